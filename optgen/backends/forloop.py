"""The for-loop backend: one parameter at a time, torch tensor methods, in place.

It emits one function shaped like torch's ``_single_tensor_adam`` (the flags' variants merged into
``if amsgrad:`` branches by optgen.passes.merge_variants)::

    for i, param in enumerate(params):
        grad = grads[i]
        exp_avg = exp_avgs[i]
        ...
        # exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * conj(grad)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

It is the readable reference implementation and, on CPU, the fastest of torch's two non-fused
paths (torch's foreach walks every tensor once per op, evicting the cache between ops).
"""
from __future__ import annotations

from itertools import pairwise

from optgen.backends.base import counter_list, kernel_signature, plural
from optgen.backends.python_base import PythonKernelBackend, PythonRenderer
from optgen.ir.ops import OpProgram, Step, TensorOp
from optgen.passes import Compiled
from optgen.passes.merge_variants import Block

# op name → how it prints, given the receiver, the argument list and the output name
_SPECIAL = {
    "alias": "{out} = {self}",
    "clone": "{out} = {self}.clone()",
    "neg": "{out} = -{self}",
    "maximum_": "torch.maximum({self}, {args}, out={self})",
    "minimum_": "torch.minimum({self}, {args}, out={self})",
    "where": "{out} = torch.where({self}, {args})",
    "store_": "{self}.copy_(torch.as_tensor({args}))",  # Note [Counters set from host values]
    "full_like": "{out} = torch.full_like({self}, {args})",
    "newton_schulz": "{out} = newton_schulz({self}, {args})",
}


# Note [Counters set from host values]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A counter assigned a host value (ASGD's eta and mu) is stored as torch stores it:
# ``eta.copy_(torch.as_tensor(value))``, which rounds to the default dtype on the way.  After
# load_state_dict has cast such a counter to a float64 parameter's dtype, fill_(value) would keep
# more digits than torch does, and a torch checkpoint would not continue bit for bit.


