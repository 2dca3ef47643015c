"""Scheduling a rule that reduces tensors into sweeps over them, for the fused backends.

Note [Sweeps]
~~~~~~~~~~~~~
An elementwise rule is one pass over each tensor.  A rule that reduces a tensor (``norm(update)``,
Adafactor's ``norm_dim(grad, -1)``) needs the whole reduction before a later statement can read
it, so its kernel walks the tensor several times.  This module decides what each walk computes;
the C backend prints it.

Extents.  Every tensor of a step is viewed as ``(B, M, C)``: ``C`` its last dimension, ``M`` the
one before (1 for a vector), ``B`` the product of the rest.  A value's *extent* is the axes it
keeps: the parameter's is FULL; ``norm_dim(x, -1)`` keeps (b, m) (ROWS), ``norm_dim(x, -2)``
keeps (b, c) (COLS), ``mean_dim`` of ROWS over -2 keeps (b) (BATCH), ``norm(x)`` keeps nothing
(a per-tensor scalar).  An expression's extent is the union of its operands' (broadcasting).

Levels.  Reductions are lifted out of the statements that contain them (a fresh name each).
A name's *level* is the number of whole-tensor walks that must finish before its value exists:
0 for what the step starts with, ``1 + level(operand)`` for a reduction of a FULL operand (it is
accumulated during walk ``level``), and for everything else the largest level it reads
(a reduction of a smaller extent is a short loop of its own, between walks).

Walks.  With S the largest level, the kernel makes S + 1 walks over the tensor: walk k
(1 <= k <= S) recomputes, from what is in memory, every FULL statement of level < k and
accumulates the reductions of level k; the last walk recomputes every FULL statement and stores
the parameter and FULL states.  Recomputing costs arithmetic, never a temporary tensor.

Early stores.  A FULL state assigned once, whose old value no earlier statement reads, is stored
by the first walk that computes it (for a reduction there), and later walks load its new value
instead of recomputing it (optgen/backends/c.py, ``early_stores``).  That costs no bytes (the
write moves to an earlier walk; a later walk loads the new value instead of the old one) and
saves the reads only its statement needed, and its arithmetic: Lamb's moments are stored by the
walk that sums the norms, so its last walk reads the parameter and the moments, not the gradient
(40 bytes per float32 parameter instead of 44).  A state whose old value an earlier statement
reads stays in the last walk (a later walk recomputing that statement would read the new value).
The walk that stores early rounds the value to the storage type first (``to_compute(from_compute
(x))``: bfloat16 and float16; the identity for float and double), so its sums see the value later
walks load, as the for-loop's ops see the state they stored.

The fewest walks.  A whole-tensor reduction that a later statement of the same tensor reads is
one more walk, whatever is stored: Lamb's trust ratio needs norm(update) before any element of
the parameter is written, so two walks (the first reads param, grad and the moments and stores
the moments, the second reads param and the moments and stores param).  Adafactor's matrices
need three: the update needs every column's sum of grad ** 2 (walk 1, with norm(param) and the
row sums), norm(update) needs the update (walk 2), the parameter needs norm(update) (walk 3) —
three reads of the gradient and two of the parameter, 24 bytes per float32 element against
the single walk's 12, and no temporary tensor (storing the update in walk 2 would cost a write
and a read in place of walk 3's read of the gradient).

Between walks run, in the spec's order, the per-tensor scalars and the small-extent statements
(ROWS, COLS, BATCH: O(M + C) work) of the level just reached.  A small state is written where
its statement runs, so one read before a later write of it is refused (never the case in the
specs here).  Without reductions this is the single walk of Note [C kernel layout].
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy

from optgen.backends.printer import Unsupported
from optgen.ir.functions import SCALAR_OF_TENSOR, MeanDim, Norm, NormDim
from optgen.ir.nodes import Assign, Program, Role


@dataclass(frozen=True)
class Extent:
    """The axes of the ``(B, M, C)`` view a value keeps."""

    b: bool
    m: bool
    c: bool

    def __or__(self, other: Extent) -> Extent:
        return Extent(self.b or other.b, self.m or other.m, self.c or other.c)

    def __str__(self) -> str:
        return {FULL: "full", ROWS: "rows", COLS: "cols", BATCH: "batch", SCALAR: "scalar"}.get(self, repr(self))


FULL, ROWS, COLS, BATCH, SCALAR = (Extent(True, True, True), Extent(True, True, False), Extent(True, False, True),
                                   Extent(True, False, False), Extent(False, False, False))


@dataclass(frozen=True)
class Reduction:
    """``name = kind(operand)`` over the axes ``operand``'s extent keeps and ``extent`` drops."""

    name: str
    kind: str              # "norm" (square root of the sum of squares) or "mean"
    operand: sympy.Expr
    source: Extent         # the operand's extent
    extent: Extent         # the result's
    guard: sympy.Basic     # the guard of the statement it was lifted from
    text: str


@dataclass(frozen=True)
class Item:
    """One statement or lifted reduction, in the spec's order, with where it runs."""

    node: Assign | Reduction
    level: int
    extent: Extent


@dataclass
class Schedule:
    items: list[Item]
    extents: dict[str, Extent]   # every tensor name (params, states, locals, reduction results)
    roles: dict[str, Role]       # the program's, plus the reductions' names
    walks: int                   # S: the walks that accumulate reductions (the last walk not counted)


