"""Op selection: sympy assignments → torch-shaped tensor ops (see Note [Tensor ops]).

The patterns recognised are the ones torch's hand-written optimizers use, so the generated code
performs the same floating-point operations in the same order:

    target = lerp(target, x, w)            →  target.lerp_(x, w)
    target = maximum(target, x)            →  torch.maximum(target, x, out=target)
    target = c0 * target + c1 * x          →  target.mul_(c0).add_(x, alpha=c1)
             + c2 * x * y                  →            .addcmul_(x, y, value=c2)
             + c3 * x / y                  →            .addcdiv_(x, y, value=c3)
    target = c * target * x / y            →  target.mul_(c).mul_(x).div_(y)

Persistent targets (param, state, counters) are always updated in place.  Other targets (grad,
temporaries) are computed out of place first — the user's ``.grad`` is never written — and
subsequent ops on a tensor this step created run in place, which keeps foreach's temporary memory
at one buffer per live temporary (see :mod:`optgen.passes.reuse_buffers`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy

from optgen.ir.functions import Clamp, Lerp, Maximum, MeanDim, Minimum, NewtonSchulz, NormDim, Where, symbol
from optgen.ir.nodes import Program, Role, is_tensor_valued
from optgen.ir.ops import OpProgram, Step, TensorOp

_UNARY = {sympy.exp: "exp", sympy.log: "log", sympy.Abs: "abs", sympy.sign: "sign"}
_COMPARE = {">": "gt", "<": "lt", ">=": "ge", "<=": "le", "==": "eq", "!=": "ne"}


# Note [Shapes]
# Tensors are the parameter's shape except reductions that keep a dimension (Adafactor's row and
# column moments, norm_dim/mean_dim results).  A shape is the set of dimensions reduced to size 1
# (frozenset() = the parameter's full shape).  Broadcasting a ∘ b gives the dims reduced in both,
# so an op may run in place on `a` only if every dim reduced in `a` is reduced in the operands too.
FULL: frozenset[int] = frozenset()


@dataclass
class _Value:
    name: str
    owned: bool  # a tensor this step created (may be mutated in place)
    shape: frozenset = FULL


class _Selector:
    def __init__(self, program: Program):
        self.program = program
        self.fresh = (f"_t{i}" for i in itertools.count())
        self.counter: str | None = None  # the counter being updated: a tensor for that statement
        self.products: tuple = ()        # the current statement's product chains, as written
        # Note [Shapes]: reduced states from their initialiser; temporaries as they are created.
        self.shapes: dict[str, frozenset] = {
            s.name: frozenset({s.reduced_dim}) for s in program.spec.state.values() if s.init == "zeros_reduced"}

    def shape(self, name: str) -> frozenset:
        return self.shapes.get(name, FULL)

    def is_tensor(self, expr: sympy.Expr) -> bool:
        if self.counter is not None and expr.has(symbol(self.counter)):
            return True
        return is_tensor_valued(expr, self.program.roles)

    # -- splitting products and sums -------------------------------------------------------------
    def split_product(self, expr: sympy.Expr):
        """``c * n1 * n2 / d1`` → (scalar c, [tensor numerators], [tensor denominators])."""
        coeff, nums, dens = sympy.Integer(1), [], []
        for factor in sympy.Mul.make_args(expr):
            if not self.is_tensor(factor):
                coeff *= factor
            elif factor.is_Pow and factor.exp == -1:
                dens.append(factor.base)
            elif factor.is_Pow and factor.exp == 2:
                nums += [factor.base, factor.base]
            else:
                nums.append(factor)
        return coeff, nums, dens

    def ordered_terms(self, expr: sympy.Expr, first: sympy.Expr | None = None) -> list[sympy.Expr]:
        terms = list(sympy.Add.make_args(expr))
        # Scalars last: torch adds eps after the tensor arithmetic.
        return sorted(terms, key=lambda t: (first is not None and not t.has(first), not self.is_tensor(t)))

    # -- materialising an expression as a new tensor -------------------------------------------
    def materialize(self, expr: sympy.Expr, ops: list[TensorOp]) -> _Value:
        if not self.is_tensor(expr):
            return self.full(expr, ops)
        if expr.is_Symbol:
            return _Value(expr.name, False, self.shape(expr.name))
        if isinstance(expr, sympy.Add):
            return self.materialize_sum(expr, ops)
        if isinstance(expr, sympy.Mul):
            coeff, nums, dens = self.split_product(expr)
            if coeff == -1 and len(nums) == 1 and not dens:
                return self.apply(self.materialize(nums[0], ops), "neg", (), ops)
            if len(nums) == 2 and nums[0] == nums[1] and not dens:  # x ** 2: computed once, squared
                return self.scale(self.apply(self.materialize(nums[0], ops), "square", (), ops), coeff, [], ops)
            written = self.written_order(expr, ops)
            if written is not None:
                return written
            # Not written as one chain: a compound factor first (a buffer of our own to work in),
            # then divisions, then the other factors.
            nums.sort(key=lambda n: n.is_Symbol)
            value = self.materialize(nums[0], ops) if nums else None
            if value is None:  # 1 / tensor
                value = self.apply(self.materialize(dens.pop(0), ops), "reciprocal", (), ops)
            for d in dens:
                value = self.apply(value, "div", (self.operand(d, ops),), ops)
            for n in nums[1:]:
                value = self.apply(value, "mul", (self.operand(n, ops),), ops)
            return self.scale(value, coeff, [], ops)
        if expr.is_Pow:
            base = self.materialize(expr.base, ops)
            method = {sympy.S.Half: "sqrt", -sympy.S.Half: "rsqrt", -1: "reciprocal"}.get(expr.exp)
            if expr.exp == 2:
                return self.apply(base, "square", (), ops)
            if method:
                return self.apply(base, method, (), ops)
            return self.apply(base, "pow", (expr.exp,), ops)
        if isinstance(expr, Lerp):
            a, b, w = expr.args
            return self.apply(self.materialize(a, ops), "lerp", (self.operand(b, ops), w), ops)
        if isinstance(expr, (Maximum, Minimum)):
            a, b = expr.args if self.is_tensor(expr.args[0]) else expr.args[::-1]
            return self.extremum(self.materialize(a, ops), type(expr), b, ops)
        if expr.func in _UNARY:
            return self.apply(self.materialize(expr.args[0], ops), _UNARY[expr.func], (), ops)
        if isinstance(expr, (NormDim, MeanDim)):
            x, dim = expr.args
            fn = "norm" if isinstance(expr, NormDim) else "mean"
            value = self.materialize(x, ops)
            out = next(self.fresh)
            ops.append(TensorOp(out, fn, value.name, (), (("dim", dim), ("keepdim", sympy.true))))
            self.shapes[out] = value.shape | {int(dim)}
            return _Value(out, True, self.shapes[out])
        if isinstance(expr, NewtonSchulz):
            x, *scalars = expr.args
            out = next(self.fresh)
            ops.append(TensorOp(out, "newton_schulz", self.operand(x, ops), tuple(scalars)))
            return _Value(out, True)
        if isinstance(expr, Clamp):
            return self.apply(self.materialize(expr.args[0], ops), "clamp", (), ops, _clamp_bounds(expr))
        if isinstance(expr, Where):
            cond, a, b = expr.args
            mask = self.compare(cond, ops)
            if not self.is_tensor(a) and self.is_tensor(b):  # torch's `x[mask] = a`, without indexing
                return self.apply(self.materialize(b, ops), "masked_fill", (mask, a), ops)
            # Two numbers: the first as a tensor of the parameter's dtype (torch.where(mask, 1, -1)
            # would be an int64 tensor, torch.where(mask, 1.0, -1.0) one of the default dtype).
            branches = tuple(self.operand(x, ops) if self.is_tensor(x) or i == 0 else x for i, x in enumerate((a, b)))
            out = next(self.fresh)
            ops.append(TensorOp(out, "where", mask, branches))
            return _Value(out, True)
        raise NotImplementedError(f"no tensor op for {expr}")

    def full(self, value: sympy.Expr, ops: list[TensorOp]) -> _Value:
        """A number (or host scalar) where a tensor is needed: a tensor of the parameter's shape and
        dtype holding it (``x = grad - grad`` is a tensor of zeros, not the number 0)."""
        out = next(self.fresh)
        ops.append(TensorOp(out, "full_like", "param", (value,)))
        return _Value(out, True)

    def extremum(self, value: _Value, kind, other: sympy.Expr, ops: list[TensorOp]) -> _Value:
        """maximum/minimum of a tensor and ``other``; with a number, clamp (torch.maximum takes
        tensors only)."""
        if not self.is_tensor(other):
            return self.apply(value, "clamp", (), ops, (("min" if kind is Maximum else "max", other),))
        fn = "maximum" if kind is Maximum else "minimum"
        return self.apply(value, fn, (self.operand(other, ops),), ops)

    def compare(self, cond: sympy.Basic, ops: list[TensorOp]) -> str:
        """A boolean mask; never reused in place (it is not a float buffer)."""
        lhs, rhs = cond.lhs, cond.rhs
        if not self.is_tensor(lhs):
            lhs, rhs = rhs, lhs
            cond = cond.reversed
        left = self.materialize(lhs, ops)
        other = self.operand(rhs, ops) if self.is_tensor(rhs) else rhs
        out = next(self.fresh)
        ops.append(TensorOp(out, _COMPARE[cond.rel_op], left.name, (other,)))
        return out

    def written_order(self, expr: sympy.Expr, ops: list[TensorOp]) -> _Value | None:
        """The product computed in the order its spec statement writes it (``row_var * col_var /
        x`` multiplies first, ``a / std * grad`` divides first), when it was written as one chain."""
        for chain in self.products:
            value = sympy.Integer(1)
            for op, f in chain:
                value = value * f if op == "*" else value / f
            if value != expr:
                continue
            tensors = [(op, f) for op, f in chain if self.is_tensor(f)]
            if not tensors or tensors[0][0] != "*":
                return None
            coeff = sympy.Mul(*[f if op == "*" else 1 / f for op, f in chain if not self.is_tensor(f)])
            result = self.materialize(tensors[0][1], ops)
            for op, f in tensors[1:]:
                result = self.apply(result, "mul" if op == "*" else "div", (self.operand(f, ops),), ops)
            return self.scale(result, coeff, [], ops)
        return None

    def materialize_sum(self, expr: sympy.Expr, ops: list[TensorOp]) -> _Value:
        terms = self.ordered_terms(expr)
        # The base: a bare tensor (grad + wd * param → grad.add(param, alpha=wd)), else a compound term.
        bare = [t for t in terms if t.is_Symbol and self.is_tensor(t)]
        base = bare[0] if bare else next(t for t in terms if self.is_tensor(t))
        value = self.materialize(base, ops)
        for term in terms:
            if term is not base:
                value = self.accumulate(value, term, ops)
        return value

    def operand(self, expr: sympy.Expr, ops: list[TensorOp]) -> str:
        return self.materialize(expr, ops).name

    def apply(self, value: _Value, fn: str, args: tuple, ops: list[TensorOp], kwargs=()) -> _Value:
        """``fn`` on ``value``: in place when value is ours (and keeps its shape), else into a new
        temporary."""
        shape = value.shape
        for a in args:
            if isinstance(a, str):
                shape = shape & self.shape(a)
        fits = shape == value.shape  # Note [Shapes]
        if value.owned and fits:
            ops.append(TensorOp(value.name, fn + "_", value.name, args, kwargs))
            return value
        out = next(self.fresh)
        ops.append(TensorOp(out, fn, value.name, args, kwargs, in_place_ok=fits))
        self.shapes[out] = shape
        return _Value(out, True, shape)

    def scale(self, value: _Value, coeff: sympy.Expr, dens: list, ops: list[TensorOp]) -> _Value:
        num, den = sympy.fraction(coeff)
        if num == -1 and den == 1:  # (and the tensor divisors below: returning here dropped them)
            value = self.apply(value, "neg", (), ops)
        else:
            if num != 1:
                value = self.apply(value, "mul", (num,), ops)
            if den != 1:
                value = self.apply(value, "div", (den,), ops)
        for d in dens:
            value = self.apply(value, "div", (self.operand(d, ops),), ops)
        return value

    def accumulate(self, value: _Value, term: sympy.Expr, ops: list[TensorOp]) -> _Value:
        """``value + term`` with the fused op torch would use."""
        if not self.is_tensor(term):
            return self.apply(value, "add", (term,), ops)
        coeff, nums, dens = self.split_product(term)
        alpha = () if coeff == 1 else (("alpha", coeff),)
        value_kw = () if coeff == 1 else (("value", coeff),)
        if len(nums) == 1 and not dens and coeff == -1:
            return self.apply(value, "sub", (self.operand(nums[0], ops),), ops)
        if len(nums) == 1 and not dens:
            return self.apply(value, "add", (self.operand(nums[0], ops),), ops, alpha)
        nums.sort(key=lambda n: n.is_Symbol)  # a compound factor first: addcmul_(grad.sign(), step_size)
        if len(nums) == 2 and not dens:
            first = self.operand(nums[0], ops)
            second = first if nums[1] == nums[0] else self.operand(nums[1], ops)  # (x - y) ** 2: x - y once
            return self.apply(value, "addcmul", (first, second), ops, value_kw)
        if len(nums) == 1 and len(dens) == 1:
            return self.apply(value, "addcdiv", (self.operand(nums[0], ops), self.operand(dens[0], ops)),
                              ops, value_kw)
        return self.apply(value, "add", (self.operand(term, ops),), ops)

    # -- statements ------------------------------------------------------------------------------
    def update_in_place(self, target: str, expr: sympy.Expr) -> list[TensorOp]:
        """Ops that leave ``expr`` in the persistent tensor ``target``."""
        ops: list[TensorOp] = []
        me = symbol(target)
        mine = _Value(target, True)
        if expr == me:
            return ops
        if isinstance(expr, Lerp) and expr.args[0] == me:
            self.apply(mine, "lerp", (self.operand(expr.args[1], ops), expr.args[2]), ops)
            return ops
        if isinstance(expr, (Maximum, Minimum)) and any(a.has(me) for a in expr.args) \
                and not all(a.has(me) for a in expr.args):
            # maximum(beta2 * exp_inf, x): update exp_inf in place to beta2 * exp_inf, then take the max
            inner, other = expr.args if expr.args[0].has(me) else expr.args[::-1]
            ops += self.update_in_place(target, inner)
            self.extremum(mine, type(expr), other, ops)
            return ops
        if isinstance(expr, Clamp) and expr.args[0].has(me) and not any(a.has(me) for a in expr.args[1:]):
            ops += self.update_in_place(target, expr.args[0])
            self.apply(mine, "clamp", (), ops, _clamp_bounds(expr))
            return ops
        terms = self.ordered_terms(expr, first=me)
        coeff, nums, dens = self.split_product(terms[0])
        # In place only when nothing else in the statement reads the old value: a later term, another
        # factor, or a divisor (m / (|m| + 2) read m after m.neg_() had changed it).
        if me in nums and not any(t.has(me) for t in terms[1:]) and not any(n.has(me) for n in nums if n != me) \
                and not any(d.has(me) for d in dens):
            nums.remove(me)
            for n in nums:
                self.apply(mine, "mul", (self.operand(n, ops),), ops)
            self.scale(mine, coeff, dens, ops)
            for term in terms[1:]:
                self.accumulate(mine, term, ops)
            return ops
        if me in terms and self.is_tensor(expr):
            # ax + (param - ax) * mu: terms that read the old value are computed before it changes
            early = {t: self.operand(t, ops) for t in terms if t != me and t.has(me)}
            for term in terms:
                if term in early:
                    self.apply(mine, "add", (early[term],), ops)
                elif term != me:
                    self.accumulate(mine, term, ops)
            return ops
        if isinstance(expr, Where) and not self.is_tensor(expr.args[1]) and expr.args[2].is_Symbol \
                and (expr.args[2] == me or not expr.args[0].has(me)):
            # where(c, s, x): x stored, then filled with s where c holds (Rprop's prev)
            cond, fill, x = expr.args
            if x != me:
                ops.append(TensorOp(target, "copy_", target, (x.name,)))
            self.apply(mine, "masked_fill", (self.compare(cond, ops), fill), ops)
            return ops
        if not self.is_tensor(expr):
            # a counter set from host values (Note [Counters set from host values]), a tensor
            # filled with a number (``m = 0 * grad``)
            ops.append(TensorOp(target, "store_" if self.counter == target else "fill_", target, (expr,)))
            return ops
        value = self.materialize(expr, ops)
        ops.append(TensorOp(target, "copy_", target, (value.name,)))
        return ops

    def compute(self, target: str, expr: sympy.Expr) -> list[TensorOp]:
        """Ops that bind the local (or grad) ``target`` to ``expr``."""
        ops: list[TensorOp] = []
        value = self.materialize(expr, ops)
        self.shapes[target] = value.shape
        if not ops:
            ops.append(TensorOp(target, "alias", value.name))
        else:
            ops = _rename(ops, value.name, target)
        return ops

    def create_state(self, target: str, expr: sympy.Expr) -> list[TensorOp]:
        """A lazily created state's first value: always a tensor of its own (torch clones grad)."""
        ops: list[TensorOp] = []
        value = self.materialize(expr, ops)
        if not value.owned:
            ops.append(TensorOp(target, "clone", value.name))
            return ops
        return _rename(ops, value.name, target)


