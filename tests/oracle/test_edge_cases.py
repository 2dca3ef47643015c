"""torch's options and the edge cases users hit, for every optimizer of tests/registry.py's CASES
(so a new spec is covered the moment it is registered), against torch.optim itself.

- ``differentiable=True``: autograd through ``step``, modelled on torch's own test
  (test/optim/test_optim.py, ``_diff_fn``): the parameter and the state are non-leaf functions of
  leaves that require grad; one step (and several); gradients of the result w.r.t. the leaves
  equal torch's.
- ``capturable=True`` on CPU parameters, Tensor learning rates and betas: torch's behaviour and
  errors (type and message), at construction and at step.
- Parameters without grad, zero-size and 0-dim parameters, mixed float32/float64 parameters,
  ``add_param_group`` mid-training, ``zero_grad`` then ``step``, ``maximize`` with weight decay,
  complex parameters.

Each case runs both of optgen's implementations, chosen the way users choose them (``foreach=``):
errors are compared with torch's on the same path, numbers with torch's for-loop (see
TORCH_REFERENCE).  Deliberate differences from torch are tested as such, each with its reason;
what needs the compiler is an ``xfail(strict=True)`` test saying what.
"""
import inspect
from typing import cast

import pytest
import torch

import optgen
import optgen.runtime.c_launch
from tests.oracle.test_torch_parity import assert_same_state
from tests.registry import CASES, IMPLEMENTATIONS, case_id

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")

# Edge cases need fewer steps than the trajectory table: they test that the step runs and agrees,
# with state created, used and carried over (10 steps: several bias-correction values, momentum).
STEPS = 10


def signature(name):
    return inspect.signature(getattr(optgen, name)).parameters


def with_implementation(name, kwargs, implementation):
    """``kwargs`` choosing ``implementation`` through the constructor, as users do."""
    if "foreach" in signature(name):
        return {**kwargs, "foreach": implementation == "foreach"}
    return dict(kwargs)


def build(lib, name, groups, kwargs, implementation):
    opt = getattr(lib, name)(groups, **with_implementation(name, kwargs, implementation))
    if lib is optgen and "foreach" not in signature(name):
        opt.implementation = implementation
    return opt


def grads_for(step, params, seed=100):
    """Deterministic gradients (float64 draws cast to each param's dtype), one per param."""
    g = torch.Generator().manual_seed(seed + step)
    out = []
    for p in params:
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if p.is_complex():
            grad = torch.complex(grad, torch.randn(p.shape, generator=g, dtype=torch.float64))
        out.append(grad.to(p.dtype))
    return out


def twins(tensors):
    """Two independent copies (optgen's, torch's) of some leaf parameters."""
    return ([t.clone().requires_grad_() for t in tensors], [t.clone().requires_grad_() for t in tensors])


#: torch's implementation the numbers are compared with: its for-loop, as in test_torch_parity.
#: (torch's foreach ASGD rounds eta and mu through float32 tensors where its for-loop uses Python
#: floats; both of optgen's implementations follow the for-loop.)
TORCH_REFERENCE = "forloop"


def run_both(name, kwargs, implementation, base, groups=None, steps=STEPS, grads=grads_for, between=None):
    """Train optgen and torch side by side from the same parameters and gradients.

    ``groups(params)`` makes the param groups (default: one group); ``grads(k, params)`` gives the
    gradients of step k (a None leaves a param without grad); ``between(k, opt, params)`` runs
    after step k on both sides (add_param_group, zero_grad, ...)."""
    groups = groups or (lambda ps: ps)
    p_ours, p_torch = twins(base)
    ours = build(optgen, name, groups(p_ours), kwargs, implementation)
    theirs = build(torch.optim, name, groups(p_torch), kwargs, TORCH_REFERENCE)
    for k in range(steps):
        for p_o, p_t, g in zip(p_ours, p_torch, grads(k, p_ours), strict=True):
            p_o.grad = None if g is None else g.clone()
            p_t.grad = None if g is None else g.clone()
        ours.step()
        theirs.step()
        if between is not None:
            between(k, ours, p_ours)
            between(k, theirs, p_torch)
    return ours, theirs


def assert_same(ours, theirs, dtype=torch.float64):
    """Same params, state (keys, order, values, dtypes, shapes) and param_groups as torch."""
    assert_same_state(ours, theirs, dtype)
    assert [{k: v for k, v in g.items() if k != "foreach"} for g in ours.state_dict()["param_groups"]] == \
        [{k: v for k, v in g.items() if k != "foreach"} for g in theirs.state_dict()["param_groups"]]