class ForLoopRenderer(PythonRenderer):
    name = "forloop"
    #: a lazily created state tensor is handed back in its list as it is created (the
    #: differentiable renderer stores every state at the end of the iteration instead)
    stores_created_state = True

    def __init__(self, program: OpProgram, index: str | None = None, loop_locals: bool = True,
                 local_names: frozenset = frozenset()):
        super().__init__(program)
        self.local_names = local_names  # names that live for one iteration of the caller's loop
        # With ``index`` set (foreach's per-tensor code), variables are list elements; a
        # statement's own intermediates (_t0, ...) are too, unless the code runs inside one loop
        # iteration (``loop_locals``) where they live for that iteration only.
        self.index = index
        self.loop_locals = loop_locals
        self.inlined: dict[str, str] = {}  # temporary → the expression written in its place

    def var(self, name: str) -> str:
        if name in self.inlined:
            return self.inlined[name]
        if name in self.redirect:  # Note [Branches on traced scalars] in python_base.py
            return self.redirect[name]
        if not self.index or (self.loop_locals and name.startswith("_t")) or name in self.local_names:
            return name
        return f"{self.list_name(name)}[{self.index}]"

    def scalar_name(self, name: str) -> str:
        per_tensor = name not in self.program.group_scalars and not name.startswith('"') \
            and name not in self.local_names
        return f"{self.list_name(name)}[{self.index}]" if self.index and per_tensor else name

    def args(self, op: TensorOp) -> str:
        parts = [self.var(a) if isinstance(a, str) else self.scalar(a) for a in op.args]
        parts += [f"{k}={self.scalar(v)}" for k, v in op.kwargs]
        return ", ".join(parts)

    def op(self, op: TensorOp) -> str:
        fields = dict(out=self.var(op.out), self=self.var(op.self_), args=self.args(op))
        if op.fn in _SPECIAL:
            return _SPECIAL[op.fn].format(**fields)
        if op.in_place:
            return "{self}.{fn}({args})".format(fn=op.fn, **fields)
        return "{out} = {self}.{fn}({args})".format(fn=op.fn, **fields)

    def chain(self, ops: tuple[TensorOp, ...]) -> list[str]:
        """As the base class, and a temporary that only the next line's first op reads is written
        into it, as people write it: ``torch.maximum(exp_inf, grad.abs().add_(eps), out=exp_inf)``,
        ``sign.masked_fill_(sign.gt(0), etaplus)``."""
        units: list[list[TensorOp]] = []  # the ops of one line: an op, then the ops chained to it
        for op in ops:
            last = units[-1][-1] if units else None
            if last is not None and self.fluent(op) and op.self_ == last.out and self.chainable(last):
                units[-1].append(op)
            else:
                units.append([op])
        lines: list[str] = []
        for k, unit in enumerate(units):
            temp = self._inlinable(units, k)
            if temp is not None:
                self.inlined[temp] = lines.pop().partition(" = ")[2]
            tails = [self.fluent(op, previous) for previous, op in pairwise(unit)]
            assert None not in tails, unit  # a unit is an op and the ops fluent() continues it with
            text = self.op(unit[0]) + "".join(t for t in tails if t is not None)
            if temp is not None:
                del self.inlined[temp]
            lines += text.split("\n")
            if unit[0].note:  # Note [Value semantics]: why a clone is there
                lines[-1] += f"  # {unit[0].note}"
        return lines

    def _inlinable(self, units: list[list[TensorOp]], k: int) -> str | None:
        """The temporary the line before ``units[k]`` creates, if ``units[k]``'s first op is its only
        reader (and reads it as an argument, so moving it there keeps the order of evaluation)."""
        if k == 0 or self.loop_locals is False and self.index:
            return None
        before, first = units[k - 1], units[k][0]
        temp = before[0].out
        if not temp.startswith("_t") or before[0].in_place or before[0].fn in _SPECIAL \
                or any(op.out != temp for op in before) or first.self_ == temp:
            return None
        readers = [op for unit in units[k:] for op in unit for name in (op.self_, *op.tensor_args()) if name == temp]
        return temp if readers == [first] else None

    def fluent(self, op: TensorOp, previous: TensorOp | None = None) -> str | None:
        if op.in_place and op.fn not in _SPECIAL:
            return f".{op.fn}({self.args(op)})"
        return None

    def chainable(self, op: TensorOp) -> bool:
        return (op.fn not in _SPECIAL or op.fn == "clone") and not op.note  # the note ends the line

    def scalar_step(self, step: Step) -> list[str]:
        target = self.scalar_name(step.target) if step.per_tensor else step.target
        return [f"{target} = {self.scalar(step.expr)}"]

    def counter_read(self, name: str) -> str:
        # Note [Counters under torch.compile] (optgen/runtime/tensor_scalars.py)
        return f"{self.scalar_name(name)} = counter_value({self.var(name + '_t')})"

    def lazy_state(self, step: Step) -> list[str]:
        name = step.target
        assert step.first_ops is not None, step  # called for lazily created state only
        first = self.chain(step.first_ops)
        if not self.index and self.stores_created_state:  # a new tensor: the caller stores it in the state
            first.append(f"{self.list_name(name)}[i] = {name}")
        update = self.chain(step.ops) or ["pass"]  # `anchor = anchor`: kept as created
        return [f"if {self.var(name)} is None:", *("    " + line for line in first),
                "else:", *("    " + line for line in update)]

    # -- the function ------------------------------------------------------------------------------
    def loop_header(self) -> list[str]:
        """Binding each tensor of this iteration to its name (torch's `exp_avg = exp_avgs[i]`)."""
        lines = [f"{t} = {plural(t)}[i]" for t in self.program.tensors if t != "param"]
        lines += [f"{c}_t = {counter_list(c)}[i]" for c in self.program.counters]
        return lines

    def loop_footer(self) -> list[str]:
        return []

    def function_items(self) -> list:
        """The preamble, then one loop over the tensors: torch's ``_single_tensor_adam``."""
        loop = [*((line,) for line in self.loop_header()), *self.body_items(),
                *((line,) for line in self.loop_footer())]
        return [*((line,) for line in self.preamble()), Block("for i, param in enumerate(params):", tuple(loop))]


def describe_ops(program: OpProgram) -> str:
    """The op program as for-loop code (for `optgen show --dump-ir select_ops`)."""
    r = ForLoopRenderer(program)
    return "\n".join([*r.preamble(), "# for each tensor:", *r.loop_header(), *r.body()])


class ForLoopBackend(PythonKernelBackend):
    name = "forloop"
    summary = "for-loop implementation: one parameter at a time, torch ops, in place"
    renderer = ForLoopRenderer

    def tensor_scalars(self, compiled: Compiled) -> tuple[str, ...]:
        """Note [A Tensor lr in the for-loop kernel]: torch's single-tensor paths keep a Tensor
        ``lr`` a 0-dim tensor (``_to_scalar``), so what they derive from it on the host (Muon's
        ``lr * ratio``, AdamW's ``1 - lr * weight_decay``, Adam's ``lr / bias_correction1``) is
        computed in the lr's dtype — float32 for ``torch.tensor(0.01)``, also on float64
        parameters — and the torch ops take it as ``alpha=``/``value=``.  This kernel takes it
        the same way, as given, so it rounds where torch rounds; a number lr stays a number.
        Only ``lr``: torch turns other Tensor hyperparameters (Adam's betas) into numbers here."""
        lr = compiled.spec.hyperparameters.get("lr")
        return ("lr",) if lr is not None and lr.tensor and "lr" in kernel_signature(compiled).scalars else ()


BACKEND = ForLoopBackend()
