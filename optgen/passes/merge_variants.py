"""Merging the flag variants of a spec into one guarded sequence: flags become branches.

Every flag combination is compiled on its own (``compile_variant``: specialise, then every pass),
so each variant's code is straight-line and correct by itself.  This pass lays the variants' code
over one another: a statement every variant runs is kept once, the others run under the flag
values they belong to, and a backend prints one function shaped like torch's
``_single_tensor_adam``::

    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if amsgrad:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = max_exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    else:
        denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)

API (language-neutral; the Python backends use it today, C and Triton can print from it too):

- a variant's code is a sequence of *items*: a leaf (any hashable value, compared with ``==``:
  a printed statement, an IR ``Assign``) or a :class:`Block` — a nested block with a
  ``header`` (``if weight_decay != 0:``, a loop) and a ``body`` (and an ``orelse``); blocks are
  aligned as units and, when their headers are equal, their bodies are merged in turn;
- :func:`merge` ``(space, sequences)`` → a tuple of :class:`Merged` (an item and the set of
  variants it runs in, ``on``), one sequence per variant of ``space``, in its order;
- :func:`project` ``(merged, v)`` → the items variant ``v`` runs (equal to its sequence:
  Note [Merged variants run their own code]);
- :func:`sections` ``(merged, within, space)`` → how to print one body: a list of
  :class:`Section`, each unconditional or an ``if``/``elif``/``else`` chain of arms whose
  conditions are sympy booleans over the flag symbols, simplified with every assignment outside
  ``within`` (and every earlier arm of the chain) as a don't-care;
- :func:`merge_programs` ``(compiled)`` → the IR (``Program``) of every variant, merged, and
  :func:`describe` prints it (``optgen show``, ``--dump-ir merge_variants``).
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import sympy
from sympy.logic import SOPform

# Note [Merged variants run their own code]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The invariant of this pass: for every variant v, the items of the merged sequence whose ``on``
# contains v, in merged order (blocks projected the same way, recursively), are exactly v's own
# sequence.  Flags are constant during a step and flag conditions read nothing else, so under
# v's flag values the merged code executes v's statements, in v's order, and nothing else — the
# merged function computes bit for bit what v's function computed.  The alignment keeps the
# invariant by construction (a longest common subsequence: matched items keep their order in
# both sequences, an unmatched item of v is inserted between the same two matched neighbours),
# and `merge` checks it for every variant before returning (tests/compiler/
# test_merge_variants.py checks it on its own, and the Python backends' output under each flag
# assignment against the variant's own rendering).  Merging may reorder only items of disjoint
# variant sets, and only where printing groups them into one if/elif/else chain, where at most
# one arm runs.


@dataclass(frozen=True)
class Block:
    """A nested block of one variant's code, merged as a unit: ``header`` is what must be equal
    for two variants' blocks to be one block (the printed ``if weight_decay != 0:``), ``body`` its
    items, ``orelse`` the items of its ``else:`` (empty: none)."""

    header: Hashable
    body: tuple = ()
    orelse: tuple = ()


@dataclass(frozen=True)
class MergedBlock:
    header: Hashable
    body: tuple[Merged, ...] = ()
    orelse: tuple[Merged, ...] = ()


@dataclass(frozen=True)
class Merged:
    """An item of the merged code and the variants (indices into the space) that run it."""

    item: Hashable | MergedBlock
    on: frozenset[int]


@dataclass(frozen=True)
class FlagSpace:
    """The flags of a spec and the assignments of them that exist as variants (a fixed flag has
    one value; the others both)."""

    flags: tuple[str, ...]
    assignments: tuple[tuple[bool, ...], ...]

    @staticmethod
    def of(variant_flags: Sequence[tuple[tuple[str, bool], ...]]) -> FlagSpace:
        names = tuple(name for name, _ in variant_flags[0]) if variant_flags else ()
        return FlagSpace(names, tuple(tuple(value for _, value in f) for f in variant_flags))

    @property
    def everything(self) -> frozenset[int]:
        return frozenset(range(len(self.assignments)))


# -- merging -------------------------------------------------------------------------------------
def merge(space: FlagSpace, sequences: Sequence[Sequence]) -> tuple[Merged, ...]:
    """One sequence running each variant's items under its flag values (Note [Merged variants
    run their own code]); ``sequences[v]`` is the code of ``space.assignments[v]``."""
    if len(sequences) != len(space.assignments):
        raise ValueError(f"{len(sequences)} sequences for {len(space.assignments)} variants")
    merged: tuple[Merged, ...] = ()
    for v, items in enumerate(sequences):
        merged = _merge_one(merged, tuple(items), v)
    for v, items in enumerate(sequences):
        if project(merged, v) != tuple(items):
            raise RuntimeError(f"merge_variants: variant {space.assignments[v]} does not run its own code "
                               "(Note [Merged variants run their own code])")
    return merged


def project(merged: Sequence[Merged], v: int) -> tuple:
    """The items variant ``v`` runs, blocks included."""
    out: list = []
    for m in merged:
        if v not in m.on:
            continue
        if isinstance(m.item, MergedBlock):
            out.append(Block(m.item.header, project(m.item.body, v), project(m.item.orelse, v)))
        else:
            out.append(m.item)
    return tuple(out)


def _fresh(item, v: int) -> Merged:
    if isinstance(item, Block):
        return Merged(MergedBlock(item.header, tuple(_fresh(i, v) for i in item.body),
                                  tuple(_fresh(i, v) for i in item.orelse)), frozenset({v}))
    return Merged(item, frozenset({v}))


def _merge_one(merged: tuple[Merged, ...], items: tuple, v: int) -> tuple[Merged, ...]:
    """``merged`` with variant ``v``'s ``items`` laid over it along a best alignment."""
    pairs = _align(merged, items)
    out: list[Merged] = []
    for i, j in pairs:
        if i is None:
            assert j is not None  # _align never pairs nothing with nothing
            out.append(_fresh(items[j], v))
        elif j is None:
            out.append(merged[i])
        else:
            m, item = merged[i], items[j]
            if isinstance(item, Block):
                assert isinstance(m.item, MergedBlock)  # aligned items are equal: a Block's header matched
                block = MergedBlock(item.header, _merge_one(m.item.body, item.body, v),
                                    _merge_one(m.item.orelse, item.orelse, v))
                out.append(Merged(block, m.on | {v}))
            else:
                out.append(Merged(m.item, m.on | {v}))
    return tuple(out)