def outcome(fn):
    """('ok', value) or ('error', type, message): errors are compared whole."""
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return ("error", type(e), str(e))


def params_like(dtype=torch.float64, shapes=((4, 3), (5,))):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]



# ------------------------------------------------------------------------------- differentiable

#: the registry's cases whose optimizer takes ``differentiable``
DIFFERENTIABLE_CASES = [c for c in CASES if "differentiable" in signature(c[0])]


def warm_state(name, kwargs, p, steps=3, counter_dtype=torch.float64):
    """State after a few ordinary steps (every state tensor exists and is non-trivial), as leaves:
    floating tensors requiring grad, 0-dim counters (``step``...) not and in float64, as torch's
    test has them (see test_differentiable_step_with_float32_counters_rounds_like_torch)."""
    q = p.detach().clone().requires_grad_()
    opt = getattr(torch.optim, name)([q], **kwargs)
    for k in range(steps):
        q.grad = grads_for(k, [q], seed=7)[0]
        opt.step()
    return {key: (v.detach().clone().requires_grad_() if v.dim() > 0 else v.detach().to(counter_dtype))
            if isinstance(v, torch.Tensor) else v for key, v in opt.state[q].items()}


def diff_fn(lib, name, kwargs, implementation, p_leaf, grad_leaves, state):
    """torch's ``_diff_fn``: step a non-leaf parameter; return it and the state that requires grad."""
    p = p_leaf.clone()
    opt = build(lib, name, [p], {**kwargs, "differentiable": True}, implementation)
    opt.state[p].update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()})
    for grad in grad_leaves:
        p.grad = grad.clone()
        opt.step()
    return (p, *(v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.requires_grad))


def gradients(lib, name, kwargs, implementation, p_leaf, grad_leaves, state):
    """The step's outputs and the gradients of a weighted sum of them w.r.t. every leaf."""
    outputs = diff_fn(lib, name, kwargs, implementation, p_leaf, grad_leaves, state)
    g = torch.Generator().manual_seed(3)
    real = [torch.view_as_real(o) if o.is_complex() else o for o in outputs]
    loss = cast(torch.Tensor, sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in real))
    leaves = [p_leaf, *grad_leaves, *(v for v in state.values() if isinstance(v, torch.Tensor) and v.requires_grad)]
    # An input the result does not depend on has gradient zero, whether autograd recorded the
    # dependence (torch's ASGD: ax.copy_(param) overwrites ax) or not (ours: ax = param.clone()).
    return [o.detach() for o in outputs], torch.autograd.grad(loss, leaves, allow_unused=True,
                                                               materialize_grads=True)


