"""The tensor-op IR: what the Python backends print, one op per torch call.

Note [Tensor ops]
~~~~~~~~~~~~~~~~~
:func:`optgen.passes.select_ops.select_ops` turns each tensor assignment of a :class:`Program`
into torch-shaped operations — ``exp_avg_sq.mul_(beta2)``, ``.addcmul_(grad, grad, value=...)``,
``param.addcdiv_(exp_avg, denom, value=-step_size)`` — so the for-loop and foreach renderers
differ only in how they print an op (``x.mul_(c)`` vs ``torch._foreach_mul_(xs, c)``).

An op ``out = self.fn(*args, **kwargs)`` creates a new tensor; a name ending in ``_`` mutates
``self`` in place (then ``out == self``).  ``alias`` binds a name to an existing tensor without a
copy; :func:`optgen.passes.preserve_values.preserve_values` turns an alias into a ``clone`` where an
in-place op would otherwise change the value it names (Note [Value semantics]).  Scalar arguments
stay sympy expressions until a backend prints them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy

from optgen.errors import Location

Arg = "str | sympy.Expr"  # a tensor variable name, or a scalar expression


@dataclass(frozen=True)
class TensorOp:
    out: str
    fn: str
    self_: str
    args: tuple = ()
    kwargs: tuple[tuple[str, sympy.Expr], ...] = ()
    in_place_ok: bool = True   # False when an operand broadcasts self to a larger shape
    note: str = ""             # why the op is there, printed after it (Note [Value semantics])

    @property
    def in_place(self) -> bool:
        return self.fn.endswith("_")

    def tensor_args(self) -> list[str]:
        return [a for a in self.args if isinstance(a, str)]

    def reads(self) -> set[str]:
        return {self.self_, *self.tensor_args()}

    def with_fn(self, fn: str) -> TensorOp:
        return replace(self, fn=fn)


@dataclass(frozen=True)
class Step:
    """The ops of one spec statement, with the statement kept for the comment above them.

    kind: ``"tensor"`` (ops), ``"scalar"`` (``target = expr`` on the host), ``"counter"`` (ops on
    a 0-dim state tensor, then its value read back as ``target``), ``"read"`` (a counter's value
    read before its update), ``"release"`` (a temporary freed after its last use).
    ``first_ops`` (lazily created state): what runs instead of ``ops`` on the step that creates it.
    """

    kind: str
    target: str
    guard: sympy.Basic
    text: str
    loc: Location
    ops: tuple[TensorOp, ...] = ()
    expr: sympy.Expr | None = None
    first_ops: tuple[TensorOp, ...] | None = None
    per_tensor: bool = False


@dataclass(frozen=True)
class OpProgram:
    """A specialised program after op selection: what a Python backend renders."""

    name: str                         # variant name, e.g. "amsgrad_maximize" or "default"
    flags: tuple[tuple[str, bool], ...]
    preamble: tuple[Step, ...]        # group-level scalars
    steps: tuple[Step, ...]
    tensors: tuple[str, ...]          # per-tensor inputs in signature order: param, grad, states
    counters: tuple[str, ...]
    scalars: tuple[str, ...]          # hyperparameters the kernel takes
    lazy_states: tuple[str, ...]      # states created on their first step (may be None on entry)
    group_scalars: frozenset[str] = frozenset()  # names with one value per param group; all
                                                 # others (tensors, counters, ...) vary per tensor
