"""Common-subexpression elimination over straight-line runs of statements.

Statements reassign names (``grad = grad + ...``), so before handing expressions to
:func:`sympy.cse` each write gets a fresh version of its name (SSA); repeated subexpressions come
back as new temporaries, inserted just before their first use and named ``common0``, ``common1``…
(a subexpression equal to a statement the spec already named is not repeated: sympy finds it as
that statement's symbol).  Runs are split at guard changes, because a temporary computed under one
guard must not be used under another.  Only *tensor* subexpressions are worth a temporary: a
repeated scalar costs one Python operation — even one that reads a tensor, such as numel(param),
bar a norm() (Note [Per-tensor scalars stay scalars]).  A comparison never is (Note [Comparisons
stay in their where()]).
"""
from __future__ import annotations

import dataclasses
import itertools

import sympy
from sympy.logic.boolalg import Boolean

from optgen.ir.functions import Norm, symbol
from optgen.ir.nodes import Assign, Program, Role, is_tensor_valued


def _runs(body):
    """Consecutive statements with the same guard and no lazily-created state."""
    for _, group in itertools.groupby(body, key=lambda a: (a.guard, a.first is not None)):
        yield list(group)


def cse(program: Program) -> Program:
    roles = dict(program.roles)
    counter = itertools.count()
    body: list[Assign] = []
    for run in _runs(program.body):
        if len(run) < 2 and not _has_repeats(run[0].value):
            body.extend(run)
            continue
        versions: dict[str, sympy.Symbol] = {}   # name → its current version
        inverse: dict[sympy.Symbol, sympy.Symbol] = {}  # every version → the plain name
        renamed = []
        for a in run:
            value = a.value.xreplace({s: versions.get(s.name, s) for s in a.value.free_symbols})
            renamed.append(value)
            versions[a.target] = sympy.Dummy(a.target, real=True)
            inverse[versions[a.target]] = symbol(a.target)
        # A version is named as its plain name (Dummy("grad")), so `roles` gives its role too.
        tensor_symbols = {v for v, plain in inverse.items() if roles[plain.name].is_tensor} \
            | {symbol(n) for n, r in roles.items() if r.is_tensor}
        replacements, reduced = sympy.cse(renamed, symbols=(sympy.Dummy(f"c{i}") for i in itertools.count()),
                                          optimizations=None, order="none")
        names: dict[sympy.Symbol, sympy.Symbol] = {}
        pending = []
        for sub, expr in replacements:
            expr = expr.xreplace(names)
            temporaries = {s for s in names.values() if s.is_Symbol and roles.get(s.name) is Role.TENSOR}
            role = _temporary_role(expr, roles, tensor_symbols | temporaries)
            if role is not None:
                name = f"common{next(counter)}"
                roles[name] = role
                names[sub] = symbol(name)
                pending.append((names[sub], expr))
            else:
                names[sub] = expr
        emitted: set = set()
        for a, value in zip(run, reduced, strict=True):
            value = value.xreplace(names)
            for sym, expr in pending:
                if sym not in emitted and sym in value.free_symbols | _needed(pending, value):
                    body.append(Assign(sym.name, expr.xreplace(inverse), a.guard, a.loc,
                                       f"{sym.name} = {expr.xreplace(inverse)}"))
                    emitted.add(sym)
            body.append(dataclasses.replace(a, value=value.xreplace(inverse)))
    return program.with_body(body, roles=roles)


# Note [Per-tensor scalars stay scalars]
# numel(param), size(grad, 0), norm(param) read a tensor but are one number per tensor (a Python
# number in the for-loop code, a list of numbers in foreach): a repeated one named as a TENSOR
# temporary became torch.full_like(...), which math.sqrt and add's alpha refuse.  So a repeated
# subexpression is a tensor temporary only when it reads a tensor element by element
# (is_tensor_valued); a scalar-valued one is written again where it is used — one Python operation,
# as for any repeated scalar — except when it holds a norm(), a reduction over the whole tensor
# (and a device sync) worth doing once: that one is a per-tensor SCALAR temporary (hoist_scalars
# keeps it in the loop).
def _temporary_role(expr: sympy.Expr, roles, tensors: set) -> Role | None:
    """The role of a temporary for a repeated subexpression, or None to leave it in place."""
    if is_tensor_valued(expr, roles):  # versions (Dummy("grad")) and temporaries are named in roles
        return Role.TENSOR if _worth_a_temporary(expr, tensors) else None
    if any(isinstance(e, Norm) for e in sympy.preorder_traversal(expr)):
        return Role.SCALAR  # Note [Per-tensor scalars stay scalars]
    return None  # a scalar: one Python operation


def _needed(pending, value) -> set:
    """Temporaries a value needs, including those other temporaries need."""
    need = set(value.free_symbols)
    for sym, expr in reversed(pending):
        if sym in need:
            need |= expr.free_symbols
    return need


def _has_repeats(expr: sympy.Expr) -> bool:
    seen = set()
    for sub in sympy.preorder_traversal(expr):
        if sub.args and _worth_a_temporary(sub):
            if sub in seen:
                return True
            seen.add(sub)
    return False


# Note [Comparisons stay in their where()]
# A comparison is a mask, not a number, and the IR has no boolean tensors: every temporary is a float
# tensor of the parameter's dtype (a buffer reuse_buffers may hand to another float value, a
# scalar_t in the C kernel, a float in Triton and the interpreter), and op selection builds a mask
# only as where()'s first argument.  So a repeated `grad > 0` (where(grad > 0, where(grad > 0, grad,
# p), m), or the where()s of two statements) is compared again in each where() — one elementwise
# compare — rather than given a boolean temporary that every backend would need its own type,
# buffers and printing for.  Number-valued parts of a comparison (`grad - m` of `grad - m > 0`) and a
# whole where() are still shared.
def _worth_a_temporary(expr: sympy.Expr, tensors: set | None = None) -> bool:
    if isinstance(expr, Boolean):  # Note [Comparisons stay in their where()]
        return False
    # x**2 is printed as x * x by every backend: no temporary needed for it.
    if (expr.is_Pow and expr.exp == 2) or (expr.is_Mul and len(expr.args) == 2 and expr.args[0] == -1):
        return False
    # Scalars times at most two tensor names or their reciprocals (NAdam's lr / denom in two
    # statements) fold into the op that uses them — add's alpha, addcmul, addcdiv — so a temporary
    # would cost a buffer and an op, and round differently from torch.
    if tensors is not None:
        factors = [f for f in sympy.Mul.make_args(expr) if f.free_symbols & tensors]
        plain = all(f in tensors or (f.is_Pow and f.exp == -1 and f.base in tensors) for f in factors)
        if plain and len(factors) <= 2:
            return False
    return True