def differentiable_inputs(name, kwargs, steps, with_state=True, counter_dtype=torch.float64, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    p_leaf = (torch.rand(6, generator=g, dtype=dtype) + 0.5).requires_grad_()
    grad_leaves = [(torch.rand(6, generator=g, dtype=dtype) - 0.3).requires_grad_() for _ in range(steps)]
    state = warm_state(name, kwargs, p_leaf, counter_dtype=counter_dtype) if with_state else {}
    return p_leaf, grad_leaves, state


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
@pytest.mark.parametrize("case", DIFFERENTIABLE_CASES, ids=case_id)
def test_differentiable_step_gradients_match_torch(case, dtype):
    """One step from a given state (torch's test): values and gradients w.r.t. the parameter, the
    gradient and every state tensor equal torch's; complex parameters too."""
    name, kwargs = case
    inputs = differentiable_inputs(name, kwargs, steps=1, dtype=dtype)
    out_t, grads_t = gradients(torch.optim, name, kwargs, "forloop", *inputs)
    out_o, grads_o = gradients(optgen, name, kwargs, "forloop", *inputs)
    torch.testing.assert_close(out_o, out_t, rtol=1e-12, atol=1e-14)
    for g_o, g_t in zip(grads_o, grads_t, strict=True):
        torch.testing.assert_close(g_o, g_t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", DIFFERENTIABLE_CASES, ids=case_id)
def test_differentiable_step_moves_params_as_the_plain_step(case):
    """A differentiable step runs the plain step's ops out of place (Note [differentiable=True]):
    float32 parameters, float32 counters, five steps — the same bits as ``differentiable=False``."""
    name, kwargs = case
    runs = []
    for differentiable in (False, True):
        # a differentiable step writes non-leaf tensors in place (as in torch's tests)
        leaves = [p.requires_grad_().clone() if differentiable else p for p in params_like(torch.float32)]
        opt = optgen.__getattr__(name)(leaves, **{**kwargs, "differentiable": differentiable})
        if not differentiable:
            opt.implementation = "forloop"  # the plain step it mirrors (the default on CPU is the C kernel)
        for k in range(5):
            for p, g in zip(leaves, grads_for(k, leaves), strict=True):
                p.grad = g
            opt.step()
        runs.append(([p.detach() for p in leaves], opt))
    (plain, plain_opt), (diff, diff_opt) = runs
    torch.testing.assert_close(diff, plain, rtol=0, atol=0)
    for p_plain, p_diff in zip(plain_opt.state, diff_opt.state, strict=True):
        for key, value in plain_opt.state[p_plain].items():
            other = diff_opt.state[p_diff][key]
            torch.testing.assert_close(other.detach() if isinstance(other, torch.Tensor) else other, value,
                                       rtol=0, atol=0)


def test_differentiable_adam_computes_bias_corrections_in_float64_where_torch_rounds_them():
    """Deliberate difference (README): torch's differentiable Adam/AdamW runs its capturable
    algebra, with ``1 - beta2 ** step`` a tensor of the step's dtype — float32 by default, 4.7e-5
    relative error at step 1 — so its gradient w.r.t. a Tensor lr is off by 6.7e-6 relative.
    optgen computes step-derived scalars as its plain step (and torch's) does, in float64: the
    gradient is the exact derivative; with float64 counters the two agree (test above)."""
    lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    p = torch.ones(3, dtype=torch.float64, requires_grad=True).clone()
    opt = optgen.Adam([p], lr=lr, differentiable=True)
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    assert opt.state[p]["step"].dtype == torch.float32
    got = torch.autograd.grad(p.sum(), lr)[0]
    # step 1, grad g: exp_avg / bias_correction1 = g, sqrt(exp_avg_sq / bias_correction2) = |g|
    exact = -3 * 0.5 / (0.5 + 1e-8)
    torch.testing.assert_close(got, torch.tensor(exact, dtype=torch.float64), rtol=1e-14, atol=0)


def _torch_differentiates_from_scratch(case):
    """torch detaches the momentum buffer SGD creates on its first step (``clone(grad).detach()``,
    from before SGD was differentiable), so no gradient reaches the first step's grad through it;
    optgen keeps the buffer in the graph, which is the true derivative (checked by gradcheck)."""
    name, kwargs = case
    return not (name == "SGD" and kwargs.get("momentum", 0) != 0)


@pytest.fixture
def float64_counters():
    """Counters (``step``...) are created in float64, as under a float64 default dtype: torch's
    differentiable path rounds step-derived scalars in the counter's dtype (see the xfail above)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("case", DIFFERENTIABLE_CASES, ids=case_id)
def test_differentiable_through_several_steps_from_fresh_state(case, float64_counters):
    """Three steps from no state, differentiated at the end.  Where torch can do it, ours equals
    torch's; where torch cannot (its in-place updates overwrite values autograd saved: amsgrad,
    Adamax, RMSprop, Rprop), ours still works and gradcheck confirms it."""
    name, kwargs = case
    inputs = differentiable_inputs(name, kwargs, steps=3, with_state=False)
    expected = outcome(lambda: gradients(torch.optim, name, kwargs, "forloop", *inputs))
    out_o, grads_o = gradients(optgen, name, kwargs, "forloop", *inputs)
    if expected[0] == "ok" and _torch_differentiates_from_scratch(case):
        out_t, grads_t = expected[1]
        torch.testing.assert_close(out_o, out_t, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grads_o, grads_t, rtol=1e-10, atol=1e-12)
    else:
        p_leaf, grad_leaves, _ = inputs

        def fn(p_leaf, *grad_leaves):
            return diff_fn(optgen, name, kwargs, "forloop", p_leaf, grad_leaves, {})

        assert torch.autograd.gradcheck(fn, (p_leaf, *grad_leaves))


@pytest.mark.parametrize("name", sorted({c[0] for c in DIFFERENTIABLE_CASES}))
def test_differentiable_errors_are_torchs(name):
    """A leaf that requires grad cannot be updated in place under autograd; torch's foreach
    implementations refuse ``differentiable`` (all but SGD's)."""
    for implementation in IMPLEMENTATIONS:
        results = []
        for lib in (torch.optim, optgen):
            p = torch.ones(3, dtype=torch.float64, requires_grad=True)
            opt = build(lib, name, [p], {"differentiable": True}, implementation)
            p.grad = torch.full_like(p, 0.5)
            results.append(outcome(opt.step))
        assert results[0][0] == "error"
        assert results[1] == results[0], implementation
        results = []
        for lib in (torch.optim, optgen):
            leaf = torch.ones(3, dtype=torch.float64, requires_grad=True)
            p = leaf * 1.0
            opt = build(lib, name, [p], {"differentiable": True}, implementation)
            p.grad = torch.full_like(p, 0.5)
            results.append(outcome(lambda: (opt.step(), p.grad_fn is not None)[1]))
        assert results[1][:3] == results[0][:3], implementation


def test_differentiable_gradcheck_sgd_and_adam_like_torchs_test():
    """torch's own gradcheck tests of SGD and Adam(amsgrad), run on optgen."""
    g = torch.Generator().manual_seed(0)

    def rand():
        return torch.rand(10, generator=g, dtype=torch.float64, requires_grad=True)

    p, grad = rand(), rand()
    for cls, kwargs, state in [
        (optgen.SGD, {"lr": 0.9, "momentum": 0.9}, {"momentum_buffer": rand()}),
        (optgen.Adam, {"lr": 0.9, "amsgrad": True},
         {"step": torch.tensor(10.0, dtype=torch.float64), "exp_avg": rand(), "exp_avg_sq": rand(),
          "max_exp_avg_sq": rand()}),
    ]:
        def fn(p, grad, *state_values, cls=cls, kwargs=kwargs, keys=tuple(state)):
            p = p.clone()
            p.grad = grad
            opt = cls([p], differentiable=True, **kwargs)
            opt.state[p].update({k: v.clone() for k, v in zip(keys, state_values, strict=True)})
            opt.step()
            return (p, *(v for v in opt.state[p].values() if v.requires_grad))

        assert torch.autograd.gradcheck(fn, (p, grad, *state.values()))


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RAdam"])
def test_differentiable_step_counter_requiring_grad_like_torch(name):
    """torch's Adam and AdamW refuse a ``step`` that requires grad in differentiable mode; the
    others step (their counter is not differentiated)."""
    results = []
    for lib in (torch.optim, optgen):
        p = torch.ones(3, dtype=torch.float64, requires_grad=True).clone()
        opt = getattr(lib, name)([p], differentiable=True)
        opt.step()  # no grad yet: nothing happens
        p.grad = torch.full_like(p, 0.5)
        opt.state[p]["step"] = torch.tensor(3.0, dtype=torch.float64, requires_grad=True).clone()
        for key, value in warm_state(name, {}, p).items():
            opt.state[p].setdefault(key, value.clone())
        results.append(outcome(lambda: opt.step() or p.detach().clone()))
    assert results[1][0] == results[0][0]
    if results[0][0] == "error":
        assert results[1] == results[0]
    else:
        torch.testing.assert_close(results[1][1], results[0][1])


def test_differentiable_gradient_through_nadam_mu_product_like_torch():
    """A counter holding a value, not a count, stays a tensor in a differentiable step."""
    results = []
    for lib in (torch.optim, optgen):
        g = torch.Generator().manual_seed(0)
        p, grad = (torch.rand(10, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
        mu_product = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        state = {"step": torch.tensor(10.0, dtype=torch.float64),
                 "exp_avg": torch.rand(10, dtype=torch.float64, generator=g),
                 "exp_avg_sq": torch.rand(10, dtype=torch.float64, generator=g), "mu_product": mu_product}
        q = p.clone()
        q.grad = grad.clone()
        opt = lib.NAdam([q], lr=0.9, differentiable=True)
        opt.state[q].update({k: v.clone() for k, v in state.items()})
        opt.step()
        results.append(torch.autograd.grad(q.sum(), mu_product, allow_unused=True)[0])
    assert results[1] is not None
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("name", sorted({c[0] for c in DIFFERENTIABLE_CASES}))
def test_differentiable_tensor_lr_gets_a_gradient_like_torch(name, float64_counters):
    """A Tensor lr reaches the kernel as given and what is computed from it is recorded: two
    steps, the gradient w.r.t. lr equals torch's where torch computes one (Adam, AdamW, RAdam,
    SGD); where torch cannot (a TypeError: its addcdiv_ takes no Tensor value, Rprop's full_like
    no Tensor fill; NAdam, ASGD: in-place errors or no gradient) gradcheck confirms ours (Rprop's
    lr only fills the initial step_size: the state keeps its graph)."""
    def run(lib, lr):
        p = torch.linspace(0.5, 1.5, 3, dtype=torch.float64, requires_grad=True).clone()
        opt = getattr(lib, name)([p], lr=lr, differentiable=True)
        for k in range(2):
            p.grad = torch.linspace(-0.3, 0.5, 3, dtype=torch.float64) * (k + 1)
            opt.step()
        return p

    lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(run(optgen, lr).sum(), lr)[0]
    theirs = outcome(lambda: torch.autograd.grad(run(torch.optim, lr).sum(), lr)[0])
    if theirs[0] == "ok" and theirs[1] is not None:
        torch.testing.assert_close(ours, theirs[1], rtol=1e-12, atol=0)
    else:
        assert name in ("ASGD", "Adadelta", "Adagrad", "Adamax", "NAdam", "RMSprop", "Rprop"), theirs
        assert torch.autograd.gradcheck(lambda lr: run(optgen, lr), (lr,))


@pytest.mark.parametrize("name, kwargs", [
    ("AdamW", dict(weight_decay=0.1)), ("NAdam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
    ("ASGD", dict(weight_decay=0.1)), ("RAdam", dict(weight_decay=0.1, decoupled_weight_decay=True))])
def test_differentiable_tensor_lr_scaling_the_parameter(name, kwargs, float64_counters):
    """``param * (1 - lr * weight_decay)`` with a Tensor lr saves the parameter for backward: the
    kernel works on a copy, so writing the user's tensor at the end leaves what was saved intact
    (where it needs nothing of the parameter it skips the copy; Note [In place under autograd])."""
    def run(lr):
        p = torch.linspace(0.5, 1.5, 3, requires_grad=True).clone()
        opt = getattr(optgen, name)([p], lr=lr, differentiable=True, **kwargs)
        for k in range(2):
            p.grad = torch.linspace(-0.3, 0.5, 3) * (k + 1)
            opt.step()
        return p

    assert torch.autograd.gradcheck(run, (torch.tensor(0.01, requires_grad=True),))


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_differentiable_tensor_betas_get_gradients_like_torch(name, float64_counters):
    """Adam's betas may be Tensors (``tensor = true`` in its spec): torch differentiates w.r.t.
    them in its differentiable path, and so does optgen's, over two steps."""
    results = []
    for lib in (torch.optim, optgen):
        betas = (torch.tensor(0.9, requires_grad=True), torch.tensor(0.99, requires_grad=True))
        p = torch.linspace(0.5, 1.5, 3, requires_grad=True).clone()
        opt = getattr(lib, name)([p], lr=0.01, betas=betas, weight_decay=0.1, differentiable=True)
        for k in range(2):
            p.grad = torch.linspace(-0.3, 0.5, 3) * (k + 1)
            opt.step()
        results.append(torch.autograd.grad(p.sum(), betas))
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------- capturable

CAPTURABLE = sorted({c[0] for c in CASES if "capturable" in signature(c[0])})


@pytest.mark.parametrize("lr", ["float", "Tensor"])
@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("name", CAPTURABLE)
def test_capturable_on_cpu_params_fails_at_step_like_torch(name, foreach, lr):
    """torch accepts ``capturable=True`` at construction (a Tensor lr with ``foreach=True`` too)
    and raises an AssertionError at the first step naming its supported devices (the wording
    differs per optimizer and path); the state that step created stays, with counters on the
    parameter's device."""
    results, optimizers = [], []
    for lib in (torch.optim, optgen):
        p = torch.ones(3, requires_grad=True)
        opt = getattr(lib, name)([p], capturable=True, foreach=foreach,
                                 lr=torch.tensor(0.01) if lr == "Tensor" else 0.01)
        p.grad = torch.full_like(p, 0.5)
        results.append(outcome(opt.step))
        optimizers.append((opt, p))
    assert results[0][0] == "error"
    assert results[1] == results[0]
    (theirs, q), (ours, p) = optimizers
    assert list(ours.state[p]) == list(theirs.state[q])
    for key, value in theirs.state[q].items():
        assert (ours.state[p][key].dtype, ours.state[p][key].device) == (value.dtype, value.device)
    torch.testing.assert_close(p, q)


# ------------------------------------------------------------------------------- Tensor lr, betas

LR_SHAPES = [(), (1,)]


@pytest.mark.parametrize("lr_shape", LR_SHAPES, ids=lambda s: f"lr{list(s)}")
@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tensor_lr_behaves_like_torch(case, foreach, lr_shape):
    """A 1-element Tensor lr (0-dim or shape (1,)): the same constructor error as torch, or the
    same trajectory, state and param_groups (the Tensor kept in the group)."""
    name, kwargs = case
    lr = kwargs.get("lr", signature(name)["lr"].default)
    kwargs = {**kwargs, "lr": torch.full(lr_shape, lr, dtype=torch.float64), "foreach": foreach}
    base = params_like()
    expected = outcome(lambda: getattr(torch.optim, name)([base[0].clone().requires_grad_()], **kwargs))
    got = outcome(lambda: getattr(optgen, name)([base[0].clone().requires_grad_()], **kwargs))
    if expected[0] == "error":
        assert got == expected
        return
    assert got[0] == "ok"
    p_ours, p_torch = twins(base)
    ours, theirs = getattr(optgen, name)(p_ours, **kwargs), getattr(torch.optim, name)(p_torch, **kwargs)
    for k in range(STEPS):
        for p_o, p_t, g in zip(p_ours, p_torch, grads_for(k, p_ours), strict=True):
            p_o.grad, p_t.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert_same_state(ours, theirs, torch.float64)
    lr_o, lr_t = ours.param_groups[0]["lr"], theirs.param_groups[0]["lr"]
    assert type(lr_o) is type(lr_t) and lr_o.shape == lr_t.shape and lr_o == lr_t


BETAS_OPTIMIZERS = sorted({c[0] for c in CASES if "betas" in signature(c[0])})
TENSOR_BETAS = {
    "both 0-dim": (torch.tensor(0.8), torch.tensor(0.99)),
    "shape (1,)": (torch.tensor([0.8]), torch.tensor([0.99])),
    "float and Tensor": (0.8, torch.tensor(0.99)),
    "2-element": (torch.tensor([0.8, 0.7]), torch.tensor(0.99)),
    "ints": (0, 0.99),
}


@pytest.mark.parametrize("foreach", [None, True])
@pytest.mark.parametrize("betas", TENSOR_BETAS, ids=str)
@pytest.mark.parametrize("name", BETAS_OPTIMIZERS)
def test_tensor_betas_construction_errors_are_torchs(name, betas, foreach):
    """Where torch's constructor rejects betas (Adam, AdamW validate Tensor betas; every
    optimizer fails on a 2-element Tensor), optgen raises the same error; where torch accepts
    them, optgen runs with their values.  (Deliberate difference: Adamax, NAdam and RAdam do not
    validate Tensor betas in torch and then crash inside some of their kernels — a
    ``_foreach_lerp_`` or ``addcdiv_`` argument error; optgen runs them as numbers.)"""
    kwargs = {"betas": TENSOR_BETAS[betas], "foreach": foreach, "lr": 0.01}
    expected = outcome(lambda: getattr(torch.optim, name)([torch.ones(3, requires_grad=True)], **kwargs))
    got = outcome(lambda: getattr(optgen, name)([torch.ones(3, requires_grad=True)], **kwargs))
    if expected[0] == "error":
        assert got == expected
        return
    assert got[0] == "ok"
    # optgen with Tensor betas runs as torch (for-loop) with the same betas as numbers
    p_ours, p_torch = twins(params_like())
    ours = getattr(optgen, name)(p_ours, **kwargs)
    theirs = getattr(torch.optim, name)(p_torch, **{**kwargs, "foreach": False,
                                                     "betas": tuple(float(b) for b in kwargs["betas"])})
    for k in range(3):
        for p_o, p_t, g in zip(p_ours, p_torch, grads_for(k, p_ours), strict=True):
            p_o.grad, p_t.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    # betas as float32 Tensors hold float32-rounded values
    torch.testing.assert_close(p_ours, p_torch, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------- edge cases

edge = pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
every_case = pytest.mark.parametrize("case", CASES, ids=case_id)


@edge
@every_case
def test_params_without_grad_some_steps(case, implementation):
    """A param that never gets a grad (no state, untouched) and one with a grad only on some
    steps (its state advances only then)."""
    name, kwargs = case
    base = params_like(shapes=((4, 3), (5,), (2, 2)))

    def grads(k, params):
        g = grads_for(k, params)
        return [g[0], None, g[2] if k % 3 != 1 else None]

    ours, theirs = run_both(name, kwargs, implementation, base, grads=grads)
    assert len(ours.state) == len(theirs.state)
    assert_same(ours, theirs)


@edge
@every_case
def test_zero_size_and_0_dim_params(case, implementation):
    name, kwargs = case
    base = params_like(shapes=((0,), (3, 0), (), (4,)))
    ours, theirs = run_both(name, kwargs, implementation, base)
    assert_same(ours, theirs)


@edge
@every_case
def test_mixed_float32_and_float64_params_in_one_group_and_across_groups(case, implementation):
    name, kwargs = case
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g, dtype=torch.float64).to(dt) for s, dt in
            [((4, 3), torch.float32), ((5,), torch.float64), ((3,), torch.float32), ((2, 2), torch.float64)]]
    lr = kwargs.get("lr", signature(name)["lr"].default)

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:3]}, {"params": ps[3:], "lr": lr * 0.5}]

    ours, theirs = run_both(name, kwargs, implementation, base, groups=groups)
    assert_same_state(ours, theirs, torch.float32)
    for p in ours.param_groups[0]["params"] + ours.param_groups[1]["params"]:
        for value in ours.state[p].values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert value.dtype == p.dtype


@edge
@every_case
def test_add_param_group_mid_training(case, implementation):
    """A group added after 5 steps (with its own lr) starts its state on its first step (Adagrad
    too: torch creates Adagrad's state eagerly only for the constructor's groups); the old
    groups carry on."""
    name, kwargs = case
    base = params_like(shapes=((4, 3), (5,), (3, 2), (2,)))
    lr = kwargs.get("lr", signature(name)["lr"].default)
    added = {}

    def grads(k, params):
        g = grads_for(k, params)
        return g if k >= 5 else g[:2] + [None, None]

    def between(k, opt, params):
        if k == 4:
            opt.add_param_group({"params": params[2:], "lr": lr * 0.5})
            added[opt.__module__.split(".")[0]] = len(opt.state)

    ours, theirs = run_both(name, kwargs, implementation, base, groups=lambda ps: ps[:2], grads=grads,
                            between=between)
    assert_same(ours, theirs)
    assert added["optgen"] == added["torch"]


@edge
@every_case
def test_zero_grad_then_step(case, implementation):
    """``zero_grad()`` (grads set to None: the step changes nothing) and
    ``zero_grad(set_to_none=False)`` (zero grads: the step runs, state advances) between steps."""
    name, kwargs = case

    def between(k, opt, params):
        if k % 3 == 0:
            opt.zero_grad(set_to_none=bool(k % 2))
            opt.step()

    ours, theirs = run_both(name, kwargs, implementation, params_like(), between=between)
    assert_same(ours, theirs)


#: for each optimizer with both: its first registry case with maximize=True and weight decay on
MAXIMIZE_WEIGHT_DECAY = [(name, {**kwargs, "maximize": True, "weight_decay": 0.1})
                         for name, kwargs in {c[0]: c[1] for c in reversed(CASES)}.items()
                         if {"maximize", "weight_decay"} <= set(signature(name))]


@edge
@pytest.mark.parametrize("case", MAXIMIZE_WEIGHT_DECAY, ids=case_id)
def test_maximize_with_weight_decay(case, implementation):
    name, kwargs = case
    ours, theirs = run_both(name, kwargs, implementation, params_like())
    assert_same(ours, theirs)


@edge
@every_case
def test_complex_params_like_torch(case, implementation):
    """Complex parameters (complex128, next to a real one): the same trajectory and state as
    torch, or torch's error where torch refuses them."""
    name, kwargs = case
    g = torch.Generator().manual_seed(0)
    base = [torch.complex(torch.randn(4, 3, generator=g, dtype=torch.float64),
                          torch.randn(4, 3, generator=g, dtype=torch.float64)),
            torch.randn(5, generator=g, dtype=torch.float64)]
    expected = outcome(lambda: run_both(name, kwargs, implementation, base, steps=1)[1])
    if expected[0] == "error":
        got = outcome(lambda: run_both(name, kwargs, implementation, base, steps=1)[0])
        assert got == expected
        return
    ours, theirs = run_both(name, kwargs, implementation, base)
    assert_same(ours, theirs)
    for p in ours.param_groups[0]["params"]:
        for value in ours.state[p].values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert value.is_complex() == p.is_complex()


#: torch runs these on sparse gradients (SGD: the same update; Adagrad: its own sparse algorithm)
TORCH_SPARSE = {"SGD", "Adagrad"}


@pytest.mark.parametrize("name", sorted({c[0] for c in CASES}))
def test_sparse_gradients_like_torch(name):
    """A sparse gradient: torch's error (its wording), or torch's update."""
    results = []
    for lib in (torch.optim, optgen):
        p = torch.ones(4, 3, dtype=torch.float64, requires_grad=True)
        opt = getattr(lib, name)([p], lr=0.1)
        p.grad = torch.zeros(4, 3, dtype=torch.float64).index_fill_(0, torch.tensor([1, 3]), 0.5).to_sparse()
        results.append(outcome(lambda: opt.step() or p.detach().clone()))
    assert results[1][0] == results[0][0]
    if results[0][0] == "error":
        assert results[1] == results[0]
    else:
        torch.testing.assert_close(results[1][1], results[0][1])


@pytest.mark.parametrize("case", [
    ("SGD", {"momentum": 0.9}), ("SGD", {"momentum": 0.9, "nesterov": True}),
    ("SGD", {"momentum": 0.5, "dampening": 0.2, "maximize": True}), ("SGD", {"momentum": 0.9, "foreach": True}),
    ("SGD", {"weight_decay": 0.1}), ("SGD", {"fused": True}),
    ("Adagrad", {"lr_decay": 0.1, "eps": 1e-3, "initial_accumulator_value": 0.2}), ("Adagrad", {"maximize": True}),
    ("Adagrad", {"foreach": True}), ("Adagrad", {"weight_decay": 0.1}), ("Adagrad", {"fused": True}),
], ids=case_id)
def test_sparse_gradient_options_like_torch(case):
    """SGD and Adagrad with sparse gradients (uncoalesced, next to a dense one) over several steps:
    torch's parameters and state (layouts included), or torch's error."""
    name, kwargs = case
    results = []
    for lib in (torch.optim, optgen):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True),
                  torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)]
        opt = getattr(lib, name)(params, lr=0.1, **kwargs)

        def steps():
            for k in range(3):
                gen = torch.Generator().manual_seed(k + 1)
                indices = torch.tensor([[0, 2, 2, 3], [1, 0, 0, 2]])  # a repeated index: uncoalesced
                values = torch.randn(4, generator=gen, dtype=torch.float64)
                params[0].grad = torch.sparse_coo_tensor(indices, values, (4, 3))
                params[1].grad = torch.randn(5, generator=gen, dtype=torch.float64)
                opt.step()
            return [(p.detach().clone(), {k: v for k, v in opt.state[p].items()}) for p in params]
        results.append(outcome(steps))
    assert results[1][0] == results[0][0]
    if results[0][0] == "error":
        assert results[1] == results[0]
        return
    for (p_ours, s_ours), (p_theirs, s_theirs) in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(p_ours, p_theirs)
        assert s_ours.keys() == s_theirs.keys()
        for key, value in s_theirs.items():
            assert s_ours[key].layout == value.layout
            torch.testing.assert_close(s_ours[key].to_dense(), value.to_dense())


