"""The foreach backend: torch's multi-tensor ``_foreach_*`` ops over all tensors of a group.

One function shaped like torch's ``_multi_tensor_adam`` (flag variants merged into branches); every name is a list
(one entry per tensor of one device and dtype), scalars that differ per tensor are Python lists::

    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    bias_correction1s = [1 - beta1 ** step for step in steps]

What has no multi-tensor form runs tensor by tensor, printed by the for-loop backend — as torch's
own foreach optimizers do: an op torch has no ``_foreach_`` kernel for (``where``, ``clamp``), a
statement under a per-tensor condition (RAdam's ``if rho_t > 5``), and the step that creates a
lazily created state (SGD's momentum buffer).
"""
from __future__ import annotations

import itertools

import sympy

from optgen.backends.base import counter_list, plural
from optgen.backends.forloop import ForLoopRenderer
from optgen.backends.python_base import PythonKernelBackend, PythonRenderer
from optgen.ir.guards import simplify_guard
from optgen.ir.ops import Step, TensorOp
from optgen.passes.merge_variants import Block
from optgen.passes.reuse_buffers import allocates, step_reads

#: ops with a torch._foreach_ kernel (in-place forms add "_")
FOREACH_OPS = {"add", "mul", "div", "addcmul", "addcdiv", "lerp", "maximum", "minimum", "sqrt", "rsqrt",
               "reciprocal", "neg", "abs", "sign", "exp", "log", "pow", "copy_", "clone", "sub", "clamp"}

_SPECIAL = {
    "alias": "{out} = {self}",
    # Note [Counters set from host values] in forloop.py
    "store_": "for t, value in zip({self}, {args}):\n    t.copy_(torch.as_tensor(value))",
}


