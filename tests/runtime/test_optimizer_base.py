"""optgen's Optimizer base class, checked against torch.optim.Optimizer (torch 2.13) itself.

The same tiny SGD-with-momentum algorithm is written twice: ``OurSGD`` subclasses
optgen's base (implementing ``_step_group``), ``TorchSGD`` subclasses torch's base
(implementing ``step`` the way torch's own optimizers do). Every test drives both the
same way and asserts the observable behaviour is identical, so a divergence from
torch (torch being the oracle) fails the test.

optgen's base inherits torch's base rather than copying it (Note [What optgen overrides in
torch's Optimizer] in optgen/runtime/optimizer.py), so these tests check that what optgen does
override — ``step`` and the generated optimizers' state handling — keeps torch's behaviour.
"""
from __future__ import annotations

import copy
import pickle
import re
import warnings

import pytest
import torch
from torch.optim import optimizer as torch_optimizer_module
from torch.optim.optimizer import _use_grad_for_differentiable, required
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

import optgen
from optgen.runtime.optimizer import Optimizer

# --------------------------------------------------------------------------- the two optimizers


def _make_defaults(lr, momentum, differentiable, foreach):
    return dict(lr=lr, momentum=momentum, differentiable=differentiable, foreach=foreach)


def _sgd_update(opt, group):
    """SGD with momentum (torch.optim.SGD's for-loop math with dampening=0) plus a 0-dim step."""
    # Grad mode seen by the update; setdefault because copies/unpickled optimizers lack it.
    opt.__dict__.setdefault("grad_modes", []).append(torch.is_grad_enabled())
    for p in group["params"]:
        if p.grad is None:
            continue
        state = opt.state[p]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.clone(p.grad).detach()
        else:
            state["momentum_buffer"].mul_(group["momentum"]).add_(p.grad)
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        state["step"] += 1
        p.add_(state["momentum_buffer"], alpha=-group["lr"])


class OurSGD(Optimizer):
    def __init__(self, params, lr=required, momentum=0.9, differentiable=False, foreach=False):
        super().__init__(params, _make_defaults(lr, momentum, differentiable, foreach))
        self.grad_modes = []

    def _step_group(self, group):
        _sgd_update(self, group)


class TorchSGD(torch.optim.Optimizer):
    def __init__(self, params, lr=required, momentum=0.9, differentiable=False, foreach=False):
        super().__init__(params, _make_defaults(lr, momentum, differentiable, foreach))
        self.grad_modes = []

    @_use_grad_for_differentiable
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _sgd_update(self, group)
        return loss


# --------------------------------------------------------------------------- helpers


SHAPES = ((3, 2), (4,), (2, 2), (5,))


