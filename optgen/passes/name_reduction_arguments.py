"""Naming the tensor argument of a per-tensor scalar: ``norm(exp(grad) + sign(m))`` becomes
``norm_arg0 = exp(grad) + sign(m)`` followed by ``norm(norm_arg0)``.

Note [Per-tensor scalars read a name]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``norm``, ``numel``, ``ndim``, ``size`` and ``machine_eps`` turn a tensor into one number per
tensor.  Where they sit in a statement, the backends print them with their *scalar* printers
(Python floats in the for-loop, foreach and differentiable kernels, ``double`` in C), which know
how to ask a tensor for its norm or shape but not how to compute a tensor: a compound argument
came out as ``math.exp(grad) + (float(m > 0) - ...).norm()`` — ``math.exp`` of a tensor, and
``.norm()`` bound to the last operand only.  Rather than teach every scalar printer tensor
arithmetic, this pass gives each compound tensor argument a tensor temporary of its own,
computed just before the statement (under its guard), so every backend sees ``norm(symbol)``:
the Python backends select ops for the temporary like for any tensor statement, and the C
kernel's sweeps (Note [Sweeps] in optgen/backends/sweeps.py) compute it in the walk that
accumulates the norm.  A temporary only ``numel``/``ndim``/``size``/``machine_eps`` read costs a
tensor in the Python kernels (C and Triton compute nothing no stored value needs); such
arguments are rare, and a name is always right.

The argument is evaluated where the statement is, so it reads the values the statement reads
(value semantics).  A statement that creates a lazily initialised state (``first``) is left as
it is when the argument reads that state: on the creating step the state does not exist yet, and
only the statement's ``first`` value may run.  validate (optgen/ir/validate.py) rejects such a
statement with a SpecError naming the rewrite, so that case never reaches a backend.
"""
from __future__ import annotations

import dataclasses
import itertools

import sympy

from optgen.ir.functions import SCALAR_OF_TENSOR, Ndim, Norm, Numel, Size, symbol
from optgen.ir.nodes import Assign, Program, Role, is_tensor_valued
from optgen.spec.reserved import derived_names

_BASE = {Norm: "norm", Numel: "numel", Ndim: "ndim", Size: "size"}


def name_reduction_arguments(program: Program) -> Program:
    roles = dict(program.roles)
    taken = set(roles) | {d for n, r in roles.items() for d in derived_names(n, r is Role.COUNTER)}
    counter = itertools.count()

    def fresh(base: str) -> str:
        while True:
            name = f"{base}_arg{next(counter)}"
            if name not in taken and not taken & set(derived_names(name)):
                taken.add(name)
                return name

    body: list[Assign] = []
    for a in program.body:
        named: dict[sympy.Expr, sympy.Symbol] = {}  # argument → its temporary, for this statement
        lazy = a.first is not None

        def name_arguments(expr: sympy.Expr) -> sympy.Expr:
            if not expr.args:
                return expr
            if isinstance(expr, SCALAR_OF_TENSOR):
                x, *rest = expr.args
                x = name_arguments(x)  # norm(grad * norm(grad - m)): the inner one first
                compound = not x.is_Symbol and is_tensor_valued(x, roles)
                if compound and not (lazy and a.target in {s.name for s in x.free_symbols}):
                    if x not in named:
                        name = fresh(_BASE.get(type(expr), "machine_eps"))
                        roles[name] = Role.TENSOR
                        named[x] = symbol(name)
                        body.append(Assign(name, x, a.guard, a.loc, f"{name} = {x}"))
                    return expr.func(named[x], *rest)
                return expr.func(x, *rest) if x != expr.args[0] else expr
            args = [name_arguments(x) for x in expr.args]
            return expr.func(*args) if args != list(expr.args) else expr

        value = name_arguments(a.value)
        first = name_arguments(a.first) if a.first is not None else None
        body.append(dataclasses.replace(a, value=value, first=first) if named else a)
    if len(body) == len(program.body):
        return program
    return program.with_body(body, roles=roles)