def test_sparse_adam_rejects_complex_params_at_construction_like_torch():
    params = lambda: [torch.ones(2, requires_grad=True), torch.ones(2, dtype=torch.complex64, requires_grad=True)]  # noqa: E731
    expected = outcome(lambda: torch.optim.SparseAdam(params()))
    assert expected[0] == "error"
    assert outcome(lambda: optgen.SparseAdam(params())) == expected


def test_adagrad_state_of_added_groups_uses_the_group_initial_accumulator_value():
    """Deliberate difference: torch's Adagrad fills ``sum`` with the *constructor's*
    initial_accumulator_value for every group, ignoring a group's own value; optgen honours
    the group's value, like every other per-group hyperparameter."""
    results = {}
    for lib in (torch.optim, optgen):
        a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
        opt = lib.Adagrad([{"params": [a]}, {"params": [b], "initial_accumulator_value": 0.5}])
        results[lib.__name__] = opt.state[b]["sum"]
    assert torch.equal(results["torch.optim"], torch.zeros(2))
    assert torch.equal(results["optgen"], torch.full((2,), 0.5))


def test_every_registry_optimizer_is_covered():
    """The tables above are derived from CASES: a newly registered optimizer is in every test
    that applies to it."""
    names = {c[0] for c in CASES}
    assert {c[0] for c in DIFFERENTIABLE_CASES} == {n for n in names if "differentiable" in signature(n)}
    assert ({c[0] for c in MAXIMIZE_WEIGHT_DECAY}
            == {n for n in names if {"maximize", "weight_decay"} <= set(signature(n))})


@pytest.mark.parametrize("implementation", ["forloop", "foreach", "differentiable", "c"])
def test_adamw_group_with_coupled_weight_decay_steps_like_torch(implementation):
    # AdamW's decoupled_weight_decay is fixed to True in its constructor, but a param group edited
    # afterwards is read as it is, by torch's AdamW and by ours (the merged kernels take the flag).
    if implementation == "c" and not optgen.runtime.c_launch.available():
        pytest.skip("no C compiler")
    start = torch.linspace(-1.0, 1.0, 6)
    results = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5, foreach=False),
                 lambda ps: optgen.AdamW(ps, lr=0.1, weight_decay=0.5)):
        p = torch.nn.Parameter(start.clone())
        opt = make([p])
        if isinstance(opt, optgen.AdamW):
            opt.implementation = implementation
        opt.param_groups[0]["decoupled_weight_decay"] = False
        for k in range(3):
            p.grad = torch.full_like(p, 0.3 * (k + 1)) - p.detach()
            opt.step()
        results.append(p.detach())
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)
