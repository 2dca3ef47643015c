"""optgen.swa_utils against torch.optim.swa_utils: averaged weights, buffers, BatchNorm statistics,
state_dicts, errors — and the generated averaging kernels against each other."""
from __future__ import annotations

import copy
import warnings
from typing import Any, cast

import pytest
import torch
from torch.optim import swa_utils as T

from optgen import swa_utils as O
from optgen.runtime import c_launch

UPDATES = 25  # enough for the running mean's weight 1/(n+1) to get small and EMA to forget the start


def make_model(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3)).to(dtype)


AVERAGINGS = {
    "swa (default)": lambda m: dict(),
    "swa, buffers": lambda m: dict(use_buffers=True),
    "ema multi": lambda m: dict(multi_avg_fn=m.get_ema_multi_avg_fn(0.9)),
    "ema multi, buffers": lambda m: dict(multi_avg_fn=m.get_ema_multi_avg_fn(0.99), use_buffers=True),
    "swa multi": lambda m: dict(multi_avg_fn=m.get_swa_multi_avg_fn()),
    "ema avg_fn": lambda m: dict(avg_fn=m.get_ema_avg_fn(0.95)),
    "swa avg_fn": lambda m: dict(avg_fn=m.get_swa_avg_fn()),
    "custom avg_fn": lambda m: dict(avg_fn=lambda avg, cur, n: 0.5 * (avg + cur)),
}


def train_and_average(module, dtype, averaging):
    model = make_model(dtype)
    averaged = module.AveragedModel(model, **AVERAGINGS[averaging](module))
    generator = torch.Generator().manual_seed(1)
    for _ in range(UPDATES):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator, dtype=dtype))
        model(torch.randn(8, 6, generator=generator, dtype=dtype))  # moves the BatchNorm statistics
        averaged.update_parameters(model)
    return averaged


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("averaging", list(AVERAGINGS))
def test_averaged_model_matches_torch(averaging, dtype):
    theirs, ours = (train_and_average(m, dtype, averaging) for m in (T, O))
    assert list(theirs.state_dict()) == list(ours.state_dict())
    assert int(ours.n_averaged) == UPDATES
    # The running mean is a lerp here (torch divides per tensor on CPU): equal up to rounding.
    tol: dict[str, Any] = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, **tol, msg=key)


def test_state_dict_loads_both_ways():
    theirs = train_and_average(T, torch.float64, "ema multi")
    ours = O.AveragedModel(make_model(), multi_avg_fn=O.get_ema_multi_avg_fn(0.9))
    ours.load_state_dict(theirs.state_dict())
    assert int(ours.n_averaged) == UPDATES
    back = T.AveragedModel(make_model(), multi_avg_fn=T.get_ema_multi_avg_fn(0.9))
    back.load_state_dict(ours.state_dict())
    x = torch.randn(4, 6, dtype=torch.float64)
    theirs.eval(), ours.eval(), back.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(back(x), theirs(x))


def test_update_bn_matches_torch():
    loader: list[Any] = [torch.randn(16, 6, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                         for i in range(5)]
    loader += [(torch.randn(16, 6, dtype=torch.float64), torch.zeros(16))]  # (input, target) batches too
    models = []
    for module in (T, O):
        model = make_model()
        model.eval()
        module.update_bn(loader, model)
        models.append(model)
        assert not model.training  # the mode is restored
    (bn_t, bn_o) = (m[1] for m in models)
    torch.testing.assert_close(bn_o.running_mean, bn_t.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn_o.running_var, bn_t.running_var, rtol=0, atol=0)
    assert int(bn_o.num_batches_tracked) == int(bn_t.num_batches_tracked) == 6
    assert bn_o.momentum == bn_t.momentum == 0.1
    plain = torch.nn.Linear(2, 2)
    O.update_bn(loader, plain)  # no BatchNorm: nothing happens


def test_swa_with_swalr_and_update_bn_end_to_end():
    """The torch docs' SWA recipe with every piece from optgen and from torch: same weights."""
    results = []
    for module in (T, O):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        swa_model = module.AveragedModel(model)
        swa_scheduler = module.SWALR(optimizer, swa_lr=0.01, anneal_epochs=3)
        generator = torch.Generator().manual_seed(3)
        data = [(torch.randn(16, 6, generator=generator, dtype=torch.float64),
                 torch.randint(0, 3, (16,), generator=generator)) for _ in range(4)]
        for epoch in range(8):
            for x, y in data:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            if epoch >= 3:
                swa_model.update_parameters(model)
                swa_scheduler.step()
        module.update_bn([x for x, _ in data], swa_model)
        results.append((swa_model.state_dict(), [g["lr"] for g in optimizer.param_groups]))
    for key in results[0][0]:
        torch.testing.assert_close(results[1][0][key], results[0][0][key], rtol=1e-12, atol=1e-12, msg=key)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-12)


