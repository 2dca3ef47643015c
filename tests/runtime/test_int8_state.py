"""``state_dtype="int8"``: blockwise 8-bit optimizer state (Note [Blockwise 8-bit state] in
optgen/runtime/quantized_state.py)."""
from __future__ import annotations

import io

import pytest
import torch

import optgen
from optgen.runtime import quantized_state as q

BIG = (96, 64)  # 6144 elements: quantized (24 blocks)
SMALL = (50,)  # below MIN_NUMEL: float32 state


def params(seed=0, shapes=(BIG, SMALL)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def set_grads(ps, k):
    g = torch.Generator().manual_seed(100 + k)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def stepped(name, kwargs, steps=4, implementation=None, seed=0, state_dtype="int8"):
    ps = params(seed)
    opt = getattr(optgen, name)(ps, state_dtype=state_dtype, **kwargs)
    if implementation is not None:
        opt.implementation = implementation
    for k in range(steps):
        set_grads(ps, k)
        opt.step()
    return ps, opt


def test_the_code_maps_are_the_dynamic_maps():
    signed, unsigned = q.code_map(True), q.code_map(False)
    for m in (signed, unsigned):
        assert m.shape == (256,) and bool((m[1:] > m[:-1]).all()) and m[-1] == 1.0
    assert signed[0] == -signed[-2] and signed[127] == 0.0  # symmetric about 0, which it holds exactly
    assert unsigned[0] == 0.0 and bool((unsigned >= 0).all())
    # seven decades below 1: the smallest nonzero magnitude is the first decade's first midpoint
    assert float(signed[128]) == pytest.approx(0.55e-6, rel=1e-6)
    assert float(unsigned[1]) == pytest.approx(0.325e-6, rel=1e-6)  # (two steps in the first decade)


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_picks_the_nearest_code_in_each_block(signed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * q.BLOCK + 17, generator=g) * torch.logspace(-4, 2, 3 * q.BLOCK + 17)
    x = x.abs() if not signed else x
    codes, absmax = q.quantize(x, signed)
    assert codes.dtype == torch.uint8 and absmax.shape == (4,)
    blocks = torch.nn.functional.pad(x, (0, 4 * q.BLOCK - x.numel())).view(4, q.BLOCK)
    assert torch.equal(absmax, blocks.abs().amax(dim=1))
    # brute force: the code whose value is closest to each element over its block's absmax
    normalized = (blocks / absmax[:, None]).reshape(-1)[:x.numel()]
    distance = (normalized[:, None] - q.code_map(signed)[None, :]).abs()
    best = distance.min(dim=1).values
    chosen = distance.gather(1, codes.long()[:, None])[:, 0]
    assert torch.equal(chosen, best)
    back = q.dequantize(codes, absmax, signed)
    assert torch.equal(back, q.code_map(signed)[codes.long()] * absmax.repeat_interleave(q.BLOCK)[:x.numel()])


@pytest.mark.parametrize("signed", [True, False])
def test_the_bit_pattern_lookup_equals_a_binary_search_at_every_midpoint(signed):
    """Values on, just above and just below each midpoint, 0, ±1 and denormals: the code
    ``quantize`` picks is torch.bucketize's over the midpoints (ties to the lower code)."""
    mid = q._midpoints(signed)
    x = torch.cat([mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0)),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 0.99999994, -0.99999994])]).clamp(-1, 1)
    x = x if signed else x.abs()
    blocks = torch.zeros(x.numel(), q.BLOCK)  # one value per block, beside a 1: normalized as it is
    blocks[:, 0], blocks[:, 1] = x, 1.0
    codes, absmax = q.quantize(blocks, signed)
    assert torch.equal(absmax, torch.ones(x.numel()))
    assert torch.equal(codes[:, 0].long(), torch.bucketize(x, mid, right=False))


def test_an_outlier_costs_precision_in_its_own_block_only():
    x = torch.full((2 * q.BLOCK,), 0.01)
    x[3] = 1000.0
    codes, absmax = q.quantize(x, True)
    back = q.dequantize(codes, absmax, True)
    assert torch.equal(absmax, torch.tensor([1000.0, 0.01]))
    assert torch.equal(back[q.BLOCK:], x[q.BLOCK:])  # the second block: its own scale, exact
    assert float(back[3]) == 1000.0


