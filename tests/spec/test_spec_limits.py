"""Every valid spec compiles, every invalid one gets one ``path:line:col`` error (issue 10):
reserved names, ``first`` states read before they exist, non-finite defaults and constants,
huge constants, deep or long expressions, and internal compiler errors.

Each case is ``minimal.toml`` with one edit, compiled (and, where it must build, rendered by every
backend) in a temporary folder; the error text is compared exactly.
"""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

from optgen.backends.base import module_name
from optgen.backends.optimizer_class import OptimizerClassBackend
from optgen.backends.registry import KERNEL_BACKENDS
from optgen.build import kernel_backends
from optgen.errors import InternalCompilerError, SpecError
from optgen.passes import compile_spec
from optgen.spec import expressions
from optgen.spec.load import load_spec
from optgen.spec.reserved import GROUPS

MINIMAL = Path(__file__).resolve().parent / "minimal.toml"
RULE_LINE = 24  # the line of minimal.toml's first rule statement ("if maximize:")
PARAM_LINE = 33  # "param = param - lr * exp_avg / denom"


def spec_file(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    text = MINIMAL.read_text()
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "mini.toml"
    path.write_text(text)
    return path


def error(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        compile_spec(load_spec(path))
    return str(info.value)


def located(path: Path, line: int, col: int, message: str) -> str:
    return f"{load_spec_path(path)}:{line}:{col}: {message}"


def load_spec_path(path: Path) -> str:
    from optgen.spec.toml_source import display_path

    return display_path(path)


def build_everything(path: Path) -> dict[str, str]:
    """Compile and render every backend that takes the spec (what `optgen build` writes)."""
    compiled = compile_spec(load_spec(path))
    backends = kernel_backends(compiled)
    files = {module_name(compiled.spec.name, b.name): b.render(compiled) for b in backends}
    files[module_name(compiled.spec.name)] = OptimizerClassBackend(tuple(b.name for b in backends)).render(compiled)
    return files


# --------------------------------------------------------------------------- first states


def test_first_state_read_before_its_first_assignment(tmp_path):
    path = spec_file(tmp_path, ('exp_avg = "zeros_like(param)"', 'exp_avg = { first = "grad" }'),
                     ("step = step + 1\n", "step = step + 1\nparam = param - lr * exp_avg\n"))
    assert error(path) == located(path, RULE_LINE + 3, 1,
                                  "state 'exp_avg' is read here but it is created by its first assignment, which "
                                  "does not run before this line on every path; assign it first, or declare it "
                                  'with init = "zeros_like(param)"')


def test_first_state_created_on_one_path_only(tmp_path):
    """Created under `if amsgrad:` and read unconditionally: not before the read on every path."""
    path = spec_file(tmp_path, ('exp_avg = "zeros_like(param)"', 'exp_avg = { first = "grad" }'),
                     ("exp_avg = lerp(exp_avg, grad, 1 - beta)\n",
                      "if amsgrad:\n    exp_avg = lerp(exp_avg, grad, 1 - beta)\n"))
    assert error(path) == located(path, RULE_LINE + 9, 5,
                                  "state 'exp_avg' is read here but it is created by its first assignment, which "
                                  "does not run before this line on every path; assign it first, or declare it "
                                  'with init = "zeros_like(param)"')


def test_first_state_updated_where_it_was_not_created(tmp_path):
    path = spec_file(tmp_path, ('exp_avg = "zeros_like(param)"', 'exp_avg = { first = "grad" }'),
                     ("exp_avg = lerp(exp_avg, grad, 1 - beta)\n",
                      "if amsgrad:\n    exp_avg = lerp(exp_avg, grad, 1 - beta)\nelse:\n    exp_avg = grad\n"))
    assert error(path) == located(path, RULE_LINE + 6, 5,
                                  "state 'exp_avg' is updated here but it is created by its first assignment (the "
                                  "first one in the rule), which does not run before this line on every path; "
                                  "create it on every path that reaches this line")


def test_first_state_read_after_creation_builds(tmp_path):
    """The creating assignment may read the state (it stores `first` on the creating step); later
    reads on every path are fine — SGD's momentum buffer."""
    path = spec_file(tmp_path, ('exp_avg = "zeros_like(param)"', 'exp_avg = { first = "grad" }'))
    build_everything(path)


def test_first_value_may_not_read_the_state_itself(tmp_path):
    path = spec_file(tmp_path, ('exp_avg = "zeros_like(param)"', 'exp_avg = { first = "exp_avg + grad" }'))
    assert error(path).startswith(located(path, 19, 22, "unknown name 'exp_avg' in a state's first value"))


# --------------------------------------------------------------------------- reserved names

#: one name per group of optgen.spec.reserved.GROUPS, and what it says
RESERVED_CASES = {
    "python_keyword": ("lambda", "a Python keyword"),
    "python_builtin": ("enumerate", "a Python builtin the generated code uses"),
    "generated_module": ("torch", "a name the generated modules use"),
    "triton": ("tl", "a name of the Triton kernels"),
    "c": ("INFINITY", "a C keyword or a name of the C kernels' prelude"),
}


def test_every_group_is_tested():
    assert set(RESERVED_CASES) == set(GROUPS)


@pytest.mark.parametrize("group", sorted(RESERVED_CASES))
def test_reserved_hyperparameter(group, tmp_path):
    name, why = RESERVED_CASES[group]
    path = spec_file(tmp_path, ("eps = 1e-8", f"{name} = 1e-8"))
    assert error(path) == located(path, 9, 1, f"'{name}' cannot be the name of a hyperparameter: {why} — "
                                              "choose another name")


@pytest.mark.parametrize("group", sorted(RESERVED_CASES))
def test_reserved_local(group, tmp_path):
    name, why = RESERVED_CASES[group]
    if group == "python_keyword":
        pytest.skip("a keyword cannot be assigned in Python syntax: the rule is a syntax error")
    path = spec_file(tmp_path, ("step = step + 1\n", f"step = step + 1\n{name} = lr * 2\n"))
    assert error(path) == located(path, RULE_LINE + 3, 1, f"'{name}' cannot be the name of a local: {why} — "
                                                          "choose another name")


@pytest.mark.parametrize("name", ["self", "params", "int64_t", "NAN", "state_steps", "_t0", "double", "restrict"])
def test_reserved_state_and_tuple_item(name, tmp_path):
    path = spec_file(tmp_path, ('exp_avg = "zeros_like(param)"', f'exp_avg = "zeros_like(param)"\n{name} = "0"'))
    assert error(path).startswith(located(path, 20, 1, f"'{name}' cannot be the name of a state: "))
    path = spec_file(tmp_path, ("beta = 0.9", f'beta = {{ default = [0.9, 0.5], names = ["b1", "{name}"] }}'),
                     ("1 - beta)", "1 - b1)"))
    assert error(path).startswith(located(path, 8, 48, f"'{name}' cannot be the name of a tuple item: "))


def test_hyperparameter_named_like_a_state_list(tmp_path):
    """The foreach kernel takes a list exp_avgs for the state exp_avg."""
    path = spec_file(tmp_path, ("eps = 1e-8", "eps = 1e-8\nexp_avgs = 0.5"),
                     ('signature = "lr, beta, eps,', 'signature = "lr, beta, eps, exp_avgs,'))
    assert error(path) == located(path, 10, 1, "'exp_avgs' cannot be a name here: the generated code derives it "
                                               "from 'exp_avg' — choose another name")


def test_local_named_like_a_counter_temporary(tmp_path):
    path = spec_file(tmp_path, ("step = step + 1\n", "step = step + 1\nstep_t = lr * 2\n"))
    assert error(path) == located(path, RULE_LINE + 3, 1, "'step_t' cannot be a name here: the generated code "
                                                          "derives it from 'step' — choose another name")


def test_c_prelude_names_are_reserved():
    """Every name the C prelude defines at file scope is in the reserved list."""
    import re

    from optgen.runtime.c_launch import prelude

    PRELUDE = prelude()

    defined = set(re.findall(r"#define (\w+)", PRELUDE)) | set(re.findall(r"typedef [^;(]* (\w+);", PRELUDE)) \
        | set(re.findall(r"typedef [^;]*\(\*(\w+)\)", PRELUDE)) \
        | set(re.findall(r"^(?:static )?(?:inline )?\w+ \*?(\w+)\(", PRELUDE, re.M))
    assert {"for_each_tensor", "tensor_step_t", "optgen_set_num_threads"} <= defined  # (the patterns see each kind)
    assert defined and defined <= GROUPS["c"][1]


# --------------------------------------------------------------------------- inf / nan / None


def test_inf_default_builds_and_imports(tmp_path, monkeypatch):
    path = spec_file(tmp_path, ("eps = 1e-8", "eps = 1e-8\nclip = inf\nlow = { default = [-inf, 0.5], names = "
                                              '["lo1", "lo2"] }'),
                     ('signature = "lr, beta, eps,', 'signature = "lr, beta, eps, clip, low,'),
                     ("param = param - lr", "param = param - 0 * clamp(grad, lo1, clip) - lr"))
    files = build_everything(path)
    assert '        clip=float("inf"),\n        low=(-float("inf"), 0.5),\n' in files["mini"]
    package = tmp_path / "infpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in files.items():
        (package / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("infpkg.mini")
        import torch

        p = torch.nn.Parameter(torch.ones(3))
        opt = module.Mini([p])
        assert opt.param_groups[0]["clip"] == float("inf") and opt.param_groups[0]["low"][0] == -float("inf")
        p.grad = torch.ones(3)
        opt.step()
    finally:
        for name in [m for m in sys.modules if m.startswith("infpkg")]:
            del sys.modules[name]


def test_nan_default(tmp_path):
    path = spec_file(tmp_path, ("eps = 1e-8", "eps = nan"))
    assert error(path) == located(path, 9, 7, "default of 'eps' is nan; a default must be a number (inf is "
                                              'allowed) or "None" with derive = "..." or choices')
    path = spec_file(tmp_path, ("beta = 0.9", 'beta = { default = [0.9, nan], names = ["b1", "b2"] }'),
                     ("1 - beta)", "1 - b1)"))
    assert error(path) == located(path, 8, 26, "default of 'beta[1]' is nan; a default must be a number (inf "
                                               'is allowed) or "None" with derive = "..." or choices')


def test_none_default_of_a_scalar(tmp_path):
    path = spec_file(tmp_path, ("eps = 1e-8", 'eps = "None"'))
    assert error(path) == located(path, 9, 8, "default of 'eps' must be a number, a bool or a list of numbers "
                                              '("None" for None), not str')


@pytest.mark.parametrize("text, col, message", [
    ("1e999", 17, "the number '1e309' is out of range: numbers must be finite floats or integers of at "
                  "most 9223372036854775807 in size"),
    ("inf", 17, "unknown name 'inf' in an update rule"),
    ("None", 17, "None is not a number; an update rule takes numbers and names"),
    ("(1 / 0)", 17, "'1 / 0 * grad' divides by zero or is not a number: numbers must be finite"),
])
def test_non_finite_numbers_in_a_rule(text, col, message, tmp_path):
    path = spec_file(tmp_path, ("param = param - lr", f"param = param - {text} * grad - lr"))
    assert error(path).startswith(located(path, PARAM_LINE, col, message))


# --------------------------------------------------------------------------- huge constants


def test_power_of_constants_is_not_evaluated(tmp_path):
    path = spec_file(tmp_path, ("param = param - lr", "param = param - grad * 10 ** 10 ** 10 - lr"))
    assert error(path) == located(path, PARAM_LINE, 24, "the constant '10 ** 10 ** 10' is too large to compute: a "
                                                        "power of two numbers must stay within float64's range "
                                                        "(exponent at most 1024)")


@pytest.mark.parametrize("text, shown", [("1e300 * 1e300", "1.00E+600"), ("(2 ** 62 + 2 ** 62)", "9.22E+18")])
def test_folded_constant_out_of_range(text, shown, tmp_path):
    path = spec_file(tmp_path, ("param = param - lr", f"param = param - grad * {text} - lr"))
    assert f"computes the constant {shown}, which is out of range" in error(path)


def test_small_constant_powers_still_fold(tmp_path):
    build_everything(spec_file(tmp_path, ("param = param - lr", "param = param - 2 ** 10 * 0.5 ** 3 * grad - lr")))


# --------------------------------------------------------------------------- deep and long expressions

DEPTH = expressions.MAX_EXPRESSION_DEPTH


def expression_depth(text: str) -> int:
    """The depth check_size measures: nested expression nodes of the statement's value."""
    def depth(node):
        return 1 + max((depth(c) for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr)), default=0)
    statement = ast.parse(text).body[0]
    assert isinstance(statement, ast.Assign | ast.Expr), text
    return depth(statement.value)


def shape(kind: str, n: int) -> str:
    if kind == "sum":
        return " + ".join(["grad"] * (n + 1))
    if kind == "exp":
        return "exp(" * n + "grad" + ")" * n
    if kind == "clamp":
        return "clamp(" * n + "grad" + " + lr, -1, 1)" * n
    if kind == "where":
        # distinct comparisons: cse would share a repeated `grad > 0`, which select_ops cannot print
        # (a separate bug of cse, reported as an internal compiler error)
        return "".join(f"where(grad > {i}, exp_avg + " for i in range(n)) + "grad" + ", grad)" * n
    if kind == "lerp":
        return "lerp(grad, " * n + "grad" + ", lr)" * n
    raise ValueError(kind)


def nested(kind: str, depth: int) -> str:
    """``param = param - (<kind nested n times>) * lr`` whose value is ``depth`` levels deep
    (within one level: a two-level step such as clamp(x + lr) may stop one short)."""
    n = 1
    while expression_depth(f"param = param - ({shape(kind, n + 1)}) * lr") <= depth:
        n += 1
    return shape(kind, n if depth <= DEPTH else n + 1)


KINDS = ["sum", "exp", "clamp", "where", "lerp"]


@pytest.mark.parametrize("kind", KINDS)
def test_expression_at_the_depth_limit_builds_through_every_backend(kind, tmp_path):
    """Note [Expression limits]: nothing downstream recurses too deep at the limit."""
    assert len(KERNEL_BACKENDS) == 5
    text = f"param = param - ({nested(kind, DEPTH)}) * lr"
    assert expression_depth(text) in (DEPTH - 1, DEPTH)
    build_everything(spec_file(tmp_path, ("param = param - lr * exp_avg / denom", text)))


@pytest.mark.parametrize("kind", ["sum", "exp"])
def test_expression_past_the_depth_limit(kind, tmp_path):
    text = f"param = param - ({nested(kind, DEPTH + 1)}) * lr"
    assert expression_depth(text) > DEPTH
    path = spec_file(tmp_path, ("param = param - lr * exp_avg / denom", text))
    assert error(path) == located(path, PARAM_LINE, 9, f"expression nested too deeply (more than {DEPTH} levels of "
                                                       "operators and calls; a chain a + b + c counts one level per "
                                                       "operator) — split it into several assignments")


def test_500_term_sum_and_500_parentheses(tmp_path):
    path = spec_file(tmp_path, ("param = param - lr", "param = param - " + " + ".join(["grad"] * 500) + " - lr"))
    assert "expression nested too deeply" in error(path)
    path = spec_file(tmp_path, ("param = param - lr", "param = param - " + "(" * 500 + "grad" + ")" * 500))
    assert error(path) == located(path, PARAM_LINE, 217, "syntax error: too many nested parentheses (expected "
                                                         "Python-syntax statements)")


def test_expression_too_long(tmp_path):
    terms = " + ".join(f"({' * '.join(['grad'] * 20)})" for _ in range(11))  # 11 * 39 + 10 nodes, depth 31
    path = spec_file(tmp_path, ("param = param - lr", f"param = param - lr * ({terms})"))
    assert error(path) == located(path, PARAM_LINE, 9, f"expression too long (more than "
                                                       f"{expressions.MAX_EXPRESSION_NODES} operators, names and "
                                                       "numbers) — split it into several assignments")


def test_long_if_nest(tmp_path):
    """Python's parser stops at 100 levels of indentation: a clean syntax error."""
    nest = "".join("    " * i + f"if lr > {i}:\n" for i in range(101)) + "    " * 101 + "param = param - lr\n"
    path = spec_file(tmp_path, ("param = param - lr * exp_avg / denom\n", nest))
    assert "syntax error: too many levels of indentation" in error(path)
    nest = "".join("    " * i + f"if lr > {i}:\n" for i in range(60)) + "    " * 60 + "param = param - lr\n"
    build_everything(spec_file(tmp_path, ("param = param - lr * exp_avg / denom\n", nest)))


# --------------------------------------------------------------------------- internal compiler errors


def test_internal_error_names_the_spec_and_statement(tmp_path, monkeypatch):
    """A bug in a pass (here: cse failing on the statement that assigns denom) is reported at the
    statement, naming the pass, with the original exception chained."""
    cse_module = sys.modules["optgen.passes.cse"]

    real_symbol = cse_module.symbol

    def broken(name):
        if name == "denom":
            raise ZeroDivisionError("boom")
        return real_symbol(name)

    monkeypatch.setattr(cse_module, "symbol", broken)
    path = spec_file(tmp_path)
    with pytest.raises(InternalCompilerError) as info:
        compile_spec(load_spec(path))
    assert str(info.value) in {located(path, RULE_LINE + line, 5, "internal compiler error in cse while compiling "
                                                                  f"'{text}': ZeroDivisionError: boom — please "
                                                                  "report this with the spec")
                               for line, text in ((6, "denom = max_exp_avg + eps"), (8, "denom = abs(exp_avg) + eps"))}
    assert isinstance(info.value, SpecError) and isinstance(info.value.__cause__, ZeroDivisionError)


def test_internal_error_helper_for_backends(tmp_path):
    from optgen.errors import internal_errors

    compiled = compile_spec(load_spec(spec_file(tmp_path)))
    with pytest.raises(InternalCompilerError) as info:
        with internal_errors("the C backend", compiled.spec):
            raise KeyError("x")
    assert str(info.value) == located(tmp_path / "mini.toml", RULE_LINE, 1,
                                      "internal compiler error in the C backend while compiling the rule: "
                                      "KeyError: 'x' — please report this with the spec")
    with pytest.raises(SpecError) as plain:  # a SpecError passes through unchanged
        with internal_errors("the C backend", compiled.spec):
            raise SpecError(None, "declined")
    assert not isinstance(plain.value, InternalCompilerError)


# --------------------------------------------------------------------------- messages users meet
@pytest.mark.parametrize("written,message", [
    ("exp_avg.sqrt()", "methods are not part of the spec language: write sqrt(exp_avg) instead of 'exp_avg.sqrt()'"),
    ("clamp(exp_avg, -1)", "clamp() takes 3 positional argument(s); for one bound use clamp_min(x, low) or "
                           "clamp_max(x, high)"),
    ("exp_avg * (grad > 0)", "'grad > 0' is a condition, not a value: a comparison may only be the first argument "
                             "of where(condition, a, b), or the test of an 'if'"),
])
def test_common_mistakes_say_what_to_write(tmp_path, written, message):
    path = spec_file(tmp_path, ("param = param - lr * exp_avg / denom", f"param = param - lr * {written} / denom"))
    assert message in error(path)
    assert error(path).startswith(f"{load_spec_path(path)}:{PARAM_LINE}:")


@pytest.mark.parametrize("written,message", [
    ("sqrt(-1)", "is not a real number"),
    ("log(-1)", "is not a real number"),
    ("exp(1000)", "which is not a finite real number"),
    ("exp(exp(exp(10)))", "which is not a finite real number"),
])
def test_constants_that_are_not_finite_real_numbers(tmp_path, written, message):
    """Parts of a rule made of numbers alone that no backend can compute: a spec error at the
    statement, not an internal compiler error in a backend or the interpreter."""
    path = spec_file(tmp_path, ("param = param - lr * exp_avg / denom",
                                f"param = param - lr * {written} * exp_avg / denom"))
    assert error(path).startswith(f"{load_spec_path(path)}:{PARAM_LINE}:") and message in error(path)
    assert "internal compiler error" not in error(path)
