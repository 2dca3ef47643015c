"""From one closed form lr(t) to torch's two forms: the closed form and the chainable recursion.

Note [Deriving the chainable form]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
torch's schedulers have two forms: ``_get_closed_form_lr`` computes lr(t) from the initial lr
(``base_lr``), and ``get_lr`` computes lr(t) from the *current* lr of the group, so that several
schedulers on one optimizer compose (ExponentialLR and MultiStepLR stacked multiply their
factors).  A spec gives only the closed form F(t, base_lr); this module derives the recursion.

1. F must be affine in base_lr: F = c0(t) + c1(t) · base_lr (every schedule torch and the
   popular libraries ship is).  Then base_lr can be recovered from the previous lr,
   base_lr = (lr(t-1) - c0(t-1)) / c1(t-1), and reapplied:

       lr(t) = c0(t) + r(t) · (lr(t-1) - c0(t-1)),   r(t) = c1(t) / c1(t-1)

   with sympy simplifying r.  Two special shapes read better and are what torch writes:
   *scale* (c0 = 0): lr(t) = lr(t-1) · r(t) — StepLR, ExponentialLR, LinearLR …; and *affine*
   (c0 = A (1 - c1) for a constant A): lr(t) = A + (lr(t-1) - A) · r(t) — CosineAnnealingLR with
   A = eta_min, SWALR with A = swa_lr.  Fed the lr of another scheduler, the scale form
   multiplies factors; that is what "chainable" means.
2. Where c1(t-1) = 0 the recursion cannot recover base_lr (the lr has collapsed to a value that
   no longer depends on it — CosineAnnealingLR at T_max when eta_min = 0).  There the step is
   *additive*: lr(t) = lr(t-1) + F(t) - F(t-1), the form torch's CosineAnnealingLR uses at that
   point.  Where c1(t-1) might vanish and sympy cannot rule it out, the generated code tests the
   denominator at run time and takes the additive step if it is zero.
3. Phases.  A ``where`` (Piecewise) or ``min``/``max`` of t splits the line into intervals
   ("pieces"); inside a piece r is simplified on that piece's formula alone, and at the first
   step of a piece (where t-1 lies in the previous piece) the step is derived from the two
   neighbouring formulas.  Equal neighbouring steps are merged, so LinearLR's recursion comes
   out as torch writes it: one ratio up to total_iters, the lr unchanged after.
4. A ratio that is itself a ``where`` becomes branches: StepLR's
   gamma ** (t // s - (t - 1) // s) is gamma where t % s == 0 and 1 elsewhere.

The derivation is impossible, and the spec's get_lr must be the closed form, when F is not
affine in base_lr, or does not depend on base_lr at all (OneCycleLR sets absolute values:
there is nothing to chain).  ``derive`` then returns the reason instead of steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy
from sympy import Add, Piecewise

from optgen.schedules.expressions import CountEQ, CountLE
from optgen.schedules.model import BASE_LR, CURRENT_LR, ScheduleSpec, T

NEG_INF = sympy.S.NegativeInfinity
POS_INF = sympy.S.Infinity


# -- steps -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """How lr(t) follows from lr(t-1) on some set of t.

    kind: "keep" (unchanged) | "scale" (lr · ratio) | "affine" (anchor + (lr - anchor) · ratio) |
    "general" (c0 + ratio · (lr - c0_prev)) | "additive" (lr + delta) | "set" (lr = delta, with
    ``lr`` in delta the group's current lr: the step at t = 0).
    ``guard_delta`` is set when the ratio's denominator may vanish: the additive step to take then.
    """

    kind: str
    ratio: sympy.Expr | None = None
    anchor: sympy.Expr | None = None
    c0: sympy.Expr | None = None
    c0_prev: sympy.Expr | None = None
    delta: sympy.Expr | None = None
    guard_delta: sympy.Expr | None = None

    def same(self, other: Step) -> bool:
        if self.kind != other.kind:
            return False
        pairs = [(self.ratio, other.ratio), (self.anchor, other.anchor), (self.c0, other.c0),
                 (self.c0_prev, other.c0_prev), (self.delta, other.delta)]
        return all((a is None) == (b is None) and (a is None or _is_zero(a - b)) for a, b in pairs)

    def describe(self, show=None) -> str:
        """The step as an equation, for docstrings and `optgen schedule --explain`."""
        _pretty = show or _default_show
        if self.kind == "keep":
            return "lr(t) = lr(t-1)"
        if self.kind == "scale":
            return f"lr(t) = lr(t-1) * {_pretty(self.ratio)}"
        if self.kind == "affine":
            a = _pretty(self.anchor)
            return f"lr(t) = {a} + (lr(t-1) - {a}) * {_pretty(self.ratio)}"
        if self.kind == "general":
            previous = sympy.Symbol("lr(t-1)", real=True)
            return f"lr(t) = {_pretty(self.c0 + self.ratio * (previous - self.c0_prev))}"
        if self.kind == "set":
            if self.delta is not None and self.delta.has(CURRENT_LR):
                return f"lr(0) = {_pretty(self.delta)}, where lr is the group's lr before the scheduler"
            return f"lr(t) = {_pretty(self.delta)}"
        return f"lr(t) = lr(t-1) + {_pretty(self.delta)}"


@dataclass(frozen=True)
class Interval:
    """Integers t with every lower ≤ t ≤ every upper (bounds are sympy expressions)."""

    lowers: frozenset
    uppers: frozenset

    def describe(self, show=None) -> str:
        _pretty = show or _default_show
        if len(self.lowers) == 1 and self.lowers == self.uppers:
            return f"t == {_pretty(next(iter(self.lowers)))}"
        parts = ([f"{_pretty(lo)} <= t" for lo in _sorted(self.lowers)]
                 + [f"t <= {_pretty(hi)}" for hi in _sorted(self.uppers)])
        return " and ".join(parts) or "always"


@dataclass(frozen=True)
class Branch:
    """A step on the t in ``interval`` where ``extra`` (a sympy boolean, often True) holds."""

    interval: Interval
    extra: sympy.Basic
    step: Step


@dataclass(frozen=True)
class Derivation:
    closed: sympy.Expr                 # F(t, base_lr), named definitions kept as symbols
    initial: Step                      # the step at t = 0 (lr := F(0) with base_lr := the group's lr)
    branches: tuple[Branch, ...]       # the recursion for t >= 1; the last one is the "else"
    prev_definitions: frozenset        # names of definitions the steps read at t - 1 (as <name>_prev)
    why_not: str | None = None         # when no recursion exists: why

    def describe(self, show=None) -> list[str]:
        """The recursion as equations, one line per case; ``show`` prints an expression."""
        if self.why_not:
            return [f"no chainable form: {self.why_not}"]
        lines = [f"t == 0: {self.initial.describe(show)}"]
        for i, b in enumerate(self.branches):
            where = "otherwise" if i == len(self.branches) - 1 and len(self.branches) > 1 else _where(b, show)
            lines.append(f"{where}: {b.step.describe(show)}")
        return lines


def _where(b: Branch, show) -> str:
    shown = b.interval.describe(show)
    parts = [] if shown == "always" else [shown]
    if b.extra != sympy.true:
        parts.append((show or _default_show)(b.extra))
    return " and ".join(parts) or "t >= 1"


def _default_show(expr) -> str:
    return str(expr)


# -- sympy helpers ----------------------------------------------------------------------------------
def _is_zero(expr) -> bool:
    """Provably zero, under the spec's assumptions (used for decisions, never for printed text)."""
    if expr is None:
        return False
    expr = sympy.sympify(expr)
    if expr.is_zero:
        return True
    assumed = _positive_t(expr.subs(_ASSUMED[-1]))
    if _nonzero_somewhere(assumed):  # cheap and conclusive: skips most symbolic simplifications
        return False
    try:
        return any(sympy.simplify(e) == 0 for e in (expr, assumed))
    except (TypeError, ValueError):  # pragma: no cover - sympy corner cases
        return False


def _nonzero_somewhere(expr) -> bool:
    """True if the expression is nonzero at some sample point (so not identically zero); False
    when every sample is (near) zero or cannot be evaluated — then sympy decides."""
    symbols = sorted(expr.free_symbols, key=lambda x: x.name)
    if expr.atoms(sympy.core.function.AppliedUndef):
        return False
    for seed in (0, 1):
        values = {}
        for i, x in enumerate(symbols):
            if x.is_integer:
                values[x] = 3 + 2 * i + 5 * seed + (0 if x.is_nonnegative or x.is_positive else 0)
            else:
                values[x] = sympy.Rational(3 + i + 2 * seed, 11 + 2 * i + seed)
        try:
            value = complex(sympy.N(expr.xreplace(values), 15))
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if value == value and abs(value) != float("inf") and abs(value) > 1e-9:
            return True
    return False


#: inside the recursion t >= 1: simplifications may use it (sqrt(1/t) / sqrt(1/(t-1)) = sqrt((t-1)/t))
_T_POSITIVE = sympy.Symbol("t", integer=True, positive=True)


def _positive_t(expr):
    return sympy.sympify(expr).xreplace({T: _T_POSITIVE})


def _as_t(expr):
    return sympy.sympify(expr).xreplace({_T_POSITIVE: T})


def _simplify(expr: sympy.Expr) -> sympy.Expr:
    """The shortest of the expression, its simplification and its factorisation (as written wins ties)."""
    expr = _count_rewrite(sympy.piecewise_fold(expr))
    simplified = _count_rewrite(_as_t(sympy.simplify(_positive_t(expr))))
    if simplified.has(Piecewise):
        simplified = sympy.piecewise_fold(simplified)
    candidates = [expr, simplified]
    if not expr.has(Piecewise):
        candidates.append(sympy.factor(simplified))
    return min(candidates, key=sympy.count_ops)


def _count_rewrite(expr: sympy.Expr) -> sympy.Expr:
    """count_le(m, x) - count_le(m, x - 1) → count_eq(m, x): the milestones reached exactly at x;
    and floor(x / s) - floor((x - 1) / s) → [x % s == 0] for integer x, s (StepLR)."""

    def rewrite(add: Add) -> sympy.Expr:
        terms = list(add.args)
        for i, a in enumerate(terms):
            for j, b in enumerate(terms):
                if i == j or (-b).func not in (CountLE, sympy.floor):
                    continue
                nb = -b
                if isinstance(a, CountLE) and isinstance(nb, CountLE) and a.args[0] == nb.args[0] \
                        and sympy.expand(a.args[1] - nb.args[1] - 1) == 0:
                    rest = [x for k, x in enumerate(terms) if k not in (i, j)]
                    return Add(CountEQ(*a.args), *rest)
                if isinstance(a, sympy.floor) and isinstance(nb, sympy.floor):
                    num_a, den_a = sympy.fraction(sympy.together(a.args[0]))
                    num_b, den_b = sympy.fraction(sympy.together(nb.args[0]))
                    if den_a == den_b and sympy.expand(num_a - num_b - 1) == 0 and num_a.is_integer \
                            and den_a.is_integer:
                        rest = [x for k, x in enumerate(terms) if k not in (i, j)]
                        return Add(Piecewise((1, sympy.Eq(sympy.Mod(num_a, den_a), 0)), (0, True)), *rest)
        return add

    return expr.replace(lambda e: isinstance(e, Add), rewrite)


def _shift(expr: sympy.Expr, prev: dict) -> sympy.Expr:
    """expr at t - 1: t → t - 1 and each t-dependent named definition → its ``_prev`` symbol."""
    return expr.xreplace(prev).subs(T, T - 1)


# -- the closed form ---------------------------------------------------------------------------------
def _closed_form(spec: ScheduleSpec) -> tuple[sympy.Expr, dict, set]:
    """F(t, base_lr) with definitions that involve base_lr substituted (others stay symbols), the
    map of t-dependent definitions to their ``_prev`` symbols, and the names of those."""
    values = {d.name: d.expr for d in spec.definitions}
    depends_t: dict[str, bool] = {}
    depends_base: dict[str, bool] = {}
    for d in spec.definitions:  # in order: dependencies come first
        names = {s.name for s in d.expr.free_symbols}
        depends_t[d.name] = "t" in names or any(depends_t.get(n, False) for n in names)
        depends_base[d.name] = "base_lr" in names or any(depends_base.get(n, False) for n in names)
    expr = spec.lr.expr
    for d in reversed(spec.definitions):
        if depends_base[d.name]:
            expr = expr.subs(sympy.Symbol(d.name, real=True), values[d.name])
    prev = {sympy.Symbol(n, real=True): sympy.Symbol(f"{n}_prev", real=True)
            for n, dep in depends_t.items() if dep}
    # expand the spec's helper functions where their arguments involve base_lr
    for f in spec.functions.values():
        expr = expr.replace(lambda e: getattr(e, "func", None) == sympy.Function(f.name) and e.has(BASE_LR),
                            lambda e: f.body.xreplace(dict(zip(f.args, e.args, strict=True))))
    return expr, prev, {n for n, dep in depends_t.items() if dep}


# -- pieces of the line ------------------------------------------------------------------------------
class _NotLinear(Exception):
    """A condition that is not an interval of t: fall back to one piece."""


def _bound(rel) -> Interval:
    """A relational of t → the interval it allows (integer t; integer bounds for strict ones)."""
    if not isinstance(rel, sympy.core.relational.Relational) or not rel.has(T):
        raise _NotLinear
    diff = sympy.expand(rel.lhs - rel.rhs)
    coeff = diff.coeff(T)
    rest = diff - coeff * T
    if not coeff.is_number or coeff == 0 or rest.has(T):
        raise _NotLinear
    bound = sympy.simplify(-rest / coeff)
    op = rel.rel_op
    if coeff < 0:
        op = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}[op]
    if op in ("<", ">") and not bound.is_integer:
        raise _NotLinear
    if op == "<=":
        return Interval(frozenset(), frozenset([bound]))
    if op == "<":
        return Interval(frozenset(), frozenset([bound - 1]))
    if op == ">=":
        return Interval(frozenset([bound]), frozenset())
    if op == ">":
        return Interval(frozenset([bound + 1]), frozenset())
    if op == "==":
        return Interval(frozenset([bound]), frozenset([bound]))
    raise _NotLinear