class ForeachRenderer(PythonRenderer):
    name = "foreach"

    def __init__(self, program):
        super().__init__(program)
        self.per_tensor_code = ForLoopRenderer(program, index="i")  # inside `for i in ...:` blocks
        self.per_op_code = ForLoopRenderer(program, index="i", loop_locals=False)  # one op, all lists
        self.intermediates = _intermediates_to_free(list(program.steps))

    def var(self, name: str) -> str:
        return self.list_name(name)

    def is_per_tensor(self, expr) -> bool:
        return any(s.name not in self.program.group_scalars and not s.name.startswith('"')
                   for s in sympy.sympify(expr).free_symbols)

    def scalar_arg(self, expr) -> str:
        """A scalar argument: a number, or a list with one number per tensor."""
        expr = sympy.sympify(expr)
        if not self.is_per_tensor(expr):
            return self.scalar(expr)
        names = sorted(s.name for s in expr.free_symbols
                       if s.name not in self.program.group_scalars and not s.name.startswith('"'))
        if expr.is_Symbol:
            return self.list_name(expr.name)
        if len(names) == 1:
            return f"[{self.scalar(expr)} for {names[0]} in {self.list_name(names[0])}]"
        return f"[{self.scalar(expr)} for {', '.join(names)} in zip({', '.join(map(plural, names))})]"

    def op(self, op: TensorOp) -> str:
        if op.fn.rstrip("_") not in FOREACH_OPS and op.fn not in _SPECIAL:
            return self.tensor_by_tensor(op)
        tensors = [self.list_name(a) if isinstance(a, str) else self.scalar_arg(a) for a in op.args]
        kwargs = dict(op.kwargs)
        out, receiver = self.list_name(op.out), self.list_name(op.self_)
        if op.fn in _SPECIAL:
            return _SPECIAL[op.fn].format(out=out, self=receiver, args=", ".join(tensors))
        if op.fn.rstrip("_") == "clamp":  # no _foreach_clamp: clamp(x, lo, hi) = min(max(x, lo), hi)
            return self.clamp(op)
        alpha = kwargs.pop("alpha", None)
        if alpha is not None and self.is_per_tensor(alpha):
            # _foreach_add has no per-tensor alpha, and scaling the addend first would round it
            # in its own (maybe lower) precision: tensor by tensor, as torch.
            return self.tensor_by_tensor(op)
        if alpha is not None:
            kwargs["alpha"] = alpha
        if "value" in kwargs:  # addcmul/addcdiv take the scalar (or scalar list) positionally
            value = kwargs.pop("value")
            tensors.append(self.scalar_arg(value))
            if self.is_per_tensor(value) and op.in_place and not kwargs:
                # a list that holds 0-dim tensors while torch.compile traces, which no foreach
                # overload takes there: optgen.runtime.tensor_scalars's function of the same name
                # (Note [Counters under torch.compile])
                return f"foreach_{op.fn}({', '.join([receiver, *tensors])})"
        args = ", ".join([receiver, *tensors, *(f"{k}={self.scalar(v)}" for k, v in kwargs.items())])
        if op.in_place:
            return f"torch._foreach_{op.fn}({args})"
        return f"{out} = torch._foreach_{op.fn}({args})"

    def clamp(self, op: TensorOp) -> str:
        bounds = dict(op.kwargs)
        out, lines = self.list_name(op.self_), []
        for i, (bound, fn) in enumerate((b, f) for b, f in (("min", "clamp_min"), ("max", "clamp_max")) if b in bounds):
            value = self.scalar_arg(bounds[bound])
            if i == 0 and not op.in_place:
                out = self.list_name(op.out)
                lines.append(f"{out} = torch._foreach_{fn}({self.list_name(op.self_)}, {value})")
            else:
                lines.append(f"torch._foreach_{fn}_({out}, {value})")
        return "\n".join(lines)

    def tensor_by_tensor(self, op: TensorOp) -> str:
        """An op with no multi-tensor kernel, as a loop or list comprehension of the for-loop op."""
        code = self.per_op_code.op(op)
        if op.in_place:
            return f"for i in range(len(params)):\n    {code}"
        target, _, value = code.partition(" = ")
        return f"{self.list_name(op.out)} = [{value} for i in range(len(params))]"

    def scalar_step(self, step: Step) -> list[str]:
        if step.per_tensor and not self.is_per_tensor(step.expr):
            # a per-tensor name's assignment of a group value (`n = 1.0` before `if step > 1:
            # n = 1 + norm(u)`): a list of it, which later statements assign tensor by tensor
            return [f"{self.list_name(step.target)} = [{self.scalar(step.expr)}] * len(params)"]
        if step.per_tensor:
            return [f"{self.list_name(step.target)} = {self.scalar_arg(step.expr)}"]
        return [f"{step.target} = {self.scalar(step.expr)}"]

    def release(self, name: str) -> list[str]:
        return [f"del {self.list_name(name)}  # free the temporary before the next allocation"]

    def step_lines(self, step: Step) -> list[str]:
        lines = super().step_lines(step)
        names = self.intermediates.get(id(step))
        if names:
            lines.append(f"del {', '.join(map(self.list_name, names))}  # this statement's intermediates")
        return lines

    def counter_read(self, name: str) -> str:
        # Note [Counters under torch.compile] (optgen/runtime/tensor_scalars.py)
        return f"{self.list_name(name)} = [counter_value(t) for t in {counter_list(name)}]"

    def lazy_state(self, step: Step) -> list[str]:
        states = self.list_name(step.target)
        fallback = self.per_tensor_code.lazy_state(step)
        return [f"if all(t is not None for t in {states}):",
                *("    " + line for line in self.chain(step.ops) or ["pass"]),
                "else:  # the step that creates them: tensor by tensor",
                "    for i in range(len(params)):",
                *("        " + line for line in fallback)]

    # -- statements under per-tensor conditions ------------------------------------------------
    def per_tensor_guard(self, step: Step) -> bool:
        """Runs tensor by tensor: under a per-tensor condition, or a statement of several ops one
        of which has no multi-tensor kernel (Rprop's masked_fill_), whose temporaries (masks) then
        live for one tensor, not for all at once."""
        if step.kind == "release":
            return False
        no_kernel = step.kind == "tensor" and step.first_ops is None and len(step.ops) > 1 and any(
            op.fn.rstrip("_") not in FOREACH_OPS and op.fn not in _SPECIAL for op in step.ops)
        return no_kernel or self.is_per_tensor(step.guard)

    def body_items(self) -> list:
        """As the base class, but runs of statements under per-tensor conditions become one loop
        (a Block: merged with other variants' loops as a unit)."""
        lines: list = []
        steps = list(self.program.steps)
        defined = {*self.program.tensors, *self.program.counters}
        # name → the condition under which a list of that name exists: a statement under a
        # group-level `if` binds it only then (`if weight_decay != 0: us = s0s`); a loop creates
        # the lists it fills whatever its conditions (below).
        # A counter's list of host numbers (`steps`) exists only once the counter is read back.
        bound = {name: sympy.true for name in self.program.tensors}
        persistent = set(self.program.tensors) - {"grad"}

        def rebound(run) -> set[str]:  # names the loop assigns new tensors (`xs[i] = ...`)
            return {op.out for s in run for op in s.ops if op.out == s.target and not op.in_place}
        runs = [(per_tensor, list(run)) for per_tensor, run in itertools.groupby(steps, key=self.per_tensor_guard)]
        for position, (per_tensor, run) in enumerate(runs):
            local: frozenset[str] = frozenset()
            if not per_tensor:
                lines += self.guarded_blocks(run, self)
            else:
                # What the loop computes and nothing after it reads lives for one iteration
                # (RAdam's adaptive_lr): a list of them would hold every tensor's at once.
                later = [s for _, r in runs[position + 1:] for s in r]
                local = frozenset(s.target for s in run if s.kind in ("tensor", "scalar")
                                  and s.target not in defined and s.target not in _reads(later))
                renderer = ForLoopRenderer(self.program, index="i", local_names=local)
                # Lists first filled inside the loop must exist before it.
                for name in dict.fromkeys(s.target for s in run if s.kind != "release" and s.target not in local):
                    xs = self.list_name(name)
                    when = bound.get(name, sympy.false)
                    if when == sympy.false:
                        lines.append((f"{xs} = [None] * len(params)",))
                    elif name in rebound(run) and name not in persistent:
                        # a list of our own: it may be another name's (`update = momentum_buffer`)
                        lines.append((f"{xs} = list({xs})" if when == sympy.true else
                                      f"{xs} = list({xs}) if {self.scalar(when)} else [None] * len(params)",))
                    elif when != sympy.true:
                        lines.append((f"{xs} = {xs} if {self.scalar(when)} else [None] * len(params)",))
                    bound[name] = sympy.true
                lines.append(Block("for i in range(len(params)):", tuple(self.guarded_blocks(run, renderer))))
            for s in run:
                if s.kind == "counter" and id(s) in self.unread_counters:
                    continue  # no `.item()` list: nothing reads the new value
                if s.kind in ("tensor", "scalar", "counter", "read") and s.target not in local:
                    bound[s.target] = simplify_guard(sympy.Or(bound.get(s.target, sympy.false), s.guard))
            defined |= {s.target for s in run}
        return lines


