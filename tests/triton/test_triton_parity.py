"""The triton implementation against torch.optim itself (the registry table of tests/oracle),
float32, two param groups with different learning rates, on CPU tensors in Triton's interpreter.

The comparison with the reference interpreter (tests/backends, test_triton_kernels.py) shows the
kernels do what the specs say; this one shows what the specs say is what torch does, through the
fused kernels too.  STEPS is lower than the registry's 25 because the interpreter is slow;
8 steps still move the bias corrections and fill momentum, amsgrad's maximum and Rprop's signs.
"""
import pytest

pytest.importorskip("triton", reason="the Triton backend's tests need triton (pip install triton)")

import torch

import optgen
from tests.registry import CASES, case_id
from tests.triton.specs import COMPILED

STEPS = 8
FUSED = {c.spec.name for c in COMPILED}
TRITON_CASES = [c for c in CASES if c[0] in FUSED]


@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_trajectory_and_state_match_torch(case):
    name, kwargs = case
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 5), (5,), (3, 2, 4), (1,), (0,)]
    start = [torch.randn(s, generator=g) for s in shapes]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    lr = kwargs.get("lr", 0.01)

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": lr * 0.5}]

    opt = getattr(optgen, name)(groups(ours), **kwargs)
    opt.implementation = "triton"
    ref = getattr(torch.optim, name)(groups(theirs), **kwargs)
    for _ in range(STEPS):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, q, grad in zip(ours, theirs, grads, strict=True):
            p.grad = grad + 0.1 * p.detach()
            q.grad = grad + 0.1 * q.detach()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
        assert list(opt.state[p]) == list(ref.state[q])
        for key in ref.state[q]:
            a, b = opt.state[p][key], ref.state[q][key]
            torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name,kwargs", [("Adam", dict(lr=0.01, amsgrad=True)), ("SGD", dict(lr=0.05, momentum=0.9)),
                                         ("RMSprop", dict(lr=0.01, centered=True))])
def test_complex_parameters_match_torch(name, kwargs):
    """Complex parameters reach the kernel as real views (torch.view_as_real), as torch does."""
    if name not in FUSED:
        pytest.skip(f"no {name} spec here")
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g, dtype=torch.complex64) for s in [(4, 3), (5,)]]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    opt = getattr(optgen, name)(ours, **kwargs)
    opt.implementation = "triton"
    ref = getattr(torch.optim, name)(theirs, **kwargs)
    for _ in range(4):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-7)
    for p, q in zip(ours, theirs, strict=True):
        for key in ref.state[q]:
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=2e-6, atol=1e-7)