#: substitutions that encode the spec's `assume` relations (set by derive, read by _known_nonneg)
_ASSUMED: list[dict] = [{}]


def _known_nonneg(expr) -> bool | None:
    expr = sympy.simplify(sympy.sympify(expr).subs(_ASSUMED[-1]))
    if expr.is_nonnegative:
        return True
    if expr.is_negative:
        return False
    return None


def _tidy(iv: Interval) -> Interval | None:
    """Drops dominated bounds; None if provably empty."""
    def keep(bounds, larger_wins):
        out = []
        for b in bounds:
            dominated = False
            for c in bounds:
                if c is b:
                    continue
                d = _known_nonneg((c - b) if larger_wins else (b - c))
                if d and (sympy.simplify(c - b) != 0 or sympy.default_sort_key(c) < sympy.default_sort_key(b)):
                    dominated = True
                    break
            if not dominated:
                out.append(b)
        return frozenset(out)

    lowers, uppers = keep(list(iv.lowers), True), keep(list(iv.uppers), False)
    for lo in lowers:
        for hi in uppers:
            if _known_nonneg(lo - hi - 1):  # lo > hi
                return None
    return Interval(lowers, uppers)


def _sorted(bounds) -> list:
    """Bounds in a fixed order (sets iterate in hash order; generated code must not)."""
    return sorted(bounds, key=sympy.default_sort_key)