def _intermediates_to_free(steps: list[Step]) -> dict[int, list[str]]:
    """A statement's own temporary lists (``_t1s``: AdaBelief's ``grad - exp_avg``) that nothing
    after it reads, by statement, where a later statement allocates: a list of parameter-sized
    tensors would otherwise live to the end of the step.  reuse_buffers frees statement targets;
    these names exist only in the op program of one statement."""
    out: dict[int, list[str]] = {}
    for i, step in enumerate(steps):
        if step.kind != "tensor" or step.first_ops is not None:
            continue
        later = steps[i + 1:]
        names = sorted({op.out for op in step.ops if op.out.startswith("_t") and op.out != step.target
                        and not op.in_place and op.fn != "alias"} - _reads(later))
        if names and any(allocates(s) for s in later):
            out[id(step)] = names
    return out


def _reads(steps) -> set[str]:
    """Every name some step reads: op operands, scalar expressions and guards."""
    names: set[str] = set()
    for step in steps:
        names |= step_reads(step)
        if step.kind in ("release", "read"):
            names.add(step.target)
    return names


class ForeachBackend(PythonKernelBackend):
    name = "foreach"
    multi_tensor = True
    summary = "foreach implementation: torch `_foreach_*` ops over every tensor of one device and dtype"
    renderer = ForeachRenderer


BACKEND = ForeachBackend()
