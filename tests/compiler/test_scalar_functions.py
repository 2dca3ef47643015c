"""Functions of the spec language applied to host scalars, and where() of a decided comparison.

Every function of the spec language may take scalars as well as tensors: ``sign(lr - 0.375)``,
``abs(h)``, ``conj(beta ** step)``, ``maximum(beta, lr)``, ``if_none(eps1, 0.25)``.  A scalar
expression is computed on the host (the Python scalar printer for the for-loop, foreach and
differentiable kernels, the C scalar printer, the Triton printer), so each function needs a host
form on every backend; the fuzzer found ``sign`` had none in Python (tests/fuzz/regressions/
sign_of_scalar.toml).  Each case is built into a throw-away package and run on every backend it
gets, against the reference interpreter and the rule computed by hand here
(tests/compiler/test_value_semantics.py has the helpers).
"""
from __future__ import annotations

import math

import pytest
import torch

from optgen.errors import SpecError
from optgen.passes import compile_spec
from optgen.spec.load import load_spec
from tests.compiler import test_value_semantics as value_semantics
from tests.compiler.test_value_semantics import check, spec_text

HYPER = """
lr = 0.1
beta = 0.9
h = -0.3
eps = { default = ["None", 0.5], names = ["eps1", "eps2"] }
"""
DEFAULTS = {"lr": 0.1, "beta": 0.9, "h": -0.3, "eps": (None, 0.5)}
CONFIGS = [{}, {"h": 0.4, "eps": (0.125, 0.5)}, {"h": 0.0}]


def _sign(x: float) -> float:
    return float((x > 0) - (x < 0))


def _values(kwargs: dict) -> dict:
    v = {**DEFAULTS, **kwargs}
    v["eps1"], v["eps2"] = v.pop("eps")
    return v


# (the scalar expression, the same by hand from the hyperparameters, the parameter and the gradient)
SCALAR_CASES = {
    "sign_of_hyper": ("sign(h)", lambda v, p, g: _sign(v["h"])),
    "sign_of_difference": ("sign(lr - 0.375)", lambda v, p, g: _sign(v["lr"] - 0.375)),
    "sign_in_product": ("2 * sign(h + 0.1) * beta", lambda v, p, g: 2 * _sign(v["h"] + 0.1) * v["beta"]),
    "abs": ("abs(h - 1) * lr", lambda v, p, g: abs(v["h"] - 1) * v["lr"]),
    "conj": ("3 * conj(beta ** 2 - h)", lambda v, p, g: 3 * (v["beta"] ** 2 - v["h"])),
    "lerp": ("2 * lerp(lr, beta, h)", lambda v, p, g: 2 * (v["lr"] + v["h"] * (v["beta"] - v["lr"]))),
    "maximum_minimum": ("maximum(h, lr) - minimum(h, lr / 2)",
                        lambda v, p, g: max(v["h"], v["lr"]) - min(v["h"], v["lr"] / 2)),
    "clamp": ("clamp(h, -0.1, 0.2) + clamp_min(h, 0) + clamp_max(h, 0.1)",
              lambda v, p, g: min(max(v["h"], -0.1), 0.2) + max(v["h"], 0) + min(v["h"], 0.1)),
    "where_of_hypers": ("where(h > 0, lr, 2 * lr)", lambda v, p, g: v["lr"] if v["h"] > 0 else 2 * v["lr"]),
    "if_none": ("if_none(eps1, 0.25) * 2", lambda v, p, g: (0.25 if v["eps1"] is None else v["eps1"]) * 2),
    "exp_log_sqrt": ("exp(h) + log(beta) - sqrt(beta)",
                     lambda v, p, g: math.exp(v["h"]) + math.log(v["beta"]) - math.sqrt(v["beta"])),
    "sign_of_norm": ("sign(norm(grad) - 3) * numel(param)",
                     lambda v, p, g: _sign(g.norm().item() - 3) * p.numel()),
    "abs_of_size": ("abs(h - size(param, 0))", lambda v, p, g: abs(v["h"] - p.size(0))),
}


