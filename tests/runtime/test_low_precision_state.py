"""``state_dtype=torch.bfloat16`` (issue 15): bfloat16 state, float32 math, stochastic rounding.

- which states a spec stores in bfloat16 (the default rule of Note [Low-precision state]);
- the rounding is unbiased (the mean of many roundings is the value, within the binomial standard
  deviation), keeps exact values, NaN, infinities and signs, and its random bits are the hash the
  docstring of optgen/runtime/low_precision.py defines (two implementations agree);
- every implementation computes the same bits from the same state (the rounding keys agree);
- state_dict round trips are bit-exact; float32 checkpoints convert (round to nearest) and back;
- the bytes of state per parameter halve; wrong uses are clear errors.
"""
from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import pytest
import torch

import optgen
from optgen.runtime import c_launch, low_precision
from optgen.runtime.low_precision import COUNT_KEY, mix32, random_bits, stochastic_round

#: the references, and the fused C kernel where a compiler is here
IMPLEMENTATIONS = ("forloop", "foreach", *(("c",) if c_launch.available() else ()))
#: the C kernel's float32 arithmetic is not the for-loop's, op for op (tests/c/test_c_backend.py's tolerance)
FLOAT32: dict[str, Any] = dict(rtol=2e-5, atol=1e-6)
CASES = [
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("Lion", dict(lr=1e-3)),
    ("Adafactor", dict(lr=1e-2)),
]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def trajectory(name, kwargs, implementation, steps=5, state_dtype=torch.bfloat16, seed=0, shape=(64, 33)):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)), torch.nn.Parameter(torch.randn(70, generator=g))]
    opt = getattr(optgen, name)(params, state_dtype=state_dtype, **kwargs)
    opt.implementation = implementation
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


# ------------------------------------------------------------------------------ the spec's word


def test_which_states_are_low_precision():
    assert optgen.Adam._low_precision_state == ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    assert optgen.SGD._low_precision_state == ("momentum_buffer",)
    # Adafactor's factored row/column moments are small and stay float32; a vector's variance may not
    assert optgen.Adafactor._low_precision_state == ("variance",)
    for cls in (optgen.Adam, optgen.Adafactor, optgen.NAdam, optgen.ASGD):
        counters = {key for _, key in cls._counter_state}
        assert counters and not counters & set(cls._low_precision_state)


# ------------------------------------------------------------------------------ the rounding


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.9, 1 / 3])
def test_stochastic_rounding_is_unbiased(fraction):
    """N roundings of a value a fraction f between bfloat16 neighbours a < b: each is a or b, and
    their mean is the value within 5 binomial standard deviations (b - a)·sqrt(f(1 - f)/N)."""
    n = 200_000
    for a in (1.0, -3.140625, 2.0 ** -20):
        a16 = torch.tensor(a, dtype=torch.bfloat16)
        b16 = (a16.view(torch.int16) + 1).view(torch.bfloat16)  # the next bfloat16 away from zero
        low, high = sorted((a16.float().item(), b16.float().item()))
        value = torch.tensor(low + fraction * (high - low), dtype=torch.float32)
        rounded = stochastic_round(value.expand(n), key=12345).float()
        assert set(rounded.unique().tolist()) <= {low, high}
        sigma = (high - low) * (fraction * (1 - fraction) / n) ** 0.5
        assert abs(rounded.double().mean().item() - value.item()) < 5 * sigma
        # and a second key draws other bits: not the same roundings
        assert not torch.equal(rounded, stochastic_round(value.expand(n), key=54321).float())


def test_round_to_nearest_would_be_biased():
    """The reason for stochastic rounding: adding 1/1000 of a bfloat16 step to a state 1000 times
    moves it by one step on average; rounding to nearest never moves it."""
    start = torch.full((10_000,), 1.0, dtype=torch.bfloat16)
    nearest, stochastic = start.clone(), start.clone()
    step = torch.finfo(torch.bfloat16).eps / 1000
    for k in range(1000):
        nearest = (nearest.float() + step).to(torch.bfloat16)
        stochastic = stochastic_round(stochastic.float() + step, key=low_precision.state_key(0, k, "exp_avg"))
    assert torch.equal(nearest, start)
    # each element ends up a whole number of steps of eps above 1: about Poisson(1), sd 1/sqrt(10000)
    assert abs(stochastic.float().mean().item() - (1 + 1000 * step)) < 5 * 0.01 * 1000 * step


