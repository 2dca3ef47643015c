"""Every numeric hyperparameter as a 0-dim Tensor, and its hypergradient (docs/hyperparameters.md).

- given to the constructor or set in the group later, a 0-dim Tensor hyperparameter moves the
  parameters exactly as the same number does, on every CPU implementation;
- with ``differentiable=True`` the gradient of a loss after two steps w.r.t. a Tensor
  hyperparameter that requires grad is the true one (``torch.autograd.gradcheck``, float64).
"""
from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import optgen
from optgen.runtime.hyperparameters import schedulable

#: options under which every hyperparameter of the optimizer is read by the update
OPTIONS = {
    "SGD": dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.1),
    "RMSprop": dict(lr=0.01, momentum=0.5, weight_decay=0.1),
    "Adagrad": dict(lr=0.1, weight_decay=0.1, lr_decay=0.01),
    "Adadelta": dict(weight_decay=0.1), "Adam": dict(weight_decay=0.1), "AdamW": dict(),
    "NAdam": dict(weight_decay=0.1), "RAdam": dict(weight_decay=0.1), "Adamax": dict(weight_decay=0.1),
    "ASGD": dict(weight_decay=0.1, t0=1.0), "Lion": dict(lr=0.01, weight_decay=0.1),
    "Lamb": dict(weight_decay=0.1), "AdaBelief": dict(weight_decay=0.1), "Rprop": dict(), "Muon": dict(),
    "Adafactor": dict(weight_decay=0.1),
}
SKIP = {"LBFGS", "SparseAdam"}  # a closure line search / sparse gradients: their own tests
IMPLEMENTATIONS = ("forloop", "foreach", "c", "differentiable")


def _numeric_names(cls):
    """(name, accessor) of every real-valued hyperparameter (Muon's ns_steps is a count)."""
    opt = cls([torch.nn.Parameter(torch.zeros(2, 2))], **OPTIONS.get(cls.__name__, {}))
    return [(name, h) for name, h in schedulable(opt).items() if name != "ns_steps"]


CASES = [(name, hp, h, impl) for name, cls in optgen.OPTIMIZERS.items() if name not in SKIP
         for hp, h in _numeric_names(cls) for impl in IMPLEMENTATIONS if impl in cls._kernels]


def _with_tensor(name, options, h, make):
    """``options`` with hyperparameter ``h`` replaced by ``make(value)``; Adam and AdamW take both
    betas as Tensors or neither (torch's check), so the other one becomes a constant Tensor."""
    options = dict(options)
    cls = getattr(optgen, name)
    value = options.get(h.key, cls([torch.nn.Parameter(torch.zeros(2, 2))]).defaults[h.key])
    if h.index is None:
        options[h.key] = make(float(value))
        return options
    items = [torch.tensor(float(v), dtype=torch.float64) if name in ("Adam", "AdamW") else v for v in value]
    items[h.index] = make(float(value[h.index]))
    options[h.key] = tuple(items)
    return options


def _shapes(name):
    return [(4, 3), (5, 2)] if name == "Muon" else [(4, 3), (5,)]


def _run(name, options, implementation, steps=3, set_later=None):
    torch.manual_seed(0)
    leaves = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in _shapes(name)]
    differentiable = implementation == "differentiable"
    # a differentiable step writes non-leaf tensors in place (as in torch's tests)
    params = [w.clone() for w in leaves] if differentiable else \
        [torch.nn.Parameter(w.detach().clone()) for w in leaves]
    opt = getattr(optgen, name)(params, **options, **({"differentiable": True} if differentiable else {}))
    opt.implementation = implementation
    if set_later is not None:
        set_later(opt.param_groups[0])
    for _ in range(steps):
        loss = torch.stack([(x ** 2).sum() + x.sin().sum() for x in params]).sum()
        grads = torch.autograd.grad(loss, params)
        for x, g in zip(params, grads, strict=True):
            x.grad = g.detach()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    return [x.detach() for x in params]


#: a counter that carries a value (NAdam's mu_product, float32 by default) updated by a product with the
#: hyperparameter: a Tensor one is multiplied in float64 and rounded (test_hypergradient_gradcheck uses float64)
FLOAT32_COUNTER = {("NAdam", "beta1", "differentiable"), ("NAdam", "momentum_decay", "differentiable")}


@pytest.mark.parametrize("name, hp, h, implementation", CASES,
                         ids=[f"{n}-{hp}-{i}" for n, hp, _, i in CASES])
def test_a_tensor_hyperparameter_steps_as_its_number(name, hp, h, implementation):
    options = OPTIONS.get(name, {})
    expected = _run(name, options, implementation)
    as_tensor = _with_tensor(name, options, h, lambda v: torch.tensor(v, dtype=torch.float64))
    if name in ("Adam", "AdamW") and h.index is not None and implementation == "foreach":
        pytest.skip("torch: betas as Tensors are not supported for capturable=False and foreach=True")
    if hp == "lr" and implementation == "foreach" and name in ("Adam", "AdamW"):
        pytest.skip("torch: lr as a Tensor is not supported for capturable=False and foreach=True")
    def set_later(group):  # set in the group after construction, as a scheduler or a user does
        group.update(_with_tensor(name, {k: group[k] for k in (h.key,)}, h,
                                  lambda v: torch.tensor(v, dtype=torch.float64)))

    for got in (_run(name, as_tensor, implementation), _run(name, options, implementation, set_later=set_later)):
        if (name, hp, implementation) in FLOAT32_COUNTER:  # documented: float32 rounding of one counter
            with pytest.raises(AssertionError):
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)
        else:
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


