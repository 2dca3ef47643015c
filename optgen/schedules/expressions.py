"""Schedule formulas: Python-syntax text → sympy, without ever executing the text.

The optimizer specs' grammar (:mod:`optgen.spec.expressions`) is for elementwise tensor updates;
a schedule is a scalar function of the step count with phases, so its grammar adds conditionals
and the integer arithmetic schedules are made of.  Text is parsed with :mod:`ast`; only the
allow-listed nodes below become sympy, anything else is a :class:`SpecError` at its column.

- numbers, ``pi``, declared names; ``+ - * / ** // %`` and unary minus;
- functions: ``cos sin exp log sqrt abs floor ceil min max`` (``log(x, base)`` too),
  ``where(condition, a, b)`` — a :class:`sympy.Piecewise`, the shape of cyclic, one-cycle and
  warm-up schedules —, ``count_le(milestones, t)`` (how many milestones are ≤ t, counted with
  multiplicity), the spec's own [functions] and its method attributes (CyclicLR's ``scale_fn``);
- conditions (in ``where`` and wherever a condition is expected): comparisons (chains too),
  ``and`` / ``or`` / ``not``, ``True`` / ``False``, boolean names, and a string-valued name
  compared with a string, ``anneal_strategy == 'cos'``.
"""
from __future__ import annotations

import ast
from collections.abc import Callable

import sympy

from optgen.errors import Location, SpecError
from optgen.spec.expressions import node_location, parse_python, strip_located, validate_check


class CountLE(sympy.Function):
    """``count_le(milestones, t)``: how many milestones (a multiset) are ≤ t — torch's
    ``bisect_right(sorted(milestones.elements()), t)``."""

    nargs = 2


class CountEQ(sympy.Function):
    """How many milestones equal t (``milestones[t]`` on a Counter); what the chainable form of a
    ``gamma ** count_le(milestones, t)`` schedule needs (see :mod:`optgen.schedules.derive`)."""

    nargs = 2


def _log(*args):
    return sympy.log(args[0]) if len(args) == 1 else sympy.log(args[0]) / sympy.log(args[1])


#: name → (allowed numbers of arguments, sympy constructor)
FUNCTIONS: dict[str, tuple[tuple[int, ...], Callable]] = {
    "cos": ((1,), sympy.cos),
    "sin": ((1,), sympy.sin),
    "exp": ((1,), sympy.exp),
    "log": ((1, 2), _log),
    "sqrt": ((1,), sympy.sqrt),
    "abs": ((1,), sympy.Abs),
    "floor": ((1,), sympy.floor),
    "ceil": ((1,), sympy.ceiling),
    "min": ((2, 3, 4), sympy.Min),
    "max": ((2, 3, 4), sympy.Max),
}
SPECIAL = ("where", "count_le")

_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b,
           ast.FloorDiv: lambda a, b: sympy.floor(a / b), ast.Mod: lambda a, b: sympy.Mod(a, b)}
_COMPARE = {ast.Lt: sympy.Lt, ast.LtE: sympy.Le, ast.Gt: sympy.Gt, ast.GtE: sympy.Ge,
            ast.Eq: sympy.Eq, ast.NotEq: sympy.Ne}

#: roles a name can have in a formula
NUMBER_ROLES = {"t", "base_lr", "hyper", "per_group", "attribute", "definition", "argument"}
BOOL_ROLES = {"flag"}
STRING_ROLES = {"choice"}