def _match(m: Merged, item) -> int:
    """How much aligning ``item`` with ``m`` shares: 0 if they cannot be one item; a block
    counts itself and what its bodies share, so blocks pair with the most similar block."""
    if isinstance(item, Block):
        if not isinstance(m.item, MergedBlock) or m.item.header != item.header:
            return 0
        return 1 + _score(m.item.body, item.body) + _score(m.item.orelse, item.orelse)
    return int(not isinstance(m.item, MergedBlock) and m.item == item)


@functools.lru_cache(maxsize=4096)
def _table(merged: tuple[Merged, ...], items: tuple) -> tuple[list[list[int]], dict]:
    """best[i][j]: the most a merged[i:] and items[j:] alignment shares (a longest common
    subsequence, weighted by _match)."""
    n, k = len(merged), len(items)
    best = [[0] * (k + 1) for _ in range(n + 1)]
    matches: dict[tuple[int, int], int] = {}
    for i in range(n - 1, -1, -1):
        for j in range(k - 1, -1, -1):
            s = _match(merged[i], items[j])
            matches[i, j] = s
            best[i][j] = max(best[i + 1][j], best[i][j + 1], s + best[i + 1][j + 1] if s else 0)
    return best, matches


def _score(merged: tuple[Merged, ...], items: tuple) -> int:
    return _table(merged, items)[0][0][0]


