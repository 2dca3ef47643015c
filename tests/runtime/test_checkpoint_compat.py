"""Checkpoint compatibility: every state dict torch 2.13's ``load_state_dict`` accepts for an
optimizer, optgen accepts, and resumes from to the same values as torch.optim."""
import copy
from typing import Any

import pytest
import torch

import optgen
from tests.registry import TOLERANCES

# The optimizers optgen and torch.optim both have (SparseAdam takes only sparse gradients and keeps
# its step as a Python number already: it is not in this loop), with torch's own counter keys.
COUNTERS = {
    "SGD": (), "Adam": ("step",), "AdamW": ("step",), "Adagrad": ("step",), "Adadelta": ("step",),
    "Adamax": ("step",), "ASGD": ("step", "eta", "mu"), "NAdam": ("step", "mu_product"),
    "RAdam": ("step",), "RMSprop": ("step",), "Rprop": ("step",), "Adafactor": ("step",),
}
KWARGS: dict[str, dict[str, Any]] = {"SGD": dict(lr=0.05, momentum=0.9), "Adagrad": dict(lr=0.05),
                                     "ASGD": dict(lr=0.05, t0=1), "Adam": dict(lr=0.01, amsgrad=True)}
IMPLEMENTATIONS = ("forloop", "foreach", "c")
# Which counters the checkpoint holds as numbers: step alone, and every counter where there are more.
CHECKPOINTS = [(name, keys[:1]) for name, keys in sorted(COUNTERS.items())] + [
    (name, keys) for name, keys in sorted(COUNTERS.items()) if len(keys) > 1]
SHAPES = [(4, 3), (5,), (1,)]


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def _set_grads(step, params):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) + 0.1 * p.detach()


def _torch_optimizer(name, params):
    cls = getattr(torch.optim, name, None) or torch.optim._adafactor.Adafactor
    return cls(params, **KWARGS.get(name, {}))


def _legacy_checkpoint(name, dtype, keys):
    """A state dict after 2 torch steps, with the counters in ``keys`` stored as Python numbers
    (the format of older torch releases, which torch 2.13 still loads)."""
    params = _params(dtype)
    opt = _torch_optimizer(name, params)
    for k in range(2):
        _set_grads(k, params)
        opt.step()
    sd = opt.state_dict()
    for state in sd["state"].values():
        for key in keys:
            state[key] = float(state[key])
    return [p.detach().clone() for p in params], sd


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name,keys", CHECKPOINTS, ids=lambda v: "-".join(v) if isinstance(v, tuple) else v)
def test_number_counters_resume_like_torch(name, keys, implementation, dtype):
    # ASGD/NAdam, float64, c: torch's load casts a float64 model's eta / mu_product to float64 but
    # keeps step float32; the C launcher reads one counter dtype, so that group steps with the
    # for-loop kernel, with a warning (KernelDeclined), and must still match torch.
    values, sd = _legacy_checkpoint(name, dtype, keys)
    p_torch = [v.clone().requires_grad_() for v in values]
    p_ours = [v.clone().requires_grad_() for v in values]
    theirs = _torch_optimizer(name, p_torch)
    ours = getattr(optgen, name)(p_ours, **KWARGS.get(name, {}))
    ours.implementation = implementation
    # Each gets its own copy: load_state_dict keeps (does not copy) tensors of the right dtype.
    theirs.load_state_dict(copy.deepcopy(sd))
    ours.load_state_dict(copy.deepcopy(sd))
    for k in range(2, 4):
        _set_grads(k, p_torch)
        _set_grads(k, p_ours)
        theirs.step()
        ours.step()
    tol = TOLERANCES[dtype]
    for p_o, p_t in zip(p_ours, p_torch, strict=True):
        torch.testing.assert_close(p_o, p_t, **tol)
        s_o, s_t = ours.state[p_o], theirs.state[p_t]
        assert list(s_o) == list(s_t)
        for key, v_t in s_t.items():
            v_o = s_o[key]
            assert type(v_o) is type(v_t), key
            torch.testing.assert_close(v_o, v_t, **tol)
            assert (v_o.dtype, v_o.device, v_o.shape) == (v_t.dtype, v_t.device, v_t.shape), key


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_fused_capturable_on_cpu_steps_and_resumes_like_torch(name):
    # torch's fused kernels skip the capturable device check (only the for-loop and foreach paths
    # assert on it), so Adam(fused=True, capturable=True) steps on CPU, and its checkpoint resumes.
    kw = dict(lr=0.01, weight_decay=0.1, fused=True, capturable=True)
    p_torch, p_ours = _params(torch.float32), _params(torch.float32)
    theirs = getattr(torch.optim, name)(p_torch, **kw)
    ours = getattr(optgen, name)(p_ours, **kw)
    for k in range(2):
        _set_grads(k, p_torch)
        _set_grads(k, p_ours)
        theirs.step()
        ours.step()
    resumed = [p.detach().clone().requires_grad_() for p in p_torch]
    again = getattr(optgen, name)(resumed, **kw)
    again.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for k in range(2, 4):
        for params in (p_torch, p_ours, resumed):
            _set_grads(k, params)
        theirs.step()
        ours.step()
        again.step()
    for p_t, p_o, p_r in zip(p_torch, p_ours, resumed, strict=True):
        torch.testing.assert_close(p_o, p_t, **TOLERANCES[torch.float32])
        torch.testing.assert_close(p_r, p_t, **TOLERANCES[torch.float32])
        for key, v_t in theirs.state[p_t].items():
            for opt, p in ((ours, p_o), (again, p_r)):
                v = opt.state[p][key]
                assert (v.dtype, v.device, v.shape) == (v_t.dtype, v_t.device, v_t.shape), key
                torch.testing.assert_close(v, v_t, **TOLERANCES[torch.float32])