class FormulaBuilder:
    """Turns the ast of one formula into sympy.

    ``names`` maps every name the formula may use to its role (see the sets above);
    ``symbols`` gives the sympy symbol of a name (its assumptions: integer step counts …);
    ``functions`` the spec's own helpers (name → arity) and ``methods`` the callable attributes;
    ``choices`` collects the boolean symbols that stand for ``name == 'value'``.
    """

    def __init__(self, base: Location, names: dict[str, str], symbols: dict[str, sympy.Symbol],
                 functions: dict[str, int], methods: dict[str, int], choices: dict[str, tuple[str, str]],
                 choice_values: dict[str, tuple[str, ...]], counters: set[str], what: str):
        self.base = base
        self.names = names
        self.symbols = symbols
        self.functions = functions
        self.methods = methods
        self.choices = choices
        self.choice_values = choice_values
        self.counters = counters
        self.what = what

    def error(self, node: ast.AST, message: str) -> SpecError:
        return SpecError(node_location(self.base, node), message)

    def known(self) -> str:
        return ", ".join(sorted(self.names)) or "none"

    # -- numbers ---------------------------------------------------------------------------------
    def math(self, node: ast.AST) -> sympy.Expr:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return sympy.Integer(node.value) if isinstance(node.value, int) else sympy.Float(node.value)
        if isinstance(node, ast.Constant):
            raise self.error(node, f"{node.value!r} is not a number; {self.what} takes numbers, names and "
                                   "functions (a string may only be compared with a string-valued name)")
        if isinstance(node, ast.Name):
            if node.id == "pi":
                return sympy.pi
            role = self.names.get(node.id)
            if role is None:
                raise self.error(node, f"unknown name '{node.id}' in {self.what}; known names: {self.known()}")
            if role not in NUMBER_ROLES:
                kind = "a boolean" if role in BOOL_ROLES else "a string"
                raise self.error(node, f"'{node.id}' is {kind}; use it in a condition, e.g. where({node.id} "
                                       + ("== '...'" if role in STRING_ROLES else "") + ", a, b)")
            return self.symbols[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](self.math(node.left), self.math(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self.math(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.Call):
            return self.call(node)
        raise self.error(node, f"'{ast.unparse(node)}' is not allowed in {self.what}: use numbers, names, "
                               "+ - * / ** // %, where(condition, a, b) and functions such as cos, min, floor")

    def call(self, node: ast.Call) -> sympy.Expr:
        if not isinstance(node.func, ast.Name):
            raise self.error(node, f"'{ast.unparse(node.func)}' cannot be called; call a function by its name")
        name = node.func.id
        if node.keywords:
            raise self.error(node, f"{name}() takes positional arguments only")
        args = node.args
        if name == "where":
            if len(args) != 3:
                raise self.error(node, "where() takes 3 arguments: where(condition, value_if_true, value_if_false)")
            return sympy.Piecewise((self.math(args[1]), self.condition(args[0])), (self.math(args[2]), True))
        if name == "count_le":
            if len(args) != 2 or not isinstance(args[0], ast.Name) or args[0].id not in self.counters:
                counters = ", ".join(sorted(self.counters)) or "none in this spec"
                raise self.error(node, "count_le() takes a Counter hyperparameter (convert = \"Counter\"; "
                                       f"here: {counters}) and a number: count_le(milestones, t)")
            return CountLE(self.symbols[args[0].id], self.math(args[1]))
        if name in FUNCTIONS:
            arities, make = FUNCTIONS[name]
            if len(args) not in arities:
                raise self.error(node, f"{name}() takes {' or '.join(map(str, arities))} argument(s)")
            return make(*(self.math(a) for a in args))
        for table, kind in ((self.functions, "function"), (self.methods, "method")):
            if name in table:
                if len(args) != table[name]:
                    raise self.error(node, f"{kind} {name}() takes {table[name]} argument(s)")
                return sympy.Function(name, real=True)(*(self.math(a) for a in args))
        available = sorted([*FUNCTIONS, *SPECIAL, *self.functions, *self.methods])
        raise self.error(node, f"unknown function '{name}'; available: {', '.join(available)}")

    # -- conditions ------------------------------------------------------------------------------
    def condition(self, node: ast.AST) -> sympy.Basic:
        if isinstance(node, ast.BoolOp):
            parts = [self.condition(v) for v in node.values]
            return sympy.And(*parts) if isinstance(node.op, ast.And) else sympy.Or(*parts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return sympy.Not(self.condition(node.operand))
        if isinstance(node, ast.Constant) and isinstance(node.value, bool):
            return sympy.true if node.value else sympy.false
        if isinstance(node, ast.Name):
            if self.names.get(node.id) not in BOOL_ROLES:
                raise self.error(node, f"'{node.id}' is not a boolean; a condition is a comparison such as "
                                       "'t < warmup_steps', a boolean name, or and/or/not of those")
            return self.symbols[node.id]
        if isinstance(node, ast.Compare):
            choice = self.choice(node)
            if choice is not None:
                return choice
            parts, left = [], node.left
            for op, right in zip(node.ops, node.comparators, strict=True):
                if type(op) not in _COMPARE:
                    raise self.error(node, f"'{ast.unparse(node)}': compare with < <= > >= == !=")
                parts.append(_COMPARE[type(op)](self.math(left), self.math(right)))
                left = right
            return sympy.And(*parts)
        raise self.error(node, f"'{ast.unparse(node)}' is not a condition: expected a comparison such as "
                               "'t < warmup_steps', a boolean name, or and/or/not of those")

    def choice(self, node: ast.Compare) -> sympy.Basic | None:
        """``name == 'value'`` / ``name != 'value'`` for a string-valued name, as a boolean symbol."""
        sides = (node.left, node.comparators[0])
        if not any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides):
            return None
        name, value = (sides if isinstance(sides[0], ast.Name) else sides[::-1])
        if (len(node.ops) != 1 or type(node.ops[0]) not in (ast.Eq, ast.NotEq) or not isinstance(name, ast.Name)
                or not isinstance(value, ast.Constant) or not isinstance(value.value, str)):
            raise self.error(node, f"'{ast.unparse(node)}': a string can only be compared (== or !=) with a "
                                   "string-valued name, e.g. anneal_strategy == 'cos'")
        if self.names.get(name.id) not in STRING_ROLES:
            known = ", ".join(n for n, r in sorted(self.names.items()) if r in STRING_ROLES) or "none"
            raise self.error(name, f"'{name.id}' is not string-valued; known string names: {known}")
        allowed = self.choice_values.get(name.id, ())
        if allowed and value.value not in allowed:
            raise self.error(value, f"'{value.value}' is not one of {name.id}'s choices: {', '.join(allowed)}")
        symbol = sympy.Symbol(f"{name.id}=={value.value}")
        self.choices[symbol.name] = (name.id, value.value)
        return symbol if isinstance(node.ops[0], ast.Eq) else sympy.Not(symbol)


def parse_formula(text: str, loc: Location, builder_args: dict, what: str) -> sympy.Expr:
    """One formula (a number-valued expression)."""
    loc, text = strip_located(text, loc)
    tree = parse_python(text, loc)
    return FormulaBuilder(loc, what=what, **builder_args).math(tree.body)


# -- Python checks and attribute paths (printed into the generated class, never run here) ------------
#: calls a check may make, with their arity
CHECK_CALLS = {"isinstance": 2, "len": 1, "float": 1, "int": 1, "callable": 1}
CHECK_TYPES = {"Tensor", "float", "int", "bool", "tuple", "list", "str", "None"}
_CHECK_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.Compare,
                ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq, ast.Is, ast.IsNot, ast.In, ast.NotIn,
                ast.Constant, ast.Name, ast.Load, ast.Subscript, ast.Call, ast.BinOp, ast.Add, ast.Sub,
                ast.Mult, ast.Div, ast.Tuple, ast.List)


def parse_python_check(text: str, loc: Location, names: set[str], what: str = "a check",
                       rename: Callable[[str], str] | None = None) -> str:
    """Validates Python text against the check allow-list; returns it normalised (names renamed).

    Allowed: the given names, numbers, strings, None/True/False, the type names of
    :data:`CHECK_TYPES`, ``and or not``, comparisons (``in`` too), ``+ - * /``, subscripts,
    tuple/list literals and the calls of :data:`CHECK_CALLS`.
    """
    loc, text = strip_located(text, loc)
    tree = parse_python(text, loc)
    validate_check(tree, loc, names, calls=CHECK_CALLS, types=CHECK_TYPES, nodes=_CHECK_NODES, what=what,
                   name_scope=what, constructs="subscripts, literals")
    if rename is not None:
        tree = _Rename(names, rename).visit(tree)
    return ast.unparse(tree.body)


class _Rename(ast.NodeTransformer):
    def __init__(self, names: set[str], rename: Callable[[str], str]):
        self.names, self.rename = names, rename

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in self.names:
            return ast.parse(self.rename(node.id), mode="eval").body
        return node