def test_rounding_keeps_exact_values_signs_and_special_values():
    exact = torch.randn(1000).to(torch.bfloat16)
    assert torch.equal(bits(stochastic_round(exact.float(), key=7)), bits(exact))
    x = torch.randn(1000)
    assert torch.equal(torch.sign(stochastic_round(x, key=7).float()), torch.sign(x))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    out = stochastic_round(special, key=7).float()
    assert out[0].isnan() and out[1] == float("inf") and out[2] == -float("inf")
    assert torch.equal(torch.signbit(out[3:]), torch.tensor([False, True]))


def test_random_bits_are_the_documented_hash():
    """The tensor version of the hash against the Python-int one, element by element."""
    key = low_precision.state_key(3, 17, "exp_avg")
    drawn = random_bits(1000, key)
    assert drawn.tolist() == [mix32(i ^ key) for i in range(1000)]
    assert 0 <= int(drawn.min()) and int(drawn.max()) < 2 ** 32
    # each step, parameter and state has its own key
    keys = {low_precision.state_key(p, c, k) for p in range(3) for c in range(50) for k in ("exp_avg", "exp_avg_sq")}
    assert len(keys) == 300


# ------------------------------------------------------------------------------ the kernels


@pytest.mark.parametrize("name,kwargs", CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_implementations_round_to_the_same_bits(name, kwargs):
    """Same seed, same state: every implementation draws the same random bits for each element,
    so the for-loop and foreach kernels store the same bfloat16 state and parameters, bit for bit.
    The C kernel draws them too: where its float32 arithmetic is torch's to the bit, so is its
    bfloat16 state; where it differs from torch's by an ulp here and there (as it does with float32
    state: Adam's denominator), its parameters are close, and its bfloat16 state is the same bits
    except where such an ulp crosses a rounding threshold: about 1 element in 65536 per ulp — a
    wrong key or index would change half of them."""
    runs = {impl: trajectory(name, kwargs, impl) for impl in IMPLEMENTATIONS}
    ref_params, ref_opt = runs["forloop"]
    # where the C kernel's float32 arithmetic is torch's to the bit (with float32 state: SGD, Lion),
    # its bfloat16 state and parameters must be the reference's to the bit too
    c_exact = "c" in runs and all(torch.equal(bits(p), bits(q)) for p, q in zip(
        trajectory(name, kwargs, "forloop", state_dtype=None)[0], trajectory(name, kwargs, "c", state_dtype=None)[0],
        strict=True))
    assert c_exact or name not in ("SGD", "Lion")  # (so the exact branch below runs)
    for impl, (params, opt) in runs.items():
        for p, q in zip(ref_params, params, strict=True):
            if impl == "c" and not c_exact:
                torch.testing.assert_close(q, p, **FLOAT32)
            else:
                assert torch.equal(bits(p), bits(q)), impl
            for key in ref_opt._low_precision_state:
                if key in ref_opt.state[p]:
                    mine, theirs = ref_opt.state[p][key], opt.state[q][key]
                    assert mine.dtype == theirs.dtype == torch.bfloat16
                    if impl == "c" and not c_exact:
                        apart = (bits(mine).int() - bits(theirs).int()).abs()
                        assert apart.max() <= 1 and (apart > 0).float().mean() <= 1e-3, (impl, key)
                    else:
                        assert torch.equal(bits(mine), bits(theirs)), (impl, key)
            assert opt.state[q][COUNT_KEY] == 5


@pytest.mark.skipif("c" not in IMPLEMENTATIONS, reason="no C compiler")
def test_c_kernel_rounds_the_same_on_any_number_of_threads():
    """A tensor past PARALLEL_MIN is split among the threads: the bits do not depend on how many
    (the random bits are a function of the element's index, not of the thread)."""
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            params, opt = trajectory("Adam", dict(lr=1e-2), "c", steps=3, shape=(300, 300))
            results.append([bits(params[0]), bits(opt.state[params[0]]["exp_avg"])])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for r in results[1:] for a, b in zip(results[0], r, strict=True))
    # and the same state bits as the for-loop reference (one ulp apart in rare elements, as above)
    params, opt = trajectory("Adam", dict(lr=1e-2), "forloop", steps=3, shape=(300, 300))
    apart = (bits(opt.state[params[0]]["exp_avg"]).int() - results[0][1].int()).abs()
    assert apart.max() <= 1 and (apart > 0).float().mean() <= 1e-3


