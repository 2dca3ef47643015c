"""Op selection computes what the statement says: cases where a fused in-place chain dropped part
of the expression (run on every backend against the interpreter and the rule by hand)."""
from __future__ import annotations

import pytest
import torch

from tests.compiler.test_value_semantics import HYPER, ON_OFF, check, spec_text


@pytest.mark.parametrize("rule,by_hand", [
    # scale() returned after neg_ for a coefficient of exactly -1 and forgot the tensor divisors:
    # s0 = -s0 / (|grad| + 1) - |sign(grad)| compiled to s0.neg_().sub_(...) (fuzz seed 80453)
    ("m = -m / (abs(grad) + 1) - grad", lambda m, g: -m / (g.abs() + 1) - g),
    ("m = -m / (abs(grad) + 1)", lambda m, g: -m / (g.abs() + 1)),
    ("m = -m / (abs(grad) + 1) / (abs(m) + 2) + grad", lambda m, g: -m / (g.abs() + 1) / (m.abs() + 2) + g),
    ("m = -2 * m / (abs(grad) + 1) + grad", lambda m, g: -2 * m / (g.abs() + 1) + g),
    # a divisor or another operand that reads the old value, in every in-place shape select_ops has
    ("m = -m / (abs(grad) + 1) / (abs(m) + 2) + grad", lambda m, g: -m / (g.abs() + 1) / (m.abs() + 2) + g),
    ("m = 0.5 * m / (abs(m) + 1)", lambda m, g: 0.5 * m / (m.abs() + 1)),
    ("m = lerp(m, grad, abs(m) / (abs(m) + 1))", lambda m, g: m + m.abs() / (m.abs() + 1) * (g - m)),
    ("m = lerp(m, m * grad, 0.25)", lambda m, g: m + 0.25 * (m * g - m)),
    ("m = maximum(0.5 * m, m * grad)", lambda m, g: torch.maximum(0.5 * m, m * g)),
    ("m = clamp(m * grad, -1, 1) + m", lambda m, g: (m * g).clamp(-1, 1) + m),
    ("m = where(m > 0, m * 2, grad)", lambda m, g: torch.where(m > 0, m * 2, g)),
    ("m = 0.9 * m + m * m / (abs(grad) + 1)", lambda m, g: 0.9 * m + m * m / (g.abs() + 1)),
])
def test_in_place_update_with_a_negated_quotient(tmp_path, rule, by_hand):
    def expected(param, grad, s, h):
        s["m"] = by_hand(s["m"] + grad, grad)
        return param - 0.1 * s["m"], s

    check(tmp_path, spec_text(f"""
        m = m + grad
        {rule}
        param = param - lr * m
    """, HYPER, 'm = "zeros_like(param)"'), expected, ON_OFF)
