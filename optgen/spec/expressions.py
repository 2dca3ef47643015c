"""Spec expressions: Python-syntax text → sympy, without ever executing the text.

Text is parsed with :mod:`ast`; only an allow-list of node types, names and functions is turned
into sympy.  Anything else is a :class:`SpecError` at the offending column.  Three grammars:

- **math** (update rules, state `first` values): numbers, declared names, ``+ - * / **``, unary
  minus and the functions in :data:`FUNCTIONS`.
- **condition** (``if`` in update rules, state ``when``): flags, comparisons of hyperparameters
  with numbers, ``and`` / ``or`` / ``not``.
- **check** (constructor validation): comparisons, ``and``/``or``/``not``, subscripts such as
  ``betas[0]``, and the calls in :data:`CHECK_CALLS`; checks are printed back as Python (they run
  on user input at construction time, before any tensor exists), not converted to sympy.
"""
from __future__ import annotations

import ast
import math
from collections.abc import Callable
from typing import Literal, cast, overload

import sympy

from optgen.errors import Location, SpecError

# The IR's vocabulary (optgen/ir/functions.py): the parser builds expressions of these.
from optgen.ir.functions import (
    Clamp,
    IfNone,
    Lerp,
    MachineEps,
    Maximum,
    MeanDim,
    Minimum,
    Ndim,
    NewtonSchulz,
    Norm,
    NormDim,
    Numel,
    Size,
    Where,
    symbol,
)

#: functions whose second argument is a dimension: an integer
DIMENSION_ARGUMENT = ("size", "norm_dim", "mean_dim")


def _conj(x):
    # Complex parameters are handled as real views (torch.view_as_real), so conj is the identity
    # on everything the update sees; accepted so specs can be written as in the papers.  Dropped
    # here rather than kept as sympy.conjugate: sympy removes that only from what it can prove
    # real, and ``conj(beta2 ** step)`` (a power with a symbolic exponent) would reach every
    # backend's printer as a node none of them needs.
    return x


#: name in a spec → (arity, sympy constructor)
FUNCTIONS: dict[str, tuple[int, Callable]] = {
    "sqrt": (1, sympy.sqrt),
    "abs": (1, sympy.Abs),
    "sign": (1, sympy.sign),
    "exp": (1, sympy.exp),
    "log": (1, sympy.log),
    "conj": (1, _conj),
    "lerp": (3, Lerp),
    "maximum": (2, Maximum),
    "minimum": (2, Minimum),
    "clamp": (3, Clamp),
    "clamp_min": (2, lambda x, low: Clamp(x, low, sympy.oo)),
    "clamp_max": (2, lambda x, high: Clamp(x, -sympy.oo, high)),
    "where": (3, Where),
    "norm": (1, Norm),
    "numel": (1, Numel),
    "ndim": (1, Ndim),
    "size": (2, Size),
    "machine_eps": (1, MachineEps),
    "if_none": (2, IfNone),
    "norm_dim": (2, NormDim),
    "mean_dim": (2, MeanDim),
    "newton_schulz": (6, NewtonSchulz),
}

#: calls a constructor check may make, with their arity
CHECK_CALLS = {"isinstance": 2, "numel": 1, "ndim": 1, "len": 1, "float": 1, "int": 1, "is_complex": 1,
               "is_sparse": 1}
CHECK_TYPES = {"Tensor", "float", "int", "bool", "tuple", "list"}

_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b}
_COMPARE = {ast.Lt: sympy.Lt, ast.LtE: sympy.Le, ast.Gt: sympy.Gt, ast.GtE: sympy.Ge,
            ast.Eq: sympy.Eq, ast.NotEq: sympy.Ne}


def node_location(base: Location, node: ast.AST | _SyntaxPos) -> Location:
    """Location of an ast node parsed from text that starts at ``base``."""
    line = getattr(node, "lineno", 1)
    col = getattr(node, "col_offset", 0)
    if line == 1:
        return Location(base.path, base.line, base.col + col)
    return Location(base.path, base.line + line - 1, col + 1)


def strip_located(text: str, loc: Location) -> tuple[Location, str]:
    """``text.strip()`` and the location of its first character (so columns stay exact)."""
    lead = text[: len(text) - len(text.lstrip())]
    if "\n" in lead:
        return Location(loc.path, loc.line + lead.count("\n"), len(lead) - lead.rfind("\n")), text.strip()
    return Location(loc.path, loc.line, loc.col + len(lead)), text.strip()


