"""optgen's foreach step allocates no more temporary memory than torch's foreach step.

Both are measured the same way (optgen.tools.bench.peak_temporary_bytes watches every tensor the step
allocates), on the configurations of the torch parity table.
"""
import pytest
import torch

import optgen
from optgen.tools.bench import peak_temporary_bytes
from tests.registry import CASES, case_id


def _peak(opt_cls, kwargs, implementation=None):
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in [(64, 32), (32,), (16, 16)]]
    opt = opt_cls(params, foreach=True, **kwargs) if implementation is None else opt_cls(params, **kwargs)
    if implementation:
        opt.implementation = implementation
    for _ in range(8):  # steady state: state exists, and step-dependent branches (RAdam's rho_t > 5) are taken
        for p in params:
            p.grad = torch.randn_like(p)
        peak = peak_temporary_bytes(opt, params)
    return peak


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_foreach_peak_temporaries_at_most_torchs(case):
    name, kwargs = case
    ours = _peak(getattr(optgen, name), kwargs, "foreach")
    theirs = _peak(getattr(torch.optim, name), kwargs)
    assert ours <= theirs, (ours, theirs)


def test_measurement_sees_temporaries():
    """The probe is not blind: Adam's denominators are one param-sized buffer."""
    assert _peak(optgen.Adam, {}, "foreach") >= (64 * 32 + 32 + 16 * 16) * 4


@pytest.mark.parametrize("kwargs", [{}, dict(weight_decay=0.1, maximize=True)], ids=str)
def test_adafactor_foreach_peak_within_one_tensor_of_torchs(kwargs):
    """Adafactor (not in the parity table: its factored state for >= 2-D tensors): optgen's
    foreach keeps one update per tensor, as torch's does, and forms each in a new buffer where
    torch reuses the variance estimate's: at most the largest tensor more."""
    ours = _peak(optgen.Adafactor, kwargs, "foreach")
    theirs = _peak(torch.optim.Adafactor, kwargs)
    assert ours <= theirs + 64 * 32 * 4, (ours, theirs)


@pytest.mark.parametrize("kwargs", [dict(weight_decay=0.1, decoupled_weight_decay=False), {}], ids=str)
def test_adabelief_foreach_frees_its_statements_intermediates(kwargs):
    """AdaBelief (not in torch): ``(grad - exp_avg) * (grad - exp_avg)`` forms one list of
    differences, freed after its statement, so the step holds one list of parameter-sized
    tensors at a time (the denominators), as Adam's does."""
    one_list = (64 * 32 + 32 + 16 * 16) * 4
    assert _peak(optgen.AdaBelief, kwargs, "foreach") <= one_list
