"""The Triton implementation on a real GPU: skipped where there is none.

NOTE: written without a GPU (none was available when the Triton backend was built); these tests
have only been run with no CUDA device, where they are skipped.  On CPU the same kernels run in
Triton's interpreter (the other test files), and test_triton_compile.py compiles them for sm_90.
"""
import inspect
import os

import pytest

pytest.importorskip("triton", reason="the Triton backend's tests need triton (pip install triton)")

import torch

import optgen

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1 interprets every kernel"),
]

CASES = [("Adam", dict(lr=0.01, weight_decay=0.1)), ("Adam", dict(lr=0.01, amsgrad=True, maximize=True)),
         ("AdamW", dict(lr=0.01)), ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
         ("Adagrad", dict(lr=0.1, lr_decay=0.01)), ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True)),
         ("NAdam", dict(lr=0.01)), ("RAdam", dict(lr=0.01)), ("Adamax", dict(lr=0.01)),
         ("Adadelta", dict(lr=1.0)), ("ASGD", dict(lr=0.01)), ("Rprop", dict(lr=0.01))]
SHAPES = [(1000, 37), (0,), (5,), (70000,), (3, 3, 3)]


def _run(make, steps=5, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, device="cuda", dtype=dtype, generator=g).requires_grad_() for s in SHAPES]
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", dtype=dtype, generator=g)
        opt.step()
    return params, opt


def _fused(name, kwargs):
    """optgen's triton implementation: ``fused=True`` where torch's signature has it (Adam, AdamW,
    SGD, Adagrad), else chosen by name (its counters then move to the GPU on the first step)."""
    cls = optgen.OPTIMIZERS[name]

    def make(params):
        if "fused" in inspect.signature(cls).parameters:
            return cls(params, fused=True, **kwargs)
        opt = cls(params, **kwargs)
        opt.implementation = "triton"
        return opt
    return make


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_fused_matches_torch(name, kwargs):
    if name not in optgen.OPTIMIZERS or "triton" not in optgen.OPTIMIZERS[name]([torch.zeros(1)]).implementations:
        pytest.skip(f"{name} has no triton implementation here")
    ours, opt = _run(_fused(name, kwargs))
    theirs, _ = _run(lambda ps: getattr(torch.optim, name)(ps, foreach=True, **kwargs))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert all(s["step"].device.type == "cuda" for s in opt.state.values() if "step" in s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_torch_fused_adamw(dtype):
    ours, _ = _run(lambda ps: optgen.AdamW(ps, lr=0.01, fused=True), dtype=dtype)
    theirs, _ = _run(lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True), dtype=dtype)
    torch.testing.assert_close(ours, theirs, rtol=2 ** -6, atol=1e-3)


def test_grad_scaler_matches_torch_fused():
    results = []
    for make in (lambda ps: optgen.Adam(ps, lr=0.01, fused=True), lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True)):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64).cuda()
        opt = make(model.parameters())
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12)
        x = torch.randn(32, 64, device="cuda")
        for k in range(6):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x).float().square().mean()
            scaler.scale(loss).backward()
            if k == 3:
                assert model.weight.grad is not None
                model.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        results.append(([p.detach().clone() for p in model.parameters()], scaler.get_scale()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert results[0][1] == results[1][1]


def test_cuda_graph_capture_with_tensor_lr():
    """capturable: counters on the device, a Tensor lr read in the kernel, cached tables — the step
    replays from a CUDA graph and follows an lr changed in place between replays."""
    params = [torch.randn(1000, device="cuda", requires_grad=True) for _ in range(3)]
    lr = torch.tensor(0.01, device="cuda")
    opt = optgen.Adam(params, lr=lr, capturable=True, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # warm-up outside the graph: state, launch tables, compilation
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    before = [p.detach().clone() for p in params]
    graph.replay()
    torch.cuda.synchronize()
    assert all(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert opt.state[params[0]]["step"].item() == 3  # warm-up, side stream, replay (capture runs nothing)
    lr.fill_(0.0)
    frozen = [p.detach().clone() for p in params]
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close([p.detach() for p in params], frozen, rtol=0, atol=0)


def test_one_launch_per_group_on_cuda():
    params = [torch.randn(257, device="cuda", requires_grad=True) for _ in range(200)]
    opt = optgen.AdamW(params, lr=0.01, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len([e for e in kernels if "_adam_" in e.name]) == 1, [e.name for e in kernels]  # AdamW runs Adam's kernels


@pytest.mark.parametrize("name,kwargs", [("Adam", dict(lr=0.01, amsgrad=True)), ("SGD", dict(lr=0.1, momentum=0.9)),
                                         ("RMSprop", dict(lr=0.01, centered=True)), ("Lion", dict(lr=1e-3))],
                         ids=["Adam", "SGD", "RMSprop", "Lion"])
def test_int8_state_matches_the_reference(name, kwargs):
    """int8 state on the GPU (Note [Blockwise 8-bit state in Triton]): ``fused=True`` or the Triton
    kernel by name against the foreach reference on the same GPU — parameters within float32
    rounding, codes equal but for a rare element one apart, scales within float32 rounding."""
    from optgen.runtime import quantized_state as q

    def make(implementation):
        def build(params):
            opt = optgen.OPTIMIZERS[name](params, state_dtype="int8", **kwargs)
            opt.implementation = implementation
            return opt
        return build

    reference, ref = _run(make("foreach"))
    fused, opt = _run(make("triton"))
    for p, r in zip(fused, reference, strict=True):
        torch.testing.assert_close(p, r, rtol=2e-5, atol=1e-6)
        for key, value in ref.state[r].items():
            if q.is_quantized(ref.state[r], key):
                apart = (opt.state[p][key].int() - value.int()).abs()
                assert apart.max() <= 1 and (apart > 0).float().mean() <= 1e-3, key
                torch.testing.assert_close(opt.state[p][key + q.ABSMAX], ref.state[r][key + q.ABSMAX], rtol=1e-5,
                                           atol=0)
