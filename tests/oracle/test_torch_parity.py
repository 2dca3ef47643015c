"""Built-in specs against torch.optim itself: trajectories, state, checkpoints, errors."""
import io
from typing import Any

import pytest
import torch

import optgen
from tests.registry import CASES, IMPLEMENTATIONS, STEPS, TOLERANCES, assert_signature_is_torchs, case_id

SHAPES = [(8, 5), (5,), (3, 2, 4), (1,)]


def make_params(dtype, complex_=False):
    g = torch.Generator().manual_seed(0)
    out = []
    for s in SHAPES:
        p = torch.randn(s, generator=g, dtype=torch.float64)
        if complex_:
            p = torch.complex(p, torch.randn(s, generator=g, dtype=torch.float64))
        out.append(p.to(dtype if not complex_ else torch.complex128 if dtype == torch.float64 else torch.complex64))
    return out


def param_groups(params, kwargs):
    """Two param groups: the second with its own learning rate, as users write them."""
    lr = kwargs.get("lr", 0.01)
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr * 0.5}]


def set_grads(step, *param_lists):
    g = torch.Generator().manual_seed(100 + step)
    for i in range(len(param_lists[0])):
        ref = param_lists[0][i]
        grad = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(ref.dtype)
        if ref.is_complex():
            grad = grad + 0.5j * torch.randn(ref.shape, generator=g, dtype=torch.float64).to(ref.dtype)
        for params in param_lists:
            params[i].grad = grad + 0.1 * params[i].detach()


def assert_same_state(ours, theirs, dtype):
    tol = TOLERANCES[dtype]
    assert len(ours.state) == len(theirs.state)
    for group_o, group_t in zip(ours.param_groups, theirs.param_groups, strict=True):
        for p_o, p_t in zip(group_o["params"], group_t["params"], strict=True):
            torch.testing.assert_close(p_o, p_t, **tol)
            s_o, s_t = ours.state[p_o], theirs.state[p_t]
            assert list(s_o) == list(s_t)
            for key in s_t:
                torch.testing.assert_close(s_o[key], s_t[key], **tol)
                assert s_o[key].dtype == s_t[key].dtype and s_o[key].shape == s_t[key].shape


def run_pair(name, kwargs, implementation, dtype, steps=STEPS, complex_=False):
    p_ours = [p.clone().requires_grad_() for p in make_params(dtype, complex_)]
    p_torch = [p.clone().requires_grad_() for p in make_params(dtype, complex_)]
    ours = getattr(optgen, name)(param_groups(p_ours, kwargs), **kwargs)
    ours.implementation = implementation
    theirs = getattr(torch.optim, name)(param_groups(p_torch, kwargs), **kwargs)
    for k in range(steps):
        set_grads(k, p_ours, p_torch)
        ours.step()
        theirs.step()
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_trajectory_and_state_match_torch(case, implementation, dtype):
    name, kwargs = case
    ours, theirs = run_pair(name, kwargs, implementation, dtype)
    assert_same_state(ours, theirs, dtype)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name,kwargs", [("Adam", dict(lr=0.01, amsgrad=True)), ("AdamW", {}),
                                         ("Adagrad", dict(lr=0.05)), ("SGD", dict(lr=0.05, momentum=0.9)),
                                         ("Adadelta", dict(weight_decay=0.1)), ("Adamax", dict(lr=0.01)),
                                         ("ASGD", dict(lr=0.05, t0=3)), ("NAdam", dict(lr=0.01)),
                                         ("RAdam", dict(lr=0.01, betas=(0.8, 0.9))),
                                         ("RMSprop", dict(centered=True, momentum=0.5)), ("Rprop", dict(lr=0.05))])
def test_complex_parameters_match_torch(name, kwargs, implementation):
    ours, theirs = run_pair(name, kwargs, implementation, torch.float64, steps=10, complex_=True)
    assert_same_state(ours, theirs, torch.float64)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_state_dict_layout_is_torchs(case):
    name, kwargs = case
    ours, theirs = run_pair(name, kwargs, "forloop", torch.float32, steps=2)
    sd_o, sd_t = ours.state_dict(), theirs.state_dict()
    assert [list(g) for g in sd_o["param_groups"]] == [list(g) for g in sd_t["param_groups"]]
    assert sd_o["param_groups"] == sd_t["param_groups"]
    assert {k: list(v) for k, v in sd_o["state"].items()} == {k: list(v) for k, v in sd_t["state"].items()}
    for k, v in sd_t["state"].items():
        for key, value in v.items():
            assert sd_o["state"][k][key].dtype == value.dtype
            assert sd_o["state"][k][key].device == value.device


