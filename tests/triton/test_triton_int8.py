"""``state_dtype="int8"`` on the Triton kernels (Note [Blockwise 8-bit state in Triton] in
optgen/backends/triton.py), in Triton's interpreter on CPU tensors: the kernels quantize as the
reference does (tests/c/test_int8_kernel.py holds the C kernel's side)."""
import pytest
import torch

import optgen
from optgen.runtime import quantized_state as q
from optgen.runtime import triton_launch


@pytest.fixture
def int8_chunks(monkeypatch):
    """Loop blocks of 512 elements (two quantization blocks) and programs of 1024: the tests'
    tensors (5000 and 6144 elements) span several programs, and end in a partial block."""
    monkeypatch.setitem(triton_launch.CONFIG, "BLOCK", 512)
    monkeypatch.setitem(triton_launch.CONFIG, "CHUNK", 1024)


def steps(name, kwargs, implementation, n=3):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=g).requires_grad_() for s in ((96, 64), (5000,), (50,))]
    opt = getattr(optgen, name)(ps, state_dtype="int8", **kwargs)
    opt.implementation = implementation
    for k in range(n):
        g = torch.Generator().manual_seed(100 + k)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("name,kwargs", [("Adam", dict(lr=1e-2, amsgrad=True)), ("SGD", dict(lr=0.1, momentum=0.9)),
                                         ("RMSprop", dict(lr=1e-2, centered=True))], ids=["Adam", "SGD", "RMSprop"])
def test_triton_kernel_quantizes_as_the_reference(name, kwargs, int8_chunks):
    """Three steps (SGD's buffer created by the reference on the first): parameters within float32
    rounding of the foreach reference's (the kernels' FMAs), codes equal but for a rare element one
    code apart, scales within float32 rounding; the small parameter keeps float32 state."""
    ref_params, ref = steps(name, kwargs, "foreach")
    params, opt = steps(name, kwargs, "triton")
    compared = 0
    for p, r in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, r, rtol=2e-5, atol=1e-6)
        for key, value in ref.state[r].items():
            if not q.is_quantized(ref.state[r], key):
                continue
            mine = opt.state[p][key]
            assert mine.dtype == torch.uint8
            apart = (mine.int() - value.int()).abs()
            assert apart.max() <= 1 and (apart > 0).float().mean() <= 1e-3, key
            torch.testing.assert_close(opt.state[p][key + q.ABSMAX], ref.state[r][key + q.ABSMAX], rtol=1e-5, atol=0)
            compared += 1
    assert compared >= 2
    assert opt.state[params[2]][next(iter(ref._low_precision_state))].dtype == torch.float32


def test_a_loop_block_of_partial_quantization_blocks_is_a_clear_error(monkeypatch):
    """BLOCK must hold whole blocks of 256: otherwise the step says so before anything is stepped."""
    monkeypatch.setitem(triton_launch.CONFIG, "BLOCK", 128)
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(96, 64, generator=g).requires_grad_(), torch.randn(50, generator=g).requires_grad_()]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    before = [p.detach().clone() for p in ps]
    opt = optgen.Adam(ps, state_dtype="int8")
    opt.implementation = "triton"
    with pytest.raises(RuntimeError, match="BLOCK=128 is not a multiple of 256"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before, strict=True))


def test_the_kernel_divides_as_the_reference_does():
    """The GPU's `/` on float32 is approximate (2 ulp): the codes would differ from the reference's;
    the kernel divides with div_rn, IEEE's correctly rounded division."""
    from optgen.generated import adam_triton

    source = open(adam_triton.__file__).read()
    assert source.count("tl.math.div_rn(") == 3 and " / tl.where(" not in source


def test_gradscalers_scale_reaches_the_parts_an_int8_step_runs_on_the_reference(int8_chunks):
    """The Triton kernels apply GradScaler's grad_scale and found_inf themselves; a step whose int8
    state is created by the reference (SGD's momentum buffer on its first step) must unscale those
    gradients first (they were stepped 1024x too large), and skip where found_inf says so."""
    def run(scale, found_inf=0.0):
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(96, 64, generator=g).requires_grad_(), torch.randn(50, generator=g).requires_grad_()]
        opt = optgen.SGD(ps, lr=0.1, momentum=0.9, state_dtype="int8")
        opt.implementation = "triton"
        for k in range(2):
            g = torch.Generator().manual_seed(100 + k)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g) * scale
            opt.grad_scale, opt.found_inf = torch.tensor(float(scale)), torch.tensor(found_inf)
            opt.step()
        return ps
    for p, r in zip(run(1024), run(1), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(96, 64, generator=g), torch.randn(50, generator=g)]
    for p, s in zip(run(1024, found_inf=1.0), start, strict=True):
        assert torch.equal(p.detach(), s)  # (every step skipped)


@pytest.mark.parametrize("inf_at", [None, 0], ids=["finite", "inf-first-step"])
def test_gradscaler_unscales_or_skips_the_parameters_the_reference_steps(inf_at, int8_chunks):
    """Under GradScaler the Triton kernel unscales the gradients itself (or skips the step on an
    inf); a parameter whose int8 state this step creates (SGD's momentum buffer, on the first step)
    is stepped by the reference, which must unscale (or skip) too, as the foreach path does:
    before, it stepped with the gradient 1024 times too large, and on an inf step wrote inf."""
    def run(implementation):
        g = torch.Generator().manual_seed(0)
        # (quantizable only: a float32 state created on an inf step is another matter)
        ps = [torch.randn(s, generator=g).requires_grad_() for s in ((64, 80), (4100,))]
        opt = optgen.SGD(ps, lr=0.1, momentum=0.9, state_dtype="int8", fused=True)
        opt.implementation = implementation
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for k in range(3):
            g = torch.Generator().manual_seed(100 + k)
            loss = torch.stack([(p * torch.randn(p.shape, generator=g)).sum() for p in ps]).sum()
            scaler.scale(loss * float("inf") if k == inf_at else loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return ps, opt

    ref_params, ref = run("foreach")
    params, opt = run("triton")
    for p, r in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, r, rtol=2e-5, atol=1e-6)
    assert opt.state[params[0]]["momentum_buffer"].dtype == torch.uint8