GRADCHECK = [(name, hp, h) for name, hp, h, impl in CASES if impl == "differentiable"
             and not (name == "ASGD" and hp == "t0")]  # (t0 only moves a threshold: a step function)
#: hyperparameters the loss after these two steps does not depend on: Lion steps along a sign;
#: RAdam's first steps are not rectified (beta2, eps unused); Rprop's etaminus acts on a sign change,
#: its step_size_min / step_size_max on a step size that reaches them
ZERO_GRADIENT = {("Lion", "beta1"), ("Lion", "beta2"), ("RAdam", "beta2"), ("RAdam", "eps"), ("Rprop", "etaminus"),
                 ("Rprop", "step_size_min"), ("Rprop", "step_size_max")}


@pytest.fixture
def float64_counters():
    """Counters (NAdam's mu_product) in float64, as gradcheck's finite differences need."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("name, hp, h", GRADCHECK, ids=[f"{n}-{hp}" for n, hp, _ in GRADCHECK])
def test_hypergradient_gradcheck(name, hp, h, float64_counters):
    """d(loss after two differentiable steps) / d(hyperparameter) and / d(parameter): gradcheck.
    An eps is taken at 1e-2, so that gradcheck's perturbation keeps it valid (eps >= 0)."""
    shape = _shapes(name)[0]
    g = torch.Generator().manual_seed(3)
    p_leaf = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    grads = [torch.rand(shape, generator=g, dtype=torch.float64) - 0.4 for _ in range(2)]
    weights = torch.linspace(-1, 2, p_leaf.numel(), dtype=torch.float64).reshape(shape)

    def loss(p_leaf, value):
        p = p_leaf.clone()
        options = _with_tensor(name, OPTIONS.get(name, {}), h, lambda _: value)
        opt = getattr(optgen, name)([p], **options, differentiable=True)
        for grad in grads:
            p.grad = grad
            opt.step()
        return (p * weights).sum()

    value = 1e-2 if hp == "eps" else h.get(_with_tensor(name, OPTIONS.get(name, {}), h, lambda v: torch.tensor(v)))
    x = torch.tensor(float(value), dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(loss(p_leaf, x), x, allow_unused=True, materialize_grads=True)
    assert (dx == 0) == ((name, hp) in ZERO_GRADIENT)  # the loss depends on it, and autograd sees that
    assert torch.autograd.gradcheck(loss, (p_leaf, x))


def test_rprop_clamp_bound_hypergradient(float64_counters):
    """A Tensor step_size_max that clamps the step size: its gradient is not zero, and true (torch's
    clamp takes bounds all numbers or all tensors: optgen.runtime.tensor_scalars.clamp)."""
    p_leaf = torch.linspace(0.5, 1.5, 6, dtype=torch.float64).requires_grad_()

    def loss(p_leaf, step_size_max):
        p = p_leaf.clone()
        opt = optgen.Rprop([p], lr=0.01, step_sizes=(1e-6, step_size_max), differentiable=True)
        for _ in range(3):  # the same gradient sign: the step size grows by etaplus and hits the bound
            p.grad = torch.ones_like(p)
            opt.step()
        return (p * torch.linspace(-1, 2, 6, dtype=torch.float64)).sum()

    x = torch.tensor(0.011, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(loss(p_leaf, x), x)
    assert dx != 0
    assert torch.autograd.gradcheck(loss, (p_leaf, x))


def _sparse_adam(options, implementation):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True).double()
    opt = optgen.SparseAdam(emb.parameters(), **options)
    opt.implementation = implementation
    for _ in range(3):
        opt.zero_grad()
        emb(torch.tensor([1, 2, 5])).pow(2).sum().backward()
        opt.step()
    return emb.weight.detach()


@pytest.mark.parametrize("implementation", list(optgen.SparseAdam._kernels))
@pytest.mark.parametrize("options", [dict(lr=1e-3), dict(betas=(0.9, 0.999)), dict(betas=(0.9, 0.999), index=1),
                                     dict(eps=1e-8)], ids=["lr", "beta1", "beta2", "eps"])
def test_sparse_adam_tensor_hyperparameters(options, implementation):
    options = dict(options)
    index = options.pop("index", 0)
    (key, value), = options.items()
    given: dict[str, Any]
    if key == "betas":
        items = list(value)
        items[index] = torch.tensor(items[index], dtype=torch.float64)
        given = {key: tuple(items)}
    else:
        given = {key: torch.tensor(value, dtype=torch.float64)}
    torch.testing.assert_close(_sparse_adam(given, implementation), _sparse_adam({}, implementation), rtol=0, atol=0)


@pytest.mark.parametrize("key, value", [("lr", 1.0), ("tolerance_grad", 1e-7), ("tolerance_change", 1e-9)])
def test_lbfgs_tensor_hyperparameters(key, value):
    def run(options):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
        opt = optgen.LBFGS([p], **options)

        def closure():
            opt.zero_grad()
            loss = (p ** 2).sum() + p.sin().sum()
            loss.backward()
            return loss
        for _ in range(2):
            opt.step(closure)
        return p.detach()

    torch.testing.assert_close(run({key: torch.tensor(value, dtype=torch.float64)}), run({}), rtol=0, atol=0)
