"""One fused kernel, planned once: what the C (CPU) and Triton (CUDA) backends both print.

Both backends turn a specialised :class:`~optgen.ir.nodes.Program` (one flag variant, after
specialize, cse and hoist_scalars) into one kernel over every tensor of a group.  What that
kernel touches and in which order does not depend on the language, so it is computed here, once,
as a :class:`KernelPlan`; optgen/backends/c.py and optgen/backends/triton.py only print it
(Note [C kernel layout], Note [Triton kernel layout]).

Note [What the fused plan decides]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
- **Tensors.**  The parameter, its gradient and the states some statement reads or writes, in
  the order of :class:`~optgen.backends.base.KernelSignature` (the runtime's table order).  A
  state's *presence* is the disjunction of the host guards of the statements that touch it: under
  ``momentum == 0`` SGD's kernel never touches ``momentum_buffer``, so its list is not passed.
  A state is *read* when a statement loads it before any statement wrote it (or keeps its old
  value: a per-tensor guard, a ``first`` value), *written* under the host guards that assign it.
- **Guards.**  A statement's guard splits into its *host* part (hyperparameters only:
  ``weight_decay != 0``), which Triton turns into a ``tl.constexpr`` and C into a per-tensor
  ``const int`` it specialises its loops on, and its *per-tensor* part (``rho_t > 5``).  Both
  name a condition after its text (:func:`readable`): ``weight_decay_ne_0`` in C,
  ``WEIGHT_DECAY_NE_0`` as a Triton constexpr.
- **Hyperparameters.**  Every one the statements read; Triton passes only those the kernel
  computes with (a host guard is evaluated on the host), and reads those the spec allows to be
  a Tensor from the device.
- **Counters** (0-dim state such as ``step``) are loaded once per tensor and, where written,
  stored back once; a counter's new value is rounded as torch's 0-dim tensor holds it
  (:attr:`Statement.rounding`).
- **Lazy states** (``first = "grad"``) are allocated on the host before the launch; the kernel
  stores their ``first`` value on the step that creates them.
- **Scalars.**  Scalar statements run in the spec's order, in float64 (``double``), once per
  tensor; the scalar subexpressions of a tensor statement are hoisted out of the elementwise loop
  by :func:`hoist_scalars` (the one walk both backends use; each says which leaves stay inline).
- **Walks.**  A rule that reduces a tensor (``norm``) is several walks over it, scheduled by
  optgen/backends/sweeps.py (:attr:`KernelPlan.schedule`); the C backend prints them, the Triton
  backend refuses such a rule (its printer raises :class:`Unsupported` for the reduction).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import sympy

from optgen.backends.base import KernelSignature
from optgen.backends.printer import Unsupported, identifier, is_condition
from optgen.backends.printing import PythonScalarPrinter
from optgen.backends.sweeps import Schedule, schedule
from optgen.ir.nodes import Assign, Program, Role, is_tensor_valued


@dataclass(frozen=True)
class Statement:
    """One assignment of the variant, in the spec's order, with its guard split."""

    assign: Assign            # target, value, first (a lazy state's value on its first step), text
    host: sympy.Basic         # the guard's part over hyperparameters alone (true: none)
    per_tensor: sympy.Basic   # the rest, over per-tensor values (true: none)
    #: a counter's rounding (None for any other target): "in_dtype" when the update reads the
    #: counter (``mu_product *= mu`` runs on the 0-dim tensor, in its dtype), else "once" (computed
    #: in float64 and rounded when stored, as optgen.ir.interpret does)
    rounding: str | None
    later: frozenset[str]     # scalars some later statement assigns (a hoisted read must snapshot them)

    @property
    def target(self) -> str:
        return self.assign.target


@dataclass(frozen=True)
class LazyState:
    """A state created on its first step (``first = ...``), allocated by the launcher."""

    name: str
    when: str                 # whether it exists, as Python over the kernel's keyword arguments `a`
    first: sympy.Basic        # the value stored on the step that creates it


