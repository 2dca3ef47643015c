"""The C kernels' int8 state (Note [Blockwise 8-bit state in C] in optgen/backends/c.py): the
quantization in C is the reference's (optgen/runtime/quantized_state.py) to the bit, and a fused
step computes what the foreach reference computes."""
from __future__ import annotations

import pytest
import torch

import optgen
from optgen.runtime import c_launch, dispatch
from optgen.runtime import quantized_state as q

pytestmark = pytest.mark.skipif(not c_launch.available(), reason="needs a C compiler")

#: quantizes values[0:n] into codes and scales with the prelude's q8_store (flags: signed), and
#: dequantizes each code back with q8_load: the kernel signature, so Library.function can call it
SHIM = r"""
void q8_shim(int64_t n, void **t, void **g, void **c, const int64_t *numels, const int64_t *dims,
             const uint8_t *f, const double *h, int c64, int flags, const uint32_t *k)
{
    const float *x = (const float *)t[0];
    uint8_t *codes = (uint8_t *)t[1];
    float *scale = (float *)t[2], *back = (float *)t[3];
    for (int64_t i0 = 0; i0 < n; i0 += Q8_BLOCK)
        q8_store(x + i0, i0, i0 + Q8_BLOCK < n ? i0 + Q8_BLOCK : n, codes, scale, flags);
    for (int64_t i = 0; i < n; ++i) back[i] = q8_load(codes[i], scale[i >> Q8_BLOCK_SHIFT], flags);
}
"""


def c_quantize(values: torch.Tensor, signed: bool):
    n = values.numel()
    codes, scales = torch.zeros(n, dtype=torch.uint8), torch.zeros(q.blocks(n))
    back = torch.zeros(n)
    table = torch.tensor([values.data_ptr(), codes.data_ptr(), scales.data_ptr(), back.data_ptr()])
    c_launch.Library("q8_shim", SHIM).function(torch.float32, "q8_shim", "int8")(
        n, table.data_ptr(), 0, 0, 0, 0, 0, 0, 0, int(signed), 0)
    return codes, scales, back


