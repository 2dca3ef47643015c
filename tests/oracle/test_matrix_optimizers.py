"""Muon and Adafactor against torch.optim: the optimizers whose updates are not only elementwise
(a Newton–Schulz intrinsic; factored second moments from per-tensor reductions)."""
import copy
from typing import Any

import pytest
import torch

import optgen
from optgen.runtime import c_launch
from optgen.runtime.intrinsics import newton_schulz
from tests.registry import assert_signature_is_torchs

#: Adafactor's (300, 257) is above the C kernel's PARALLEL_MIN: its walks split rows across threads
SHAPES: dict[str, list[tuple[int, ...]]] = {"Muon": [(8, 5), (3, 7), (6, 6)],
                                            "Adafactor": [(8, 5), (7,), (2, 3, 4), (1,), (), (300, 257)]}
CASES = [
    ("Muon", dict(lr=0.02)),
    ("Muon", dict(lr=0.02, nesterov=False, adjust_lr_fn="match_rms_adamw", weight_decay=0.01, momentum=0.9)),
    ("Muon", dict(lr=0.02, adjust_lr_fn="original", ns_steps=3, ns_coefficients=(3.0, -3.0, 1.0))),
    ("Adafactor", dict(lr=0.02)),
    ("Adafactor", dict(lr=0.02, weight_decay=0.1, maximize=True, eps=(1e-30, 1e-3), d=2.0, beta2_decay=-0.5)),
]
TOL: dict[torch.dtype, dict[str, Any]] = {torch.float64: dict(rtol=1e-12, atol=1e-14),
                                          torch.float32: dict(rtol=2e-6, atol=1e-7)}
#: the C kernel computes each element in one expression and sums the norms in double, where torch
#: rounds op by op and sums in float32: a few float32 ulps apart after 20 steps (tests/c's bound)
TOL_C: dict[torch.dtype, dict[str, Any]] = {torch.float64: TOL[torch.float64],
                                            torch.float32: dict(rtol=2e-5, atol=1e-6)}


def run(name, kwargs, implementation, dtype, steps=20, switch_at=None):
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES[name]]
    ours_p = [p.clone().requires_grad_() for p in base]
    torch_p = [p.clone().requires_grad_() for p in base]
    ours = getattr(optgen, name)(ours_p, **kwargs)
    ours.implementation = implementation
    theirs = getattr(torch.optim, name)(torch_p, **kwargs)
    for k in range(steps):
        gen = torch.Generator().manual_seed(100 + k)
        for p, q in zip(ours_p, torch_p, strict=True):
            grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    return ours, theirs, ours_p, torch_p


#: every implementation each has: Adafactor's fused CPU kernel walks each tensor three times
#: (Note [Sweeps] in optgen/backends/sweeps.py); Muon's Newton–Schulz has none
RUNS = [(name, kwargs, implementation) for i, (name, kwargs) in enumerate(CASES)
        for implementation in ("forloop", "foreach", "c") if implementation in optgen.OPTIMIZERS[name]._kernels
        and (implementation != "c" or c_launch.available())]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name,kwargs,implementation", RUNS,
                         ids=[f"{n}-{CASES.index((n, k))}-{i}" for n, k, i in RUNS])
def test_matches_torch(name, kwargs, implementation, dtype):
    ours, theirs, ours_p, torch_p = run(name, kwargs, implementation, dtype)
    tol = (TOL_C if implementation == "c" else TOL)[dtype]
    torch.testing.assert_close(ours_p, torch_p, **tol)
    for p, q in zip(ours_p, torch_p, strict=True):
        assert list(ours.state[p]) == list(theirs.state[q])
        for key in theirs.state[q]:
            torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], **tol)
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]


@pytest.mark.parametrize("name,kwargs", CASES[::2], ids=lambda x: str(x))
def test_checkpoint_from_torch_continues_identically(name, kwargs):
    ours, theirs, ours_p, torch_p = run(name, kwargs, "forloop", torch.float64, steps=5)
    restored = getattr(optgen, name)(torch_p, **kwargs)  # same tensors as torch's, state from torch
    restored.load_state_dict(copy.deepcopy(theirs.state_dict()))
    gen = torch.Generator().manual_seed(7)
    for q in torch_p:
        q.grad = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    before = [q.detach().clone() for q in torch_p]
    restored.step()
    after_ours = [q.detach().clone() for q in torch_p]
    with torch.no_grad():
        for q, b in zip(torch_p, before, strict=True):
            q.copy_(b)
    theirs.step()
    torch.testing.assert_close(after_ours, [q.detach() for q in torch_p], rtol=1e-12, atol=1e-14)


BAD = [
    ("Muon", dict(lr=-1.0)), ("Muon", dict(momentum=-0.1)), ("Muon", dict(weight_decay=-0.1)),
    ("Muon", dict(adjust_lr_fn="nope")), ("Muon", dict(lr=torch.tensor([0.1, 0.2]))),
    ("Adafactor", dict(lr=-1.0)), ("Adafactor", dict(beta2_decay=0.5)), ("Adafactor", dict(eps=(-1.0, 1e-3))),
    ("Adafactor", dict(eps=(None, -1.0))), ("Adafactor", dict(d=0.5)), ("Adafactor", dict(weight_decay=-1.0)),
]


@pytest.mark.parametrize("name,kwargs", BAD, ids=lambda x: str(x))
def test_constructor_errors_match_torch(name, kwargs):
    def error(cls):
        try:
            cls([torch.zeros(2, 2, requires_grad=True)], **kwargs)
        except Exception as e:  # noqa: BLE001
            return type(e), str(e)
    expected = error(getattr(torch.optim, name))
    assert expected is not None and error(getattr(optgen, name)) == expected


def test_muon_rejects_non_matrices_and_complex_like_torch():
    for cls in (optgen.Muon, torch.optim.Muon):
        with pytest.raises(ValueError, match=r"Muon only supports 2D parameters .*torch.Size\(\[3\]\)"):
            cls([torch.zeros(3, requires_grad=True)])
    p = torch.zeros(2, 2, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="Muon does not support complex parameters"):
        optgen.Muon([p]).step()


@pytest.mark.parametrize("name", ["Muon", "Adafactor"])
def test_signature_is_torchs(name):
    assert_signature_is_torchs(getattr(optgen, name), getattr(torch.optim, name))


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_newton_schulz_intrinsic_equals_torchs(shape):
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    coefficients = (3.4445, -4.775, 2.0315)
    torch.testing.assert_close(newton_schulz(g, *coefficients, 5, 1e-7),
                               _zeropower_via_newtonschulz(g, coefficients, 5, 1e-7), rtol=0, atol=0)
    with pytest.raises(ValueError, match="less than 100"):
        newton_schulz(g, *coefficients, 100, 1e-7)