# Note [Expression limits]
# ~~~~~~~~~~~~~~~~~~~~~~~~
# Everything after parsing walks an expression recursively: ast.unparse (each statement's text),
# sympy's constructors and printers, the passes and the backends' printers.  A spec is data from
# anyone, so its expressions are bounded here, before any of that runs: at most MAX_EXPRESSION_DEPTH
# nested operators and calls (a chain ``a + b + c`` nests one level per operator in Python's
# syntax tree) and MAX_EXPRESSION_NODES operators, names and numbers per expression.  The depth is
# far below what the recursive walkers need at Python's default recursion limit (1000 frames;
# tests/spec/test_spec_limits.py builds an expression at the limit of each kind through every
# backend), and no optimizer needs more: the longest built-in expression has a few dozen nodes.
# Numbers are bounded too (MathBuilder.constant): sympy folds a power of two numbers exactly, and
# ``10 ** 10 ** 10`` would take all memory.
MAX_EXPRESSION_DEPTH = 48
MAX_EXPRESSION_NODES = 400
#: the largest integer (and numerator or denominator) a constant may have: an int64 in C
MAX_INTEGER = 2 ** 63 - 1
#: the largest magnitude of a float constant (the largest finite float64)
MAX_FLOAT = 1.7976931348623157e308
#: the largest exponent a power of two numbers is folded with
MAX_CONSTANT_EXPONENT = 1024


@overload
def parse_python(text: str, loc: Location, mode: Literal["eval"] = "eval") -> ast.Expression: ...
@overload
def parse_python(text: str, loc: Location, mode: Literal["exec"]) -> ast.Module: ...
def parse_python(text: str, loc: Location, mode: Literal["eval", "exec"] = "eval") -> ast.Expression | ast.Module:
    try:
        tree = cast(ast.Expression | ast.Module, ast.parse(text, mode=mode))
    except SyntaxError as e:
        where = node_location(loc, _SyntaxPos(e.lineno or 1, (e.offset or 1) - 1))
        expected = "Python-syntax statements" if mode == "exec" else "a Python-syntax expression"
        raise SpecError(where, f"syntax error: {e.msg} (expected {expected})") from None
    except (RecursionError, MemoryError):  # the parser's own limits, before ours
        raise SpecError(loc, f"expression too deeply nested for Python's parser; at most "
                             f"{MAX_EXPRESSION_DEPTH} levels — split it into several assignments") from None
    check_size(tree, loc)
    return tree


def check_size(tree: ast.AST, loc: Location) -> None:
    """Note [Expression limits]: every expression in ``tree`` within the depth and size bounds.
    Iterative, so that the check itself never recurses."""
    stack: list[tuple[ast.AST, int, ast.AST | None]] = [(tree, 0, None)]
    sizes: dict[int, int] = {}
    while stack:
        node, depth, root = stack.pop()
        if isinstance(node, ast.expr):
            if root is None:
                root, depth = node, 0
            depth += 1
            sizes[id(root)] = sizes.get(id(root), 0) + 1
            if depth > MAX_EXPRESSION_DEPTH:
                raise SpecError(node_location(loc, root), f"expression nested too deeply (more than "
                                f"{MAX_EXPRESSION_DEPTH} levels of operators and calls; a chain a + b + c "
                                "counts one level per operator) — split it into several assignments")
            if sizes[id(root)] > MAX_EXPRESSION_NODES:
                raise SpecError(node_location(loc, root), f"expression too long (more than "
                                f"{MAX_EXPRESSION_NODES} operators, names and numbers) — split it into "
                                "several assignments")
        stack.extend((child, depth, root) for child in ast.iter_child_nodes(node))


class _SyntaxPos:
    def __init__(self, lineno, col_offset):
        self.lineno, self.col_offset = lineno, col_offset


