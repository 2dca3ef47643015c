"""Per-tensor scalars (numel, ndim, size, norm, machine_eps) of reduced-shape tensors and of
compound tensor expressions, on every backend.

Each case is a small spec run by the helpers of tests/compiler/test_value_semantics.py on every
kernel backend it gets (for-loop, foreach, differentiable, C, Triton in its interpreter) against
the float64 interpreter and the rule computed here by hand.

- ``numel(v)``/``size(v, d)`` of a reduced-shape tensor (a local from ``norm_dim``/``mean_dim``,
  a ``zeros_reduced`` state) printed as the *parameter's* numel and dimensions in the C kernel
  (``numel``, ``dim_c``, ``dim_m``): off by whole numbers.
- a compound tensor argument (``norm(exp(grad) + sign(m))``) printed inline by the Python scalar
  printer: ``math.exp`` of a tensor, and ``.norm()`` bound to the last operand only.
"""
from __future__ import annotations

import torch

from tests.compiler.test_value_semantics import HYPER, check, spec_text


def vector_norm(x, dim=None):
    return torch.linalg.vector_norm(x, dim=dim, keepdim=dim is not None)


EPS = torch.finfo(torch.float64).eps


# -- bug 1: shapes of reduced-shape tensors -----------------------------------------------------------

def test_numel_and_sizes_of_a_reduced_local(tmp_path):
    def expected(param, grad, s, h):
        v = vector_norm(grad, -1)
        c = v.numel() + v.size(-1) + 10 * v.dim() + 100 * v.size(-1) * EPS / EPS
        s["m"] = s["m"] + v
        return param - 0.1 * c * grad, s

    check(tmp_path, spec_text("""
        v = norm_dim(grad, -1)
        c = numel(v) + size(v, -1) + 10 * ndim(v) + 100 * size(v, -1) * machine_eps(v) / machine_eps(param)
        m = m + v
        param = param - lr * c * grad
    """, HYPER, 'm = "zeros_like(param)"'), expected, [{}])


def test_numel_and_sizes_of_reductions_over_both_dimensions(tmp_path):
    def expected(param, grad, s, h):
        c = 1.0 * param.numel()
        if param.dim() > 1:
            v = vector_norm(grad, -2)
            w = v.mean(dim=-1, keepdim=True)
            u = grad.mean(dim=-1, keepdim=True)
            c = (v.numel() + 2 * v.size(-2) + 3 * v.size(-1) + 5 * w.numel() + 7 * w.size(-1) + 11 * w.size(-2)
                 + 13 * u.numel() + 17 * u.size(-2) + 19 * u.size(-1)) / 100
        s["m"] = s["m"] + c * grad
        return param - 0.1 * s["m"], s

    check(tmp_path, spec_text("""
        c = 1.0 * numel(param)
        if ndim(param) > 1:
            v = norm_dim(grad, -2)
            w = mean_dim(v, -1)
            u = mean_dim(grad, -1)
            c = (numel(v) + 2 * size(v, -2) + 3 * size(v, -1) + 5 * numel(w) + 7 * size(w, -1) + 11 * size(w, -2)
                 + 13 * numel(u) + 17 * size(u, -2) + 19 * size(u, -1)) / 100
        m = m + c * grad
        param = param - lr * m
    """, HYPER, 'm = "zeros_like(param)"'), expected, [{}])


def test_numel_and_size_of_a_reduced_state(tmp_path):
    def expected(param, grad, s, h):
        s["r"] = s["r"] + 0.1 * grad.mean(dim=-1, keepdim=True)
        c = s["r"].numel() + 2 * s["r"].size(-1)
        return param - 0.1 * c * grad * s["r"], s

    check(tmp_path, spec_text("""
        r = r + (1 - beta) * mean_dim(grad, -1)
        c = numel(r) + 2 * size(r, -1)
        param = param - lr * c * grad * r
    """, HYPER, 'r = "zeros_reduced(param, -1)"'), expected, [{}], state_names=("r",),
          init=lambda name, p: torch.zeros_like(p.mean(dim=-1, keepdim=True)))


