"""Repeated comparisons: a where() condition that appears more than once in a statement or a run.

CSE used to hoist a repeated comparison (``grad > 0`` in two where()s) into a temporary
``common0 = grad > 0``, which op selection, the C and the Triton backends have no tensor op for:
every such spec was an internal compiler error.  A comparison is now left in each where() that
uses it (Note [Comparisons stay in their where()] in optgen/passes/cse.py); repeated *number*
subexpressions around or inside it are still shared.

Each case is built into a throw-away package and every kernel backend (for-loop, foreach,
differentiable, C, Triton in its CPU interpreter) is compared with the float64 interpreter and
with the rule computed by hand, using the helpers of test_value_semantics.py.
"""
from __future__ import annotations

import pytest
import torch

from optgen.errors import SpecError
from optgen.passes import compile_spec
from optgen.spec.load import load_spec

from .test_value_semantics import HYPER, ON_OFF, check, forloop_code, spec_text

M = 'm = "zeros_like(param)"'
W = torch.where


def _m_step(update):
    """``expected`` for rules that update m and param: ``update(p, g, m, h) -> (m, p)``."""
    def expected(param, grad, s, h):
        s["m"], param = update(param, grad, s["m"], h)
        return param, s
    return expected


CASES = [
    # the example: the same comparison in a where() nested in another
    ("nested", """
        u = where(grad > 0, where(grad > 0, grad, param), m)
        m = m + u
        param = param - lr * u
     """, lambda p, g, m, h: (m + W(g > 0, g, m), p - 0.1 * W(g > 0, g, m))),
    # two where()s of one statement
    ("one_statement", """
        u = where(grad > 0, grad, 0) + where(grad > 0, m, param)
        m = beta * m + u
        param = param - lr * u
     """, lambda p, g, m, h: (0.9 * m + W(g > 0, g, 0.0) + W(g > 0, m, p),
                              p - 0.1 * (W(g > 0, g, 0.0) + W(g > 0, m, p)))),
    # across statements of one run
    ("across_statements", """
        a = where(grad > 0, grad, m)
        b = where(grad > 0, param, grad)
        m = m + a * b
        param = param - lr * (a + b)
     """, lambda p, g, m, h: (m + W(g > 0, g, m) * W(g > 0, p, g), p - 0.1 * (W(g > 0, g, m) + W(g > 0, p, g)))),
    # where(c, 1, -1) repeated: the whole where() is a number-valued tensor, shared
    ("constants_repeated", """
        m = m + where(grad > 0, 1, -1)
        param = param - lr * where(grad > 0, 1, -1) * m
     """, lambda p, g, m, h: (m + W(g > 0, 1.0, -1.0).double(),
                              p - 0.1 * W(g > 0, 1.0, -1.0).double() * (m + W(g > 0, 1.0, -1.0).double()))),
    # a local compared with a state, twice; the state is updated in between
    ("local_against_state", """
        d = grad - m
        u = where(d > m, d, m)
        m = m * beta + grad
        v = where(d > m, grad, param)
        w = where(d > m, u, v)
        param = param - lr * (u + v + w)
     """, None),
    # a compound operand: grad - m > 0 twice (the difference is shared, the comparison is not)
    ("compound_operand", """
        u = where(grad - m > 0, grad - m, grad)
        v = where(grad - m > 0, param, m)
        m = beta * m + grad
        param = param - lr * (u + v)
     """, lambda p, g, m, h: (0.9 * m + g, p - 0.1 * (W(g - m > 0, g - m, g) + W(g - m > 0, p, m)))),
    # the comparison written both ways round, and against a hyperparameter
    ("reversed_and_hyper", """
        u = where(grad > lr, grad, 0) + where(lr < grad, param, m)
        m = m + where(grad > lr, 1, 0)
        param = param - lr * u
     """, lambda p, g, m, h: (m + W(g > 0.1, 1.0, 0.0).double(),
                              p - 0.1 * (W(g > 0.1, g, 0.0) + W(0.1 < g, p, m)))),
    # ... under a flag's guard, and with an "and" spelled as nested where()s
    ("guarded_and_nested_and", """
        if weight_decay != 0:
            u = where(grad > 0, where(param < 1, grad, 0), 0) + where(grad > 0, m, 0)
        else:
            u = where(grad > 0, where(param < 1, grad, m), param)
        m = m + u
        param = param - lr * u
     """, None),
]


def _local_against_state(p, g, m, h):
    d = g - m
    u = W(d > m, d, m)
    m = m * 0.9 + g
    v = W(d > m, g, p)
    w = W(d > m, u, v)
    return m, p - 0.1 * (u + v + w)


def _guarded(p, g, m, h):
    if h["weight_decay"] != 0:
        u = W(g > 0, W(p < 1, g, 0.0), 0.0) + W(g > 0, m, 0.0)
    else:
        u = W(g > 0, W(p < 1, g, m), p)
    return m + u, p - 0.1 * u


BY_HAND = {"local_against_state": _local_against_state, "guarded_and_nested_and": _guarded}


@pytest.mark.parametrize("name, rule, by_hand", CASES, ids=[c[0] for c in CASES])
def test_repeated_comparison(tmp_path, name, rule, by_hand):
    check(tmp_path, spec_text(rule, HYPER, M), _m_step(by_hand or BY_HAND[name]), ON_OFF)


def test_a_comparison_is_not_a_temporary(tmp_path):
    """The generated code compares in each where() (no boolean temporary); a repeated difference
    inside the comparison is still computed once."""
    code = forloop_code(tmp_path, """
        u = where(grad - m > 0, grad - m, grad)
        v = where(grad - m > 0, param, m)
        m = beta * m + grad
        param = param - lr * (u + v)
    """)
    assert code.count("common0 = grad.sub(m)") == 1 and "common1" not in code, code
    assert code.count("common0.gt(0)") == 2, code


def test_repeated_comparison_of_a_counter(tmp_path):
    """A comparison of host numbers (a counter) repeated: no tensor at all in the condition."""
    def expected(param, grad, s, h):
        s["step"] = s["step"] + 1
        u = grad if s["step"] > 1 else s["m"]
        v = param if s["step"] > 1 else grad
        s["m"] = s["m"] + u
        return param - 0.1 * (u + v), s

    check(tmp_path, spec_text("""
        step = step + 1
        u = where(step > 1, grad, m)
        v = where(step > 1, param, grad)
        m = m + u
        param = param - lr * (u + v)
    """, HYPER, 'step = "0"\nm = "zeros_like(param)"'), expected, [{}], state_names=("step", "m"),
          init=lambda name, p: 0.0 if name == "step" else torch.zeros_like(p))


@pytest.mark.parametrize("condition", ["(grad > 0) & (param < 1)", "grad > 0 and param < 1"])
def test_combined_conditions_are_a_spec_error(tmp_path, condition):
    """where() takes one comparison; combining them is spelled with nested where()s."""
    path = tmp_path / "case.toml"
    path.write_text(spec_text(f"param = param - lr * where({condition}, grad, 0)", HYPER, M))
    with pytest.raises(SpecError, match="is not a comparison: where\\(\\) takes one"):
        compile_spec(load_spec(path))