def extent_of_expression(expr, extents: dict[str, Extent]) -> Extent:
    """The extent of ``expr`` (reductions already lifted into names), ``extents`` those of the names."""
    if expr.is_Symbol:
        return extents.get(expr.name, SCALAR)
    if isinstance(expr, SCALAR_OF_TENSOR):  # numel(grad), size(grad, -1): per-tensor numbers
        return SCALAR
    out = SCALAR
    for x in expr.args:
        out = out | extent_of_expression(x, extents)
    return out


def _dropped(extent: Extent, dim: int) -> Extent:
    if dim == -1 and extent.c:
        return Extent(extent.b, extent.m, False)
    if dim == -2 and extent.m:
        return Extent(extent.b, False, extent.c)
    raise Unsupported(f"a reduction over dimension {dim} of a {extent} value (the fused kernels reduce "
                      "over the last two dimensions)")


def schedule(program: Program) -> Schedule:
    roles = dict(program.roles)
    extents: dict[str, Extent] = {}
    for name, role in roles.items():
        if role in (Role.PARAM, Role.GRAD):
            extents[name] = FULL
        elif role is Role.STATE:
            state = program.spec.state[name]
            init = state.init
            if init == "zeros_reduced":  # zeros_reduced(param, dim): dim kept with size 1
                extents[name] = _dropped(FULL, state.reduced_dim)
            elif init in ("zeros", "full", "first"):
                extents[name] = FULL
            else:
                raise Unsupported(f"state '{name}' is not shaped like the parameter ({init})")
    level: dict[str, int] = {}
    items: list[Item] = []
    taken = set(roles)
    small_state_read: set[str] = set()  # small states read so far (a later write would race the read)

    def small_states(names) -> set[str]:
        return {n for n in names if roles.get(n) is Role.STATE and extents[n] != FULL}

    def extent_of(expr) -> Extent:
        return extent_of_expression(expr, extents)

    def level_of(expr) -> int:
        return max((level.get(s.name, 0) for s in expr.free_symbols), default=0)

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    def lift(expr, a: Assign):
        """``expr`` with every reduction replaced by its name (innermost first)."""
        if not expr.args:
            return expr
        args = [lift(x, a) for x in expr.args]
        if isinstance(expr, (Norm, NormDim, MeanDim)):
            operand = args[0]
            source = extent_of(operand)
            if isinstance(expr, Norm):
                kind, result, suffix, text = "norm", SCALAR, "", f"norm({operand})"
            else:
                dim = int(args[1])
                kind = "norm" if isinstance(expr, NormDim) else "mean"
                result, suffix, text = _dropped(source, dim), f"_dim{-dim}", f"{kind}_dim({operand}, {dim})"
            if source == SCALAR:
                raise Unsupported(f"{expr}: a reduction of a per-tensor scalar")
            base = operand.name if operand.is_Symbol else "value"
            name = fresh(f"{kind}{suffix}_{base}")
            roles[name] = Role.SCALAR if result == SCALAR else Role.TENSOR
            if result != SCALAR:
                extents[name] = result
            level[name] = max(level_of(operand), level_of(a.guard)) + (1 if source == FULL else 0)
            small_state_read.update(small_states(s.name for s in operand.free_symbols))
            items.append(Item(Reduction(name, kind, operand, source, result, a.guard, text), level[name],
                              source))
            return sympy.Symbol(name, real=True)
        return expr.func(*args) if args != list(expr.args) else expr

    for a in [*program.preamble, *program.body]:
        lifted = replace(a, value=lift(a.value, a), first=lift(a.first, a) if a.first is not None else None)
        reads, target, role = lifted.reads(), a.target, roles[a.target]
        if role is Role.STATE and extents[target] != FULL and target in small_state_read:
            raise Unsupported(f"state '{target}' is read before it is written again (a small state is "
                              "written where its statement runs)")
        small_state_read |= small_states(reads) - {target}
        guarded = a.guard != sympy.true
        ext = SCALAR
        if role.is_tensor:
            ext = extent_of(lifted.value) | (extents.get(target, SCALAR) if guarded else SCALAR)
            if role is not Role.TENSOR:  # the parameter's and a state's shape are fixed
                if ext | extents[target] != extents[target]:
                    raise Unsupported(f"'{target}' ({extents[target]}) is assigned a {ext} value")
                ext = extents[target]
            extents[target] = extents.get(target, SCALAR) | ext
        level[target] = max([level.get(n, 0) for n in reads] + [level.get(target, 0) if guarded else 0])
        items.append(Item(lifted, level[target], ext))
    walks = max((i.level for i in items if isinstance(i.node, Reduction) and i.extent == FULL), default=0)
    _check_full_locals(items, extents)
    return Schedule(items=items, extents=extents, roles=roles, walks=walks)


def _check_full_locals(items: list[Item], extents: dict[str, Extent]) -> None:
    """A name first assigned a small value and later a FULL one would be read at two shapes."""
    for item in items:
        if isinstance(item.node, Assign) and item.extent != SCALAR and item.extent != extents[item.node.target]:
            raise Unsupported(f"'{item.node.target}' holds values of different shapes ({item.extent} and "
                              f"{extents[item.node.target]})")