def test_norm_of_a_reduced_local(tmp_path):
    def expected(param, grad, s, h):
        v = vector_norm(grad, -1)
        s["m"] = s["m"] + grad
        return param - 0.1 * grad / (vector_norm(v).item() + 1), s

    check(tmp_path, spec_text("""
        v = norm_dim(grad, -1)
        m = m + grad
        param = param - lr * grad / (norm(v) + 1)
    """, HYPER, 'm = "zeros_like(param)"'), expected, [{}])


# -- bug 2: compound tensor arguments -----------------------------------------------------------------

def test_norm_of_a_compound_tensor_expression(tmp_path):
    def expected(param, grad, s, h):
        n = vector_norm(grad.exp() + s["m"].sign()).item()
        s["m"] = 0.9 * s["m"] + grad
        return param - 0.1 * grad / n, s

    check(tmp_path, spec_text("""
        n = norm(exp(grad) + sign(m))
        m = beta * m + grad
        param = param - lr * grad / n
    """, HYPER, 'm = "zeros_like(param)"'), expected, [{}])


def test_every_per_tensor_scalar_of_a_compound_argument(tmp_path):
    def expected(param, grad, s, h):
        a = grad * 2 + s["m"]
        c = (a.numel() + 2 * a.dim() + 3 * a.size(-1) + 5 * torch.finfo(a.dtype).eps / EPS
             + vector_norm(param * grad).item())
        s["m"] = s["m"] + grad
        return param - 0.01 * c * grad, s

    check(tmp_path, spec_text("""
        c = (numel(grad * 2 + m) + 2 * ndim(grad * 2 + m) + 3 * size(grad * 2 + m, -1)
             + 5 * machine_eps(grad * 2 + m) / machine_eps(param) + norm(param * grad))
        m = m + grad
        param = param - lr / 10 * c * grad
    """, HYPER, 'm = "zeros_like(param)"'), expected, [{}])


def test_norm_of_a_compound_expression_in_a_tensor_statement(tmp_path):
    def expected(param, grad, s, h):
        s["m"] = s["m"] + grad / (1 + vector_norm(grad - s["m"]).item())
        return param - 0.1 * s["m"], s

    check(tmp_path, spec_text("""
        m = m + grad / (1 + norm(grad - m))
        param = param - lr * m
    """, HYPER, 'm = "zeros_like(param)"'), expected, [{}])


def test_numel_of_a_compound_argument_in_every_kernel(tmp_path):
    """numel() alone: the Triton kernel takes this spec too (it declines size, ndim and norm)."""
    def expected(param, grad, s, h):
        s["m"] = s["m"] + grad / (grad * 2 + s["m"]).numel()
        return param - 0.1 * s["m"], s

    _, impls = check(tmp_path, spec_text("""
        m = m + grad / numel(grad * 2 + m)
        param = param - lr * m
    """, HYPER, 'm = "zeros_like(param)"'), expected, [{}])
    assert "triton" in impls


def test_norm_of_a_compound_argument_under_a_per_tensor_condition(tmp_path):
    """The temporary runs under the statement's guard (a counter: tensor by tensor in foreach)."""
    def expected(param, grad, s, h):
        s["step"] = s["step"] + 1
        if s["step"] > 1:
            s["m"] = s["m"] + grad / (1 + vector_norm(grad * s["m"]).item())
        s["m"] = s["m"] * 0.9 + grad
        return param - 0.1 * s["m"], s

    check(tmp_path, spec_text("""
        step = step + 1
        if step > 1:
            m = m + grad / (1 + norm(grad * m))
        m = m * beta + grad
        param = param - lr * m
    """, HYPER, 'step = "0"\nm = "zeros_like(param)"'), expected, [{}], state_names=("step", "m"),
          init=lambda name, p: 0.0 if name == "step" else torch.zeros_like(p))