def make_params(shapes=SHAPES, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def set_grads(params, k):
    """Deterministic gradients that depend on the current values (so divergence shows)."""
    for i, p in enumerate(params):
        p.grad = torch.sin(p.detach() * (k + 1) + i)


def train(opt, params, steps, start=0):
    for k in range(start, start + steps):
        set_grads(params, k)
        opt.step()


def groups_of(params, named=False):
    """Three param groups (the last one uses the default lr), optionally named."""
    items = [(f"p{i}", p) for i, p in enumerate(params)] if named else list(params)
    return [
        {"params": items[:1], "lr": 0.05},
        {"params": items[1:3], "lr": 0.2, "momentum": 0.5},
        {"params": items[3:]},
    ]


def assert_same(a, b, path="root"):
    """Exact structural equality: types, dict key order, tensor dtype/device/shape/values."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape), path
        assert torch.equal(a, b), f"{path}: {a} != {b}"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_params_equal(ps, qs):
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(p, q)


def saved(opt):
    """A state dict as after torch.save/torch.load: loading aliases state tensors otherwise."""
    return copy.deepcopy(opt.state_dict())


def error_of(fn):
    """(type, message) of the exception ``fn`` raises; function reprs/addresses normalized."""
    with pytest.raises(Exception) as info:
        fn()
    message = re.sub(r"<function [\w.<>]+ at 0x[0-9a-f]+>", "<function>", str(info.value))
    return type(info.value), message


def pair(params=None, named=False, **kwargs):
    """(ours, torch's) optimizers over equal but distinct params, with their params."""
    base = params if params is not None else make_params()
    ours_p, torch_p = clone_params(base), clone_params(base)
    ours = OurSGD(groups_of(ours_p, named), lr=0.1, **kwargs)
    theirs = TorchSGD(groups_of(torch_p, named), lr=0.1, **kwargs)
    return ours, ours_p, theirs, torch_p


# --------------------------------------------------------------------------- identity


def test_isinstance_of_torch_optimizer():
    assert isinstance(OurSGD(make_params(), lr=0.1), torch.optim.Optimizer)


#: torch's methods that optgen inherits unchanged (Note [What optgen overrides in torch's Optimizer];
#: ``__getstate__`` is extended by GeneratedOptimizer, so that ``implementation`` survives a copy)
INHERITED = ("__repr__", "add_param_group", "state_dict", "load_state_dict",
             "zero_grad", "_patch_step_function", "profile_hook_step", "_optimizer_step_code",
             "_process_value_according_to_param_policy", "register_step_pre_hook",
             "register_step_post_hook", "register_state_dict_pre_hook", "register_state_dict_post_hook",
             "register_load_state_dict_pre_hook", "register_load_state_dict_post_hook")


@pytest.mark.parametrize("cls", [Optimizer, optgen.Adam, optgen.SGD, optgen.LBFGS], ids=lambda c: c.__name__)
def test_torch_base_methods_are_inherited_not_copied(cls):
    for name in INHERITED:
        assert getattr(cls, name) is getattr(torch.optim.Optimizer, name), name


def test_torch_init_runs(monkeypatch):
    """torch's ``__init__`` builds the groups (it logs its API use once, as for torch's optimizers)."""
    seen: list = []
    monkeypatch.setattr(torch._C, "_log_api_usage_once", seen.append)
    optgen.Adam(make_params(), lr=0.1)
    assert seen == ["python.optimizer"]


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda ps: ps, id="list"),
        pytest.param(lambda ps: (p for p in ps), id="generator"),
        pytest.param(lambda ps: [(f"w{i}", p) for i, p in enumerate(ps)], id="named"),
        pytest.param(lambda ps: groups_of(ps), id="groups"),
        pytest.param(lambda ps: groups_of(ps, named=True), id="named-groups"),
        pytest.param(lambda ps: [{"params": ps[0]}, {"params": tuple(ps[1:])}], id="tensor-and-tuple"),
    ],
)
def test_param_forms_build_identical_groups(make):
    base = make_params()
    ours_p, torch_p = clone_params(base), clone_params(base)
    ours, theirs = OurSGD(make(ours_p), lr=0.1), TorchSGD(make(torch_p), lr=0.1)
    assert_same(ours.state_dict(), theirs.state_dict())
    assert ours.defaults == theirs.defaults
    assert isinstance(ours.state, type(theirs.state)) and ours.state.default_factory is dict
    for g, h in zip(ours.param_groups, theirs.param_groups, strict=True):
        assert type(g["params"]) is list and list(g) == list(h)