def _align(merged: tuple[Merged, ...], items: tuple) -> list[tuple[int | None, int | None]]:
    """The aligned pairs in order: (i, j) matched, (i, None) only merged, (None, j) only new.
    Between two matches, the merged items come first (the new variant's follow them)."""
    best, matches = _table(merged, items)
    i = j = 0
    pairs: list[tuple[int | None, int | None]] = []
    while i < len(merged) and j < len(items):
        s = matches[i, j]
        if s and best[i][j] == s + best[i + 1][j + 1]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif best[i][j] == best[i + 1][j]:
            pairs.append((i, None))
            i += 1
        else:
            pairs.append((None, j))
            j += 1
    pairs += [(i2, None) for i2 in range(i, len(merged))] + [(None, j2) for j2 in range(j, len(items))]
    return pairs


# -- conditions ----------------------------------------------------------------------------------
def condition(space: FlagSpace, on: frozenset[int], care: frozenset[int]) -> sympy.Basic:
    """A boolean over the flag symbols, true on the assignments ``on`` and false on the rest of
    ``care``; any other assignment (a combination that is no variant, or one the code around
    has already ruled out) may go either way, whichever prints shorter."""
    if on >= care:
        return sympy.true
    if not on:
        return sympy.false
    symbols = [sympy.Symbol(name) for name in space.flags]
    minterms = [[int(b) for b in space.assignments[v]] for v in sorted(on)]
    off = {space.assignments[v] for v in care - on}
    dontcares = [list(map(int, a)) for a in itertools.product((False, True), repeat=len(symbols))
                 if a not in off and list(map(int, a)) not in minterms]
    return SOPform(symbols, minterms, dontcares)


def _size(expr: sympy.Basic) -> tuple[int, int]:
    """(literals, negations): shorter conditions first, then positive ones (``if amsgrad:``)."""
    return (sum(1 for a in sympy.preorder_traversal(expr) if a.is_Symbol),
            sum(1 for a in sympy.preorder_traversal(expr) if isinstance(a, sympy.Not)))


@dataclass(frozen=True)
class Arm:
    condition: sympy.Basic | None  # None: ``else``; sympy.true: unconditional
    items: tuple[Merged, ...]


@dataclass(frozen=True)
class Section:
    """Consecutive items of one body as printed: ``arms[0].condition`` is sympy.true for items
    every variant of the body runs; otherwise an if/elif/else chain."""

    arms: tuple[Arm, ...]


def sections(merged: Sequence[Merged], within: frozenset[int], space: FlagSpace) -> list[Section]:
    """How to print a body whose variants are ``within``: consecutive items run by the same
    variants share one ``if``; consecutive groups of pairwise disjoint variants form one
    if/elif/else chain (any order of its arms is correct: at most one runs), arms ordered
    shortest condition first, each condition simplified given the arms before it."""
    groups = [(on, tuple(g)) for on, g in itertools.groupby(merged, key=lambda m: m.on & within)]
    out: list[Section] = []
    k = 0
    while k < len(groups):
        on, items = groups[k]
        if on == within:
            out.append(Section((Arm(sympy.true, items),)))
            k += 1
            continue
        chain = [groups[k]]
        k += 1
        while k < len(groups) and groups[k][0] != within \
                and all(not (groups[k][0] & c) for c, _ in chain):
            chain.append(groups[k])
            k += 1
        out.append(Section(_order_arms(chain, within, space)))
    return out


def _order_arms(chain, within: frozenset[int], space: FlagSpace) -> tuple[Arm, ...]:
    arms: list[Arm] = []
    care = within
    remaining = list(chain)
    while remaining:
        options = [(condition(space, on, care), n) for n, (on, _) in enumerate(remaining)]
        expr, n = min(options, key=lambda o: (*_size(o[0]), o[1]))
        on, items = remaining.pop(n)
        arms.append(Arm(None if expr == sympy.true and arms else expr, items))
        care = care - on
    return tuple(arms)


# -- the IR, merged ------------------------------------------------------------------------------
def program_items(program) -> tuple:
    """A variant's Program as items: hoisted scalars, then the body, consecutive statements
    under one guard as one block."""
    items: list = [("hoisted", a) for a in program.preamble]
    for guard, group in itertools.groupby(program.body, key=lambda a: a.guard):
        statements = tuple(group)
        items += list(statements) if guard == sympy.true else [Block(guard, statements)]
    return tuple(items)


