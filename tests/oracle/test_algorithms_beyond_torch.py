"""Optimizers torch.optim does not have, checked against their papers' update written out here
independently of the spec (torch.optim cannot be the oracle for them).

Lion (Chen et al., 2023, arXiv:2302.06675, Algorithm 2, decoupled weight decay):
    c = beta1 * m + (1 - beta1) * g;  theta = theta - lr * (sign(c) + wd * theta);
    m = beta2 * m + (1 - beta2) * g

LAMB (You et al., 2019, arXiv:1904.00962, Algorithm 2, phi = identity, ratio 1 at a zero norm):
    m, v as Adam's; u = m_hat / (sqrt(v_hat) + eps) + wd * theta
    theta = theta - lr * (||theta|| / ||u||) * u

AdaBelief (Zhuang et al., 2020, Algorithm 2, as the authors' adabelief-pytorch 0.2 computes it
without rectification: eps added to s every step, weight decay decoupled by default):
    m = beta1 * m + (1 - beta1) * g;  s = beta2 * s + (1 - beta2) * (g - m)^2 + eps
    theta = theta - lr / (1 - beta1^t) * m / (sqrt(s / (1 - beta2^t)) + eps)
"""
from typing import Any

import pytest
import torch

import optgen
from optgen.runtime import c_launch

IMPLEMENTATIONS = ["forloop", "foreach", "differentiable"] + (["c"] if c_launch.available() else [])
SHAPES = [(40, 30), (7,), ()]


def inputs(dtype, steps=20):
    """Parameters and ``steps`` gradients for each (float64 draws cast to ``dtype``)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES] for _ in range(steps)]
    return params, grads


def run_optgen(name, implementation, params, grads_per_step, kwargs):
    """optgen's ``name`` through ``implementation`` ("differentiable": differentiable=True on
    non-leaf copies, as such a step needs); returns the stepped tensors and the optimizer."""
    differentiable = implementation == "differentiable"
    leaves = [p.clone() if differentiable else p for p in params]
    opt = getattr(optgen, name)(leaves, differentiable=differentiable, **kwargs)
    if not differentiable:
        opt.implementation = implementation
    for grads in grads_per_step:
        for p, grad in zip(leaves, grads, strict=True):
            p.grad = grad
        opt.step()
    return leaves, opt


def lion_reference(params, grads_per_step, lr, betas, weight_decay, maximize=False):
    """The paper's Algorithm 2 in float64."""
    beta1, beta2 = betas
    theta = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    for grads in grads_per_step:
        for t, mi, g in zip(theta, m, grads, strict=True):
            g = -g.double() if maximize else g.double()
            c = beta1 * mi + (1 - beta1) * g
            t.sub_(lr * (torch.sign(c) + weight_decay * t))
            mi.mul_(beta2).add_((1 - beta2) * g)
    return theta, m


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kwargs", [dict(lr=1e-3), dict(lr=3e-4, betas=(0.95, 0.98), weight_decay=0.1),
                                    dict(lr=1e-3, weight_decay=0.01, maximize=True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_lion_follows_the_paper(implementation, kwargs, dtype):
    params, grads_per_step = inputs(dtype)
    theta, m = lion_reference(params, grads_per_step, kwargs["lr"], kwargs.get("betas", (0.9, 0.99)),
                              kwargs.get("weight_decay", 0.0), kwargs.get("maximize", False))
    leaves, opt = run_optgen("Lion", implementation, params, grads_per_step, kwargs)
    # float64: rounding only (the spec's lerp vs the paper's weighted sum); float32: a few ulps
    # of the values, over 20 steps
    tol: dict[str, Any] = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for p, t, mi in zip(leaves, theta, m, strict=True):
        torch.testing.assert_close(p.detach().double(), t, **tol)
        torch.testing.assert_close(opt.state[p]["exp_avg"].detach().double(), mi, **tol)


def adabelief_reference(params, grads_per_step, lr, betas, eps, weight_decay, decoupled, maximize=False):
    beta1, beta2 = betas
    theta = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    s = [torch.zeros_like(t) for t in theta]
    for step, grads in enumerate(grads_per_step, start=1):
        for t, mi, si, g in zip(theta, m, s, grads, strict=True):
            g = -g.double() if maximize else g.double()
            if decoupled:
                t.mul_(1 - lr * weight_decay)
            else:
                g = g + weight_decay * t
            mi.copy_(beta1 * mi + (1 - beta1) * g)
            si.copy_(beta2 * si + (1 - beta2) * (g - mi) ** 2 + eps)
            t.sub_(lr / (1 - beta1 ** step) * mi / ((si / (1 - beta2 ** step)).sqrt() + eps))
    return theta, m, s


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kwargs", [dict(), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1),
                                    dict(weight_decay=0.1, decoupled_weight_decay=False, maximize=True)], ids=str)
