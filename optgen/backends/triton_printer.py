"""Printing IR expressions as Triton for the fused CUDA backend (optgen/backends/triton.py), on
the shared :class:`~optgen.backends.printer.InfixPrinter` (Note [Powers in fused kernels] and
Note [Precedence as printed] in optgen/backends/printer.py).

Note [Constant subexpressions in Triton]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A number in a Triton kernel is a constexpr that takes the type of the tensor it meets (so
``step + 1`` stays float64), but an operation on numbers alone types them itself: ``tl.exp(2)``
is an int32 exponential, which Triton refuses, and ``tl.exp(0.5)`` would be a float32 one.
sympy leaves calls on numbers unevaluated (``exp(2)``, ``sqrt(2)``, ``clamp(2, -3, 3)``), so
:class:`TritonPrinter` writes every number inside a symbol-free subexpression as a float64
scalar, ``tl.full((), 2.0, tl.float64)``: such a subexpression is computed in float64 as the
kernel's other scalars are (they are hoisted out of the elementwise loop like any scalar).
"""
from __future__ import annotations

from collections.abc import Callable

import sympy
from sympy.printing.precedence import PRECEDENCE

from optgen.backends.printer import InfixPrinter, Unsupported


def _float_literal(value: float) -> str:
    return f'float("{value}")' if value != value or value in (float("inf"), -float("inf")) else repr(value)


class TritonPrinter(InfixPrinter):
    """Triton (``triton.language as tl``) expressions over loaded blocks and scalars.

    Square roots are ``tl.sqrt`` (on NVIDIA GPUs float32 ``sqrt.approx``, about 1 ulp; float64 is
    correctly rounded); maximum/minimum propagate NaN as torch's do.
    """

    FUNCTIONS = {sympy.exp: "tl.exp({0})", sympy.log: "tl.log({0})", sympy.Abs: "tl.abs({0})"}
    PRODUCT_POWERS = 8  # see Note [Powers in fused kernels]

    def __init__(self, rename: Callable[[str], str] = lambda name: name, numel: str = "numel"):
        super().__init__(rename)
        self.numel = numel
        self._in_constant = False

    def _print(self, expr, **kwargs):
        # See Note [Constant subexpressions in Triton]
        if expr.is_NumberSymbol or self._in_constant and expr.is_Number:  # e (exp(1)), pi, or 2 in exp(2)
            return f"tl.full((), {_float_literal(float(expr))}, tl.float64)"
        if self._in_constant:
            return super()._print(expr, **kwargs)
        if isinstance(expr, sympy.Expr) and not expr.is_Number and not expr.free_symbols:
            self._in_constant = True
            try:
                return super()._print(expr, **kwargs)
            finally:
                self._in_constant = False
        return super()._print(expr, **kwargs)

    def sqrt(self, x: str) -> str:
        return f"tl.sqrt({x})"

    def power(self, base, exponent) -> str:  # see Note [Powers in fused kernels]
        if base.is_Number:
            if base <= 0:
                raise Unsupported(f"{base} ** {exponent}: a power of a non-positive constant")
            log = sympy.Float(sympy.log(base).evalf(17), 17)
            return f"tl.exp({self.paren(exponent * log, PRECEDENCE['Mul'])})"
        if exponent.is_Integer:  # a negative base too: |b| ** n, negated for an odd n
            b = self._print(base)
            magnitude = f"tl.exp({int(exponent)} * tl.log(tl.abs({b})))"
            return magnitude if exponent.is_even else f"tl.where({b} < 0, -{magnitude}, {magnitude})"
        return f"tl.exp({self.paren(exponent, PRECEDENCE['Mul'])} * tl.log({self._print(base)}))"

    def select(self, condition: str, a: str, b: str) -> str:
        return f"tl.where({condition}, {a}, {b})"

    def maximum(self, a: str, b: str) -> str:
        return f"tl.maximum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)"

    def minimum(self, a: str, b: str) -> str:
        return f"tl.minimum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)"

    def _print_sign(self, expr):
        # .to(COMPUTE), the kernel's compute dtype: the literals 1.0 / -1.0 / 0.0 make a float32
        # result, and a float64 kernel then computed log(1 + |sign(m)|) in float32.  (A @triton.jit
        # helper would not run under the interpreter, which runs only the kernel itself.)
        return super()._print_sign(expr) + ".to(COMPUTE)"

    def _print_Numel(self, expr):
        # Every tensor an elementwise kernel touches has the parameter's number of elements.
        return f"{self.numel}.to(tl.float64)"