@pytest.mark.parametrize("expr, by_hand", SCALAR_CASES.values(), ids=SCALAR_CASES.keys())
def test_function_of_host_scalars(tmp_path, expr, by_hand):
    def expected(param, grad, s, kwargs):
        c = by_hand(_values(kwargs), param, grad)
        s["m"] = s["m"] + c * grad
        return param - 0.1 * s["m"], s

    rule = f"c = {expr}\nm = m + c * grad\nparam = param - lr * m"
    check(tmp_path, spec_text(rule, HYPER, 'm = "zeros_like(param)"'), expected, CONFIGS)


def test_conj_of_a_power_of_the_step(tmp_path):
    """``conj(beta2 ** step)`` (fuzz seed 1127): sympy cannot prove a power with a symbolic
    exponent real, so conj stays in the expression unless the spec language's conj — the identity
    on real values — drops it."""
    def expected(param, grad, s, kwargs):
        s["step"] += 1
        c = 0.9 ** s["step"] * _sign(_values(kwargs)["h"])
        s["m"] = s["m"] + c * grad
        return param - 0.1 * s["m"], s

    rule = "step = step + 1\nc = conj(beta ** step) * sign(h)\nm = m + c * grad\nparam = param - lr * m"
    text = spec_text(rule, HYPER, 'm = "zeros_like(param)"\nstep = "0"')
    check(tmp_path, text, expected, CONFIGS, state_names=("m", "step"),
          init=lambda name, p: torch.zeros_like(p) if name == "m" else 0)


# -- where() of a comparison sympy decides ---------------------------------------------------------

WHERE_CASES = {
    # s < s is False for every real s: the else branch (tests/fuzz/regressions/where_folds_to_false.toml)
    "false_tensor_branches": ("where(m < m, grad, param)", lambda p, g, m: p),
    "true_tensor_branches": ("where(m <= m, grad, param)", lambda p, g, m: g),
    "false_number_branch": ("where(grad > grad, grad, 0.5) + grad", lambda p, g, m: 0.5 + g),
    "true_number_branch": ("where(grad >= grad, 2, grad) * grad", lambda p, g, m: 2 * g),
    "decided_scalars": ("where(h < h, lr, beta) * grad", lambda p, g, m: 0.9 * g),
}


@pytest.mark.parametrize("expr, by_hand", WHERE_CASES.values(), ids=WHERE_CASES.keys())
def test_where_of_a_decided_comparison(tmp_path, expr, by_hand):
    def expected(param, grad, s, kwargs):
        t = by_hand(param, grad, s["m"])
        s["m"] = s["m"] + 0.5 * t.clamp(-1, 1)
        return param - 0.1 * s["m"], s

    rule = f"u = {expr}\nm = m + 0.5 * clamp(u, -1, 1)\nparam = param - lr * m"
    check(tmp_path, spec_text(rule, HYPER, 'm = "zeros_like(param)"'), expected, [{}])


# -- norm_dim / mean_dim: tensors with one dimension reduced to size 1 -----------------------------

REDUCED_CASES = {
    # a reduced local broadcast against full-size tensors
    "norm_dim_local": ("v = norm_dim(grad, -1)\nm = m + v * grad", 'm = "zeros_like(param)"',
                       lambda g, s: {"m": s["m"] + g.norm(dim=-1, keepdim=True) * g}),
    "mean_dim_in_expression": ("m = lerp(m, clamp(grad - mean_dim(grad * m, -2), -2, 2), 0.5)",
                               'm = "zeros_like(param)"',
                               lambda g, s: {"m": torch.lerp(s["m"], (g - (g * s["m"]).mean(-2, True)).clamp(-2, 2),
                                                             0.5)}),
    "abs_of_mean_dim": ("m = m + abs(mean_dim(grad, -1)) * sign(grad)", 'm = "zeros_like(param)"',
                        lambda g, s: {"m": s["m"] + g.mean(-1, True).abs() * g.sign()}),
    # a zeros_reduced state updated with a value of its shape
    "reduced_state": ("m = 0.5 * m + mean_dim(grad * grad, -1)", 'm = "zeros_reduced(param, -1)"',
                      lambda g, s: {"m": 0.5 * s["m"] + (g * g).mean(-1, True)}),
    # two reductions over different dimensions broadcast to the full shape (Adafactor's row * col)
    "row_times_column": ("m = m + norm_dim(grad, -1) * mean_dim(grad, -2)", 'm = "zeros_like(param)"',
                         lambda g, s: {"m": s["m"] + g.norm(dim=-1, keepdim=True) * g.mean(-2, True)}),
    # a reduction of a reduction: a per-tensor scalar
    "norm_of_norm_dim": ("c = norm(norm_dim(grad, -1))\nm = m + c * grad", 'm = "zeros_like(param)"',
                         lambda g, s: {"m": s["m"] + g.norm(dim=-1, keepdim=True).norm().item() * g}),
}


