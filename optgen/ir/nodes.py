"""The IR: an optimizer's update as typed, guarded assignments over sympy expressions.

Note [IR shape]
~~~~~~~~~~~~~~~
A :class:`Program` is straight-line code: every ``if`` of the spec has been flattened into the
``guard`` of the assignments under it.  Guards are *host* conditions — flags (booleans fixed when
a variant is generated) and comparisons of hyperparameters (``weight_decay != 0``) — never
per-element conditions (those are ``where(...)`` inside an expression).  Every name has a
:class:`Role`; an assignment's value is a sympy expression over real symbols named after the spec.

After flag specialisation (:func:`optgen.passes.specialize.specialize`) no flag is left in any
guard, and the backends see one straight-line program per flag combination.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import sympy

from optgen.errors import Location
from optgen.ir.functions import SCALAR_OF_TENSOR, MachineEps, MeanDim, NewtonSchulz, NormDim
from optgen.spec.model import Spec


class Role(enum.Enum):
    FLAG = "flag"              # bool hyperparameter: specialised away at generation time
    HYPER = "hyperparameter"   # scalar hyperparameter, read from the param group each step
    PARAM = "param"            # the parameter tensor (updated in place)
    GRAD = "grad"              # the gradient (read-only for the optimizer: reassigning makes a copy)
    STATE = "state"            # persistent per-parameter tensor, like the parameter's shape
    COUNTER = "counter"        # persistent per-parameter 0-dim tensor (torch's `step`)
    TENSOR = "tensor"          # local tensor temporary
    SCALAR = "scalar"          # local scalar computed on the host

    @property
    def is_tensor(self) -> bool:
        return self in (Role.PARAM, Role.GRAD, Role.STATE, Role.TENSOR)

    @property
    def is_persistent(self) -> bool:
        return self in (Role.PARAM, Role.STATE, Role.COUNTER)


def tensor_reads(expr: sympy.Basic, roles: Mapping[str, Role]) -> set[str]:
    """The tensors an expression reads element by element: outside the scalar-valued reductions
    (norm, numel, ndim, size, machine_eps), which read a tensor but give a per-tensor scalar."""
    if expr.is_Symbol:
        role = roles.get(expr.name)
        return {expr.name} if role is not None and role.is_tensor else set()
    if isinstance(expr, SCALAR_OF_TENSOR):
        return set()
    return set().union(*(tensor_reads(a, roles) for a in expr.args))


#: what reads more of a tensor than the element being updated: a reduction, or the tensor's shape
#: (``machine_eps`` reads only the dtype)
WHOLE_TENSOR = tuple(f for f in SCALAR_OF_TENSOR if f is not MachineEps) + (NormDim, MeanDim, NewtonSchulz)


def elementwise(program: Program) -> bool:
    """Whether each element's new value depends only on the same element of the tensors (and on
    host scalars): then updating a tensor piece by piece is updating it whole, and the kernels
    may run on a DTensor's local shard (Note [Tensor subclasses] in optgen/runtime/subclasses.py).
    False for a reduction or a shape read anywhere — the rule, a state's condition — and for
    state shaped unlike the parameter (Adafactor's ``zeros_reduced``)."""
    if any(s.init == "zeros_reduced" for s in program.spec.state.values()):
        return False
    expressions = [e for a in program.body + program.preamble for e in (a.value, a.first, a.guard) if e is not None]
    expressions += list(program.state_when.values())
    return not any(isinstance(e, sympy.Basic) and e.atoms(*WHOLE_TENSOR) for e in expressions)


def is_tensor_valued(expr: sympy.Basic, roles: Mapping[str, Role]) -> bool:
    """Whether an expression is a tensor (else a scalar on the host): it reads a tensor element
    by element."""
    return bool(tensor_reads(expr, roles))


@dataclass(frozen=True)
class Assign:
    """``target = value`` when ``guard`` holds.

    ``first`` is set on the first assignment of a state declared with ``first = ...``: on the step
    that creates the state, the statement stores ``first`` instead of ``value``.
    """

    target: str
    value: sympy.Expr
    guard: sympy.Basic
    loc: Location
    text: str
    first: sympy.Expr | None = None
    products: tuple = ()   # product chains as written: ((op, factor), ...) — the order to compute them in

    def reads(self) -> set[str]:
        names = {s.name for s in self.value.free_symbols}
        if self.first is not None:
            names |= {s.name for s in self.first.free_symbols}
        names |= {s.name for s in self.guard.free_symbols}
        return {n for n in names if not n.startswith('"')}  # a choice's quoted value is not a name


@dataclass(frozen=True)
class Program:
    """One optimizer update (or one flag-specialised variant of it)."""

    spec: Spec
    roles: Mapping[str, Role]
    body: tuple[Assign, ...]
    flags: tuple[tuple[str, bool], ...] = ()        # the specialisation, () before it
    per_tensor: frozenset[str] = field(default_factory=frozenset)  # scalars that differ per tensor
    preamble: tuple[Assign, ...] = ()               # group-level scalars, hoisted out of the loop
    state_when: Mapping[str, sympy.Basic] = field(default_factory=dict)

    def with_body(self, body, **changes) -> Program:
        return replace(self, body=tuple(body), **changes)

    def role(self, name: str) -> Role:
        return self.roles[name]

    @property
    def variant_name(self) -> str:
        on = [name for name, value in self.flags if value]
        return "_".join(on) if on else "default"

    def describe(self) -> str:
        """A readable dump (`optgen show`, `--dump-ir`)."""
        lines = [f"# {self.spec.name}" + (f" [{', '.join(f'{k}={v}' for k, v in self.flags)}]" if self.flags else "")]
        roles: dict[str, list[str]] = {}
        for name, role in self.roles.items():
            roles.setdefault(role.value, []).append(name)
        for kind, names in roles.items():
            lines.append(f"#   {kind}: {', '.join(names)}")
        for a in self.preamble:
            lines.append(f"{a.target} = {a.value}    # hoisted")
        for a in self.body:
            guard = "" if a.guard == sympy.true else f"if {a.guard}: "
            first = f"    (first step: {a.first})" if a.first is not None else ""
            kind = "per-tensor" if a.target in self.per_tensor else ""
            lines.append(f"{guard}{a.target} = {a.value}{first}" + (f"    # {kind}" if kind else ""))
        return "\n".join(lines)
