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


# -- a local assigned in both branches of a hyperparameter `if` nested in a per-tensor one ------------
# Each branch became a statement under its own constexpr guard, and the second branch's assignment
# `u = tl.where(step_lt_2, value, u)` kept the old `u` where the per-tensor condition is false: but
# that `u` was assigned only by the first branch, under the other guard, so the kernel compiled for
# the second one read a name it never defined (UnboundLocalError; seeds 60076, 60133).

COUNTER_STATE = 'step = "0"\nm = "zeros_like(param)"'
H0 = "lr = 0.1\nh0 = 0.3"
H0_CONFIGS = [{}, {"h0": 0.7}]


def _check_counter(tmp_path, rule, expected, hyper=H0, configs=H0_CONFIGS):
    check(tmp_path, spec_text(rule, hyper, COUNTER_STATE), expected, configs,
          init=lambda name, p: torch.zeros_like(p) if name == "m" else 0, state_names=("step", "m"))


def test_local_in_both_hyperparameter_branches_under_a_counter_condition(tmp_path):
    def expected(param, grad, s, h):
        s["step"] += 1
        if s["step"] < 3:
            u = 2 * grad if h.get("h0", 0.3) < 0.5 else 3 * grad + param
            s["m"] = s["m"] + u * param
        return param - 0.1 * s["m"], s

    _check_counter(tmp_path, """
        step = step + 1
        if step < 3:
            if h0 < 0.5:
                u = 2 * grad
            else:
                u = 3 * grad + param
            m = m + u * param
        param = param - lr * m
    """, expected)


def test_local_read_only_inside_the_nested_branches(tmp_path):
    def expected(param, grad, s, h):
        s["step"] += 1
        if s["step"] < 3:
            if h.get("h0", 0.3) < 0.5:
                u = 2 * grad
                s["m"] = s["m"] + u
            else:
                u = 3 * grad
                u = u * param
                s["m"] = s["m"] - u
        return param - 0.1 * s["m"], s

    _check_counter(tmp_path, """
        step = step + 1
        if step < 3:
            if h0 < 0.5:
                u = 2 * grad
                m = m + u
            else:
                u = 3 * grad
                u = u * param
                m = m - u
        param = param - lr * m
    """, expected)


def test_local_read_after_the_outer_block_that_assigns_it_on_both_sides(tmp_path):
    def expected(param, grad, s, h):
        s["step"] += 1
        if s["step"] < 3:
            u = 2 * grad if h.get("h0", 0.3) < 0.5 else 3 * grad
        else:
            u = grad * param
        s["m"] = s["m"] + u
        return param - 0.1 * u, s

    _check_counter(tmp_path, """
        step = step + 1
        if step < 3:
            if h0 < 0.5:
                u = 2 * grad
            else:
                u = 3 * grad
        else:
            u = grad * param
        m = m + u
        param = param - lr * u
    """, expected)


def test_scalar_local_in_both_hyperparameter_branches_under_a_counter_condition(tmp_path):
    def expected(param, grad, s, h):
        s["step"] += 1
        if s["step"] < 3:
            c = s["step"] * 2 if h.get("h0", 0.3) < 0.5 else s["step"] + 0.5
            s["m"] = s["m"] + c * grad
        return param - 0.1 * s["m"], s

    _check_counter(tmp_path, """
        step = step + 1
        if step < 3:
            if h0 < 0.5:
                c = step * 2
            else:
                c = step + 0.5
            m = m + c * grad
        param = param - lr * m
    """, expected)


def test_local_assigned_three_levels_deep(tmp_path):
    def expected(param, grad, s, h):
        s["step"] += 1
        if s["step"] < 3:
            if h.get("h0", 0.3) < 0.5:
                u = 2 * grad if h.get("h1", 0.3) < 0.5 else 4 * grad
            else:
                u = 3 * grad
            s["m"] = s["m"] + u
        return param - 0.1 * s["m"], s

    _check_counter(tmp_path, """
        step = step + 1
        if step < 3:
            if h0 < 0.5:
                if h1 < 0.5:
                    u = 2 * grad
                else:
                    u = 4 * grad
            else:
                u = 3 * grad
            m = m + u
        param = param - lr * m
    """, expected, hyper="lr = 0.1\nh0 = 0.3\nh1 = 0.3", configs=[{}, {"h0": 0.7}, {"h1": 0.7}])


def test_counter_condition_inside_the_hyperparameter_one(tmp_path):
    def expected(param, grad, s, h):
        s["step"] += 1
        if h.get("h0", 0.3) < 0.5:
            u = 2 * grad if s["step"] < 3 else grad * param
        else:
            u = 3 * grad
        s["m"] = s["m"] + u
        return param - 0.1 * u, s

    _check_counter(tmp_path, """
        step = step + 1
        if h0 < 0.5:
            if step < 3:
                u = 2 * grad
            else:
                u = grad * param
        else:
            u = 3 * grad
        m = m + u
        param = param - lr * u
    """, expected)


def test_local_assigned_under_a_hyperparameter_then_under_a_counter_condition(tmp_path):
    # the first assignment exists in one kernel only: the second keeps it (tl.where) there and
    # assigns outright in the other, where nothing reads `u` past the counter condition
    def expected(param, grad, s, h):
        s["step"] += 1
        small = h.get("h0", 0.3) < 0.5
        if small:
            u = grad * param
        if s["step"] < 3:
            u = 2 * grad
            s["m"] = s["m"] + u
        if small:
            s["m"] = s["m"] - u
        return param - 0.1 * s["m"], s

    _check_counter(tmp_path, """
        step = step + 1
        if h0 < 0.5:
            u = grad * param
        if step < 3:
            u = 2 * grad
            m = m + u
        if h0 < 0.5:
            m = m - u
        param = param - lr * m
    """, expected)