def test_named_parameters_of_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    ours, theirs = OurSGD(model.named_parameters(), lr=0.1), TorchSGD(model.named_parameters(), lr=0.1)
    assert ours.param_groups[0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert_same(ours.state_dict(), theirs.state_dict())


def test_group_dict_is_taken_over_like_torch():
    """torch fills defaults into (and keeps) the caller's group dict; so do we."""
    p = torch.zeros(2, requires_grad=True)
    group = {"params": p, "lr": 0.3}
    opt = OurSGD([group], lr=0.1)
    assert opt.param_groups[0] is group and group["params"] == [p] and group["momentum"] == 0.9


# --------------------------------------------------------------------------- errors


def _leaf(n=2):
    return torch.zeros(n, requires_grad=True)


def _load(cls, sd_groups):
    opt = cls([{"params": [_leaf()]}, {"params": [_leaf(), _leaf()]}], lr=0.1)
    sd = opt.state_dict()
    sd["param_groups"] = sd_groups(sd["param_groups"])
    opt.load_state_dict(sd)


def _bad_pre_hook(cls):
    opt = cls([_leaf()], lr=0.1)
    opt.register_step_pre_hook(lambda o, a, k: "nope")
    opt.step()


ERRORS = {
    "single-tensor": lambda cls: cls(_leaf(), lr=0.1),
    "empty-list": lambda cls: cls([], lr=0.1),
    "empty-generator": lambda cls: cls((p for p in list[torch.Tensor]()), lr=0.1),
    "group-not-dict": lambda cls: cls([_leaf()], lr=0.1).add_param_group([_leaf()]),
    "params-set": lambda cls: cls([{"params": {_leaf()}}], lr=0.1),
    "non-tensor": lambda cls: cls([_leaf(), 3], lr=0.1),
    "non-tensor-named": lambda cls: cls([("a", _leaf()), ("b", "x")], lr=0.1),
    "non-leaf": lambda cls: cls([_leaf() * 2], lr=0.1),
    "required-missing": lambda cls: cls([_leaf()]),
    "required-missing-in-group": lambda cls: cls([{"params": [_leaf()], "lr": 1.0}, {"params": [_leaf()]}]),
    "missing-params-key": lambda cls: cls([_leaf()], lr=0.1).add_param_group({"lr": 0.1}),
    "param-in-two-groups": lambda cls: (lambda p: cls([{"params": [p]}, {"params": [p]}], lr=0.1))(_leaf()),
    "param-in-added-group": lambda cls: (lambda p: cls([p], lr=0.1).add_param_group({"params": [p]}))(_leaf()),
    "names-partly-missing": lambda cls: cls([("a", _leaf()), _leaf()], lr=0.1),
    "named-group-into-unnamed": lambda cls: cls([_leaf()], lr=0.1).add_param_group({"params": [("a", _leaf())]}),
    "unnamed-group-into-named": lambda cls: cls([("a", _leaf())], lr=0.1).add_param_group({"params": [_leaf()]}),
    "load-group-count": lambda cls: _load(cls, lambda gs: gs[:1]),
    "load-group-size": lambda cls: _load(cls, lambda gs: [gs[0], {**gs[1], "params": gs[1]["params"][:1]}]),
    "load-no-param-groups": lambda cls: cls([_leaf()], lr=0.1).load_state_dict({"state": {}}),
    "step-pre-hook-bad-return": _bad_pre_hook,
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_match_torch(name):
    ours = error_of(lambda: ERRORS[name](OurSGD))
    theirs = error_of(lambda: ERRORS[name](TorchSGD))
    assert ours == theirs


def test_step_pre_hook_error_names_the_step_function():
    _, message = error_of(lambda: _bad_pre_hook(OurSGD))
    assert message == "<function> must return None or a tuple of (new_args, new_kwargs), but got nope."


def test_duplicate_params_warn_like_torch():
    def warning_of(cls):
        p = _leaf()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cls([p, p], lr=0.1)
        return [(w.category, str(w.message), w.filename, w.lineno) for w in caught]

    ours = warning_of(OurSGD)
    assert ours == warning_of(TorchSGD)
    assert len(ours) == 1 and "duplicate parameters" in ours[0][1]


def test_differentiable_allows_non_leaf_params():
    for cls in (OurSGD, TorchSGD):
        leaf = _leaf()
        opt = cls([leaf * 2], lr=0.1, differentiable=True)
        assert opt.param_groups[0]["params"][0].grad_fn is not None


def test_base_step_group_is_abstract():
    class NoUpdate(Optimizer):
        pass

    opt = NoUpdate([_leaf()], {"lr": 0.1})
    with pytest.raises(NotImplementedError, match="NoUpdate must implement _step_group"):
        opt.step()


# --------------------------------------------------------------------------- stepping


@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
def test_state_dict_identical_after_training(named):
    ours, ours_p, theirs, torch_p = pair(named=named)
    train(ours, ours_p, 3)
    train(theirs, torch_p, 3)
    assert_params_equal(ours_p, torch_p)
    assert_same(ours.state_dict(), theirs.state_dict())


def test_state_dict_layout_literal():
    """The exact layout, spelled out (indices number params across groups, in order)."""
    a, b, c = _leaf(), _leaf(), _leaf()
    opt = OurSGD([{"params": [("a", a)]}, {"params": [("b", b), ("c", c)], "lr": 0.5}], lr=0.1)
    a.grad = torch.ones(2)
    c.grad = torch.ones(2)
    opt.step()
    sd = opt.state_dict()
    assert list(sd) == ["state", "param_groups"]
    assert list(sd["state"]) == [0, 2]
    assert list(sd["state"][0]) == ["momentum_buffer", "step"]
    assert sd["state"][0]["step"].dim() == 0 and sd["state"][0]["step"].item() == 1.0
    assert sd["param_groups"] == [
        {"params": [0], "param_names": ["a"], "lr": 0.1, "momentum": 0.9,
         "differentiable": False, "foreach": False},
        {"params": [1, 2], "param_names": ["b", "c"], "lr": 0.5, "momentum": 0.9,
         "differentiable": False, "foreach": False},
    ]
    # torch's layout aliases live state (no copy) and keeps group key order.
    assert sd["state"][0]["momentum_buffer"] is opt.state[a]["momentum_buffer"]
    assert list(sd["param_groups"][0]) == ["param_names", "lr", "momentum", "differentiable", "foreach", "params"]


def test_params_without_grad_are_skipped_and_state_is_lazy():
    ours, ours_p, theirs, torch_p = pair()
    for ps, opt in ((ours_p, ours), (torch_p, theirs)):
        set_grads(ps, 0)
        ps[1].grad = None
        opt.step()
    assert_same(ours.state_dict(), theirs.state_dict())
    assert ours_p[1] not in ours.state


def test_closure_and_grad_modes():
    for cls in (OurSGD, TorchSGD):
        p = _leaf()
        opt = cls([p], lr=0.1)
        seen: list = []

        def closure():
            seen.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = (p * p).sum() + p.sum()
            loss.backward()
            return loss

        with torch.no_grad():
            loss = opt.step(closure)
        assert seen == [True] and opt.grad_modes == [False]
        assert loss.item() == 0.0
        assert opt.step() is None


@pytest.mark.parametrize("caller_grad", [True, False])
def test_differentiable_step_runs_with_grad_enabled(caller_grad):
    modes = {}
    for cls in (OurSGD, TorchSGD):
        p = _leaf()
        opt = cls([p], lr=0.1, differentiable=True)
        with torch.set_grad_enabled(caller_grad):
            opt.step()
        modes[cls] = opt.grad_modes
    assert modes[OurSGD] == modes[TorchSGD] == [True]


def test_differentiable_update_is_differentiable():
    """A differentiable group's update is recorded by autograd (torch-style hypergradient)."""
    for cls in (OurSGD, TorchSGD):
        w = _leaf(3)
        p = w.clone()
        p.retain_grad()
        opt = cls([p], lr=0.1, differentiable=True)
        p.grad = torch.ones(3, requires_grad=True)
        opt.step()
        assert p.grad_fn is not None


def test_add_param_group_mid_training():
    ours, ours_p, theirs, torch_p = pair()
    train(ours, ours_p, 2)
    train(theirs, torch_p, 2)
    new = make_params(shapes=((2,), (3,)), seed=1)
    ours_new, torch_new = clone_params(new), clone_params(new)
    ours.add_param_group({"params": ours_new, "lr": 0.3})
    theirs.add_param_group({"params": torch_new, "lr": 0.3})
    train(ours, ours_p + ours_new, 2, start=2)
    train(theirs, torch_p + torch_new, 2, start=2)
    assert_params_equal(ours_p + ours_new, torch_p + torch_new)
    assert_same(ours.state_dict(), theirs.state_dict())


# --------------------------------------------------------------------------- load_state_dict


@pytest.mark.parametrize("direction", ["ours->torch", "torch->ours"])
def test_load_state_dict_across_and_continue(direction):
    ours, ours_p, theirs, torch_p = pair(named=True)
    src, src_p, dst, dst_p = (ours, ours_p, theirs, torch_p)
    if direction == "torch->ours":
        src, src_p, dst, dst_p = theirs, torch_p, ours, ours_p
    train(src, src_p, 3)
    for p, q in zip(dst_p, src_p, strict=True):
        p.data.copy_(q)
    # A fresh destination, created with different hyperparameters: the loaded ones win.
    dst = type(dst)(groups_of(dst_p, named=True), lr=0.7)
    dst.load_state_dict(saved(src))
    assert_same(dst.state_dict(), src.state_dict())
    train(src, src_p, 2, start=3)
    train(dst, dst_p, 2, start=3)
    assert_params_equal(src_p, dst_p)
    assert_same(dst.state_dict(), src.state_dict())


def test_builtin_sgd_state_loads_into_ours_and_steps_like_it():
    base = make_params()
    sgd_p, ours_p = clone_params(base), clone_params(base)
    sgd = torch.optim.SGD(groups_of(sgd_p), lr=0.1, momentum=0.9, foreach=False)
    train(sgd, sgd_p, 2)
    for p, q in zip(ours_p, sgd_p, strict=True):
        p.data.copy_(q)
    ours = OurSGD(groups_of(ours_p), lr=0.1)
    ours.load_state_dict(saved(sgd))
    train(sgd, sgd_p, 3, start=2)
    train(ours, ours_p, 3, start=2)
    assert_params_equal(ours_p, sgd_p)
    assert ours.param_groups[1]["dampening"] == 0 and ours.param_groups[1]["momentum"] == 0.5


def test_builtin_adam_state_round_trips_through_ours():
    """torch.optim.Adam -> ours -> torch.optim.Adam: the resumed Adam steps identically."""
    base = make_params()
    adam_p, resumed_p = clone_params(base), clone_params(base)
    adam = torch.optim.Adam(groups_of(adam_p), lr=0.01, foreach=False)
    train(adam, adam_p, 3)
    ours = OurSGD(groups_of(clone_params(base)), lr=0.1)
    ours.load_state_dict(saved(adam))
    assert_same(ours.state_dict(), adam.state_dict())
    for p, q in zip(resumed_p, adam_p, strict=True):
        p.data.copy_(q)
    resumed = torch.optim.Adam(groups_of(resumed_p), lr=0.5, foreach=False)
    resumed.load_state_dict(saved(ours))
    train(adam, adam_p, 2, start=3)
    train(resumed, resumed_p, 2, start=3)
    assert_params_equal(resumed_p, adam_p)


def _policy_state_dict(capturable):
    """A saved dict with float32 state for float64 / int params, and a float64 step."""
    sd = {
        "state": {
            0: {"momentum_buffer": torch.ones(2), "step": torch.tensor(3.0, dtype=torch.float64),
                "nested": [torch.ones(1), (torch.zeros(1), 5)],
                "meta": {"step": torch.tensor(1.0, dtype=torch.float64)}},
            1: {"momentum_buffer": torch.ones(2), "count": torch.tensor(2)},
        },
        "param_groups": [{"params": [0, 1], "lr": 0.1, "momentum": 0.9,
                          "differentiable": False, "foreach": False, "capturable": capturable}],
    }
    return sd


@pytest.mark.parametrize("capturable", [False, True])
def test_load_casting_policy_matches_torch(capturable):
    loaded = {}
    for cls in (OurSGD, TorchSGD):
        p64 = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        pint = torch.zeros(2, dtype=torch.int64)
        opt = cls([p64, pint], lr=0.1)
        opt.load_state_dict(_policy_state_dict(capturable))
        loaded[cls] = opt.state_dict()
    assert_same(loaded[OurSGD], loaded[TorchSGD])
    state = loaded[OurSGD]["state"]
    assert state[0]["momentum_buffer"].dtype == torch.float64
    assert state[0]["step"].dtype == (torch.float32 if capturable else torch.float64)
    assert state[0]["meta"]["step"].dtype == state[0]["step"].dtype  # nested "step" keys too
    assert state[0]["nested"][0].dtype == torch.float64 and type(state[0]["nested"][1]) is tuple
    assert state[1]["momentum_buffer"].dtype == torch.float32  # int param: device only
    assert state[1]["count"].dtype == torch.int64


def test_loaded_optimizer_aliasing_matches_torch():
    """Groups are deep-copied; state tensors are shared when no cast is needed (as torch)."""
    for cls in (OurSGD, TorchSGD):
        src_p, dst_p = make_params(), make_params()
        src = cls([{"params": src_p, "schedule": [1, 2], "lr_tensor": torch.tensor(0.5)}], lr=0.1)
        train(src, src_p, 1)
        sd = src.state_dict()
        dst = cls([{"params": dst_p}], lr=0.1)
        dst.load_state_dict(sd)
        sd["param_groups"][0]["lr"] = 99.0
        sd["param_groups"][0]["params"].append(123)
        sd["param_groups"][0]["schedule"].append(99)
        sd["param_groups"][0]["lr_tensor"].add_(1)
        assert dst.param_groups[0]["lr"] == 0.1 and dst.param_groups[0]["params"] == dst_p
        assert dst.param_groups[0]["schedule"] == [1, 2]
        assert dst.param_groups[0]["lr_tensor"].item() == 0.5
        assert dst.state[dst_p[0]] is not sd["state"][0]
        assert dst.state[dst_p[0]]["momentum_buffer"] is sd["state"][0]["momentum_buffer"]
        assert dst.state[dst_p[0]]["step"] is sd["state"][0]["step"]


def test_load_param_names_and_foreign_state_keys_match_torch():
    results = {}
    for cls in (OurSGD, TorchSGD):
        named = cls([("a", _leaf()), ("b", _leaf())], lr=0.1)
        unnamed = cls([_leaf(), _leaf()], lr=0.1)
        sd_unnamed = unnamed.state_dict()
        sd_unnamed["state"]["legacy"] = {"x": 1}
        named.load_state_dict(sd_unnamed)  # keeps its names
        renamed = named.state_dict()
        sd_named = copy.deepcopy(renamed)
        sd_named["param_groups"][0]["param_names"] = ["x", "y"]
        unnamed.load_state_dict(sd_named)  # takes the saved names
        named.load_state_dict(sd_named)  # saved names replace its own
        results[cls] = (renamed, unnamed.state_dict(), named.state_dict(), named.defaults)
    assert_same(results[OurSGD], results[TorchSGD])
    assert results[OurSGD][0]["param_groups"][0]["param_names"] == ["a", "b"]
    assert results[OurSGD][0]["state"]["legacy"] == {"x": 1}
    assert results[OurSGD][1]["param_groups"][0]["param_names"] == ["x", "y"]
    assert results[OurSGD][2]["param_groups"][0]["param_names"] == ["x", "y"]


def test_load_goes_through_setstate_like_torch():
    """torch's optimizers upgrade old state in ``__setstate__``; loading must call it."""
    seen: dict = {}

    def setstate_recorder(base):
        class Recorder(base):  # type: ignore[valid-type,misc]  # a class made at run time
            def __setstate__(self, state):
                super().__setstate__(state)
                seen.setdefault(base, []).append(sorted(state))
                for group in self.param_groups:
                    group.setdefault("nesterov", False)

        return Recorder

    for base in (OurSGD, TorchSGD):
        opt = setstate_recorder(base)([_leaf()], lr=0.1)
        del opt.defaults["differentiable"]
        opt.load_state_dict(opt.state_dict())
        seen[base].append((opt.param_groups[0]["nesterov"], opt.defaults["differentiable"]))
    assert seen[OurSGD] == seen[TorchSGD] == [["param_groups", "state"], (False, False)]


# --------------------------------------------------------------------------- hooks


def _step_hook_log(cls):
    log: list = []
    handles = [
        torch_optimizer_module.register_optimizer_step_pre_hook(
            lambda o, a, k: log.append(("gpre", len(a), sorted(k)))),
        torch_optimizer_module.register_optimizer_step_post_hook(
            lambda o, a, k: log.append(("gpost", len(a), sorted(k)))),
    ]
    try:
        p = _leaf()
        opt = cls([p], lr=0.1)
        handles.append(opt.register_step_post_hook(lambda o, a, k: log.append(("post", a[0] is o, sorted(k)))))

        def closure():
            log.append("closure")
            return 7

        def swap_args(o, args, kwargs):  # replaces the call's arguments (args include self)
            log.append(("pre", args[0] is o))
            return (args[0],), {"closure": closure}

        handles.append(opt.register_step_pre_hook(swap_args))
        extra = opt.register_step_pre_hook(lambda o, a, k: log.append("removed"))
        extra.remove()
        p.grad = torch.ones(2)
        log.append(("ret", opt.step()))
        log.append(("ret", opt.step(None)))
    finally:
        for h in handles:
            h.remove()
    return log


def test_step_hooks_order_and_arguments_match_torch():
    log = _step_hook_log(OurSGD)
    assert log == _step_hook_log(TorchSGD)
    assert log[:6] == [("gpre", 1, []), ("pre", True), "closure",
                       ("post", True, ["closure"]), ("gpost", 1, ["closure"]), ("ret", 7)]
    assert not torch_optimizer_module._global_optimizer_pre_hooks


def _state_dict_hook_log(cls):
    log: list = []
    opt = cls([_leaf()], lr=0.1)
    opt.register_state_dict_pre_hook(lambda o: log.append("pre1"))
    opt.register_state_dict_pre_hook(lambda o: log.append("pre0"), prepend=True)

    def replace(o, sd):
        log.append("post1")
        return {**sd, "extra": 1}

    opt.register_state_dict_post_hook(replace)
    opt.register_state_dict_post_hook(lambda o, sd: log.append(("post0", "extra" in sd)), prepend=True)
    opt.register_state_dict_post_hook(lambda o, sd: log.append(("post2", "extra" in sd)))
    sd = opt.state_dict()
    log.append(sorted(sd))

    def load_pre(o, sd):
        log.append(("lpre1", "extra" in sd))
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.25
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    def drop_extra(o, sd):  # edits the dict in place, returns None
        log.append("lpre0")
        sd.pop("extra")

    h = opt.register_load_state_dict_pre_hook(drop_extra, prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: log.append(("lpost1", o.param_groups[0]["lr"])))
    opt.register_load_state_dict_post_hook(lambda o: log.append("lpost0"), prepend=True)
    opt.load_state_dict(sd)
    log.append(("caller-dict-untouched", "extra" in sd))
    h.remove()
    opt.load_state_dict(opt.state_dict())
    return log


def test_state_dict_hooks_order_and_results_match_torch():
    log = _state_dict_hook_log(OurSGD)
    assert log == _state_dict_hook_log(TorchSGD)
    assert log[:11] == ["pre0", "pre1", ("post0", False), "post1", ("post2", True),
                        ["extra", "param_groups", "state"], "lpre0", ("lpre1", False), "lpost0",
                        ("lpost1", 0.25), ("caller-dict-untouched", True)]


class OurClosureLoop(OurSGD):
    """LBFGS-like: overrides step itself and evaluates the closure several times."""

    def step(self, closure=None):
        for _ in range(3):
            with torch.enable_grad():
                loss = closure()
            with torch.no_grad():
                self._step_group(self.param_groups[0])
        return loss


class TorchClosureLoop(TorchSGD):
    def step(self, closure=None):
        for _ in range(3):
            with torch.enable_grad():
                loss = closure()
            with torch.no_grad():
                _sgd_update(self, self.param_groups[0])
        return loss


def _closure_loop_run(cls):
    log: list = []
    p = torch.ones(2, requires_grad=True)
    opt = cls([p], lr=0.1)
    opt.register_step_pre_hook(lambda o, a, k: log.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: log.append("post"))

    def closure():
        log.append("closure")
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    for _ in range(2):
        log.append(opt.step(closure).item())
    return log, p.detach()


def test_subclass_overriding_step_still_runs_hooks():
    (ours_log, ours_p), (torch_log, torch_p) = _closure_loop_run(OurClosureLoop), _closure_loop_run(TorchClosureLoop)
    assert ours_log == torch_log
    assert ours_log[:5] == ["pre", "closure", "closure", "closure", "post"]
    assert torch.equal(ours_p, torch_p)


# --------------------------------------------------------------------------- zero_grad


def _zero_grad_outcome(cls, set_to_none, foreach):
    p = make_params(shapes=((2,), (3,), (1,)))
    p.append(torch.zeros(2, dtype=torch.float64, requires_grad=True))
    opt = cls(p, lr=0.1, foreach=foreach)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # create_graph=True reference-cycle warning
        sum((q.double() ** 2).sum() for q in p[:2]).backward(create_graph=True)
    p[3].grad = torch.ones(2, dtype=torch.float64, requires_grad=True)  # a grad that is a leaf
    before = [q.grad for q in p]
    opt.zero_grad(set_to_none=set_to_none)
    return [
        None if q.grad is None else (q.grad is b, q.grad.grad_fn is None, q.grad.requires_grad, q.grad.tolist())
        for q, b in zip(p, before, strict=True)
    ]


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("foreach", [False, True])
def test_zero_grad_matches_torch(set_to_none, foreach):
    ours = _zero_grad_outcome(OurSGD, set_to_none, foreach)
    assert ours == _zero_grad_outcome(TorchSGD, set_to_none, foreach)
    if set_to_none:
        assert ours == [None] * 4
    else:
        assert ours[0] == (True, True, False, [0.0, 0.0]) and ours[2] is None
        assert ours[3] == (True, True, False, [0.0, 0.0])


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_grad_uses_foreach_kernel_like_torch(foreach, monkeypatch):
    calls: list = []
    real = torch._foreach_zero_
    def counted(ts):
        calls.append(len(ts))
        return real(ts)

    monkeypatch.setattr(torch, "_foreach_zero_", counted)
    for cls in (OurSGD, TorchSGD):
        params = make_params()
        params.append(torch.zeros(3, dtype=torch.float64, requires_grad=True))
        set_grads(params, 0)
        cls(params, lr=0.1, foreach=foreach).zero_grad(set_to_none=False)
        calls.append(cls.__name__)
    assert calls == ([4, 1, "OurSGD", 4, 1, "TorchSGD"] if foreach else ["OurSGD", "TorchSGD"])


# --------------------------------------------------------------------------- copying, repr


def test_deepcopy_and_pickle_continue_identically():
    ours, ours_p, theirs, torch_p = pair(named=True)
    train(ours, ours_p, 2)
    train(theirs, torch_p, 2)
    ours.register_step_pre_hook(lambda *a: None)
    ours_copy, theirs_copy = copy.deepcopy(ours), copy.deepcopy(theirs)
    ours_pickled = pickle.loads(pickle.dumps(ours))
    assert type(ours_copy) is OurSGD and not ours_copy._optimizer_step_pre_hooks
    assert vars(ours_copy).keys() == vars(ours_pickled).keys()
    for opt in (ours_copy, theirs_copy, ours_pickled):
        params = [p for g in opt.param_groups for p in g["params"]]
        train(opt, params, 2, start=2)
    train(ours, ours_p, 2, start=2)
    assert_same(ours_copy.state_dict(), ours.state_dict())
    assert_same(ours_pickled.state_dict(), ours.state_dict())
    assert_same(ours_copy.state_dict(), theirs_copy.state_dict())
    assert_same(ours.__getstate__(),
                {"defaults": ours.defaults, "state": ours.state, "param_groups": ours.param_groups})


@pytest.mark.parametrize("named", [False, True])
def test_repr_matches_torch(named):
    ours, _, theirs, _ = pair(named=named)
    text = repr(ours)
    assert text.replace("OurSGD", "X") == repr(theirs).replace("TorchSGD", "X")
    assert text.startswith("OurSGD (\nParameter Group 0\n    differentiable: False\n")


# --------------------------------------------------------------------------- torch tooling


def _lr_trace(cls):
    params = make_params()
    opt = cls(groups_of(params), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(5):
            set_grads(params, k)
            opt.step()
            sched.step()
            lrs.append(sched.get_last_lr())
    return lrs, opt.state_dict(), sched.state_dict(), params


def test_step_lr_drives_ours_without_warnings():
    ours = _lr_trace(OurSGD)
    theirs = _lr_trace(TorchSGD)
    assert ours[0] == theirs[0] and ours[0][-1] == [0.0125, 0.05, 0.025]
    assert_same(ours[1], theirs[1])
    assert ours[2] == theirs[2]
    assert_params_equal(ours[3], theirs[3])


def test_step_lr_warns_on_wrong_order_like_torch():
    def warnings_of(cls):
        opt = cls([_leaf()], lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sched.step()
        return [str(w.message) for w in caught]

    ours = warnings_of(OurSGD)
    assert ours == warnings_of(TorchSGD) and "before `optimizer.step()`" in ours[0]


def _grad_scaler_run(cls):
    params = make_params(shapes=((3,), (2,)))
    opt = cls(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    assert scaler.is_enabled()
    scales = []
    for k in range(3):
        opt.zero_grad()
        loss = sum(((p - k) ** 2).sum() for p in params)
        scaler.scale(loss).backward()
        if k == 1:
            params[0].grad[0] = float("inf")  # this step must be skipped
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, [p.detach() for p in params], opt.state_dict()


def test_grad_scaler_steps_ours_like_torch():
    ours, theirs = _grad_scaler_run(OurSGD), _grad_scaler_run(TorchSGD)
    assert ours[0] == theirs[0] == [256.0, 128.0, 128.0]
    assert_params_equal(ours[1], theirs[1])
    assert_same(ours[2], theirs[2])
    assert ours[2]["state"][0]["step"].item() == 2.0


# --------------------------------------------------------------------------- helpers for subclasses


def test_params_with_grad():
    a, b, c = _leaf(), _leaf(), _leaf()
    opt = OurSGD([a, b, c], lr=0.1)
    a.grad, c.grad = torch.ones(2), torch.zeros(2)
    params, grads = opt._params_with_grad(opt.param_groups[0])
    assert params == [a, c] and grads[0] is a.grad and grads[1] is c.grad


def test_group_by_device_and_dtype_matches_torch_grouping():
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float16, torch.float64]
    firsts = [torch.full((2,), float(i), dtype=d) for i, d in enumerate(dtypes)]
    seconds = [t + 10 for t in firsts]
    ours = Optimizer._group_by_device_and_dtype([firsts, seconds])
    lists: list[list[torch.Tensor | None]] = [[*firsts], [*seconds]]  # torch's annotation allows None
    theirs = _group_tensors_by_device_and_dtype(lists, with_indices=True)
    assert set(ours) == set(theirs)
    for key, (lists, indices) in theirs.items():
        assert ours[key][1] == indices
        assert_same(ours[key][0], [list(x) for x in lists])
    assert list(ours) == [(torch.device("cpu"), torch.float32), (torch.device("cpu"), torch.float64),
                          (torch.device("cpu"), torch.float16)]
    assert Optimizer._group_by_device_and_dtype([[], []]) == {}


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)
def test_zero_redundancy_optimizer_wraps_ours_like_torch(tmp_path):
    import torch.distributed as dist

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.interface, inside torch
        from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        results = {}
        for cls in (OurSGD, TorchSGD):
            params = make_params()
            zero = ZeroRedundancyOptimizer(params, optimizer_class=cls, lr=0.1)
            assert type(zero.optim) is cls
            train(zero, params, 2)
            extra = torch.zeros(2, requires_grad=True)
            zero.add_param_group({"params": [extra], "lr": 0.3})
            train(zero, params + [extra], 2, start=2)
            zero.consolidate_state_dict(to=0)
            results[cls] = (params + [extra], zero.state_dict())
    finally:
        dist.destroy_process_group()
    assert_params_equal(results[OurSGD][0], results[TorchSGD][0])
    assert_same(results[OurSGD][1], results[TorchSGD][1])
