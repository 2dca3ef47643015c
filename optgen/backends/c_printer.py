"""Printing IR expressions as C for the fused CPU backend (optgen/backends/c.py).

Two printers share :class:`~optgen.backends.printer.InfixPrinter`'s arithmetic:

- :class:`CScalarPrinter`: per-tensor scalars in ``double`` before the elementwise loop — bias
  corrections and the like, computed with C's ``pow``/``sqrt``/``exp`` as Python's float
  arithmetic computes them in the for-loop kernel;
- :class:`CElementPrinter`: the elementwise update in ``scalar_t`` (``float`` or ``double``, the
  parameters' dtype, one compile each): ``SQRT``/``EXP``/... are the macros of that type, so a
  float32 update never widens to double, and maximum/minimum propagate NaN as torch's do.
"""
from __future__ import annotations

from collections.abc import Callable

import sympy

from optgen.backends.printer import InfixPrinter, Unsupported
from optgen.backends.sweeps import FULL, Extent
from optgen.ir.guards import evaluation_order


class _CPrinter(InfixPrinter):
    RELATIONS = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}

    def select(self, condition: str, a: str, b: str) -> str:
        return f"({condition} ? {a} : {b})"

    # locals → where first assigned: && / || operands in evaluation order, as the Python kernels
    # (Note [Guards evaluate in the order they were written] in optgen/ir/guards.py)
    defined_at: dict[str, int] = {}

    def _print_And(self, expr):
        return " && ".join(f"({self._print(a)})" for a in evaluation_order(expr.args, self.defined_at))

    def _print_Or(self, expr):
        return " || ".join(f"({self._print(a)})" for a in evaluation_order(expr.args, self.defined_at))

    def _print_Not(self, expr):
        return f"!({self._print(expr.args[0])})"

    def _print_BooleanTrue(self, expr):
        return "1"

    def _print_BooleanFalse(self, expr):
        return "0"

    def _print_Infinity(self, expr):
        return "INFINITY"

    def _print_NegativeInfinity(self, expr):
        return "-INFINITY"

    def __init__(self, rename: Callable[[str], str] = lambda name: name,
                 extent: Callable[[sympy.Expr], Extent] = lambda expr: FULL):
        super().__init__(rename)
        self.extent = extent

    # The (B, M, C) view of the tensor (Note [Sweeps]) and its dtype.  The shape is that of the
    # argument: a reduced-shape value (norm_dim(grad, -1), a zeros_reduced state) keeps the
    # dimensions it reduced with size 1, so its numel and sizes are not the parameter's.
    def _print_Numel(self, expr):
        extent = self.extent(expr.args[0])
        if extent == FULL:
            return "(double)numel"
        factors = [d for d, kept in (("dim_b", extent.b), ("dim_m", extent.m), ("dim_c", extent.c)) if kept]
        return f"(double)({' * '.join(factors)})" if factors else "1.0"

    def _print_Ndim(self, expr):
        return "(double)ndim"  # reductions keep the dimension (size 1)

    def _print_Size(self, expr):
        dim = expr.args[1]
        if dim not in (-1, -2):
            raise Unsupported(f"{expr}: the fused kernels know the sizes of the last two dimensions")
        extent = self.extent(expr.args[0])
        if not (extent.c if dim == -1 else extent.m):
            return "1.0"
        return "(double)dim_c" if dim == -1 else "(double)dim_m"

    def _print_MachineEps(self, expr):
        return "STORAGE_EPS"


class CScalarPrinter(_CPrinter):
    """``double`` expressions: what Python's float arithmetic computes (C's libm, as CPython's)."""

    FUNCTIONS = {sympy.exp: "exp({0})", sympy.log: "log({0})", sympy.Abs: "fabs({0})"}

    def sqrt(self, x: str) -> str:
        return f"sqrt({x})"

    def power(self, base, exponent) -> str:
        return f"pow({self._print(base)}, {self._print(exponent)})"

    def maximum(self, a: str, b: str) -> str:
        return f"fmax({a}, {b})"  # Python's max() of two numbers (NaN-free host scalars)

    def minimum(self, a: str, b: str) -> str:
        return f"fmin({a}, {b})"

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_IfNone(self, expr):  # a None hyperparameter arrives as NaN (c_launch)
        h, fallback = (self._print(a) for a in expr.args)
        return f"(isnan({h}) ? {fallback} : {h})"

    def _print_Rational(self, expr):
        return repr(float(expr))


class CElementPrinter(_CPrinter):
    """``scalar_t`` expressions over one element of each tensor.  Non-integer constants never
    appear here: the backend hoists every scalar subexpression into a ``scalar_t`` before the loop."""

    FUNCTIONS = {sympy.exp: "EXP({0})", sympy.log: "LOG({0})", sympy.Abs: "FABS({0})"}

    def sqrt(self, x: str) -> str:
        return f"SQRT({x})"

    def power(self, base, exponent) -> str:
        return f"POW({self._print(base)}, {self._print(exponent)})"

    def maximum(self, a: str, b: str) -> str:
        return f"max_nan({a}, {b})"

    def minimum(self, a: str, b: str) -> str:
        return f"min_nan({a}, {b})"

    def _print_Float(self, expr):
        return f"(scalar_t){float(expr)!r}"

    def _print_Rational(self, expr):
        return f"(scalar_t){float(expr)!r}"

    def _print_Half(self, expr):
        return "(scalar_t)0.5"

    def _print_sign(self, expr):
        return f"sign_of({self._print(expr.args[0])})"

    def _print_Lerp(self, expr):
        """torch's lerp: from the nearer end, so weight 1 gives exactly ``b`` (SWA's first average)."""
        a, b, w = (self._print(x) for x in expr.args)
        return f"lerp_of({a}, {b}, {w})"


__all__ = ["CElementPrinter", "CScalarPrinter", "Unsupported"]