def merge_programs(compiled) -> tuple[Merged, ...]:
    """Every variant's IR after the program passes, merged (the code C and Triton print)."""
    space = FlagSpace.of([v.flags for v in compiled.variants])
    return merge(space, [program_items(v.program) for v in compiled.variants])


def describe(compiled) -> str:
    """The merged IR, readable (``optgen show``, ``--dump-ir merge_variants``)."""
    space = FlagSpace.of([v.flags for v in compiled.variants])
    flags = ", ".join(space.flags) or "none"
    lines = [f"# {compiled.spec.name}: every variant of the flags ({flags}) in one program"]

    def body(merged, within, depth):
        pad = "    " * depth
        for section in sections(merged, within, space):
            for n, arm in enumerate(section.arms):
                inner = depth
                if arm.condition is not sympy.true:
                    keyword = "else" if arm.condition is None else ("if" if n == 0 else "elif")
                    lines.append(f"{pad}{keyword}{'' if arm.condition is None else ' ' + str(arm.condition)}:")
                    inner += 1
                for m in arm.items:
                    on = m.on & within
                    if isinstance(m.item, MergedBlock):
                        lines.append(f"{'    ' * inner}if {m.item.header}:")
                        body(m.item.body, on, inner + 1)
                        if m.item.orelse:
                            lines.append(f"{'    ' * inner}else:")
                            body(m.item.orelse, on, inner + 1)
                    else:
                        item: Any = m.item  # an Assign, or ("hoisted", Assign)
                        hoisted = isinstance(item, tuple)
                        a = item[1] if hoisted else item
                        first = f"    (first step: {a.first})" if a.first is not None else ""
                        note = "    # hoisted" if hoisted else ""
                        lines.append(f"{'    ' * inner}{a.target} = {a.value}{first}{note}")

    body(merge_programs(compiled), space.everything, 0)
    return "\n".join(lines)


def merged_program(compiled):
    """Every variant's IR as one :class:`~optgen.ir.nodes.Program` the fused backends print once
    (one C source, one Triton kernel per optimizer): each statement of :func:`merge_programs`
    keeps its own guard, conjoined with the flag values it runs under (``amsgrad``,
    ``~maximize``), and the flags become hyperparameters of the program (Role.HYPER) — host
    conditions like ``weight_decay != 0``, which the fused kernels already specialise on.  Under
    one flag assignment the program runs exactly that variant's statements, in its order (Note
    [Merged variants run their own code]).  Raises ValueError where two variants give a name
    different roles (a scalar in one, a tensor in another)."""
    from dataclasses import replace

    from optgen.ir.nodes import Role

    variants = compiled.variants
    space = FlagSpace.of([v.flags for v in variants])
    preamble: list = []
    body: list = []

    def add(item, on: frozenset[int]) -> None:
        hoisted = isinstance(item, tuple)
        a = item[1] if hoisted else item
        on_flags = condition(space, on, space.everything)
        guarded = a if on_flags == sympy.true else replace(a, guard=sympy.And(on_flags, a.guard))
        (preamble if hoisted else body).append(guarded)

    for m in merge_programs(compiled):
        if isinstance(m.item, MergedBlock):  # its header is the guard every statement of it carries
            for inner in m.item.body:
                add(inner.item, inner.on)
        else:
            add(m.item, m.on)
    roles: dict = {}
    for v in variants:
        for name, role in v.program.roles.items():
            if roles.setdefault(name, role) is not role:
                raise ValueError(f"'{name}' is a {roles[name].value} in one variant and a {role.value} in another")
    roles.update({name: Role.HYPER for name in space.flags})
    first = variants[0].program
    state_when: dict = {}
    for v in variants:
        state_when.update(v.program.state_when)
    return replace(first, roles=roles, body=tuple(body), preamble=tuple(preamble), flags=(),
                   per_tensor=frozenset().union(*(v.program.per_tensor for v in variants)), state_when=state_when)
