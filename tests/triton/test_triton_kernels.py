"""Every elementwise spec's Triton kernel, every flag variant, on CPU tensors in Triton's
interpreter, against the reference interpreter (optgen.ir.interpret).

tests/backends/ already runs the triton implementation of every spec and configuration in
float64 at the default block sizes; here the shapes and dtypes are the point: with BLOCK = 8 and
CHUNK = 16 (the ``small_chunks`` fixture), the shapes below cover an empty tensor, a tensor
smaller than a block, exactly one chunk, several chunks ending mid-block, and a 3-d tensor with a
zero dimension — and float32, float16 and bfloat16 parameters, whose update is computed in
float32 as torch's fused kernels do.
"""
import pytest

pytest.importorskip("triton", reason="the Triton backend's tests need triton (pip install triton)")

import torch

import optgen
from optgen import verify
from optgen.ir.interpret import hyperparameter_values, initial_state, reference_step
from tests.triton.specs import COMPILED

#: 0 elements; < BLOCK; = CHUNK; 3 chunks, the last mid-block; 2-d, 3 chunks; a zero dimension; 3-d
SHAPES = [(0,), (5,), (16,), (37,), (5, 7), (3, 0, 2), (2, 3, 4)]
STEPS = 3  # the first step (lazy state, bias corrections at step 1) and two that read the state back
CASES = [(c, v) for c in COMPILED for v in c.variants]


def _id(case):
    compiled, variant = case
    on = [k for k, v in variant.flags if v]
    return compiled.spec.name + ("[" + ",".join(on) + "]" if on else "")


def busiest(compiled, variant) -> dict:
    """The configuration with the most hyperparameters switched on (weight decay, momentum, ...)."""
    configs = verify.configurations(compiled, dict(variant.flags))
    return max(configs, key=lambda kw: sum(1 for v in kw.values() if v not in (0, False, None)))


@pytest.fixture
def shapes(monkeypatch):
    monkeypatch.setattr(verify, "SHAPES", SHAPES)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_shapes_float64(case, small_chunks, shapes):
    """Exact indexing: every element of every shape, including empty tensors (whose counters
    still advance, as torch's do), in float64 to the reference's rounding."""
    compiled, variant = case
    kwargs = busiest(compiled, variant)
    ours = verify.run_backend(compiled, "triton", kwargs, STEPS)
    reference = verify.run_reference(compiled, kwargs, STEPS)
    assert verify.max_difference(ours, reference) < 1e-10, kwargs


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_float32(case, small_chunks, shapes):
    compiled, variant = case
    kwargs = busiest(compiled, variant)
    params, states = verify.run_backend(compiled, "triton", kwargs, STEPS, dtype=torch.float32)
    ref_params, ref_states = verify.run_reference(compiled, kwargs, STEPS)
    for p, r in zip(params, ref_params, strict=True):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p.double(), r, rtol=1e-5, atol=1e-6)
    for s, r in zip(states, ref_states, strict=True):
        assert set(s) == set(r)
        for k in s:
            torch.testing.assert_close(torch.as_tensor(s[k]).double(), torch.as_tensor(r[k]).double(),
                                       rtol=1e-5, atol=1e-6)


def _store(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to the storage dtype the way the kernel's store rounds it on CPU: Triton's
    interpreter converts float32 to bfloat16 by truncation (a GPU rounds to nearest even; the CUDA
    tests cover that), and to float16 to nearest."""
    if dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.float().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(dtype)


def _reference_in_storage_dtype(compiled, kwargs, steps, dtype):
    """The reference (float64 math) with params and states stored in ``dtype`` between steps:
    what a fused kernel computing in float32 on ``dtype`` storage approximates."""
    cls = optgen.OPTIMIZERS[compiled.spec.name]
    group = cls([torch.zeros(1, requires_grad=True)], **kwargs).param_groups[0]
    hyper = hyperparameter_values(compiled.program, group)
    params = [p.to(dtype) for p in verify.initial_params(cls)]
    states = [initial_state(compiled.program, p.double(), hyper) for p in params]
    states = [{k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in states]
    for k in range(steps):
        grads = [g.to(dtype) for g in verify.gradients(k, params)]
        for i in range(len(params)):
            state64 = {n: v.double() if isinstance(v, torch.Tensor) else v for n, v in states[i].items()}
            p, s = reference_step(compiled.program, params[i].double(), grads[i].double(), state64, hyper)
            params[i] = _store(p, dtype)
            states[i] = {n: _store(v, dtype) if isinstance(v, torch.Tensor) else v for n, v in s.items()}
    return params, states


MIXED = [c for c in CASES if c[1] is c[0].variants[0]]  # each spec's default variant


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", MIXED, ids=[_id(c) for c in MIXED])
def test_half_precision_parameters(case, dtype, small_chunks, shapes):
    """fp16/bf16 params and states, math in float32: within two units in the last place of the
    storage dtype of the reference rounded the same way (computing in the storage dtype would
    round after every operation and drift further)."""
    compiled, variant = case
    kwargs = busiest(compiled, variant)
    params, states = verify.run_backend(compiled, "triton", kwargs, STEPS, dtype=dtype)
    ref_params, ref_states = _reference_in_storage_dtype(compiled, kwargs, STEPS, dtype)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for p, r in zip(params, ref_params, strict=True):
        assert p.dtype == dtype
        torch.testing.assert_close(p.float(), r.float(), rtol=2 * ulp, atol=1e-3)
    for s, r in zip(states, ref_states, strict=True):
        for k in s:
            a, b = torch.as_tensor(s[k]), torch.as_tensor(r[k])
            assert a.dtype == b.dtype or a.dim() == 0
            torch.testing.assert_close(a.float(), b.float(), rtol=2 * ulp, atol=1e-3)


def test_generated_module_matches_the_foreach_interface():
    """Same flags, and every list and hyperparameter a kernel reads is an argument of the foreach
    function (kernels are called with the foreach kernels' keyword arguments, plus GradScaler's)."""
    import importlib
    import inspect

    for compiled in COMPILED:
        name = compiled.spec.name.lower()
        foreach = importlib.import_module(f"optgen.generated.{name}_foreach")
        fused = importlib.import_module(f"optgen.generated.{name}_triton")
        assert fused.KERNEL.multi_tensor and fused.KERNEL.grad_scaler and fused.KERNEL.counters_on_device
        assert fused.KERNEL.flags == foreach.KERNEL.flags
        theirs = set(inspect.signature(foreach.KERNEL.step).parameters)
        kernel = fused.LAUNCH
        reads = {name for name, _ in kernel.tensors} | set(kernel.counters) | set(kernel.hyperparameters)
        assert reads <= theirs and {"params", "grads"} <= reads, (name, reads - theirs)
