"""The differentiable backend: the for-loop kernel, out of place, for ``differentiable=True``.

Note [differentiable=True]
~~~~~~~~~~~~~~~~~~~~~~~~~~
With ``differentiable=True`` autograd records the step, so a loss computed from the updated
parameters can be differentiated w.r.t. the parameters, gradients and state before it (and a
Tensor ``lr``).  The for-loop kernel cannot be recorded as it is: it updates its own temporaries
in place (``exp_avg_sq.sqrt().div_(...)`` overwrites what ``sqrt`` saved for backward), writes
through ``out=`` and reads counters as numbers (``step_t.item()``).  This backend prints the same
op program, op for op, with three changes:

- every op runs out of place (``exp_avg = exp_avg.lerp(grad, 1 - beta1)``), so the numbers are
  the for-loop kernel's — a differentiable step moves the parameters exactly as a plain one —
  and at the end of each iteration the new state tensors *replace* the old ones in the lists
  (which the runtime stores back), while the parameter, the one tensor the user holds, is
  read as a copy and written in place at the end (``params[i].copy_(param)``), as torch's
  ``param.addcdiv_`` writes it;
- a counter that carries a value rather than a count (NAdam's ``mu_product``, ASGD's ``eta``)
  stays a 0-dim tensor, so gradients flow through it (read in float64, as ``.item()`` reads
  it); a counter that only counts (``step``: every update is ``+ 1``) is read as a number, as
  torch's single-tensor paths read it;
- a hyperparameter that may be a Tensor (``tensor = true`` in the spec: ``lr``) arrives as given,
  and so do the scalars computed from it or from a tensor counter.  Such a scalar cannot be the
  ``alpha=``/``value=`` of ``add``/``addcmul``/``addcdiv`` (torch takes a number there), so those
  ops call optgen.runtime.tensor_scalars' functions of the same name (the fused op for a number,
  separate recorded ops for a tensor), as ``sqrt``/``exp``/``log`` of a scalar do.

torch's Adam/AdamW differentiable path computes step-derived scalars as tensors of the step's
dtype (float32 by default: its capturable algebra); this kernel computes them as the plain step
does, in float64 — see README "Optimizers and implementations".
"""
from __future__ import annotations

import sympy

from optgen.backends.base import counter_list, kernel_signature, plural
from optgen.backends.forloop import _SPECIAL, ForLoopRenderer
from optgen.backends.printing import TensorScalarPrinter
from optgen.backends.python_base import PythonKernelBackend
from optgen.ir.functions import SCALAR_OF_TENSOR, Norm
from optgen.ir.ops import OpProgram, Step, TensorOp
from optgen.passes import Compiled

_OUT_OF_PLACE = {
    "maximum_": "{self} = torch.maximum({self}, {args})",
    "minimum_": "{self} = torch.minimum({self}, {args})",
    # Note [Counters set from host values]: rounded through the default dtype, as torch stores it;
    # copy=True: a Tensor lr stored as ASGD's eta is a new tensor, never the user's lr itself.
    "store_": "{self} = torch.as_tensor({args}).to({self}.dtype, copy=True)",
    # a tensor filled with a host value, which may be a Tensor lr (full_like takes numbers only)
    "fill_": "{self} = torch.zeros_like({self}).add_({args})",
    "full_like": "{out} = torch.zeros_like({self}).add_({args})",
    "copy_": "{self} = {args}.to({self}.dtype, copy=True)",
}

#: ops whose scalar keyword torch only takes as a number: where it may be a tensor, the function
#: of optgen.runtime.tensor_scalars of the same name (the fused op for a number)
TENSOR_SCALAR_OPS = ("add", "addcmul", "addcdiv")


class ScalarPrinter(TensorScalarPrinter):
    """Host scalars that may be 0-dim tensors (TensorScalarPrinter), and a norm stays a tensor (no
    ``.item()``)."""

    def print_reduction(self, expr) -> str:
        if isinstance(expr, Norm):
            return f"{self.print(expr.args[0])}.norm()"
        return super().print_reduction(expr)


def is_count(program: OpProgram, counter: str) -> bool:
    """A counter every update of which adds a constant to it (``step_t.add_(1)``)."""
    ops = [op for s in program.steps if s.kind == "counter" and s.target == counter for op in s.ops]
    return bool(ops) and all(op.fn == "add_" and not op.kwargs and len(op.args) == 1
                             and sympy.sympify(op.args[0]).is_number for op in ops)