def test_state_follows_float32_state_closely():
    """bfloat16 state is float32 state rounded: after a few steps, within a few bfloat16 ulps,
    and so are the parameters."""
    params32, opt32 = trajectory("Adam", dict(lr=1e-3), "forloop", state_dtype=None)
    params16, opt16 = trajectory("Adam", dict(lr=1e-3), "forloop")
    for p, q in zip(params32, params16, strict=True):
        # each of 5 roundings is off by under one ulp (2**-7 of the magnitude) of the state
        exp_avg = opt32.state[p]["exp_avg"]
        torch.testing.assert_close(opt16.state[q]["exp_avg"].float(), exp_avg,
                                   rtol=0, atol=5 * 2 ** -7 * exp_avg.abs().max().item())
        # 5 steps of at most lr each, each off by a few bfloat16 ulps (2**-8) of the state's ratio
        torch.testing.assert_close(q, p, rtol=0, atol=5 * 1e-3 * 4 * 2 ** -8)


# ------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_state_dict_round_trip_continues_bit_exact(implementation):
    """Saved after 3 steps and loaded into a fresh optimizer, 3 more steps give the bits of 6 steps."""
    g = torch.Generator().manual_seed(1)
    start = [torch.randn(40, 7, generator=g), torch.randn(9, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(6)]

    def stepped(opt, params, steps):
        for gs in steps:
            for p, gr in zip(params, gs, strict=True):
                p.grad = gr.clone()
            opt.step()

    whole = [torch.nn.Parameter(t.clone()) for t in start]
    opt = optgen.Adam(whole, lr=1e-2, state_dtype=torch.bfloat16)
    opt.implementation = implementation
    stepped(opt, whole, grads)

    first = [torch.nn.Parameter(t.clone()) for t in start]
    opt1 = optgen.Adam(first, lr=1e-2, state_dtype=torch.bfloat16)
    opt1.implementation = implementation
    stepped(opt1, first, grads[:3])
    buffer = io.BytesIO()
    torch.save(opt1.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # (a torch.dtype in param_groups loads safely)
    assert saved["state"][0]["exp_avg"].dtype == torch.bfloat16
    assert saved["param_groups"][0]["state_dtype"] == torch.bfloat16
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = optgen.Adam(resumed, lr=1e-2, state_dtype=torch.bfloat16)
    opt2.implementation = implementation
    opt2.load_state_dict(saved)
    assert torch.equal(bits(opt2.state[resumed[0]]["exp_avg"]), bits(saved["state"][0]["exp_avg"]))
    stepped(opt2, resumed, grads[3:])
    for p, q in zip(whole, resumed, strict=True):
        assert torch.equal(bits(p), bits(q))
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(bits(opt.state[p][key]), bits(opt2.state[q][key]))


def test_deepcopy_and_pickle_keep_bfloat16_state():
    params, opt = trajectory("Adam", dict(lr=1e-2), "forloop", steps=2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        state = next(iter(clone.state.values()))
        assert clone.param_groups[0]["state_dtype"] == torch.bfloat16 and state["exp_avg"].dtype == torch.bfloat16
        assert state[COUNT_KEY] == 2


def test_float32_checkpoint_converts_both_ways():
    """A float32-state checkpoint loads into a bfloat16-state optimizer rounded to nearest (the
    conversion is deterministic: no step key), and a bfloat16 one into a float32-state optimizer
    exactly; each optimizer keeps its own state_dtype."""
    params32, opt32 = trajectory("Adam", dict(lr=1e-2), "forloop", state_dtype=None)
    p16 = [torch.nn.Parameter(p.detach().clone()) for p in params32]
    opt16 = optgen.Adam(p16, lr=1e-2, state_dtype=torch.bfloat16)
    opt16.load_state_dict(opt32.state_dict())
    assert opt16.param_groups[0]["state_dtype"] == torch.bfloat16
    for p, q in zip(params32, p16, strict=True):
        assert opt16.state[q]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(bits(opt16.state[q]["exp_avg"]), bits(opt32.state[p]["exp_avg"].to(torch.bfloat16)))
    back = [torch.nn.Parameter(p.detach().clone()) for p in p16]
    opt_back = optgen.Adam(back, lr=1e-2)
    opt_back.load_state_dict(opt16.state_dict())
    assert "state_dtype" not in opt_back.param_groups[0]
    for q, r in zip(p16, back, strict=True):
        assert opt_back.state[r]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt_back.state[r]["exp_avg"], opt16.state[q]["exp_avg"].float())
        assert COUNT_KEY not in opt_back.state[r]
    # and the bfloat16 state steps on from the converted one
    for q in p16:
        q.grad = torch.ones_like(q)
    opt16.step()


def test_bytes_of_state_per_parameter_halve():
    def state_bytes(state_dtype):
        p = torch.nn.Parameter(torch.randn(1000, 100))
        opt = optgen.Adam([p], state_dtype=state_dtype)
        p.grad = torch.randn_like(p)
        opt.step()
        tensors = [v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        return sum(t.numel() * t.element_size() for t in tensors) / p.numel()

    assert state_bytes(None) == 8
    assert state_bytes(torch.bfloat16) == 4


# ------------------------------------------------------------------------------ wrong uses


def test_wrong_uses_are_clear_errors():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=r"state_dtype must be None, torch.bfloat16 or 'int8'"):
        optgen.Adam(p, state_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"state_dtype must be None, torch.bfloat16 or 'int8'"):
        optgen.Adam(p, state_dtype="int4")
    with pytest.raises(ValueError, match="LBFGS has no state that may be stored in low precision"):
        optgen.LBFGS(p, state_dtype=torch.bfloat16)
    double = [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    opt = optgen.Adam(double, state_dtype=torch.bfloat16)
    double[0].grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs float32 parameters, not torch.float64"):
        opt.step()
    opt = optgen.Adam(p, state_dtype=torch.bfloat16, differentiable=True)
    p[0].grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="not the differentiable one"):
        opt.step()



@pytest.mark.parametrize("bad", [torch.float16, "int4"])
def test_a_param_groups_own_state_dtype_is_checked_like_the_constructors(bad):
    """A param group may carry its own state_dtype (one group bfloat16, one not); another dtype is
    the constructor's ValueError when its first state is made, not a float16 state (the C kernel's
    dtype error, or float16 state rounded through bfloat16 by the reference)."""
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    for opt in (optgen.Adam([{"params": [p], "state_dtype": bad}]),
                (lambda o: (o.add_param_group({"params": [p], "state_dtype": bad}), o)[1])(optgen.Adam([q]))):
        p.grad = torch.ones(3)
        with pytest.raises(ValueError, match=r"state_dtype must be None, torch.bfloat16 or 'int8'"):
            opt.step()
        assert not opt.state.get(p)
    with pytest.raises(ValueError, match=r"state_dtype must be None, torch.bfloat16 or 'int8'"):
        optgen.Adagrad([{"params": [p], "state_dtype": bad}])  # (its state is made by the constructor)


# ------------------------------------------------------------------------------ training


def test_bfloat16_state_trains_as_well_as_float32_state():
    """A small MLP regression, 200 steps of Adam (examples/low_precision_state.py): the final loss
    with bfloat16 state is within 5% of float32 state's, with the C kernel and the reference."""
    from examples.low_precision_state import regression_loss

    full = regression_loss("Adam", dict(lr=1e-3), None, 200)
    for implementation in IMPLEMENTATIONS:
        low = regression_loss("Adam", dict(lr=1e-3), torch.bfloat16, 200, implementation=implementation)
        assert abs(low / full - 1) < 0.05, (implementation, low, full)


EVERY = ["Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop", "SGD",
         "Adafactor", "Muon", "Lion", "Lamb", "AdaBelief", "SparseAdam"]


@pytest.mark.parametrize("name", EVERY)
def test_every_optimizer_keeps_its_low_precision_states_in_bfloat16(name):
    """Each implementation of each spec (but the differentiable and Triton ones) steps with
    bfloat16 state: the states the spec marks are bfloat16 after three steps, the others not, and
    the parameters move and stay finite."""
    cls = getattr(optgen, name)
    kwargs = {"SGD": dict(momentum=0.9), "RMSprop": dict(momentum=0.9, centered=True)}.get(name, {})
    for implementation in [i for i in cls._kernels if i not in ("differentiable", "triton")]:
        torch.manual_seed(0)
        if name == "SparseAdam":
            embedding = torch.nn.Embedding(20, 4, sparse=True)
            params = list(embedding.parameters())
        else:
            params = [torch.nn.Parameter(torch.randn(8, 6)), *([torch.nn.Parameter(torch.randn(5))] * (name != "Muon"))]
        start = [p.detach().clone() for p in params]
        opt = cls(params, state_dtype=torch.bfloat16, **kwargs)
        opt.implementation = implementation
        for _ in range(3):
            if name == "SparseAdam":
                opt.zero_grad()
                embedding(torch.tensor([1, 3, 3])).sum().backward()
            else:
                for p in params:
                    p.grad = torch.randn_like(p)
            opt.step()
        for p, before in zip(params, start, strict=True):
            assert torch.isfinite(p).all() and not torch.equal(p, before), implementation
            for key, value in opt.state[p].items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    low = key in cls._low_precision_state
                    assert (value.dtype == torch.bfloat16) == low, (implementation, key, value.dtype)