def _intersect(a: Interval, b: Interval) -> Interval | None:
    return _tidy(Interval(a.lowers | b.lowers, a.uppers | b.uppers))


def _condition(cond) -> list[Interval]:
    """A condition as a union of intervals."""
    if cond == sympy.true:
        return [Interval(frozenset(), frozenset())]
    if cond == sympy.false:
        return []
    if isinstance(cond, sympy.And):
        out = [Interval(frozenset(), frozenset())]
        for part in cond.args:
            out = [x for a in out for b in _condition(part) for x in [_intersect(a, b)] if x is not None]
        return out
    if isinstance(cond, sympy.Or):
        return [iv for part in cond.args for iv in _condition(part)]
    return [_bound(cond)]


def _complement(ivs: list[Interval]) -> list[Interval]:
    out = [Interval(frozenset(), frozenset())]
    for iv in ivs:
        pieces = [Interval(frozenset(), frozenset([lo - 1])) for lo in _sorted(iv.lowers)]
        pieces += [Interval(frozenset([hi + 1]), frozenset()) for hi in _sorted(iv.uppers)]
        out = [x for a in out for p in pieces for x in [_intersect(a, p)] if x is not None]
    return out


def _pieces(expr: sympy.Expr) -> list[tuple[Interval, sympy.Expr]]:
    """The line of t cut where the closed form's formula changes."""
    expr = expr.replace(lambda e: isinstance(e, (sympy.Min, sympy.Max)) and e.has(T),
                        lambda e: e.rewrite(Piecewise))
    folded = sympy.piecewise_fold(expr)
    whole = [(Interval(frozenset(), frozenset()), expr)]
    if not isinstance(folded, Piecewise):
        return whole
    try:
        out: list[tuple[Interval, sympy.Expr]] = []
        before: list[list[Interval]] = []  # the earlier pieces' conditions
        for value, cond in folded.args:
            region = _condition(cond)
            for prior in before:
                region = [x for a in region for b in _complement(prior) for x in [_intersect(a, b)] if x is not None]
            out += [(iv, value) for iv in region]
            before.append(_condition(cond))
    except _NotLinear:
        return whole
    return out if 0 < len(out) <= 8 else whole