def special_values() -> torch.Tensor:
    """Blocks of ordinary values with, in some of them, what a block may hold: every midpoint of
    both maps and its neighbours, zeros of both signs, denormals, a NaN, an infinity, a negative
    value in an otherwise nonnegative block; an all-zero block; a partial last block."""
    g = torch.Generator().manual_seed(0)
    mids = torch.cat([q._midpoints(True), q._midpoints(False)])
    edges = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    parts = [
        torch.randn(q.BLOCK, generator=g) * torch.logspace(-8, 3, q.BLOCK),
        torch.cat([edges, torch.ones(1)]),                  # (normalized by the block's 1: as they are)
        torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1.0] * 8),
        torch.zeros(q.BLOCK),
        torch.randn(q.BLOCK, generator=g).abs(),
        torch.cat([torch.randn(q.BLOCK - 1, generator=g).abs(), torch.tensor([-1e-3])]),
        torch.cat([torch.randn(q.BLOCK - 1, generator=g), torch.tensor([float("nan")])]),
        torch.cat([torch.randn(q.BLOCK - 1, generator=g), torch.tensor([float("inf")])]),
        torch.randn(77, generator=g) * 1e-30,
    ]
    return torch.cat([torch.nn.functional.pad(x, (0, -x.numel() % q.BLOCK)) if i < len(parts) - 1 else x
                      for i, x in enumerate(parts)])


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_c_quantization_is_the_references_to_the_bit(signed):
    """Every value the reference's bit-pattern lookup is tested on, and NaN, infinite and
    negative-in-a-nonnegative-state blocks: the same codes and scales (a NaN block's codes too),
    and q8_load's values are dequantize's."""
    values = special_values()
    values = values if signed else torch.where(values.isnan(), values, values.abs())
    if not signed:  # one block of an unsigned state holds a negative value: the signed map, scale negated
        values[5 * q.BLOCK + q.BLOCK - 1] = -1e-3
    codes, scales, back = c_quantize(values, signed)
    ref_codes, ref_scales = q.quantize(values, signed)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales, ref_scales, ) or torch.allclose(scales, ref_scales, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(scales.isnan(), ref_scales.isnan()) and scales.isnan().any()
    assert not signed or not (scales < 0).any()
    assert signed or (scales < 0).sum() == 1
    ref_back = q.dequantize(ref_codes, ref_scales, signed)
    assert torch.allclose(back, ref_back, rtol=0, atol=0, equal_nan=True)


def steps(name, kwargs, implementation, shapes=((96, 64), (50,), (300, 257), (5000,)), n=5):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    opt = getattr(optgen, name)(ps, state_dtype="int8", **kwargs)
    opt.implementation = implementation
    for k in range(n):
        g = torch.Generator().manual_seed(100 + k)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return ps, opt


#: optimizers whose float32 C arithmetic is torch's to the bit, for the parameters
#: (tests/runtime/test_low_precision_state.py) and for the states too
EXACT_PARAMS, EXACT_STATE = {"SGD", "Lion"}, {"SGD"}
CASES = [
    ("Adam", dict(lr=1e-2, amsgrad=True)), ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)), ("Lion", dict(lr=1e-3)), ("Adagrad", dict(lr=0.1)),
    ("RMSprop", dict(lr=1e-2, centered=True, momentum=0.5)), ("NAdam", dict(lr=1e-2)), ("RAdam", dict(lr=1e-2)),
    ("Adamax", dict(lr=1e-2)), ("Lamb", dict(lr=1e-2)), ("Adafactor", dict(lr=1e-2)),
    ("AdaBelief", dict(lr=1e-2)), ("Adadelta", dict(lr=1.0)),
]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_the_fused_step_is_the_references(name, kwargs, monkeypatch):
    """Five steps from the same start (quantized parameters on several threads and on one, a
    vector (Adafactor's unfactored state), one too small to quantize; SGD's buffer created by the
    reference on the first step): the same codes and scales where the C kernel's float32 arithmetic
    is torch's to the bit; elsewhere (an ulp of Adam's denominator, of Lion's lerp) parameters
    within float32 rounding, and a code one apart in a rare element.  The int8 library ran (not
    the reference under the kernel's name)."""
    if not hasattr(optgen, name):
        pytest.skip(f"optgen has no {name}")
    ran = []
    real = c_launch.Library.function

    def spy(self, dtype, function, low_state=False):
        ran.append(low_state)
        return real(self, dtype, function, low_state)

    monkeypatch.setattr(c_launch.Library, "function", spy)
    fused, opt = steps(name, kwargs, "c")
    assert "int8" in ran
    monkeypatch.setattr(c_launch.Library, "function", real)
    reference, ref_opt = steps(name, kwargs, "foreach")
    quantized = 0
    for p, r in zip(fused, reference, strict=True):
        if name in EXACT_PARAMS:
            assert torch.equal(p, r)
        else:
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
        for key, value in ref_opt.state[r].items():
            mine = opt.state[p][key]
            if q.is_quantized(ref_opt.state[r], key):
                quantized += 1
                apart = (mine.int() - value.int()).abs()
                scales, ref_scales = opt.state[p][key + q.ABSMAX], ref_opt.state[r][key + q.ABSMAX]
                if name in EXACT_STATE:
                    assert torch.equal(mine, value) and torch.equal(scales, ref_scales), key
                else:
                    assert apart.max() <= 1 and (apart > 0).float().mean() <= 1e-3, key
                    torch.testing.assert_close(scales, ref_scales, rtol=1e-5, atol=0)
            elif isinstance(value, torch.Tensor):
                torch.testing.assert_close(mine, value, rtol=1e-5, atol=1e-6)
    assert quantized >= 1


def test_the_step_is_the_same_on_any_number_of_threads():
    """The threads share a tensor out in whole blocks of 256: each block is quantized by one."""
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            ps, opt = steps("Adam", dict(lr=1e-2), "c", shapes=((300, 257),), n=3)
            results.append([ps[0].detach().clone(), opt.state[ps[0]]["exp_avg"].clone(),
                            opt.state[ps[0]]["exp_avg_sq.absmax"].clone()])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for r in results[1:] for a, b in zip(results[0], r, strict=True))


def test_the_default_on_cpu_is_the_fused_kernel(monkeypatch):
    """The C kernel, unless torch's rule is asked for (optgen.set_defaults("torch"))."""
    ps = [torch.randn(96, 64, requires_grad=True)]
    opt = optgen.Adam(ps, state_dtype="int8")
    assert dispatch.choose(opt, opt.param_groups[0], ps) == "c"
    explicit = optgen.Adam(ps, state_dtype="int8", fused=False)  # (fused=False: no fused kernel, as for float32)
    assert dispatch.choose(explicit, explicit.param_groups[0], ps) == "foreach"
    monkeypatch.setattr(dispatch, "_defaults_set", "torch")  # (set_defaults, undone after the test)
    assert dispatch.choose(opt, opt.param_groups[0], ps) == "foreach"