@pytest.mark.parametrize("rule, state, by_hand", REDUCED_CASES.values(), ids=REDUCED_CASES.keys())
def test_reduced_tensors(tmp_path, monkeypatch, rule, state, by_hand):
    def expected(param, grad, s, kwargs):
        s = by_hand(grad, s)
        return param - 0.1 * (grad + s["m"].mean(-1, True).mean(-2, True)), s

    # 2-D parameters only: a reduction over dimension -2 of a 1-D tensor is torch's IndexError
    monkeypatch.setattr(value_semantics, "SHAPES", [(7, 5), (4, 6)])
    rule += "\nparam = param - lr * (grad + mean_dim(mean_dim(m, -1), -2))"
    reduced = "zeros_reduced" in state
    check(tmp_path, spec_text(rule, HYPER, state), expected, [{}],
          init=lambda name, p: p.new_zeros(*p.shape[:-1], 1) if reduced else torch.zeros_like(p))


INVALID_REDUCTIONS = {
    "norm_dim_of_a_hyperparameter": ("m = m + norm_dim(lr, -1) * grad", 'm = "zeros_like(param)"', "18:1",
                                     "norm_dim() reduces a tensor over one dimension, but its argument here is the "
                                     "host scalar 'lr'"),
    "mean_dim_of_a_cancelled_tensor": ("m = m + mean_dim(grad - grad, -1) * grad", 'm = "zeros_like(param)"', "18:1",
                                       "mean_dim() reduces a tensor over one dimension, but its argument here is "
                                       "the host scalar '0'"),
    "reduced_value_into_full_state": ("m = norm_dim(grad, -1)", 'm = "zeros_like(param)"', "18:1",
                                      "'m' has the parameter's shape, but this value has the parameter's shape "
                                      "with dimension -1 of size 1, and a tensor keeps its shape — declare it "
                                      "zeros_reduced(param, -1)"),
    "full_value_into_reduced_state": ("m = m + grad", 'm = "zeros_reduced(param, -2)"', "18:1",
                                      "'m' has the parameter's shape with dimension -2 of size 1, but this value "
                                      "has the parameter's shape, and a tensor keeps its shape — reduce the value"),
    "reduced_value_into_param": ("m = m + grad\nparam = mean_dim(param - lr * m, -1)", 'm = "zeros_like(param)"',
                                 "19:1", "'param' has the parameter's shape, but this value has"),
    "dimension_not_an_integer": ("m = m + norm_dim(grad, lr) * grad", 'm = "zeros_like(param)"', "18:24",
                                 "the dimension of norm_dim() must be an integer such as -1, not 'lr'"),
    "size_dimension_not_an_integer": ("m = m + size(grad, 0.5) * grad", 'm = "zeros_like(param)"', "18:20",
                                      "the dimension of size() must be an integer such as -1, not '0.5'"),
}


@pytest.mark.parametrize("rule, state, where, message", INVALID_REDUCTIONS.values(), ids=INVALID_REDUCTIONS.keys())
def test_invalid_reductions_are_spec_errors(tmp_path, rule, state, where, message):
    """Invalid uses of norm_dim/mean_dim are errors at the line (and column) that makes them,
    before any pass runs — not internal compiler errors, nor kernels of a different shape than the
    reference (the fuzzer found a full-size state assigned a norm_dim: copy_ broadcast it)."""
    path = tmp_path / "case.toml"
    path.write_text(spec_text(rule, HYPER, state))
    with pytest.raises(SpecError) as error:
        compile_spec(load_spec(path))
    assert str(error.value).startswith(f"{path}:{where}: {message}"), str(error.value)