@dataclass
class KernelPlan:
    """Everything about one variant's fused kernel that is not how it is printed
    (Note [What the fused plan decides])."""

    program: Program
    roles: dict[str, Role]
    statements: list[Statement]          # preamble, then body
    states: list[str]                    # the state lists it touches, in the signature's order
    hyperparameters: list[str]           # every one a statement reads, guards included (flags not)
    kernel_hyperparameters: list[str]    # those read other than in a host guard
    tensor_hyperparameters: list[str]    # of kernel_hyperparameters: those that may be a device Tensor
    counters: list[str]                  # the counter lists it touches, in the signature's order
    written_counters: list[str]          # those it stores back
    lazy: list[LazyState]
    optional: set[str]                   # states that may not exist for a tensor (their `when`)
    presence: dict[str, sympy.Basic]     # tensor → the host guard it is touched under
    written: dict[str, sympy.Basic]      # tensor → the host guard it is written under
    read: set[str]                       # tensors loaded before (or without) being written
    #: the spec's flags (``amsgrad``, ``maximize``), in its order: host conditions of the merged
    #: program (optgen.passes.merge_variants.merged_program), passed as bools, never as numbers
    flags: list[str] = dataclasses.field(default_factory=list)

    @property
    def tensors(self) -> list[str]:
        """The tensor lists in table order: param, grad, then the states."""
        return ["param", "grad", *self.states]

    @functools.cached_property
    def schedule(self) -> Schedule:
        """The walks over each tensor (Note [Sweeps]); only the C backend asks."""
        return schedule(self.program)

    def is_host(self, expr: sympy.Basic) -> bool:
        """Whether ``expr`` reads hyperparameters (and choices) alone: known before the launch."""
        names = {s.name for s in expr.free_symbols if not s.name.startswith('"')}
        return all(self.roles.get(n) is Role.HYPER for n in names)


def split_guard(guard: sympy.Basic, roles) -> tuple[sympy.Basic, sympy.Basic]:
    """(host part, per-tensor part) of a statement's guard."""
    if guard == sympy.true:
        return sympy.true, sympy.true

    def is_host(t) -> bool:
        return all(roles.get(s.name) is Role.HYPER for s in t.free_symbols if not s.name.startswith('"'))

    terms = guard.args if isinstance(guard, sympy.And) else (guard,)
    host = [t for t in terms if is_host(t)]
    dynamic = [t for t in terms if not is_host(t)]
    for t in dynamic:
        if any(s.name.startswith('"') for s in t.free_symbols):
            raise Unsupported(f"the condition '{t}' mixes a choice with per-tensor values")
    return sympy.And(*host), sympy.And(*dynamic)


def plan_kernel(program: Program, sig: KernelSignature) -> KernelPlan:
    """The plan of ``program``'s kernel; raises :class:`Unsupported` for what no fused kernel runs."""
    roles, spec = program.roles, program.spec
    assigns = [*program.preamble, *program.body]
    later = _later_scalar_definitions(assigns, roles)
    statements = []
    for a, after in zip(assigns, later, strict=True):
        host, per_tensor = split_guard(a.guard, roles)
        rounding = None
        if roles[a.target] is Role.COUNTER:
            rounding = "in_dtype" if a.target in {s.name for s in a.value.free_symbols} else "once"
        statements.append(Statement(a, host, per_tensor, rounding, frozenset(after)))

    touched = {n for a in assigns for n in a.reads() | {a.target}}
    in_kernel = set()  # names the kernel computes with (a host guard is evaluated on the host)
    for s in statements:
        a = s.assign
        for e in [a.value, s.per_tensor] + ([a.first] if a.first is not None else []):
            in_kernel |= {x.name for x in e.free_symbols}
    flags = [h.name for h in spec.flags if roles.get(h.name) is Role.HYPER]
    hypers = [n for n, r in roles.items() if r is Role.HYPER and n in touched and n not in flags]
    kernel_hypers = [n for n in hypers if n in in_kernel]
    counters = [c for c in sig.counters if c in touched]
    states = [t for t in sig.tensors if t not in ("param", "grad") and t in touched]
    lists = ["param", "grad", *states]

    presence: dict[str, sympy.Basic] = {}
    written: dict[str, sympy.Basic] = {}
    read: set[str] = set()
    defined = {"param", "grad"}
    for s in statements:
        a = s.assign
        for n in a.reads():
            if n in lists:
                presence[n] = sympy.Or(presence.get(n, sympy.false), s.host)
                if n not in defined:
                    read.add(n)
        if a.target in lists:
            presence[a.target] = sympy.Or(presence.get(a.target, sympy.false), s.host)
            written[a.target] = sympy.Or(written.get(a.target, sympy.false), s.host)
            if s.per_tensor != sympy.true or a.first is not None:
                read.add(a.target)
            defined.add(a.target)
    presence["param"] = presence["grad"] = sympy.true
    read |= {"param", "grad"}

    firsts = {a.target: a.first for a in assigns if a.first is not None}
    lazy = []
    for t in states:
        if t not in sig.lazy:
            continue
        when = program.state_when.get(t, sympy.true)
        if any(s.name == "param" for s in when.free_symbols):
            raise Unsupported(f"state '{t}' is created depending on the parameter's shape")
        lazy.append(LazyState(t, over_arguments(when) if when != sympy.true else "True", firsts.get(t)))

    def tensor_capable(name: str) -> bool:
        return any(h.tensor and (h.name == name or name in h.names) for h in spec.hyperparameters.values())

    return KernelPlan(
        program=program, roles=dict(roles), statements=statements, states=states, hyperparameters=hypers,
        kernel_hyperparameters=kernel_hypers, tensor_hyperparameters=[h for h in kernel_hypers if tensor_capable(h)],
        counters=counters, written_counters=[c for c in counters if any(a.target == c for a in assigns)],
        lazy=lazy, optional={t for t in states if program.state_when.get(t, sympy.true) != sympy.true},
        presence=presence, written=written, read=read, flags=flags)