def saved_and_loaded(state_dict):
    """A state dict through a checkpoint file: torch.save, then torch.load (weights_only)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("chain", ["torch,optgen", "optgen,torch", "torch,optgen,torch"])
@pytest.mark.parametrize("case", [c for c in CASES if c[1]], ids=case_id)
def test_checkpoint_moves_between_torch_and_optgen_mid_training(case, chain, implementation):
    """Train 7 steps with each library of the chain in turn, moving through a checkpoint file
    (state_dict, torch.save, torch.load, load_state_dict) between them: the result equals the
    same checkpoints with torch alone, for each of optgen's implementations.  (Not the same as
    uninterrupted training: loading casts state such as NAdam's mu_product and ASGD's eta to the
    parameter's dtype.)"""
    name, kwargs = case
    dtype = torch.float64

    def make(library, params):
        if library == "torch":
            return getattr(torch.optim, name)(param_groups(params, kwargs), **kwargs)
        opt = getattr(optgen, name)(param_groups(params, kwargs), **kwargs)
        opt.implementation = implementation
        return opt

    params, params_ref = ([p.clone().requires_grad_() for p in make_params(dtype)] for _ in range(2))
    opt: Any = None
    reference: Any = None
    for segment, library in enumerate(chain.split(",")):
        with torch.no_grad():  # a fresh model, loaded from the checkpoint's weights
            params = [p.detach().clone().requires_grad_() for p in params]
            params_ref = [p.detach().clone().requires_grad_() for p in params_ref]
        new, new_reference = make(library, params), make("torch", params_ref)
        if opt is not None:
            new.load_state_dict(saved_and_loaded(opt.state_dict()))
            new_reference.load_state_dict(saved_and_loaded(reference.state_dict()))
        opt, reference = new, new_reference
        for k in range(7 * segment, 7 * segment + 7):
            set_grads(k, params, params_ref)
            opt.step()
            reference.step()
    assert_same_state(opt, reference, dtype)
    assert opt.state_dict()["param_groups"] == reference.state_dict()["param_groups"]


def test_optimizers_are_torch_optimizers_and_drive_torch_schedulers():
    params = [torch.zeros(3, requires_grad=True)]
    opt = optgen.AdamW(params, lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(5):
        params[0].grad = torch.ones(3)
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.1, 0.05, 0.05, 0.025, 0.025]


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(e), str(e)
    return None


#: every built-in spec with a torch.optim counterpart
TORCH_OPTIMIZERS = ["SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop",
                    "Rprop"]

BAD_ARGUMENTS = [
    ("SGD", dict(lr=-0.1)), ("SGD", dict(momentum=-0.5)), ("SGD", dict(weight_decay=-1.0)),
    ("SGD", dict(nesterov=True)), ("SGD", dict(nesterov=True, momentum=0.9, dampening=0.1)),
    ("SGD", dict(lr=torch.tensor([0.1, 0.2]))),
    ("Adam", dict(lr=-1.0)), ("Adam", dict(eps=-1e-8)), ("Adam", dict(betas=(1.0, 0.999))),
    ("Adam", dict(betas=(0.9, -0.1))), ("Adam", dict(weight_decay=-0.1)),
    ("Adam", dict(lr=torch.tensor(0.01), foreach=True)), ("Adam", dict(lr=torch.tensor([0.1, 0.2]))),
    ("Adam", dict(fused=True, foreach=True)), ("Adam", dict(fused=True, differentiable=True)),
    ("AdamW", dict(lr=-1.0)), ("AdamW", dict(betas=(0.9, 1.5))), ("AdamW", dict(eps=-1.0)),
    ("Adagrad", dict(lr=-1.0)), ("Adagrad", dict(lr_decay=-1.0)), ("Adagrad", dict(weight_decay=-1.0)),
    ("Adagrad", dict(initial_accumulator_value=-1.0)), ("Adagrad", dict(eps=-1.0)),
    ("Adagrad", dict(fused=True, foreach=True)),
    ("Adadelta", dict(lr=-1.0)), ("Adadelta", dict(rho=1.5)), ("Adadelta", dict(rho=-0.1)),
    ("Adadelta", dict(eps=-1.0)), ("Adadelta", dict(weight_decay=-1.0)),
    ("Adadelta", dict(lr=torch.tensor([0.1, 0.2]))), ("Adadelta", dict(rho=2.0, eps=-1.0)),
    ("Adadelta", dict(fused=True)),
    ("Adamax", dict(lr=-1.0)), ("Adamax", dict(eps=-1.0)), ("Adamax", dict(betas=(1.0, 0.999))),
    ("Adamax", dict(betas=(0.9, 1.0))), ("Adamax", dict(weight_decay=-1.0)),
    ("Adamax", dict(lr=torch.tensor([0.1, 0.2]))), ("Adamax", dict(eps=-1.0, betas=(2.0, 2.0))),
    ("ASGD", dict(lr=-1.0)), ("ASGD", dict(weight_decay=-1.0)), ("ASGD", dict(lr=torch.tensor([0.1, 0.2]))),
    ("ASGD", dict(lr=-1.0, weight_decay=-1.0)),
    ("NAdam", dict(lr=-1.0)), ("NAdam", dict(eps=-1.0)), ("NAdam", dict(betas=(1.0, 0.999))),
    ("NAdam", dict(betas=(0.9, -0.1))), ("NAdam", dict(weight_decay=-1.0)), ("NAdam", dict(momentum_decay=-1.0)),
    ("NAdam", dict(lr=torch.tensor([0.1, 0.2]))), ("NAdam", dict(weight_decay=-1.0, momentum_decay=-1.0)),
    ("RAdam", dict(lr=-1.0)), ("RAdam", dict(eps=-1.0)), ("RAdam", dict(betas=(-0.1, 0.999))),
    ("RAdam", dict(betas=(0.9, 1.0))), ("RAdam", dict(weight_decay=-1.0)),
    ("RAdam", dict(lr=torch.tensor([0.1, 0.2]))), ("RAdam", dict(fused=True)),
    ("RMSprop", dict(lr=-1.0)), ("RMSprop", dict(eps=-1.0)), ("RMSprop", dict(momentum=-1.0)),
    ("RMSprop", dict(weight_decay=-1.0)), ("RMSprop", dict(alpha=-1.0)),
    ("RMSprop", dict(lr=torch.tensor([0.1, 0.2]))), ("RMSprop", dict(alpha=-1.0, weight_decay=-1.0, momentum=-1.0)),
    ("Rprop", dict(lr=-1.0)), ("Rprop", dict(etas=(1.5, 2.0))), ("Rprop", dict(etas=(0.5, 0.9))),
    ("Rprop", dict(etas=(0.0, 1.2))), ("Rprop", dict(lr=torch.tensor([0.1, 0.2]))),
]