@pytest.mark.parametrize("make", [
    lambda m: m.get_ema_multi_avg_fn(1.5), lambda m: m.get_ema_multi_avg_fn(-0.1),
    lambda m: m.get_ema_avg_fn(2), lambda m: m.AveragedModel(torch.nn.Linear(1, 1), avg_fn=lambda *a: a[0],
                                                                  multi_avg_fn=lambda *a: None),
])
def test_errors_match_torch(make):
    def error(module):
        try:
            make(module)
        except Exception as e:  # noqa: BLE001
            return type(e), str(e)
        return None

    assert error(T) is not None and error(O) == error(T)


def test_avg_fns_match_torch():
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    n = torch.tensor(3)
    torch.testing.assert_close(O.get_ema_avg_fn(0.8)(a, b, n), T.get_ema_avg_fn(0.8)(a, b, n), rtol=0, atol=0)
    torch.testing.assert_close(O.get_swa_avg_fn()(a, b, n), T.get_swa_avg_fn()(a, b, n), rtol=0, atol=0)
    for make in ("get_ema_multi_avg_fn", "get_swa_multi_avg_fn"):
        for dtype in (torch.float64, torch.int64):
            lists = [[torch.arange(4, dtype=dtype) * (i + 1) for i in range(3)] for _ in range(2)]
            current = [torch.arange(4, dtype=dtype) * 7 for _ in range(3)]
            args = ((0.9,) if make == "get_ema_multi_avg_fn" else ())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    getattr(T, make)(*args)(lists[0], current, 2)
                    getattr(O, make)(*args)(lists[1], current, 2)
                except RuntimeError:  # torch rejects some integer cases; optgen must too
                    with pytest.raises(RuntimeError):
                        getattr(O, make)(*args)(copy.deepcopy(lists[1]), current, torch.tensor(2))
                    continue
            for x, y in zip(*lists, strict=True):
                torch.testing.assert_close(y, x, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_generated_kernels_agree(dtype):
    """The for-loop and foreach kernels of specs/averaging/weight_average.toml give the same lerp
    (the Triton kernel too, interpreted on CPU tensors, for the real dtypes it handles)."""
    torch.manual_seed(0)
    current = [torch.randn(n, dtype=dtype) for n in (3, 17, 1000)]
    outs = []
    implementations = ["forloop", "foreach"]
    if dtype != torch.complex64 and O._triton_available():
        implementations.append("triton")
    if dtype != torch.complex64 and c_launch.available():
        implementations.append("c")
    for impl in implementations:
        averaged = [torch.ones(n, dtype=dtype) for n in (3, 17, 1000)]
        O.lerp_(averaged, current, 0.25, implementation=impl)
        outs.append(averaged)
    for x, c, *others in zip(outs[0], current, *outs[1:], strict=True):
        torch.testing.assert_close(x, torch.lerp(torch.ones_like(c), c, 0.25), rtol=0, atol=0)
        for y in others:  # Triton and C compute a + w (b - a) in their own rounding (FMA)
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)


def test_averaging_kernel_is_generated_from_the_spec():
    import inspect

    assert "torch._foreach_lerp_(params, grads, weight)" in inspect.getsource(O.kernel("foreach"))
    assert "param.lerp_(grad, weight)" in inspect.getsource(O.kernel("forloop"))
    assert O._implementation([torch.zeros(1)]) == "foreach"  # on CPU
    assert "param = lerp_of(param, grad, c_weight);" in cast(Any, O.kernel("c")).library.source