def test_an_all_zero_block_stays_zero():
    codes, absmax = q.quantize(torch.zeros(300), False)
    assert torch.equal(q.dequantize(codes, absmax, False), torch.zeros(300))


def test_a_negative_block_of_a_nonnegative_state_falls_back_to_the_signed_map():
    """Its scale is stored negated and its codes are the signed map's: the same values a signed
    state would hold, where the unsigned map would have clamped them to 0 (or raised, as at first:
    after the step had updated the parameters)."""
    x = torch.rand(3 * q.BLOCK)
    x[q.BLOCK + 7] = -0.25  # the second block only
    codes, absmax = q.quantize(x, False)
    assert bool(absmax[1] < 0) and bool((absmax[[0, 2]] > 0).all())
    signed_codes, signed_absmax = q.quantize(x, True)
    assert torch.equal(codes[q.BLOCK:2 * q.BLOCK], signed_codes[q.BLOCK:2 * q.BLOCK])
    back = q.dequantize(codes, absmax, False)
    assert torch.equal(back[q.BLOCK:2 * q.BLOCK], q.dequantize(signed_codes, signed_absmax, True)[q.BLOCK:2 * q.BLOCK])
    assert float(back[q.BLOCK + 7]) < 0
    unsigned = q.dequantize(*q.quantize(x.clamp(min=0), False), False)
    assert torch.equal(back[:q.BLOCK], unsigned[:q.BLOCK]) and torch.equal(back[2 * q.BLOCK:], unsigned[2 * q.BLOCK:])


def test_rmsprop_with_alpha_over_one_steps_on():
    """torch allows alpha > 1, which makes the second moment negative (and the update NaN, through
    its square root): int8 state steps as float32 state does, within quantization, where it raised
    after the parameters had moved."""
    (a, _), full = stepped("RMSprop", dict(lr=1e-3, alpha=1.5), steps=1, implementation="foreach", state_dtype=None)
    (b, _), int8 = stepped("RMSprop", dict(lr=1e-3, alpha=1.5), steps=1)
    reference = full.state[a]["square_avg"]
    value = q.dequantize(int8.state[b]["square_avg"], int8.state[b]["square_avg.absmax"], False)
    assert bool((reference < 0).all()) and bool((int8.state[b]["square_avg.absmax"] < 0).all())
    assert torch.equal(value, q.dequantize(*q.quantize(reference, True), True))  # as a signed state holds it
    assert torch.equal(a.isnan(), b.isnan())


def test_large_states_are_bytes_and_scales_small_ones_float32():
    (big, small), opt = stepped("Adam", dict(lr=1e-3))
    state = opt.state[big]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg"].shape == BIG
    assert state["exp_avg.absmax"].dtype == torch.float32 and state["exp_avg.absmax"].shape == (24,)
    assert state["step"].dtype == torch.float32 and float(state["step"]) == 4  # a counter is never quantized
    assert all(v.dtype == torch.float32 for v in opt.state[small].values())
    per_param = sum(v.numel() * v.element_size() for k, v in state.items() if k != "step") / big.numel()
    assert per_param == 2 + 2 * 4 / q.BLOCK  # two states of one byte, and a float32 scale per block of each


def test_the_nonnegative_state_uses_the_unsigned_map():
    assert optgen.Adam._nonnegative_state == ("exp_avg_sq", "max_exp_avg_sq")
    (big, _), opt = stepped("Adam", dict(lr=1e-3))
    state = opt.state[big]
    # (the reference's float32 exp_avg_sq, quantized unsigned, is what the state holds)
    value = q.dequantize(state["exp_avg_sq"], state["exp_avg_sq.absmax"], False)
    assert bool((value >= 0).all())
    assert torch.equal(q.quantize(value, False)[0], state["exp_avg_sq"])


