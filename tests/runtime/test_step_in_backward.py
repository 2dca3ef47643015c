"""optgen.step_in_backward (Note [The step inside backward] in optgen/runtime/in_backward.py).

The reference is the ordinary loop ``loss.backward(); opt.step(); opt.zero_grad()`` on an identical
model: the step inside backward runs the same update on each parameter, so parameters and every
state tensor must be equal bit for bit (torch.equal), not close.  STEPS = 8: past the first steps
(state creation, bias corrections near 0) and across two LR-scheduler decays, a few ms a case.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import optgen
from optgen.runtime import c_launch

STEPS = 8

#: every per-tensor optimizer (LBFGS is refused, SparseAdam takes sparse gradients: below)
CASES = [
    ("Adam", {}),
    ("Adam", dict(amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adagrad", dict(lr=0.05)),
    ("Lion", dict(lr=1e-3, weight_decay=0.1)),
    ("Adafactor", {}),
    ("Lamb", {}),
    ("RMSprop", dict(momentum=0.9, centered=True)),
    ("ASGD", dict(t0=2)),
    ("AdaBelief", {}),
    ("Adadelta", {}),
    ("Adamax", {}),
    ("NAdam", {}),
    ("RAdam", {}),
    ("Rprop", {}),
    ("Muon", {}),
]


def _model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    # no biases: Muon takes 2-D parameters only; the others see a 3-layer MLP either way
    return torch.nn.Sequential(torch.nn.Linear(6, 16, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(16, 16, bias=False), torch.nn.Tanh(), torch.nn.Linear(16, 3, bias=False))


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return list(model.parameters())


def _batch(i: int) -> torch.Tensor:
    return torch.randn(24, 6, generator=torch.Generator().manual_seed(100 + i))


def _loss(model, i: int) -> torch.Tensor:
    return model(_batch(i)).sin().square().mean()


def _ordinary(model, opt, steps: range, scheduler=None) -> None:
    for i in steps:
        _loss(model, i).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


def _in_backward(model, opt, steps: range, scheduler=None) -> None:
    for i in steps:
        _loss(model, i).backward()
        if scheduler is not None:
            scheduler.step()


def _assert_same(model_a, opt_a, model_b, opt_b) -> None:
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q), name
        state_a, state_b = opt_a.state[p], opt_b.state[q]
        assert state_a.keys() == state_b.keys()
        for key, value in state_a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, state_b[key]), (name, key)
            else:
                assert value == state_b[key], (name, key)


def _pair(name: str, kwargs: dict, implementation: str | None):
    model_a, model_b = _model(), _model()
    cls = optgen.OPTIMIZERS[name]
    opt_a, opt_b = cls(model_a.parameters(), **kwargs), cls(model_b.parameters(), **kwargs)
    if implementation is not None:
        opt_a.implementation = opt_b.implementation = implementation
    return model_a, opt_a, model_b, opt_b


@pytest.mark.parametrize("implementation", [None, "forloop"], ids=["default", "forloop"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + ("-" + "-".join(map(str, c[1].values())) if c[1] else ""))
def test_identical_to_the_ordinary_loop(case, implementation):
    name, kwargs = case
    model_a, opt_a, model_b, opt_b = _pair(name, kwargs, implementation)
    _ordinary(model_a, opt_a, range(STEPS))
    handle = optgen.step_in_backward(opt_b)
    _in_backward(model_b, opt_b, range(STEPS))
    handle.remove()
    _assert_same(model_a, opt_a, model_b, opt_b)
    assert not torch.equal(_weights(model_b)[0], _weights(_model())[0])  # it did step


@pytest.mark.skipif(not c_launch.available(), reason="no C compiler")
def test_the_default_steps_each_parameter_with_the_c_kernel():
    model = _model()
    opt = optgen.Adam(model.parameters())
    optgen.step_in_backward(opt)
    _in_backward(model, opt, range(2))
    cached = opt._cached_steps.values()  # one bound launch per parameter (Note [Cached steps])
    assert len(cached) == 3
    assert all(c.kernel is opt._kernel("c") and len(c.params) == 1 for c in cached)


def test_several_param_groups_keep_their_own_hyperparameters():
    def groups(model):
        return [{"params": [_weights(model)[0]], "lr": 0.1}, {"params": [_weights(model)[1], _weights(model)[2]]}]

    model_a, model_b = _model(), _model()
    opt_a, opt_b = optgen.Adam(groups(model_a), lr=0.01), optgen.Adam(groups(model_b), lr=0.01)
    _ordinary(model_a, opt_a, range(STEPS))
    optgen.step_in_backward(opt_b)
    _in_backward(model_b, opt_b, range(STEPS))
    _assert_same(model_a, opt_a, model_b, opt_b)


@pytest.mark.parametrize("scheduler", ["optgen.StepLR", "torch.LambdaLR", "torch.OneCycleLR"])
def test_lr_schedulers_change_the_lr_the_next_step_reads(scheduler):
    def make(opt):
        if scheduler == "optgen.StepLR":
            return optgen.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
        if scheduler == "torch.LambdaLR":
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + 3 * epoch))
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS)

    model_a, opt_a, model_b, opt_b = _pair("Adam", dict(lr=0.01), None)
    _ordinary(model_a, opt_a, range(STEPS), make(opt_a))
    handle = optgen.step_in_backward(opt_b)
    sched_b = make(opt_b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "lr_scheduler.step() before optimizer.step()" included
        _in_backward(model_b, opt_b, range(STEPS), sched_b)
    handle.remove()
    _assert_same(model_a, opt_a, model_b, opt_b)
    # the schedule matters within STEPS: a run without it differs (so a stale lr would be seen)
    model_c = _model()
    opt_c = optgen.Adam(model_c.parameters(), lr=0.01)
    optgen.step_in_backward(opt_c)
    _in_backward(model_c, opt_c, range(STEPS))
    assert not torch.equal(_weights(model_c)[0], _weights(model_b)[0])


def test_gradients_are_freed_and_zero_grad_is_harmless():
    model = _model()
    frozen = _weights(model)[1].requires_grad_(False)
    opt = optgen.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optgen.step_in_backward(opt)
    before = frozen.clone()
    _loss(model, 0).backward()
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(frozen, before)
    opt.zero_grad()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("first_in_backward", [True, False], ids=["saved-in-backward", "saved-ordinary"])
def test_state_dict_round_trip_between_the_modes(first_in_backward):
    reference_model = _model()
    reference = optgen.Adam(reference_model.parameters(), lr=0.01, weight_decay=0.1)
    _ordinary(reference_model, reference, range(2 * STEPS))

    model = _model()
    opt = optgen.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    if first_in_backward:
        handle = optgen.step_in_backward(opt)
        _in_backward(model, opt, range(STEPS))
        handle.remove()
    else:
        _ordinary(model, opt, range(STEPS))
    saved, saved_params = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())

    resumed_model = _model(seed=1)  # other initial values: all of it comes from the checkpoint
    resumed_model.load_state_dict(saved_params)
    resumed = optgen.Adam(resumed_model.parameters(), lr=0.5)  # the checkpoint's lr replaces this one
    resumed.load_state_dict(saved)
    if first_in_backward:
        _ordinary(resumed_model, resumed, range(STEPS, 2 * STEPS))
    else:
        optgen.step_in_backward(resumed)
        _in_backward(resumed_model, resumed, range(STEPS, 2 * STEPS))
    _assert_same(reference_model, reference, resumed_model, resumed)


def test_load_state_dict_while_in_backward_mode_replaces_the_groups_the_steps_read():
    model_r, opt_r, model_b, opt_b = _pair("Adam", dict(lr=0.01), None)
    _ordinary(model_r, opt_r, range(2))
    opt_r.param_groups[0]["lr"] = 0.3
    _ordinary(model_r, opt_r, range(2, STEPS))

    optgen.step_in_backward(opt_b)
    _in_backward(model_b, opt_b, range(2))
    changed = copy.deepcopy(opt_b.state_dict())
    changed["param_groups"][0]["lr"] = 0.3
    opt_b.load_state_dict(changed)  # new group dicts: the hooks must read lr=0.3 from now on
    _in_backward(model_b, opt_b, range(2, STEPS))
    _assert_same(model_r, opt_r, model_b, opt_b)


def test_add_param_group_in_backward_mode_hooks_the_new_parameters():
    model_a, model_b = _model(), _model()
    opt_a = optgen.Adam([_weights(model_a)[0]], lr=0.01)
    opt_b = optgen.Adam([_weights(model_b)[0]], lr=0.01)
    opt_a.add_param_group({"params": [_weights(model_a)[1], _weights(model_a)[2]], "lr": 0.02})
    optgen.step_in_backward(opt_b)
    opt_b.add_param_group({"params": [_weights(model_b)[1], _weights(model_b)[2]], "lr": 0.02})
    _ordinary(model_a, opt_a, range(STEPS))
    _in_backward(model_b, opt_b, range(STEPS))
    _assert_same(model_a, opt_a, model_b, opt_b)
    with pytest.raises(RuntimeError, match="differentiable=True"):
        opt_b.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "differentiable": True})
    assert len(opt_b.param_groups) == 2  # refused before it was added


@pytest.mark.parametrize("name", ["SparseAdam", "Adagrad", "SGD"])
def test_sparse_gradients(name):
    def run(in_backward: bool):
        torch.manual_seed(0)
        embedding = torch.nn.Embedding(20, 4, sparse=True)
        opt = optgen.OPTIMIZERS[name](embedding.parameters(), lr=0.1)
        if in_backward:
            optgen.step_in_backward(opt)
        for i in range(STEPS):
            indices = torch.randint(0, 20, (6,), generator=torch.Generator().manual_seed(i))
            embedding(indices).square().sum().backward()
            if not in_backward:
                opt.step()
                opt.zero_grad()
        return embedding, opt

    (a, opt_a), (b, opt_b) = run(False), run(True)
    assert b.weight.grad is None
    assert torch.equal(a.weight, b.weight)
    for key, value in opt_a.state[a.weight].items():
        assert torch.equal(value, opt_b.state[b.weight][key]) if isinstance(value, torch.Tensor) else \
            value == opt_b.state[b.weight][key]


def test_step_is_refused_while_the_step_runs_inside_backward():
    model = _model()
    opt = optgen.Adam(model.parameters())
    optgen.step_in_backward(opt)
    _loss(model, 0).backward()
    with pytest.raises(RuntimeError, match=r"step\(\) was called while it steps inside backward"):
        opt.step()
    with pytest.raises(RuntimeError, match="nothing left to step"):
        opt.step(lambda: _loss(model, 0))


def test_a_second_call_is_an_error_and_remove_restores_the_ordinary_loop():
    model_a, opt_a, model_b, opt_b = _pair("AdamW", dict(weight_decay=0.1), None)
    handle = optgen.step_in_backward(opt_b)
    with pytest.raises(RuntimeError, match="already steps inside backward"):
        optgen.step_in_backward(opt_b)
    _ordinary(model_a, opt_a, range(STEPS))
    _in_backward(model_b, opt_b, range(2))
    handle.remove()
    handle.remove()  # a second remove does nothing
    assert not {"_step_in_backward", "add_param_group", "_step_supports_amp_scaling"} & vars(opt_b).keys()
    _loss(model_b, 2).backward()
    assert all(p.grad is not None for p in model_b.parameters())  # gradients stay after backward again
    opt_b.step()
    opt_b.zero_grad()
    handle = optgen.step_in_backward(opt_b)  # and the mode can be entered again
    _in_backward(model_b, opt_b, range(3, 5))
    handle.remove()
    _ordinary(model_b, opt_b, range(5, STEPS))
    _assert_same(model_a, opt_a, model_b, opt_b)


def test_what_cannot_step_inside_backward_is_refused_at_registration():
    model = _model()
    with pytest.raises(RuntimeError, match="LBFGS cannot step inside backward: its step re-evaluates the loss"):
        optgen.step_in_backward(optgen.LBFGS(model.parameters()))
    with pytest.raises(RuntimeError, match=r"differentiable=True\) cannot step inside backward"):
        optgen.step_in_backward(optgen.Adam(model.parameters(), differentiable=True))
    with pytest.raises(TypeError, match="takes an optgen optimizer .* not torch.optim.adam.Adam"):
        optgen.step_in_backward(torch.optim.Adam(model.parameters()))
    # a refused registration leaves no hook behind
    opt = optgen.SGD(model.parameters(), lr=0.1)
    _loss(model, 0).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_-then-step"])
@pytest.mark.parametrize("fused", [None, True])
def test_grad_scaler_is_refused(unscale_first, fused):
    model = _model()
    opt = optgen.Adam(model.parameters(), fused=fused)
    handle = optgen.step_in_backward(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(_loss(model, 0)).backward()
    if unscale_first:
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="GradScaler cannot drive optgen.Adam while it steps inside backward"):
        scaler.step(opt)
    assert "grad_scale" not in vars(opt) and "found_inf" not in vars(opt)
    handle.remove()
    assert opt._step_supports_amp_scaling is bool(fused)  # fused=True's own value is kept


def test_exported_from_optgen():
    assert "step_in_backward" in optgen.__all__ and "step_in_backward" in dir(optgen)
    from optgen.runtime.in_backward import step_in_backward

    assert optgen.step_in_backward is step_in_backward


def test_a_parameter_used_twice_is_stepped_once_with_its_whole_gradient():
    def run(in_backward: bool):
        torch.manual_seed(0)
        shared = torch.nn.Linear(6, 6, bias=False)
        model = torch.nn.Sequential(shared, torch.nn.Tanh(), shared)  # one weight, two uses
        opt = optgen.Adam(model.parameters(), lr=0.01)
        if in_backward:
            optgen.step_in_backward(opt)
            _in_backward(model, opt, range(STEPS))
        else:
            _ordinary(model, opt, range(STEPS))
        return model, opt

    model_a, opt_a = run(False)
    model_b, opt_b = run(True)
    _assert_same(model_a, opt_a, model_b, opt_b)
    assert opt_b.state[_weights(model_b)[0]]["step"].item() == STEPS


def test_the_hooks_do_not_keep_a_dropped_optimizer_alive():
    import gc
    import weakref

    model = _model()
    opt = optgen.Adam(model.parameters())
    optgen.step_in_backward(opt)
    dropped = weakref.ref(opt)
    del opt
    gc.collect()
    assert dropped() is None
    _loss(model, 0).backward()  # nothing steps: the gradients stay, as without an optimizer
    assert all(p.grad is not None for p in model.parameters())


def test_each_gradient_is_freed_during_backward_not_after():
    """While backward runs, at most one parameter holds a gradient (the one being stepped is freed
    before autograd reaches the layer below): the peak holds one gradient, not all of them."""
    model = _model()
    opt = optgen.Adam(model.parameters())
    optgen.step_in_backward(opt)
    held: list[int] = []

    def count_gradients(grad):  # runs as backward passes each activation
        held.append(sum(p.grad is not None for p in model.parameters()))

    x = _batch(0).requires_grad_()
    h = x
    for layer in model:
        h = layer(h)
        h.register_hook(count_gradients)
    h.sin().square().mean().backward()
    x.grad = None
    assert len(held) == len(model) and max(held) == 0  # each freed before the next activation's gradient
    # the ordinary loop, for contrast: the gradients pile up
    model_b = _model()
    h = _batch(0)
    held.clear()
    for layer in model_b:
        h = layer(h)
        h.register_hook(lambda grad: held.append(sum(p.grad is not None for p in model_b.parameters())))
    h.sin().square().mean().backward()
    assert held[-1] == 2  # (the first layer's gradient comes after its input's last hook)


def test_a_parameter_unfrozen_after_registration_is_stepped():
    """Fine-tuning often starts with a frozen backbone and unfreezes it later: the parameters the
    optimizer holds must be stepped once they have gradients, as the ordinary loop steps them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    reference = copy.deepcopy(model)
    for m in (model, reference):
        m[0].requires_grad_(False)
    opt, ref_opt = optgen.SGD(model.parameters(), lr=0.1), optgen.SGD(reference.parameters(), lr=0.1)
    handle = optgen.step_in_backward(opt)
    for m in (model, reference):
        m[0].requires_grad_(True)
    x = torch.randn(8, 4)
    model(x).sum().backward()
    reference(x).sum().backward()
    ref_opt.step()
    handle.remove()
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, r)


def test_the_constructor_option_is_the_same_mode():
    """``optgen.AdamW(params, step_in_backward=True)`` steps as ``optgen.step_in_backward(opt)`` does
    (bit for bit the ordinary loop), and ``opt.in_backward.remove()`` ends it."""
    model_a, model_b = _model(), _model()
    opt_a = optgen.AdamW(model_a.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = optgen.AdamW(model_b.parameters(), lr=1e-2, weight_decay=0.1, step_in_backward=True)
    assert opt_a.in_backward is None and opt_b.in_backward is not None
    _ordinary(model_a, opt_a, range(STEPS))
    _in_backward(model_b, opt_b, range(STEPS))
    _assert_same(model_a, opt_a, model_b, opt_b)
    opt_b.in_backward.remove()
    assert opt_b.in_backward is None
    _ordinary(model_a, opt_a, range(STEPS, STEPS + 2))
    _ordinary(model_b, opt_b, range(STEPS, STEPS + 2))  # step() works again
    _assert_same(model_a, opt_a, model_b, opt_b)
    with pytest.raises(RuntimeError, match="LBFGS cannot step inside backward"):
        optgen.LBFGS(_model().parameters(), step_in_backward=True)