def test_adabelief_follows_the_paper(implementation, kwargs):
    params, grads_per_step = inputs(torch.float64)
    theta, m, s = adabelief_reference(params, grads_per_step, kwargs.get("lr", 1e-3), kwargs.get("betas", (0.9, 0.999)),
                                      kwargs.get("eps", 1e-16), kwargs.get("weight_decay", 0.0),
                                      kwargs.get("decoupled_weight_decay", True), kwargs.get("maximize", False))
    leaves, opt = run_optgen("AdaBelief", implementation, params, grads_per_step, kwargs)
    for p, t, mi, si in zip(leaves, theta, m, s, strict=True):
        torch.testing.assert_close(p.detach(), t, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["exp_avg"].detach(), mi, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["exp_avg_var"].detach(), si, rtol=1e-10, atol=1e-14)


def lamb_reference(params, grads_per_step, lr, betas, eps, weight_decay):
    beta1, beta2 = betas
    theta = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    for step, grads in enumerate(grads_per_step, start=1):
        for t, mi, vi, g in zip(theta, m, v, grads, strict=True):
            g = g.double()
            mi.copy_(beta1 * mi + (1 - beta1) * g)
            vi.copy_(beta2 * vi + (1 - beta2) * g * g)
            u = (mi / (1 - beta1 ** step)) / ((vi / (1 - beta2 ** step)).sqrt() + eps) + weight_decay * t
            w_norm, u_norm = t.norm().item(), u.norm().item()
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            t.sub_(lr * ratio * u)
    return theta, m, v


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kwargs", [dict(), dict(lr=1e-2, weight_decay=0.1)], ids=str)
def test_lamb_follows_the_paper(implementation, kwargs):
    """(The fused C kernel walks each tensor twice: the trust ratio needs both norms first; the
    Triton backend declines the reductions.)"""
    params, grads_per_step = inputs(torch.float64)
    with torch.no_grad():
        params[2].zero_()  # a zero parameter: trust ratio 1
    theta, m, v = lamb_reference(params, grads_per_step, kwargs.get("lr", 1e-3), (0.9, 0.999), 1e-6,
                                 kwargs.get("weight_decay", 0.0))
    leaves, opt = run_optgen("Lamb", implementation, params, grads_per_step, kwargs)
    for p, t, mi, vi in zip(leaves, theta, m, v, strict=True):
        torch.testing.assert_close(p.detach(), t, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["exp_avg"].detach(), mi, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"].detach(), vi, rtol=1e-10, atol=1e-14)
    assert "triton" not in opt.implementations


def test_lamb_differentiates_through_its_norms():
    """The differentiable kernel keeps norm(param) and norm(update) in the graph (and copies the
    parameter, whose norm's backward reads it): gradcheck w.r.t. the parameter and a Tensor lr."""
    def run(p_leaf, lr):
        p = p_leaf.clone()
        opt = optgen.Lamb([p], lr=lr, weight_decay=0.1, differentiable=True)
        for k in range(2):
            p.grad = torch.linspace(-0.3, 0.5, 3, dtype=torch.float64) * (k + 1)
            opt.step()
        return p

    inputs_ = (torch.linspace(0.5, 1.5, 3, dtype=torch.float64, requires_grad=True),
               torch.tensor(0.1, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(run, inputs_)


def test_lion_validates_like_a_torch_optimizer():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 1.0"):
        optgen.Lion([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        optgen.Lion([p], lr=-1)
    assert isinstance(optgen.Lion([p]), torch.optim.Optimizer)