@pytest.mark.parametrize("name,kwargs", [
    ("Adam", dict(lr=1e-2)), ("AdamW", dict(lr=1e-2, weight_decay=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)),
    ("Lion", dict(lr=1e-3)), ("Adagrad", dict(lr=0.1)), ("RMSprop", dict(lr=1e-2, centered=True, momentum=0.5)),
])
def test_for_loop_and_foreach_agree_bit_for_bit(name, kwargs):
    a, _ = stepped(name, kwargs, implementation="forloop")
    b, opt = stepped(name, kwargs, implementation="foreach")
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert any(v.dtype == torch.uint8 for v in opt.state[b[0]].values())  # (SGD's lazily made buffer too)


def test_int8_state_follows_float32_state_closely():
    """One step from the same state: the update differs only by the state's quantization (Adam's
    first moment is the gradient after one step from zero: within a code's spacing of it)."""
    (a, _), full = stepped("Adam", dict(lr=1e-3), steps=1, state_dtype=None)
    (b, _), int8 = stepped("Adam", dict(lr=1e-3), steps=1)
    exp_avg = q.dequantize(int8.state[b]["exp_avg"], int8.state[b]["exp_avg.absmax"], True)
    reference = full.state[a]["exp_avg"]
    relative = ((exp_avg - reference).abs() / reference.abs().amax()).max()
    assert 0 < relative <= 0.01  # a code's spacing near the top of a block: 1.4% of its absmax, halved
    assert torch.equal(a, b)  # the first step reads the float32 values the kernel computed, not the codes


def test_state_dict_round_trips_bit_for_bit_and_the_run_continues_identically():
    ps, opt = stepped("Adam", dict(lr=1e-2))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    copies = [p.detach().clone().requires_grad_() for p in ps]
    resumed = optgen.Adam(copies, lr=1e-2, state_dtype="int8")
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for p, c in zip(ps, copies, strict=True):
        for key, value in opt.state[p].items():
            assert torch.equal(resumed.state[c][key], value) and resumed.state[c][key].dtype == value.dtype
    for k in range(4, 7):
        set_grads(ps, k)
        set_grads(copies, k)
        opt.step()
        resumed.step()
    for p, c in zip(ps, copies, strict=True):
        assert torch.equal(p, c)


@pytest.mark.parametrize("into", [None, torch.bfloat16])
def test_an_int8_checkpoint_loads_into_another_state_dtype_dequantized(into):
    ps, opt = stepped("Adam", dict(lr=1e-2))
    state = opt.state[ps[0]]
    expected = q.dequantize(state["exp_avg"], state["exp_avg.absmax"], True)
    other = optgen.Adam([p.detach().clone().requires_grad_() for p in ps], lr=1e-2, state_dtype=into)
    other.load_state_dict(opt.state_dict())
    loaded = other.state[other.param_groups[0]["params"][0]]
    assert "exp_avg.absmax" not in loaded and "exp_avg_sq.absmax" not in loaded
    assert loaded["exp_avg"].dtype == (into or torch.float32)
    assert torch.equal(loaded["exp_avg"], expected.to(into or torch.float32))


@pytest.mark.parametrize("source", [None, torch.bfloat16])
def test_a_float_checkpoint_loads_into_an_int8_optimizer_quantized(source):
    ps, opt = stepped("Adam", dict(lr=1e-2), state_dtype=source)
    int8 = optgen.Adam([p.detach().clone().requires_grad_() for p in ps], lr=1e-2, state_dtype="int8")
    int8.load_state_dict(opt.state_dict())
    big, small = int8.param_groups[0]["params"]
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, absmax = q.quantize(opt.state[ps[0]][key].float(), signed)
        assert torch.equal(int8.state[big][key], codes) and torch.equal(int8.state[big][key + ".absmax"], absmax)
    assert int8.state[small]["exp_avg"].dtype == torch.float32  # too small to quantize
    set_grads(int8.param_groups[0]["params"], 9)
    int8.step()  # and it steps on