def test_gradscalers_scale_reaches_the_parts_a_fused_int8_step_runs_on_the_reference():
    """fused=True hands GradScaler's grad_scale and found_inf to the optimizer; a step whose int8
    state is created by the reference (SGD's momentum buffer on its first step) unscales those
    gradients too (they were stepped 1024x too large)."""
    def run(scale):
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(96, 64, generator=g).requires_grad_(), torch.randn(50, generator=g).requires_grad_()]
        opt = optgen.SGD(ps, lr=0.1, momentum=0.9, fused=True, state_dtype="int8")
        for k in range(2):
            g = torch.Generator().manual_seed(100 + k)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g) * scale
            if scale != 1:
                opt.grad_scale, opt.found_inf = torch.tensor(float(scale)), torch.tensor(0.0)
            opt.step()
        return ps
    for p, r in zip(run(1024), run(1), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


ONE_VERSION = '''
[optimizer]
name = "SignMomentum"
doc = "Lion without its flags: one version of its walk."
signature = "lr, beta"

[hyperparameters]
lr = 1e-4
beta = 0.9

[state]
exp_avg = "zeros_like(param)"

[update]
rule = """
param = param - lr * sign(exp_avg)
exp_avg = lerp(exp_avg, grad, 1 - beta)
"""
'''


def test_a_walk_of_one_version_quantizes_each_block_once(tmp_path):
    """A walk with one version prints its loop inline (Note [One loop body per walk]): the block's
    quantization follows the loop over its elements, not inside it (it ran once per element,
    256x the work, before being overwritten by the last)."""
    from optgen.backends.c import BACKEND, source_version
    from optgen.passes import compile_spec
    from optgen.spec.load import load_spec

    path = tmp_path / "sign_momentum.toml"
    path.write_text(ONE_VERSION)
    kernel = BACKEND.kernel(compile_spec(load_spec(path)))
    assert kernel.int8
    lines = source_version("\n".join(kernel.source), "STATE_INT8").split("\n")
    loop = next(k for k, line in enumerate(lines) if "for (int64_t i = i0; i < i1; ++i)" in line)
    depth, end = 0, loop
    for end in range(loop, len(lines)):
        depth += lines[end].count("{") - lines[end].count("}")
        if depth == 0:
            break
    store = next(k for k, line in enumerate(lines) if "q8_store(exp_avg_stage" in line)
    assert store > end, "\n".join(lines[loop:store + 1])


def test_scales_replaced_by_a_wrong_tensor_are_an_error_before_any_parameter_steps():
    """A quantized state's scales replaced by a tensor of the wrong size: a clear error, raised
    before the kernel writes anything, for the small parameter (float32 state, its own launch) too:
    before, it had been stepped already, and a step retried after the fix stepped it twice."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(50, generator=g).requires_grad_(), torch.randn(70000, generator=g).requires_grad_()]
    opt = optgen.Adam(ps, lr=1e-2, state_dtype="int8")
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        if _ == 1:
            opt.state[ps[1]]["exp_avg.absmax"] = torch.ones(3)
            before = [p.detach().clone() for p in ps]
            with pytest.raises(RuntimeError, match="scales as a contiguous float32 tensor of 274 elements"):
                opt.step()
            assert all(torch.equal(p, b) for p, b in zip(ps, before, strict=True))
            assert [float(opt.state[p]["step"]) for p in ps] == [1.0, 1.0]
        else:
            opt.step()


def test_scales_whose_storage_was_freed_in_place_are_an_error_that_says_so():
    """Scales of the right shape whose storage was resized to nothing in place: the error says why
    (it named the tensor's dtype and shape, which are the ones it asks for)."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(70000, generator=g).requires_grad_()
    opt = optgen.Adam([p], lr=1e-2, state_dtype="int8")
    p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    opt.state[p]["exp_avg_sq.absmax"].untyped_storage().resize_(0)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=r"parameter 0's lie outside their storage \(resized or freed in place\)"):
        opt.step()
    assert torch.equal(p, before)


SHRUNK_IN_PLACE = """
import sys, torch, optgen
g = torch.Generator().manual_seed(0)
p = torch.randn(70000, generator=g).requires_grad_()
opt = optgen.Adam([p], lr=1e-2, state_dtype="int8")
p.grad = torch.randn(70000, generator=g)
opt.step()
scales = opt.state[p]["exp_avg.absmax"]
address = scales.data_ptr()
scales.untyped_storage().resize_(0)
scales.untyped_storage().resize_(512)  # (the allocator hands back the same address: the plan's key)
print("same address:", scales.data_ptr() == address, flush=True)
try:
    opt.step()
except RuntimeError as e:
    print("error:", e)
"""


def test_scales_shrunk_in_place_at_the_same_address_are_an_error_not_a_heap_overflow():
    """A scales storage freed and allocated again smaller in place: the allocator may hand back the
    same address, and the launch plan, keyed on address, shape, contiguity and dtype, was reused:
    the kernel wrote 274 scales into 512 bytes (glibc: "double free or corruption").  Now an int8
    launch's key holds its storages' sizes too, so the plan is checked again: an error."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", SHRUNK_IN_PLACE], capture_output=True, text=True, timeout=120)
    if "same address: False" in result.stdout:
        pytest.skip("the allocator put the smaller storage elsewhere (the plan was checked again anyway)")
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "parameter 0's lie outside their storage" in result.stdout