def _clamp_bounds(expr: Clamp) -> tuple:
    """clamp's keyword bounds, leaving out an infinite one (clamp_min / clamp_max in a spec)."""
    _, low, high = expr.args
    return tuple((k, v) for k, v in (("min", low), ("max", high)) if v not in (sympy.oo, -sympy.oo))


def _rename(ops: list[TensorOp], old: str, new: str) -> list[TensorOp]:
    """Gives the temporary ``old`` the name ``new`` — unless ``new`` is still read after ``old``
    is created (``grad = grad * grad + grad``), where a final ``new = old`` keeps them apart."""
    created = next((i for i, o in enumerate(ops) if o.out == old), 0)
    if any(new in o.reads() for o in ops[created + 1:]):
        return ops + [TensorOp(new, "alias", old)]

    def r(x):
        return new if x == old else x

    return [TensorOp(r(o.out), o.fn, r(o.self_), tuple(r(a) if isinstance(a, str) else a for a in o.args), o.kwargs,
                     o.in_place_ok) for o in ops]


def select_ops(program: Program) -> OpProgram:
    selector = _Selector(program)
    roles = program.roles
    steps = []
    counters_read: set[str] = set()  # counters whose value has been read back from their tensor
    for a in program.body:
        role = roles[a.target]
        selector.products = a.products
        common = dict(target=a.target, guard=a.guard, text=a.text, loc=a.loc)
        for name in sorted(a.reads()):
            if roles.get(name) is Role.COUNTER and name not in counters_read and name != a.target:
                steps.append(Step("read", name, sympy.true, f"{name} (before this step's update)", a.loc))
                counters_read.add(name)
        if role is Role.COUNTER and a.guard == sympy.true:
            # Read back on every path.  Under an `if` it is read back only there, so a counter
            # not read before stays unbound on the other path: a later reader reads it again.
            counters_read.add(a.target)
        if role is Role.SCALAR:
            steps.append(Step("scalar", expr=a.value, per_tensor=a.target in program.per_tensor, **common))
        elif role is Role.COUNTER:
            # The counter lives in a 0-dim tensor `<name>_t` (torch's state["step"]); the update
            # runs on that tensor, then `<name>` is read back as a Python number.
            selector.counter = a.target
            ops = _rename(selector.update_in_place(a.target, a.value), a.target, f"{a.target}_t")
            selector.counter = None
            steps.append(Step("counter", ops=tuple(ops), **common))
        elif role.is_persistent:
            ops = selector.update_in_place(a.target, a.value)
            first = tuple(selector.create_state(a.target, a.first)) if a.first is not None else None
            steps.append(Step("tensor", ops=tuple(ops), first_ops=first, **common))
        else:
            steps.append(Step("tensor", ops=tuple(selector.compute(a.target, a.value)), **common))
    spec = program.spec
    states = [s.name for s in spec.state.values() if s.name in roles and roles[s.name] is Role.STATE
              and program.state_when.get(s.name) != sympy.false]
    counters = [s.name for s in spec.state.values() if s.name in roles and roles[s.name] is Role.COUNTER]
    scalars = sorted({s.name for a in (*program.preamble, *program.body) for s in a.value.free_symbols
                      | a.guard.free_symbols | (a.first.free_symbols if a.first is not None else set())
                      if roles.get(s.name) is Role.HYPER}, key=list(roles).index)
    preamble = tuple(Step("scalar", a.target, a.guard, a.text, a.loc, expr=a.value) for a in program.preamble)
    return OpProgram(
        name=program.variant_name, flags=program.flags, preamble=preamble, steps=tuple(steps),
        tensors=("param", "grad", *states), counters=tuple(counters), scalars=tuple(scalars),
        lazy_states=tuple(s.name for s in spec.state.values() if s.init == "first" and s.name in states),
        # One value per param group: hyperparameters, the preamble, and the scalars hoist_scalars
        # kept in the body only because they sit under an `if` (`if h1 < 0.5: c1 = h0 * lr`).
        group_scalars=frozenset({n for n, r in roles.items() if r is Role.HYPER}
                                | {a.target for a in program.preamble}
                                | {a.target for a in program.body
                                   if roles[a.target] is Role.SCALAR and a.target not in program.per_tensor}),
    )