# -- one step from two formulas ------------------------------------------------------------------------
def _step(now: sympy.Expr, before: sympy.Expr) -> Step:
    """The step from lr(t-1) = before(base_lr) to lr(t) = now(base_lr)."""
    c1, c1p = sympy.diff(now, BASE_LR), sympy.diff(before, BASE_LR)
    c0, c0p = now.subs(BASE_LR, 0), before.subs(BASE_LR, 0)
    if _is_zero(c1p):
        delta = _simplify(now - before)
        return Step("keep") if _is_zero(delta) else Step("additive", delta=delta)
    ratio = _simplify(c1 / c1p)
    if _is_zero(ratio):  # the lr no longer depends on base_lr: it is c0, whatever came before
        return Step("set", delta=_simplify(c0))
    guard = None
    denominator = sympy.fraction(sympy.together(ratio))[1]
    # Only a denominator that changes with t can vanish at some steps and not others; one that
    # does not (ConstantLR's 1 / factor) fails for every step alike, as torch's does.
    if (denominator.has(T) or _has_prev(denominator)) and denominator.is_zero is not False:
        guard = _simplify(now - before)
    if _is_zero(c0) and _is_zero(c0p):
        return Step("keep") if _is_zero(ratio - 1) else Step("scale", ratio=ratio, guard_delta=guard)
    if not _is_zero(1 - c1):
        anchor = _simplify(c0 / (1 - c1))
        if not anchor.has(T) and _is_zero(c0p - anchor * (1 - c1p)) and not _has_prev(anchor):
            if _is_zero(ratio - 1):
                return Step("keep")
            return Step("affine", ratio=ratio, anchor=anchor, guard_delta=guard)
    return Step("general", ratio=ratio, c0=_simplify(c0), c0_prev=_simplify(c0p), guard_delta=guard)


