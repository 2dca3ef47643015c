"""Triton kernels that computed wrong values (or failed) for rules the random-spec fuzzer wrote.

Each case is the shrunk form of a fuzz failure, run on every backend against the reference
interpreter and the rule computed by hand (tests/compiler/test_value_semantics.py's ``check``,
float64, 1e-12 relative): only Triton was wrong, the others pin the expected values.
The minimal specs themselves are under tests/fuzz/regressions/ (triton_state_copy_lerp,
triton_integer_constant); these add the neighbours the same causes broke.
"""
from __future__ import annotations

import math

import torch

from tests.compiler.test_value_semantics import HYPER, ON_OFF, check, spec_text

STATE = 'm = "zeros_like(param)"'


def test_lerp_subtracted_from_a_copy(tmp_path):
    # `m_old - lerp(m, grad, beta)` printed as `m_old - m + beta * (grad - m)` (seed 2014)
    def expected(param, grad, s, h):
        m_old = s["m"]
        s["m"] = m_old - torch.lerp(s["m"], grad, 0.9) * 0.5 + grad / (m_old + torch.lerp(m_old, grad, 0.9))
        return param - 0.1 * s["m"], s

    check(tmp_path, spec_text("""
        m_old = m
        m = m_old - lerp(m, grad, beta) * 0.5 + grad / (m_old + lerp(m_old, grad, beta))
        param = param - lr * m
    """, HYPER, STATE), expected, ON_OFF)


def test_division_by_a_square(tmp_path):
    # `grad / (m + 2) ** 2` printed as `grad / (m + 2) * (m + 2)`
    def expected(param, grad, s, h):
        s["m"] = s["m"] + grad / (s["m"] + 2) ** 2 - 3 / (grad * grad + 1) ** 3
        return param - 0.1 * s["m"], s

    check(tmp_path, spec_text("""
        m = m + grad / (m + 2) ** 2 - 3 / (grad * grad + 1) ** 3
        param = param - lr * m
    """, HYPER, STATE), expected, ON_OFF)


def test_function_of_integer_constants(tmp_path):
    # `tl.exp(tl.minimum(tl.maximum(2, -3), 3))`: an int32 exponential, which Triton refuses (seeds 2012, 2015)
    def expected(param, grad, s, h):
        s["m"] = torch.minimum(s["m"], (math.exp(2) / (grad.abs() + 0.25)).clamp(-4, 4)) + math.sqrt(2) * grad
        return param - 0.1 * s["m"] * math.log(3), s

    check(tmp_path, spec_text("""
        m = minimum(m, clamp(exp(clamp(2, -3, 3)) / (abs(grad) + 0.25), -4, 4)) + sqrt(2) * grad
        param = param - lr * m * log(maximum(3, 2))
    """, HYPER, STATE), expected, ON_OFF)


def test_integer_powers_of_a_negative_base(tmp_path):
    # `(param ** 2) ** 3` printed as `exp(6 * log(param))`: NaN for a negative param (seed 2016)
    def expected(param, grad, s, h):
        s["m"] = s["m"] - (param ** 2) ** 3 + grad ** 9 * 0.01 - grad ** 5
        return param - 0.1 * s["m"], s

    check(tmp_path, spec_text("""
        m -= (param ** 2) ** 3 - grad ** 9 * 0.01 + grad ** 5
        param = param - lr * m
    """, HYPER, STATE), expected, ON_OFF)


def test_condition_shared_by_statements_under_different_host_guards(tmp_path):
    # `step_ge_2 = step >= 2` was computed under `if H0_LT_0_5:` (the first statement reading it)
    # and read by the unguarded one too: UnboundLocalError when h0 >= 0.5 (seeds 7051, 7056, 7101)
    def expected(param, grad, s, h):
        s["step"] += 1
        if s["step"] >= 2:
            if h.get("h0", 0.3) < 0.5:
                s["m"] = s["m"] + grad
            param = param - 0.1 * s["m"]
        return param, s

    check(tmp_path, spec_text("""
        step = step + 1
        if step >= 2:
            if h0 < 0.5:
                m = m + grad
            param = param - lr * m
    """, "lr = 0.1\nh0 = 0.3", 'step = "0"\nm = "zeros_like(param)"'), expected, [{}, {"h0": 0.7}],
          init=lambda name, p: torch.zeros_like(p) if name == "m" else 0, state_names=("step", "m"))


def test_sign_keeps_the_tensors_precision(tmp_path):
    # sign(x) printed as tl.where(x > 0, 1.0, ...): float32 constants, so a float64 kernel took
    # log(1 + |sign(m)|) in float32 (6e-9 off; fuzz seed 50000)
    def expected(param, grad, s, h):
        s["m"] = grad - torch.log(1 + torch.sign(s["m"]).abs()) + torch.sign(grad) * 1e-3
        return param - 0.1 * s["m"], s

    check(tmp_path, spec_text("""
        m = grad - log(1 + abs(sign(m))) + sign(grad) * 0.001
        param = param - lr * m
    """, HYPER, STATE), expected, ON_OFF)