def test_fused_or_a_forced_native_kernel_where_none_applies_is_a_clear_error(monkeypatch):
    """The C kernel takes int8 state where it can run (Note [Blockwise 8-bit state in C]); where
    it cannot (here: no C compiler), fused=True and a forced C kernel say why, before anything is
    stepped, and the default runs the reference."""
    from optgen.runtime import dispatch

    monkeypatch.setattr(dispatch, "c_declines", lambda params, optimizer=None: "no C compiler (cc, or $CC)")
    ps = params()
    before = [p.detach().clone() for p in ps]
    set_grads(ps, 0)
    with pytest.raises(RuntimeError, match="state_dtype='int8' has no fused kernel for these parameters "
                                           r"\(no C compiler"):
        optgen.Adam(ps, fused=True, state_dtype="int8").step()
    opt = optgen.Adam(ps, state_dtype="int8")
    opt.implementation = "c"
    with pytest.raises(RuntimeError, match=r"C and Triton kernels, not the c one \(no C compiler"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before, strict=True))  # nothing stepped
    assert float(opt.state[ps[0]]["step"]) == 0
    default = optgen.Adam(ps, state_dtype="int8")
    assert dispatch.choose(default, default.param_groups[0], ps) == "foreach"


def test_state_dtype_values_are_checked():
    with pytest.raises(ValueError, match="state_dtype must be None, torch.bfloat16 or 'int8', not 'int4'"):
        optgen.Adam(params(), state_dtype="int4")
    with pytest.raises(ValueError, match=r"state_dtype='int8'\) needs float32 parameters"):
        p = torch.randn(BIG, dtype=torch.float64, requires_grad=True)
        p.grad = torch.randn_like(p)
        optgen.Adam([p], state_dtype="int8").step()