def _has_prev(expr) -> bool:
    return any(s.name.endswith("_prev") for s in expr.free_symbols)


def _lift(interval: Interval, step: Step) -> list[Branch]:
    """A step whose ratio is a `where` becomes one branch per case (StepLR: gamma where t % s == 0)."""
    if step.kind in ("scale", "affine") and isinstance(step.ratio, Piecewise):
        out, before = [], sympy.true
        for value, cond in step.ratio.args:
            extra = sympy.And(before, cond)
            sub = Step("keep") if _is_zero(value - 1) else Step(step.kind, ratio=value, anchor=step.anchor,
                                                                 guard_delta=step.guard_delta)
            out.append(Branch(interval, extra, sub))
            before = sympy.And(before, sympy.Not(cond))
        return out
    return [Branch(interval, sympy.true, step)]


# -- the whole derivation ------------------------------------------------------------------------------
def derive(spec: ScheduleSpec) -> Derivation:
    """The chainable form of a spec's closed form (Note [Deriving the chainable form])."""
    closed, prev, _ = _closed_form(spec)
    initial_value = _simplify(closed.subs(T, 0).subs(BASE_LR, CURRENT_LR))
    initial = Step("keep") if _is_zero(initial_value - CURRENT_LR) else Step("set", delta=initial_value)

    def impossible(why: str) -> Derivation:
        return Derivation(closed, initial, (), frozenset(), why)

    if not closed.has(T) and not (closed.free_symbols & set(prev)):
        state = ", ".join(sorted(s.name for s in closed.free_symbols if s.name in spec.attributes)) or "none"
        return impossible(f"lr is not a function of t: it reads the scheduler's state ({state}), "
                          "which its step() advances")
    if not _is_zero(sympy.diff(closed, BASE_LR, 2)):
        return impossible("lr is not affine in base_lr, so base_lr cannot be recovered from the previous lr")
    if _is_zero(sympy.diff(closed, BASE_LR)):
        return impossible("lr does not depend on base_lr (the schedule sets absolute values), "
                          "so there is no factor to chain")
    _ASSUMED.append(_assumptions(spec))
    try:
        return _derive_pieces(spec, closed, prev, initial)
    finally:
        _ASSUMED.pop()


