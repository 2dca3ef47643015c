"""TritonPrinter's text means the expression it prints (Note [Precedence as printed],
Note [Constant subexpressions in Triton], Note [Powers in fused kernels]).

Each expression is printed, the text evaluated in Python with ``tl`` standing for plain math
functions, and compared with sympy's value of the expression: a missing parenthesis
(``c - a + w * (b - a)`` for ``c - lerp(a, b, w)``, ``a / b * b`` for ``a / b ** 2``) changes
the value.
"""
from __future__ import annotations

import math

import pytest
import sympy

from optgen.backends.triton_printer import TritonPrinter
from optgen.ir.functions import Clamp, Lerp, Maximum

a, b, c, w = sympy.symbols("a b c w", real=True)
VALUES = {"a": 1.3, "b": -0.7, "c": 2.9, "w": 0.45}


class _tl:
    """The part of triton.language the printed expressions use, on Python floats."""
    exp, log, sqrt, abs = math.exp, math.log, math.sqrt, abs
    float64 = "float64"

    class PropagateNan:
        ALL = "all"

    @staticmethod
    def maximum(x, y, propagate_nan=None):
        return max(x, y)

    @staticmethod
    def minimum(x, y, propagate_nan=None):
        return min(x, y)

    @staticmethod
    def where(condition, x, y):
        return x if condition else y

    @staticmethod
    def full(shape, value, dtype):
        assert shape == () and dtype == "float64"
        return float(value)


def _value(expr) -> float:
    expr = expr.replace(Lerp, lambda x, y, t: x + t * (y - x))
    expr = expr.replace(Clamp, lambda x, lo, hi: sympy.Min(sympy.Max(x, lo), hi))
    expr = expr.replace(Maximum, sympy.Max)
    return float(expr.subs({sympy.Symbol(k, real=True): v for k, v in VALUES.items()}).evalf(30))


CASES = [
    c - Lerp(a, b, w),                 # lerp prints as a sum
    c * Lerp(a, b, w),
    c / Lerp(a, b, w),
    Lerp(a, b, w) ** 2,
    Lerp(a, b, w) - Lerp(b, c, w),
    Lerp(a - b, c, -w),
    a / b ** 2,                        # x ** 2 prints as a product
    a / (b * c) ** 2,
    2 / (a + c) ** 3,
    a / b ** -2,
    c - b ** 2,
    a ** (b ** 2),
    b ** 6,                            # a negative base: products up to the 8th power
    b ** 7,
    b ** 9,                            # then |b| ** n, with b's sign for an odd n
    b ** 12,
    b ** -9,
    (a + b) ** -5,
    a ** sympy.Rational(3, 2),
]


@pytest.mark.parametrize("expr", CASES, ids=str)
def test_printed_text_has_the_expressions_value(expr):
    text = TritonPrinter()(expr)
    got = eval(text, {"tl": _tl, "float": float, **VALUES})  # noqa: S307 - our own printer's output
    assert got == pytest.approx(_value(expr), rel=1e-13), text


@pytest.mark.parametrize("expr", [sympy.exp(Clamp(2, -3, 3)), sympy.sqrt(2), sympy.log(Maximum(3, 2)), sympy.E,
                                  a * sympy.exp(2)], ids=str)
def test_numbers_in_a_constant_subexpression_are_float64(expr):
    # tl.exp(2) is an int32 exponential, which Triton refuses; tl.exp(0.5) a float32 one
    text = TritonPrinter()(expr)
    assert "tl.full((), " in text and not any(f"({n}" in text for n in ("2)", "2,", "3,", "-3,")), text
    got = eval(text, {"tl": _tl, "float": float, **VALUES})  # noqa: S307
    assert got == pytest.approx(_value(expr), rel=1e-13), text


def test_numbers_beside_a_symbol_stay_as_written():
    # a number next to a float64 scalar or a block takes its type: no tl.full needed (nor wanted)
    assert TritonPrinter()(a + 1) == "a + 1"
    assert TritonPrinter()(Clamp(a, -1, 1)) == ("tl.minimum(tl.maximum(a, -1, propagate_nan=tl.PropagateNan.ALL), "
                                                "1, propagate_nan=tl.PropagateNan.ALL)")
