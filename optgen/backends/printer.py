"""Printing IR expressions as infix code: the base the C and Triton printers share, and the
error every fused backend raises for what it cannot express.

One sympy :class:`~sympy.printing.printer.Printer` subclass per language, sharing
:class:`InfixPrinter`: infix arithmetic that reads like hand-written code (``1 - beta1``,
``step_size * exp_avg / denom``), with the language's differences in tables and a few hooks
(how to write a power, a select, a NaN-propagating maximum).  :class:`~optgen.backends.c_printer.CScalarPrinter`
sets ``FUNCTIONS = {sympy.exp: "exp({0})", ...}`` and ``power`` / ``select`` and inherits the rest;
so do :class:`~optgen.backends.c_printer.CElementPrinter` and
:class:`~optgen.backends.triton_printer.TritonPrinter`.

Anything a language cannot express raises :class:`Unsupported` with a sentence saying why — at
build time, never as wrong code — and the backend turns that into its fallback message in
``optgen show`` (:meth:`optgen.backends.fused.FusedBackend.unsupported`).

The Python backends print host scalars with :class:`optgen.backends.printing.PythonScalarPrinter`,
not this base: a product of several denominators divides once (``x / (a * b)``) where this base
writes ``x / a / b``, and a sum keeps sympy's order for its number (``1 + a + b``) where this base
moves it last (``a + b + 1``).  Both can round differently, and the Python kernels' bit-exact
parity rests on that printer's order, so the two are not merged.

Note [Powers in fused kernels]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``x ** 2`` prints as ``x * x`` and ``x ** 0.5`` as a square root; Triton writes integer powers up
to the 8th as products (a few roundings, where exp/log would lose ``n * |log x|`` ulps), and higher
ones as ``exp(n * log(|x|))`` with the sign of ``x`` for an odd ``n`` — torch's ``x ** 6`` of a
negative ``x`` is positive, where ``exp(6 * log(x))`` is NaN.  A power with a non-integer or
symbolic exponent (``beta1 ** step``, ``0.96 ** (step * momentum_decay)``) prints as
``exp(e * log(b))``, which is exact in float64 — where the Triton kernel computes every scalar,
bias corrections included — and holds for the bases optimizers use (b > 0; b = 0 gives
exp(-inf) = 0).  A constant base has its logarithm folded at build time, so no float32
constant is ever rounded on the way.

Note [Precedence as printed]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Whether a subexpression needs parentheses depends on the text it prints as, not on its sympy
class: ``lerp(a, b, w)`` prints as the sum ``a + w * (b - a)`` and ``x ** 2`` as the product
``x * x``, so ``c - lerp(a, b, w)`` and ``c / x ** 2`` need them although sympy ranks a function
call and a power above any operator.  :meth:`InfixPrinter.precedence` is the one place that
knows; a printer that writes lerp as a call (the C element printer's ``lerp_of``) keeps sympy's
rank for it.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import sympy
from sympy.printing.precedence import PRECEDENCE, precedence
from sympy.printing.printer import Printer

from optgen.backends.printing import is_negative, join_sum, split_fraction


class Unsupported(Exception):
    """What a fused backend cannot express (an expression, a state's shape, a reduction); the
    message says why, and becomes the backend's fallback message in ``optgen show``."""


def identifier(text: str) -> str:
    """A readable identifier from a condition or expression: ``weight_decay != 0`` → ``weight_decay_ne_0``."""
    words = {"!=": " ne ", "==": " eq ", "<=": " le ", ">=": " ge ", "<": " lt ", ">": " gt ",
             "**": " pow ", "*": " times ", "/": " over ", "+": " plus ", " - ": " minus ", "-": " neg "}
    for op, word in words.items():
        text = text.replace(op, word)
    text = re.sub(r"math\.|\(|\)|\"|'", " ", text).replace(".", "_")
    text = re.sub(r"[^0-9A-Za-z_]+", "_", text.strip()).strip("_")
    return re.sub(r"_+", "_", text)


def is_condition(expr) -> bool:
    """Whether ``expr`` is a comparison or a boolean combination of them."""
    # (sympy's Symbol is a Boolean too, so test for the condition node types themselves)
    return isinstance(expr, (sympy.core.relational.Relational, sympy.logic.boolalg.BooleanFunction))

#: spec functions that are not elementwise, and why a one-pass elementwise kernel cannot run them
NOT_ELEMENTWISE = {
    "Norm": "norm() reduces a whole tensor to a scalar before the update can use it",
    "NormDim": "norm_dim() reduces over a dimension (a factored second moment)",
    "MeanDim": "mean_dim() reduces over a dimension (a factored second moment)",
    "NewtonSchulz": "newton_schulz() is a matrix iteration (an intrinsic), not elementwise",
    "Size": "size() depends on the tensor's shape, which the flat multi-tensor kernel does not see",
    "Ndim": "ndim() depends on the tensor's shape, which the flat multi-tensor kernel does not see",
    "MachineEps": "machine_eps() is not available inside the kernel yet",
    "IfNone": "if_none() reads a hyperparameter that may be None, which a kernel argument cannot be",
}


class InfixPrinter(Printer):
    """Arithmetic in infix form with C-family precedence; subclasses fill the tables.

    ``rename`` maps an IR name to the variable that holds it in the generated code.
    """

    printmethod = "_optgen_infix"
    #: sympy function class → format string over the printed arguments, e.g. "tl.exp({0})"
    FUNCTIONS: dict = {}
    #: integer powers up to this one print as products (x * x * x), higher ones call ``power``
    PRODUCT_POWERS = 4
    #: relational operator → its text
    RELATIONS = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}

    def __init__(self, rename: Callable[[str], str] = lambda name: name):
        super().__init__()
        self.rename = rename

    # -- hooks ---------------------------------------------------------------------------------
    def sqrt(self, x: str) -> str:
        raise NotImplementedError

    def power(self, base: sympy.Expr, exponent: sympy.Expr) -> str:
        """``base ** exponent`` for a non-integer or symbolic exponent."""
        raise NotImplementedError

    def select(self, condition: str, a: str, b: str) -> str:
        raise NotImplementedError

    def maximum(self, a: str, b: str) -> str:
        raise NotImplementedError

    def minimum(self, a: str, b: str) -> str:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------
    def __call__(self, expr) -> str:
        return self.doprint(sympy.sympify(expr))

    def emptyPrinter(self, expr):
        name = type(expr).__name__
        if name in NOT_ELEMENTWISE:
            raise Unsupported(NOT_ELEMENTWISE[name])
        raise Unsupported(f"no {type(self).__name__} rule for {name} ({expr})")

    def precedence(self, expr) -> int:
        """How tightly ``expr`` binds as this printer writes it (see Note [Precedence as printed])."""
        if type(expr).__name__ == "Lerp" and type(self)._print_Lerp is InfixPrinter._print_Lerp:
            return PRECEDENCE["Add"]  # a + w * (b - a)
        if expr.is_Pow:
            exponent = expr.exp
            if exponent == -sympy.S.Half or exponent.is_Integer and 1 <= abs(int(exponent)) <= self.PRODUCT_POWERS:
                return PRECEDENCE["Mul"]  # x * x, 1 / (x * x), 1 / sqrt(x)
        return precedence(expr)

    def paren(self, expr, level: int, strict: bool = False) -> str:
        text = self._print(expr)
        p = self.precedence(expr)
        if p < level or (strict and p == level) or (text.startswith("-") and level > PRECEDENCE["Add"]):
            return f"({text})"
        return text

    def _print_Symbol(self, expr):
        if expr.name.startswith('"'):
            raise Unsupported(f"the choice {expr.name} can only be tested on the host")
        return self.rename(expr.name)

    def _print_Integer(self, expr):
        return str(int(expr))

    def _print_Rational(self, expr):
        return repr(float(expr))

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Half(self, expr):
        return "0.5"

    def _print_NegativeOne(self, expr):
        return "-1"

    def _print_Infinity(self, expr):
        return 'float("inf")'

    def _print_NegativeInfinity(self, expr):
        return '-float("inf")'

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    def _print_Add(self, expr):
        # step + 1 and 1 - x, not 1 + step and -x + 1
        terms = sorted(expr.args,
                       key=lambda t: (is_negative(t), t.is_Number and not any(map(is_negative, expr.args))))
        return join_sum(self.paren, terms)

    def _print_Mul(self, expr):
        if is_negative(expr):
            return f"-{self.paren(-expr, PRECEDENCE['Mul'])}"
        num, den = split_fraction(expr)
        text = " * ".join(self.paren(f, PRECEDENCE["Mul"]) for f in num) if num else "1"
        for d in den:
            text += f" / {self.paren(d, PRECEDENCE['Mul'], strict=True)}"
        return text

    def _print_Pow(self, expr):
        base, exponent = expr.base, expr.exp
        if exponent == sympy.S.Half:
            return self.sqrt(self._print(base))
        if exponent == -sympy.S.Half:
            return f"1 / {self.sqrt(self._print(base))}"
        if exponent.is_Integer and 1 <= abs(int(exponent)) <= self.PRODUCT_POWERS:
            factors = " * ".join([self.paren(base, PRECEDENCE["Mul"], strict=True)] * abs(int(exponent)))
            return factors if exponent > 0 else f"1 / ({factors})" if abs(int(exponent)) > 1 else f"1 / {factors}"
        return self.power(base, exponent)

    def _print_Relational(self, expr):
        lhs = self.paren(expr.lhs, PRECEDENCE["Add"])
        rhs = self.paren(expr.rhs, PRECEDENCE["Add"])
        return f"{lhs} {self.RELATIONS[expr.rel_op]} {rhs}"

    def _print_And(self, expr):
        return " & ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Or(self, expr):
        return " | ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Not(self, expr):
        return f"~({self._print(expr.args[0])})"

    def _print_conjugate(self, expr):
        # Complex tensors reach the kernels as real views (torch.view_as_real): conj is the identity.
        return self._print(expr.args[0])

    def _print_Lerp(self, expr):
        a, b, w = expr.args
        return (f"{self.paren(a, PRECEDENCE['Add'])} + {self.paren(w, PRECEDENCE['Mul'])} * "
                f"({self._print(b)} - {self.paren(a, PRECEDENCE['Add'], strict=True)})")

    def _print_Maximum(self, expr):
        return self.maximum(self._print(expr.args[0]), self._print(expr.args[1]))

    def _print_Minimum(self, expr):
        return self.minimum(self._print(expr.args[0]), self._print(expr.args[1]))

    def _print_Clamp(self, expr):
        x, low, high = expr.args
        out = self._print(x)
        if low != -sympy.oo:
            out = self.maximum(out, self._print(low))
        if high != sympy.oo:
            out = self.minimum(out, self._print(high))
        return out

    def _print_Where(self, expr):
        condition, a, b = expr.args
        return self.select(self._print(condition), self._print(a), self._print(b))

    def _print_sign(self, expr):
        x = self.paren(expr.args[0], PRECEDENCE["Add"])
        return self.select(f"{x} > 0", "1.0", self.select(f"{x} < 0", "-1.0", "0.0"))

    def _print_Function(self, expr):
        template = self.FUNCTIONS.get(type(expr))
        if template is None:
            return self.emptyPrinter(expr)
        return template.format(*(self._print(a) for a in expr.args))