class MathBuilder:
    """Turns ast expressions into sympy, resolving names through ``names``."""

    def __init__(self, base: Location, names: dict[str, str], what: str,
                 choices: dict[str, tuple[str, ...]] | None = None):
        self.base = base
        self.choices = choices or {}
        self.products: list[tuple] = []  # every product chain as written (see product())
        self.names = names  # allowed name → its role, for error messages
        self.what = what

    def error(self, node: ast.AST, message: str) -> SpecError:
        return SpecError(node_location(self.base, node), message)

    def math(self, node: ast.AST) -> sympy.Expr:
        value = self._math(node)
        if value.has(sympy.zoo, sympy.nan):  # 1 / 0, 0 ** -1
            raise self.error(node, f"'{ast.unparse(node)}' divides by zero or is not a number: numbers must be finite")
        if not isinstance(node, ast.Constant):  # sympy folds the numbers of a sum or product
            for number in value.atoms(sympy.Float, sympy.Rational):
                self.constant(number, node)
            self.real_constants(value, node)
        return value

    def real_constants(self, value: sympy.Expr, node: ast.AST) -> None:
        """Note [Expression limits]: a part made of numbers alone (``sqrt(-1)``, ``exp(1000)``) must be
        a finite real number, or no backend can compute it (sympy keeps ``sqrt(-1)`` as ``I``)."""
        if value.has(sympy.I):
            raise self.error(node, f"'{ast.unparse(node)}' is not a real number (the square root or logarithm of "
                                   "a negative number?): the spec language computes with real numbers")
        for part in sympy.preorder_traversal(value):
            if isinstance(part, sympy.Expr) and not part.free_symbols and not part.is_Number \
                    and isinstance(part, sympy.Function):
                number = part.evalf(17)  # the spec's own functions (clamp, minimum, ...) stay unevaluated
                bad = (number.is_Number and not (number.is_finite and abs(number) <= MAX_FLOAT)) \
                    or (not number.is_Number and number.is_real is False)
                if bad:
                    raise self.error(node, f"'{ast.unparse(node)}' computes {sympy.sstr(part)} = "
                                           f"{sympy.sstr(number, full_prec=False)}, which is not a finite real "
                                           "number: numbers must be finite")

    def constant(self, value: sympy.Number, node: ast.AST) -> None:
        """Note [Expression limits]: a number (written or folded by sympy) fits the generated code."""
        if value.is_Float:
            ok = bool(value.is_finite) and abs(value) <= MAX_FLOAT
        else:
            ok = abs(value.p) <= MAX_INTEGER and value.q <= MAX_INTEGER
        if not ok:
            raise self.error(node, f"'{ast.unparse(node)}' computes the constant {sympy.Float(value, 3)}, which is "
                                   "out of range: numbers must be finite floats or integers of at most "
                                   f"{MAX_INTEGER} in size")

    def power(self, node: ast.BinOp, base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
        """``base ** exponent``, refusing to fold a power of two numbers whose result is huge (sympy
        computes it exactly: ``10 ** 10 ** 10`` would take all memory)."""
        if isinstance(base, sympy.Number) and isinstance(exponent, sympy.Number) and abs(base) not in (0, 1):
            big = abs(exponent) > MAX_CONSTANT_EXPONENT
            if not big and base.is_finite and exponent.is_finite:
                big = float(abs(exponent)) * max(abs(float(sympy.log(abs(base), 10))), 0) > 308
            if big:
                raise self.error(node, f"the constant '{ast.unparse(node)}' is too large to compute: a power of "
                                       f"two numbers must stay within float64's range (exponent at most "
                                       f"{MAX_CONSTANT_EXPONENT})")
        return base ** exponent

    def _math(self, node: ast.AST) -> sympy.Expr:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            if isinstance(node.value, float) and not math.isfinite(node.value) \
                    or isinstance(node.value, int) and abs(node.value) > MAX_INTEGER:
                raise self.error(node, f"the number '{ast.unparse(node)}' is out of range: numbers must be "
                                       f"finite floats or integers of at most {MAX_INTEGER} in size")
            return sympy.Integer(node.value) if isinstance(node.value, int) else sympy.Float(node.value)
        if isinstance(node, ast.Constant):
            raise self.error(node, f"{node.value!r} is not a number; {self.what} takes numbers and names")
        if isinstance(node, ast.Name):
            if node.id not in self.names:
                known = ", ".join(sorted(self.names)) or "none"
                raise self.error(node, f"unknown name '{node.id}' in {self.what}; known names: {known}")
            return symbol(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            if isinstance(node.op, (ast.Mult, ast.Div)):
                return self.product(node)
            if isinstance(node.op, ast.Pow):
                return self.power(node, self.math(node.left), self.math(node.right))
            return _BINOPS[type(node.op)](self.math(node.left), self.math(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self.math(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr in FUNCTIONS:  # m.sqrt(): torch style
                receiver = ast.unparse(node.func.value)
                args = ", ".join([receiver, *(ast.unparse(a) for a in node.args)])
                raise self.error(node, f"methods are not part of the spec language: write "
                                       f"{node.func.attr}({args}) instead of '{ast.unparse(node)}'")
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
                raise self.error(node, f"unknown function '{name}'; available: {', '.join(sorted(FUNCTIONS))}")
            arity, make = FUNCTIONS[node.func.id]
            if node.keywords or len(node.args) != arity:
                hint = ("; for one bound use clamp_min(x, low) or clamp_max(x, high)"
                        if node.func.id == "clamp" and len(node.args) == 2 and not node.keywords else "")
                raise self.error(node, f"{node.func.id}() takes {arity} positional argument(s){hint}")
            if node.func.id == "where":
                return make(self.comparison(node.args[0]), self.math(node.args[1]), self.math(node.args[2]))
            if node.func.id in DIMENSION_ARGUMENT:
                x, dim = self.math(node.args[0]), self.math(node.args[1])
                if not dim.is_Integer:  # it becomes torch's dim= and the C kernels' loop shape
                    raise self.error(node.args[1], f"the dimension of {node.func.id}() must be an integer such "
                                                   f"as -1, not '{ast.unparse(node.args[1])}'")
                return make(x, dim)
            return make(*(self.math(a) for a in node.args))
        if isinstance(node, ast.Compare | ast.BoolOp) or isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            raise self.error(node, f"'{ast.unparse(node)}' is a condition, not a value: a comparison may only be the "
                                   "first argument of where(condition, a, b), or the test of an 'if'")
        raise self.error(node, f"'{ast.unparse(node)}' is not allowed in {self.what}: "
                               "use numbers, names, + - * / **, and functions such as sqrt, lerp")

    def product(self, node: ast.expr) -> sympy.Expr:
        """A chain ``a * b / c * d``; its factors are recorded in written order (``self.products``),
        because sympy reorders them and the order of floating-point operations is the author's."""
        chain = []
        while isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
            chain.append(("*" if isinstance(node.op, ast.Mult) else "/", node.right))
            node = node.left
        chain.append(("*", node))
        factors = tuple((op, self.math(n)) for op, n in reversed(chain))
        value = sympy.Integer(1)
        for op, f in factors:
            value = value * f if op == "*" else value / f
        self.products.append(factors)
        return value

    def choice_test(self, node: ast.Compare) -> sympy.Basic:
        """``adjust_lr_fn == "original"``: a choice hyperparameter against one of its values."""
        right = node.comparators[0]
        value = str(right.value) if isinstance(right, ast.Constant) else ""  # a str: condition() checked
        name = node.left.id if isinstance(node.left, ast.Name) else None
        choices = self.choices.get(name) if name is not None else None
        if name is None or choices is None:
            raise self.error(node, f"'{ast.unparse(node.left)}' is not a choice hyperparameter; only those "
                                   "compare with strings")
        if value not in choices:
            raise self.error(node.comparators[0], f"'{value}' is not one of {', '.join(choices)}")
        # The value is a symbol named with its quotes, so printers write it as a string literal.
        test = sympy.Eq(symbol(name), sympy.Symbol(f'"{value}"'), evaluate=False)
        return test if isinstance(node.ops[0], ast.Eq) else sympy.Not(test)

    def comparison(self, node: ast.AST) -> sympy.Basic:
        """The first argument of where(): one comparison of two math expressions."""
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
            return _COMPARE[type(node.ops[0])](self.math(node.left), self.math(node.comparators[0]),
                                               evaluate=False)
        raise self.error(node, f"'{ast.unparse(node)}' is not a comparison: where() takes one, e.g. "
                               "where(grad * prev > 0, a, b)")

    def condition(self, node: ast.AST) -> sympy.Basic:
        if isinstance(node, ast.BoolOp):
            parts = [self.condition(v) for v in node.values]
            return sympy.And(*parts) if isinstance(node.op, ast.And) else sympy.Or(*parts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return sympy.Not(self.condition(node.operand))
        if isinstance(node, ast.Constant) and isinstance(node.value, bool):
            return sympy.true if node.value else sympy.false
        if isinstance(node, ast.Name):
            if self.names.get(node.id) != "flag":
                raise self.error(node, f"'{node.id}' is not a flag; a condition names a flag "
                                       f"(a boolean hyperparameter) or compares a hyperparameter")
            return symbol(node.id)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.Eq, ast.NotEq)) \
                and isinstance(node.comparators[0], ast.Constant) and isinstance(node.comparators[0].value, str):
            return self.choice_test(node)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
            return _COMPARE[type(node.ops[0])](self.math(node.left), self.math(node.comparators[0]))
        raise self.error(node, f"'{ast.unparse(node)}' is not a condition: expected a flag, a comparison "
                               "such as 'weight_decay != 0', or and/or/not of those")


def parse_math(text: str, loc: Location, names: dict[str, str], what: str) -> sympy.Expr:
    loc, text = strip_located(text, loc)
    tree = parse_python(text, loc)
    return MathBuilder(loc, names, what).math(tree.body)


def parse_condition(text: str, loc: Location, names: dict[str, str], what: str) -> sympy.Basic:
    loc, text = strip_located(text, loc)
    tree = parse_python(text, loc)
    return MathBuilder(loc, names, what).condition(tree.body)


_CHECK_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub,
                ast.Compare, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq, ast.Is, ast.IsNot,
                ast.Constant, ast.Name, ast.Load, ast.Subscript, ast.Call, ast.BinOp, ast.Add,
                ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.In, ast.NotIn, ast.List, ast.Tuple)


def validate_check(tree: ast.AST, loc: Location, names: set[str], *, calls: dict[str, int], types: set[str],
                   nodes: tuple, what: str = "a check", name_scope: str = "check",
                   constructs: str = "subscripts") -> None:
    """The allow-list of Python checks (constructor validation, scheduler checks): only ``nodes``,
    the given names and type names, and ``calls`` with their arities.  Errors point at the node."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not isinstance(node, nodes):
            while not hasattr(node, "lineno") and node in parents:  # an operator: show its expression
                node = parents[node]
            raise SpecError(node_location(loc, node), f"'{ast.unparse(node)}' is not allowed in {what}: use "
                                                      f"comparisons, and/or/not, + - * /, {constructs} and calls "
                                                      f"of {', '.join(calls)}")
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in calls
                    and len(node.args) == calls[node.func.id] and not node.keywords):
                raise SpecError(node_location(loc, node),
                                f"'{ast.unparse(node)}': {what} may call only "
                                + ", ".join(f"{n}() with {a} argument(s)" for n, a in calls.items()))
        if isinstance(node, ast.Name) and node.id not in names | types | set(calls):
            raise SpecError(node_location(loc, node),
                            f"unknown name '{node.id}' in {name_scope}; known names: {', '.join(sorted(names))}")


def parse_check(text: str, loc: Location, names: set[str]) -> str:
    """Validates a constructor check against the allow-list; returns it as normalised Python."""
    loc, text = strip_located(text, loc)
    tree = parse_python(text, loc)
    validate_check(tree, loc, names, calls=CHECK_CALLS, types=CHECK_TYPES | {"None"}, nodes=_CHECK_NODES)
    return ast.unparse(_NumelAsMethod().visit(tree.body))


class _NumelAsMethod(ast.NodeTransformer):
    """``numel(x)`` in a spec check is printed as ``x.numel()`` in the generated constructor."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        methods = {"numel": "numel", "ndim": "dim", "is_complex": "is_complex"}
        if isinstance(node.func, ast.Name) and node.func.id == "is_sparse":  # an attribute in torch
            return ast.Attribute(value=node.args[0], attr="is_sparse", ctx=ast.Load())
        if isinstance(node.func, ast.Name) and node.func.id in methods:
            method = ast.Attribute(value=node.args[0], attr=methods[node.func.id], ctx=ast.Load())
            return ast.Call(func=method, args=[], keywords=[])
        return node


def parse_rule(text: str, loc: Location) -> ast.Module:
    """An update rule: a block of Python-syntax statements (parsed, never run)."""
    return parse_python(text, loc, mode="exec")