def _later_scalar_definitions(assigns, roles) -> list[set[str]]:
    """For each statement, the scalars some later statement assigns."""
    out: list[set[str]] = []
    later: set[str] = set()
    for a in reversed(assigns):
        out.append(set(later))
        if not roles[a.target].is_tensor:
            later.add(a.target)
    return out[::-1]


# -- shared by the printers ---------------------------------------------------------------------------

def over_arguments(condition) -> str:
    """A host condition as Python over the kernel's keyword arguments ``a`` (hyperparameters)."""
    return PythonScalarPrinter(lambda name: f'a["{name}"]')(condition)


def readable(expr) -> str:
    """The identifier a condition or scalar is named after in either kernel: ``weight_decay != 0``
    → ``weight_decay_ne_0`` ('' when it has no Python form)."""
    try:
        return identifier(PythonScalarPrinter()(expr))
    except Exception:  # noqa: BLE001 — only used to pick a readable name
        return ""


class Names:
    """The identifiers taken in one kernel.  ``reserved``: the language's keywords and the kernel
    skeleton's names; an IR name among them gets a trailing underscore (:meth:`of`)."""

    def __init__(self, reserved: frozenset[str]):
        self.reserved = reserved
        self.taken: set[str] = set()

    def of(self, name: str) -> str:
        """The kernel variable holding the IR name ``name``."""
        return name + "_" if name in self.reserved else name

    def fresh(self, base: str) -> str:
        """A new identifier from ``base`` (``eta``, then ``eta_1``, ``eta_2``, ...)."""
        if base[:2] in ("1_", "2_"):
            base = {"1": "one", "2": "two"}[base[0]] + base[1:]
        base = base if base and not base[0].isdigit() else f"s_{base}"
        base = name = self.of(base)
        k = 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def hoist_scalars(expr: sympy.Basic, roles, *, inline: Callable[[sympy.Basic], bool],
                  division: Callable[[sympy.Basic], bool], hoist: Callable[[sympy.Basic], sympy.Basic]):
    """``expr`` (a tensor statement's value) with each maximal scalar subexpression replaced by
    ``hoist(subexpression)``: a symbol naming a value computed once per tensor, before the
    elementwise loop.  ``inline(e)``: a leaf kept in the loop as it is (a small integer, a scalar
    read directly); ``division(e)``: a power ``x ** -n`` whose base is hoisted alone, so that
    ``x / scalar`` stays a division (``x * (1 / scalar)`` rounds differently)."""
    def walk(e):
        if inline(e):
            return e
        if not is_tensor_valued(e, roles) and not is_condition(e) or e.is_Number:
            if division(e):
                return sympy.Pow(walk(e.base), e.exp, evaluate=False)
            return hoist(e)
        if not e.args:
            return e
        if isinstance(e, (sympy.Add, sympy.Mul, sympy.Pow)):
            return e.func(*(walk(x) for x in e.args), evaluate=False)
        return e.func(*(walk(x) for x in e.args))
    return walk(sympy.sympify(expr))
