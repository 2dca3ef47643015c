"""``state_dtype=torch.bfloat16`` on the Triton kernels (Note [Low-precision state in Triton]), in
Triton's interpreter on CPU tensors: the kernels draw the random bits of the for-loop reference
(tests/runtime/test_low_precision_state.py holds the rest)."""
import pytest
import torch

from tests.runtime.test_low_precision_state import bits, trajectory


@pytest.mark.parametrize("name,kwargs", [("SGD", dict(lr=0.1, momentum=0.9)), ("Lion", dict(lr=1e-3)),
                                         ("Adam", dict(lr=1e-2, amsgrad=True))], ids=["SGD", "Lion", "Adam"])
def test_triton_kernel_rounds_to_the_reference_bits(name, kwargs, small_chunks):
    """Several programs per tensor (small chunks): every bfloat16 state equals the for-loop's, but
    for elements where the kernels' float32 arithmetic (FMA) differs by an ulp that crosses a
    rounding threshold (about 1 in 65536 per ulp; a wrong key or index would change half)."""
    ref_params, ref = trajectory(name, kwargs, "forloop", steps=3, shape=(5, 7))
    params, opt = trajectory(name, kwargs, "triton", steps=3, shape=(5, 7))
    compared = 0
    for p, q in zip(ref_params, params, strict=True):
        torch.testing.assert_close(q, p, rtol=2e-5, atol=1e-6)
        for key in ref._low_precision_state:
            if key in ref.state[p]:
                assert opt.state[q][key].dtype == torch.bfloat16
                apart = (bits(ref.state[p][key]).int() - bits(opt.state[q][key]).int()).abs()
                assert apart.max() <= 1 and (apart > 0).float().mean() <= 1e-3, key
                compared += 1
    assert compared >= 2