class DifferentiableRenderer(ForLoopRenderer):
    name = "differentiable"
    stores_created_state = False  # loop_footer stores every state
    # Its counters and norms are tensors eagerly too, and its branches are decided on them as the
    # plain kernel's are (Note [Branches on traced scalars] is for the plain kernels)
    traced_branches = False

    def __init__(self, program: OpProgram, tensor_hypers: frozenset[str]):
        super().__init__(program)
        self.tensor_counters = {c for c in program.counters if not is_count(program, c)}
        # Names that may hold a 0-dim tensor at run time, in program order.
        self.maybe_tensor = set(tensor_hypers) | self.tensor_counters | {f"{c}_t" for c in program.counters}
        for step in (*program.preamble, *program.steps):
            if step.kind == "scalar" and self._reads_tensor(step.expr):
                self.maybe_tensor.add(step.target)

    def _reads_tensor(self, expr) -> bool:
        expr = sympy.sympify(expr)
        return any(s.name in self.maybe_tensor for s in expr.free_symbols) \
            or any(isinstance(e, Norm) for e in sympy.preorder_traversal(expr))

    def scalar(self, expr) -> str:
        return ScalarPrinter(self.scalar_name, self.defined_at)(expr)

    def op(self, op: TensorOp) -> str:
        fields = dict(out=self.var(op.out), self=self.var(op.self_), args=self.args(op))
        if op.fn in _OUT_OF_PLACE:
            return _OUT_OF_PLACE[op.fn].format(**fields)
        if op.fn in _SPECIAL:
            return _SPECIAL[op.fn].format(**fields)
        if self.tensor_scalar(op):
            tensors = ", ".join(self.var(a) for a in op.tensor_args())
            return f"{fields['out']} = {op.fn.rstrip('_')}({fields['self']}, {tensors}, {self.scalar(op.kwargs[0][1])})"
        if self.tensor_bounds(op):  # torch's clamp takes bounds all numbers or all tensors
            bounds = ", ".join(f"{k}={self.scalar(v)}" for k, v in op.kwargs)
            return f"{fields['out']} = clamp({fields['self']}, {bounds})"
        return "{out} = {self}.{fn}({args})".format(fn=op.fn.rstrip("_"), **fields)

    def tensor_scalar(self, op: TensorOp) -> bool:
        """Whether the op's ``alpha=``/``value=`` may be a tensor (see TENSOR_SCALAR_OPS)."""
        return op.fn.rstrip("_") in TENSOR_SCALAR_OPS and len(op.kwargs) == 1 \
            and op.kwargs[0][0] in ("alpha", "value") and self._reads_tensor(op.kwargs[0][1])

    def tensor_bounds(self, op: TensorOp) -> bool:
        """Whether a clamp's ``min=``/``max=`` may be a tensor (Rprop's Tensor step_size_min)."""
        return op.fn.rstrip("_") == "clamp" and not op.tensor_args() \
            and any(self._reads_tensor(v) for _, v in op.kwargs)

    def fluent(self, op: TensorOp, previous: TensorOp | None = None) -> str | None:
        """An op on the result of the op before it continues the line: ``x = x.mul(b).add_(y)``.
        It runs in place when that is safe for autograd (Note [In place under autograd])."""
        if not op.in_place or op.fn in _SPECIAL or op.fn in _OUT_OF_PLACE or self.tensor_scalar(op) \
                or self.tensor_bounds(op):
            return None
        fn = op.fn.rstrip("_")
        return f".{fn}{'_' if previous is not None and self.in_place_ok(op, previous) else ''}({self.args(op)})"

    # Note [In place under autograd]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # Every state and the parameter are updated out of place (ops of earlier steps may have saved
    # their old values), but a chain's later ops act on the tensor its first op just created, and
    # may overwrite it when nothing autograd saved needs its old value: the op creating it does
    # not save its result (sqrt, exp, pow do), and the op itself needs neither its input nor a
    # tensor scalar for its backward.  Each op not run in place allocates: on CPU an allocation
    # of a large tensor is fresh pages, a cost out of proportion to the arithmetic.
    SAVES_RESULT = frozenset({"sqrt", "exp", "pow", "rsqrt", "reciprocal", "tanh", "sigmoid"})
    #: ops whose backward needs nothing of ``self`` (given number scalars; mul/div by a number only)
    NEEDS_NOTHING_OF_SELF = frozenset({"add", "sub", "addcmul", "addcdiv", "lerp", "neg", "masked_fill", "mul", "div"})

    def in_place_ok(self, op: TensorOp, previous: TensorOp) -> bool:
        fn = op.fn.rstrip("_")
        if previous.fn.rstrip("_") in self.SAVES_RESULT or fn not in self.NEEDS_NOTHING_OF_SELF:
            return False
        scalars = [a for a in op.args if not isinstance(a, str)] + [v for _, v in op.kwargs]
        if any(self._reads_tensor(v) for v in scalars):
            return False
        return fn not in ("mul", "div") or not op.tensor_args()

    def chainable(self, op: TensorOp) -> bool:
        return op.fn not in _OUT_OF_PLACE and super().chainable(op)

    def step_lines(self, step: Step) -> list[str]:
        lines = super().step_lines(step)
        if step.kind == "counter" and step.first_ops is None and any(
                self._reads_tensor(v) for op in step.ops if op.fn != "store_"  # (stores in its dtype)
                for v in (*(a for a in op.args if not isinstance(a, str)), *(v for _, v in op.kwargs))):
            # A reduction of a tensor (`v = v + norm(grad)`, or through a local: `gn = norm(grad)`,
            # `v = beta2 * v + gn ** 2`) is a 0-dim tensor of the parameter's dtype: the
            # out-of-place update promotes the counter to it, where every other backend stores
            # into the counter's own dtype (torch's `step` dtype, float32).
            name = step.target
            keep = f"{name}_t = {name}_t.to({self.list_name(name + '_t')}[i].dtype)"
            lines.insert(len(lines) - (id(step) not in self.unread_counters), keep)
        return lines

    def counter_read(self, name: str) -> str:
        if name in self.tensor_counters:  # in float64, as the plain kernel's .item() reads it
            return f"{name} = {name}_t.double()"
        return super().counter_read(name)

    def loop_header(self) -> list[str]:
        """As the for-loop's, reading a copy of the parameter where an op may save it for
        backward (``param.mul(1 - lr * weight_decay)`` with a Tensor lr): the user's tensor is
        written at the end, and what autograd saved must not change (torch's differentiable
        paths clone for the same reason)."""
        return ["param = param.clone()"] * self.saves_param() + super().loop_header()

    def saves_param(self) -> bool:
        """Whether some op may save the parameter (or a name bound to it) for backward: anything
        but it being the receiver, or the added tensor, of an op that needs nothing of it."""
        names = {"param"}
        for step in self.program.steps:
            if step.kind == "scalar" and step.expr is not None and any(
                    isinstance(e, SCALAR_OF_TENSOR) and sympy.Symbol("param", real=True) in e.free_symbols
                    for e in sympy.preorder_traversal(sympy.sympify(step.expr))):
                return True  # norm(param): its backward reads the parameter
            for op in (*step.ops, *(step.first_ops or ())):
                fn = op.fn.rstrip("_")
                if fn == "alias" and op.self_ in names:
                    names.add(op.out)
                    continue
                if not names & op.reads():
                    continue
                scalars = [a for a in op.args if not isinstance(a, str)] + [v for _, v in op.kwargs]
                number_scalars = not any(self._reads_tensor(v) for v in scalars)
                # (add/addcmul/addcdiv with a tensor scalar add a product of the others: still nothing of self)
                receiver = op.self_ in names and not names & set(op.tensor_args()) and (
                    fn in ("add", "sub", "addcmul", "addcdiv", "neg")
                    or fn in self.NEEDS_NOTHING_OF_SELF and number_scalars
                    and (fn not in ("mul", "div") or not op.tensor_args()))
                added = fn in ("add", "sub") and number_scalars and op.self_ not in names
                if not (receiver or added or fn in ("clone", "copy", "full_like")):
                    return True
        return False

    def loop_footer(self) -> list[str]:
        """The new state replaces the old in the lists; the parameter is written in place."""
        states = [t for t in self.program.tensors if t not in ("param", "grad")]
        lines = [f"{plural(t)}[i] = {t}" for t in states]
        lines += [f"{counter_list(c)}[i] = {c}_t" for c in self.program.counters]
        return [*lines, "params[i].copy_(param)"]


class DifferentiableBackend(PythonKernelBackend):
    name = "differentiable"
    template = "forloop"
    summary = "for-loop implementation for differentiable=True: out of place, so autograd records the step"

    def tensor_scalars(self, compiled: Compiled) -> tuple[str, ...]:
        """Every hyperparameter the update reads arrives as given: a Tensor one keeps its graph
        (hypergradients, docs/hyperparameters.md), a number stays a number."""
        return tuple(kernel_signature(compiled).scalars)

    def renderer_for(self, compiled: Compiled, program: OpProgram) -> DifferentiableRenderer:
        return DifferentiableRenderer(program, frozenset(self.tensor_scalars(compiled)))

    def unsupported(self, compiled: Compiled) -> str | None:
        if "differentiable" not in compiled.spec.group_keys:
            return f"{compiled.spec.name} has no differentiable option"
        return None


BACKEND = DifferentiableBackend()