def _regression(name, kwargs, state_dtype, steps=150):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    student = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))
    with torch.no_grad():
        for p in [*teacher.parameters(), *student.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        y = teacher(x)
    opt = getattr(optgen, name)(student.parameters(), state_dtype=state_dtype, **kwargs)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(student(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.state[student[0].weight]["exp_avg" if "exp_avg" in opt.state[student[0].weight]
                                        else "momentum_buffer"].dtype == (torch.uint8 if state_dtype else torch.float32)
    return sum(losses[-10:]) / 10, losses[0]


@pytest.mark.parametrize("name,kwargs", [
    ("Adam", dict(lr=1e-3)), ("AdamW", dict(lr=1e-3, weight_decay=0.01)), ("SGD", dict(lr=0.05, momentum=0.9)),
    ("Lion", dict(lr=1e-4)),
])
def test_training_with_int8_state_ends_near_float32_state(name, kwargs):
    """Not worse than float32 state by more than 10% (quantization noise moves the trajectory, and
    at these small losses it may end lower: Adam 0.61x here; a state that lost its memory each
    step, or a wrong scale, ends far higher)."""
    full, first = _regression(name, kwargs, None)
    int8, _ = _regression(name, kwargs, "int8")
    assert full < 0.5 * first and int8 < 0.5 * first  # both trained
    assert int8 <= 1.1 * full, (int8, full)


@pytest.mark.parametrize("name,key,signed", [("Adagrad", "sum", False), ("SparseAdam", "exp_avg", True)])
def test_a_sparse_gradient_leaves_the_other_rows_state_as_it_was(name, key, signed):
    """A sparse gradient's step runs on the rows it touches (Note [Sparse gradients]); rows of codes
    cannot be dequantized or quantized apart from their blocks' scales.  (The gathered rows were
    dequantized with the first blocks' scales, and their one block's scale stored into every block:
    a step on row 1 moved row 90's state 1000x.  And a block the step left as it was keeps its codes
    and scale: quantized again, a block whose largest magnitude is negative shrank 0.7% a step.)"""
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(100, 64, generator=g))
    twin = torch.nn.Parameter(weight.detach().clone())  # the same gradients, dense (Adagrad takes both)
    opt = getattr(optgen, name)([weight], lr=0.1, state_dtype="int8")
    dense = optgen.Adagrad([twin], lr=0.1, state_dtype="int8", foreach=True) if name == "Adagrad" else None

    def step(row, scale):
        values = torch.randn(1, 64, generator=g) * scale
        values[0, 3] = -10 * scale  # the block's largest magnitude negative: no code for -1 (its scale moved)
        weight.grad = torch.sparse_coo_tensor(torch.tensor([[row]]), values, (100, 64))
        opt.step()
        if dense is not None:
            twin.grad = weight.grad.to_dense()
            dense.step()

    step(90, 1.0)
    state = opt.state[weight]
    before, row = q.dequantize(state[key], state[key + ".absmax"], signed)[90].clone(), weight[90].detach().clone()
    for _ in range(3):
        step(1, 100.0)
    assert torch.equal(q.dequantize(state[key], state[key + ".absmax"], signed)[90], before)
    assert torch.equal(weight[90], row)
    if dense is not None:  # Adagrad's sparse step is its dense rule on the touched rows: the same bits
        assert torch.equal(weight, twin)
        assert torch.equal(state[key], dense.state[twin][key])
        assert torch.equal(state[key + ".absmax"], dense.state[twin][key + ".absmax"])


@pytest.mark.parametrize("name,kwargs", [
    ("Adam", dict(lr=1e-2, amsgrad=True)), ("NAdam", dict(lr=1e-2)), ("SGD", dict(lr=0.1, momentum=0.9)),
    ("Lamb", dict(lr=1e-2)),
])
def test_chunks_and_batches_step_as_the_whole_group_does(name, kwargs, monkeypatch):
    """A step over chunks of a large parameter (views, a whole number of blocks each; counters
    advanced once) and batches of parameters is the step over the whole group, bit for bit (SGD:
    lazily created state, never chunked; Lamb: per-tensor norms, not elementwise, never chunked)."""
    whole, _ = stepped(name, kwargs, implementation="foreach")
    monkeypatch.setattr(q, "BATCH_ELEMENTS", 2 * q.BLOCK)  # BIG: 12 chunks; SMALL alone
    calls = []
    real = q.Quantized.__init__

    def counting(self, *args):
        calls.append(len(args[1]))  # (the entries of this batch)
        real(self, *args)

    monkeypatch.setattr(q.Quantized, "__init__", counting)
    parts, opt = stepped(name, kwargs, implementation="foreach")
    for x, y in zip(whole, parts, strict=True):
        assert torch.equal(x, y)
    chunked = opt._elementwise and not opt._lazy_state
    assert calls[:13 if chunked else 2] == ([1] * 13 if chunked else [1, 1])  # one chunk or parameter at a time
    assert float(opt.state[parts[0]].get("step", 4)) == 4


def test_a_large_parameters_step_holds_a_chunk_of_float32_copies_at_a_time():
    from optgen.tools.bench import peak_temporary_bytes

    p = torch.nn.Parameter(torch.randn(8 * q.BATCH_ELEMENTS))
    p.grad = torch.randn_like(p)
    opt = optgen.Adam([p], state_dtype="int8", foreach=True)
    opt.step()
    float32_state = 2 * 4 * p.numel()
    # (one chunk: its two states' float32 copies and the quantization's temporaries, ~25 MiB for
    # chunks of 1M; the whole parameter's copies were 191 MiB, three times its float32 state)
    assert peak_temporary_bytes(opt, [p]) < 0.5 * float32_state
    # the C kernel's float values live in registers and a block buffer on the stack: no tensor
    fused = optgen.Adam([p], state_dtype="int8")
    fused.step()
    assert peak_temporary_bytes(fused, [p]) < 0.001 * float32_state


def test_step_in_backward_with_int8_state_is_the_ordinary_loop():
    def run(in_backward: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        opt = optgen.Adam(model.parameters(), lr=1e-2, state_dtype="int8", step_in_backward=in_backward)
        x = torch.randn(32, 128)
        for _ in range(4):
            model(x).pow(2).mean().backward()
            if not in_backward:
                opt.step()
                opt.zero_grad()
        assert opt.state[model[0].weight]["exp_avg"].dtype == torch.uint8
        return list(model.parameters())

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)


DTENSOR = """
import os, sys, tempfile, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
import optgen
store = os.path.join(tempfile.mkdtemp(), "store")
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
p = torch.nn.Parameter(distribute_tensor(torch.randn(64, 128), mesh, [Shard(0)]))
p.grad = distribute_tensor(torch.randn(64, 128), mesh, [Shard(0)])
try:
    optgen.Adam([p], state_dtype="int8").step()
except ValueError as e:
    print("error:", e)
dist.destroy_process_group()
"""


def test_dtensor_parameters_are_a_clear_error_for_now():
    import subprocess
    import sys

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    result = subprocess.run([sys.executable, "-c", DTENSOR], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "error: Adam(state_dtype='int8') does not take DTensor parameters yet" in result.stdout


def test_a_block_left_as_it_was_keeps_its_codes_and_scale():
    x = torch.linspace(-1, 1, 600)
    x[5] = -10.0  # the first block's largest magnitude, negative: stored as -0.993 of its absmax
    codes, absmax = q.quantize(x, True)
    value = q.dequantize(codes, absmax, True)
    assert float(q.quantize(value, True)[1][0]) < float(absmax[0])  # quantized again, that block shrinks
    value[300] += 0.5  # the second block changes, the first and third do not
    new_codes, new_absmax = q.requantize(value, codes, absmax, True)
    fresh_codes, fresh_absmax = q.quantize(value, True)
    assert torch.equal(new_codes[:256], codes[:256]) and torch.equal(new_codes[256:], fresh_codes[256:])
    assert torch.equal(new_absmax, torch.stack([absmax[0], fresh_absmax[1], fresh_absmax[2]]))
    assert torch.equal(fresh_absmax[2], absmax[2])  # (the third: a positive largest magnitude, stable anyway)


@pytest.mark.parametrize("implementation", ["foreach", "c"])
def test_a_state_a_flag_leaves_unused_keeps_its_codes_and_scales(implementation):
    """RMSprop's grad_avg once ``centered`` is switched off: no step writes it, so it stays as it
    was, bit for bit.  (The reference quantized every state again after each step: a block whose
    largest magnitude is negative — the signed map has no -1 — shrank by 0.7% a step.)"""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = optgen.RMSprop([p], lr=1e-2, centered=True, state_dtype="int8")
    opt.implementation = implementation
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    opt.param_groups[0]["centered"] = False
    codes, scales = opt.state[p]["grad_avg"].clone(), opt.state[p]["grad_avg.absmax"].clone()
    blocks = q.dequantize(codes, scales, True).view(-1, q.BLOCK)
    assert (blocks.amin(1).abs() > blocks.amax(1)).any()  # (a block whose largest magnitude is negative)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    assert torch.equal(opt.state[p]["grad_avg"], codes)
    assert torch.equal(opt.state[p]["grad_avg.absmax"], scales)


def test_a_sparse_state_a_step_creates_stays_as_torch_keeps_it():
    """SGD with momentum and sparse gradients makes a sparse momentum buffer (as torch's does): it
    has no blocks to quantize, so it stays sparse float32, and the run is state_dtype=None's, bit for
    bit.  (Quantizing it raised "reshape is not implemented for sparse tensors", after the
    parameter had been stepped.)"""
    def run(state_dtype):
        g = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(100, 64, generator=g))
        opt = optgen.SGD([w], lr=0.1, momentum=0.9, state_dtype=state_dtype)
        for k in range(3):
            w.grad = torch.sparse_coo_tensor(torch.tensor([[k, 50 + k]]), torch.randn(2, 64, generator=g), (100, 64))
            opt.step()
        return w, opt.state[w]["momentum_buffer"]

    (w, buffer), (ref, ref_buffer) = run("int8"), run(None)
    assert torch.equal(w, ref)
    assert buffer.is_sparse and buffer.dtype == torch.float32
    assert torch.equal(buffer.to_dense(), ref_buffer.to_dense())
    # and a checkpoint of it loads back into an int8 optimizer as it was
    opt = optgen.SGD([torch.nn.Parameter(w.detach().clone())], lr=0.1, momentum=0.9, state_dtype="int8")
    saved = {"state": {0: {"momentum_buffer": buffer}}, "param_groups": [{**opt.state_dict()["param_groups"][0]}]}
    opt.load_state_dict(saved)
    loaded = next(iter(opt.state.values()))["momentum_buffer"]
    assert loaded.is_sparse and torch.equal(loaded.to_dense(), buffer.to_dense())