def _assumptions(spec: ScheduleSpec) -> dict:
    """``a > b`` / ``a >= b`` between integer hyperparameters, as a := b + (1 +) s with s >= 0: a
    substitution under which sympy can decide which pieces of the line are empty."""
    out = {}
    for rel in spec.assumptions:
        big, small = (rel.lhs, rel.rhs) if rel.rel_op in (">", ">=") else (rel.rhs, rel.lhs)
        gap = sympy.Dummy(f"{big}_minus_{small}", integer=True, nonnegative=True)
        out[big] = small + gap + (1 if rel.rel_op in (">", "<") else 0)
    return out


def _derive_pieces(spec, closed, prev, initial) -> Derivation:
    pieces = _pieces(closed)
    marked: list[tuple[Branch, bool]] = []  # (branch, whether it is a piece's first step)
    for interval, value in pieces:
        # inside the piece (t and t - 1 both in it): the step from this piece's formula alone
        inner = _tidy(Interval(frozenset(lo + 1 for lo in interval.lowers), interval.uppers))
        if inner is not None:
            marked += [(b, False) for b in _lift(inner, _step(value, _shift(value, prev)))]
        # the piece's first step (t - 1 before it): from the whole closed form at t - 1, which
        # sympy resolves to the previous piece's formula where it can
        for lo in _sorted(interval.lowers):
            at = _tidy(Interval(interval.lowers | {lo}, interval.uppers | {lo}))
            if at is not None:
                step = _step(value.subs(T, lo), _shift(closed, prev).subs(T, lo))
                marked += [(b, True) for b in _lift(at, step)]
    branches = _absorb_boundaries(marked)
    branches = _merge(branches)
    used_prev = set()
    for b in branches:
        for e in (b.step.ratio, b.step.c0_prev, b.step.delta, b.step.guard_delta):
            if e is not None:
                used_prev |= {s.name[: -len("_prev")] for s in e.free_symbols if s.name.endswith("_prev")}
    return Derivation(closed, initial, tuple(branches), frozenset(used_prev))


def _step_at(step: Step, point) -> Step:
    """A step's expressions at t = point (to compare a piece's formula with its boundary step)."""
    sub = {k: (getattr(step, k).subs(T, point) if getattr(step, k) is not None else None)
           for k in ("ratio", "anchor", "c0", "c0_prev", "delta")}
    return Step(step.kind, **sub)


def _absorb_boundaries(tagged: list[tuple[Branch, bool]]) -> list[Branch]:
    """A piece's first step that another piece's formula also gives joins that piece's branch
    (LinearLR: the ratio of the ramp holds at t = total_iters too, so one branch says t <= total_iters)."""
    inner = [b for b, boundary in tagged if not boundary]
    out_boundaries = []
    for b, boundary in tagged:
        if not boundary:
            continue
        (point,) = b.interval.uppers & b.interval.lowers or {None}
        absorbed = False
        for i, other in enumerate(inner):
            if point is None or other.extra != b.extra or not other.interval.uppers:
                continue
            ends = [u for u in other.interval.uppers if _is_zero(u - (point - 1))]
            if ends and _step_at(other.step, point).same(_step_at(b.step, point)):
                uppers = (other.interval.uppers - set(ends)) | {point}
                inner[i] = Branch(Interval(other.interval.lowers, frozenset(uppers)), other.extra, other.step)
                absorbed = True
                break
            starts = [lo for lo in other.interval.lowers if _is_zero(lo - (point + 1))]
            if starts and _step_at(other.step, point).same(_step_at(b.step, point)):
                lowers = (other.interval.lowers - set(starts)) | {point}
                inner[i] = Branch(Interval(frozenset(lowers), other.interval.uppers), other.extra, other.step)
                absorbed = True
                break
        if not absorbed:
            out_boundaries.append(b)
    return inner + out_boundaries


def _merge(branches: list[Branch]) -> list[Branch]:
    """The keep branches become the final "else"; otherwise the last branch does."""
    keeps = [b for b in branches if b.step.kind == "keep"]
    others = [b for b in branches if b.step.kind != "keep"]
    if keeps:
        return others + [Branch(Interval(frozenset(), frozenset()), sympy.true, Step("keep"))]
    if not others:
        return [Branch(Interval(frozenset(), frozenset()), sympy.true, Step("keep"))]
    last = others[-1]
    return others[:-1] + [Branch(Interval(frozenset(), frozenset()), sympy.true, last.step)]