@pytest.mark.parametrize("name,kwargs", BAD_ARGUMENTS, ids=lambda x: str(x))
def test_constructor_errors_are_torchs(name, kwargs):
    expected = _error(lambda: getattr(torch.optim, name)([torch.zeros(2, requires_grad=True)], **kwargs))
    assert expected is not None
    assert _error(lambda: getattr(optgen, name)([torch.zeros(2, requires_grad=True)], **kwargs)) == expected


@pytest.mark.parametrize("name", TORCH_OPTIMIZERS)
def test_signature_and_defaults_are_torchs(name):
    assert_signature_is_torchs(getattr(optgen, name), getattr(torch.optim, name))


@pytest.mark.parametrize("name", TORCH_OPTIMIZERS)
def test_param_without_grad_is_skipped_like_torch(name):
    p_o = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
    p_t = [p.detach().clone().requires_grad_() for p in p_o]
    ours, theirs = getattr(optgen, name)(p_o, lr=0.1), getattr(torch.optim, name)(p_t, lr=0.1)
    for params, opt in ((p_o, ours), (p_t, theirs)):
        params[0].grad = torch.full((3,), 0.5)
        opt.step()
    torch.testing.assert_close(p_o, p_t, rtol=0, atol=0)
    assert len(ours.state_dict()["state"]) == len(theirs.state_dict()["state"])


@pytest.mark.parametrize("options,expected", [
    ({}, "fastest"),
    ({"foreach": True}, "foreach"),
    ({"foreach": False}, "forloop"),
    ({"fused": False}, "forloop"),
    ({"fused": True}, "c"),
    ({"differentiable": True}, "forloop"),
    ({"capturable": True}, "forloop"),
])
def test_default_implementation_on_cpu(monkeypatch, options, expected):
    """Note [The fastest by default]: foreach=None, fused=None on CPU is the C kernel where a
    compiler works, torch's for-loop under OPTGEN_DEFAULTS=torch or optgen.set_defaults("torch");
    an explicit option keeps its torch meaning."""
    import optgen.runtime.dispatch as dispatch
    from optgen.runtime import c_launch

    def chosen():
        opt = optgen.Adam([torch.zeros(2, requires_grad=True)], **options)
        return dispatch.choose(opt, opt.param_groups[0], opt.param_groups[0]["params"])

    monkeypatch.setattr(dispatch, "_defaults_set", None)  # (restored after the test: set_defaults below)
    monkeypatch.delenv("OPTGEN_DEFAULTS", raising=False)
    c = "c" if c_launch.available() else "forloop"
    assert chosen() == (c if expected in ("fastest", "c") else expected)
    monkeypatch.setenv("OPTGEN_DEFAULTS", "torch")
    assert chosen() == ("forloop" if expected == "fastest" else c if expected == "c" else expected)
    monkeypatch.setenv("OPTGEN_DEFAULTS", "fastest")
    assert optgen.set_defaults("torch") == "fastest"
    try:
        assert chosen() == ("forloop" if expected == "fastest" else c if expected == "c" else expected)
    finally:
        assert optgen.set_defaults("fastest") == "torch"


def test_a_bad_defaults_policy_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("OPTGEN_DEFAULTS", "fast")
    opt = optgen.Adam([torch.zeros(2, requires_grad=True)])
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"OPTGEN_DEFAULTS='fast' is not a policy optgen knows; use one of fastest"):
        opt.step()
    with pytest.raises(ValueError, match="unknown policy 'slow'"):
        optgen.set_defaults("slow")
