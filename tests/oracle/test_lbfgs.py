"""LBFGS (an intrinsic algorithm behind a spec) against torch.optim.LBFGS."""
import copy

import pytest
import torch

import optgen
from tests.registry import assert_signature_is_torchs


def problem(dtype):
    """A small least-squares + quartic problem with a non-trivial curvature history."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 5, generator=g, dtype=dtype)
    b = torch.randn(12, generator=g, dtype=dtype)
    w = torch.zeros(5, dtype=dtype, requires_grad=True)
    c = torch.full((2, 2), 0.5, dtype=dtype, requires_grad=True)

    def closure_for(opt):
        def closure():
            opt.zero_grad()
            loss = ((a @ w - b) ** 2).mean() + (c ** 4).sum() + 0.1 * (w ** 4).sum()
            loss.backward()
            return loss
        return closure

    return [w, c], closure_for


def run(cls, kwargs, dtype, steps):
    params, closure_for = problem(dtype)
    opt = cls(params, **kwargs)
    losses = [opt.step(closure_for(opt)).item() for _ in range(steps)]
    return opt, params, losses


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kwargs", [
    dict(lr=0.5),
    dict(lr=1, line_search_fn="strong_wolfe"),
    dict(lr=0.3, history_size=3, max_iter=7, tolerance_change=1e-12),
    dict(lr=1, line_search_fn="strong_wolfe", max_iter=4, max_eval=6, history_size=2),
], ids=str)
def test_matches_torch(kwargs, dtype):
    ours, p_ours, l_ours = run(optgen.LBFGS, kwargs, dtype, 4)
    theirs, p_torch, l_torch = run(torch.optim.LBFGS, kwargs, dtype, 4)
    assert l_ours == l_torch
    torch.testing.assert_close(p_ours, p_torch, rtol=0, atol=0)
    s_ours, s_torch = ours.state[p_ours[0]], theirs.state[p_torch[0]]
    assert list(s_ours) == list(s_torch)
    assert s_ours["func_evals"] == s_torch["func_evals"] and s_ours["n_iter"] == s_torch["n_iter"]
    torch.testing.assert_close(s_ours["d"], s_torch["d"], rtol=0, atol=0)
    assert len(s_ours["old_dirs"]) == len(s_torch["old_dirs"])
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]


def test_checkpoint_from_torch_continues_identically():
    theirs, p_torch, _ = run(torch.optim.LBFGS, dict(lr=0.5), torch.float64, 2)
    params, closure_for = problem(torch.float64)
    with torch.no_grad():
        for p, q in zip(params, p_torch, strict=True):
            p.copy_(q)
    ours = optgen.LBFGS(params, lr=0.5)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    _, closure_torch = problem(torch.float64)
    loss_ours = ours.step(closure_for(ours)).item()
    # torch's closure must use torch's own params: rebuild it around them
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 5, generator=g, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)

    def closure():
        theirs.zero_grad()
        w, c = p_torch
        loss = ((a @ w - b) ** 2).mean() + (c ** 4).sum() + 0.1 * (w ** 4).sum()
        loss.backward()
        return loss

    assert loss_ours == theirs.step(closure).item()
    torch.testing.assert_close(params, p_torch, rtol=0, atol=0)


def test_errors_and_signature_match_torch():
    def error(cls, *args, **kwargs):
        try:
            opt = cls(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            return type(e), str(e)
        return opt

    p = [torch.zeros(2, requires_grad=True)]
    for kwargs in (dict(lr=-1.0), dict(lr=torch.tensor([1.0, 2.0]))):
        assert error(optgen.LBFGS, p, **kwargs) == error(torch.optim.LBFGS, p, **kwargs)
    groups = [{"params": [torch.zeros(1, requires_grad=True)]}, {"params": [torch.zeros(1, requires_grad=True)]}]
    assert error(optgen.LBFGS, groups) == error(torch.optim.LBFGS, groups)
    assert optgen.LBFGS(p).defaults["max_eval"] == torch.optim.LBFGS(p).defaults["max_eval"] == 25
    assert_signature_is_torchs(optgen.LBFGS, torch.optim.LBFGS)
    opt = optgen.LBFGS(p, line_search_fn="wolfe")
    p[0].grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="only 'strong_wolfe' is supported"):
        opt.step(lambda: torch.tensor(1.0))


def test_step_hooks_run_around_the_intrinsic_step():
    params, closure_for = problem(torch.float64)
    opt = optgen.LBFGS(params, lr=0.5)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    opt.step(closure_for(opt))
    assert calls == ["pre", "post"]


def complex_problem(lr):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 4, generator=g, dtype=torch.complex128)
    b = torch.randn(8, generator=g, dtype=torch.complex128)
    w = torch.zeros(4, dtype=torch.complex128, requires_grad=True)
    return w, a, b


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_complex_parameters_and_a_tensor_lr_match_torch(line_search_fn):
    """What README note 7 lists: complex parameters (torch's LBFGS views them as real) and a
    Tensor lr, step for step against torch."""
    results = []
    for cls in (optgen.LBFGS, torch.optim.LBFGS):
        w, a, b = complex_problem(None)
        opt = cls([w], lr=torch.tensor(0.5, dtype=torch.float64), line_search_fn=line_search_fn, max_iter=5)

        def closure():
            opt.zero_grad()
            loss = (a @ w - b).abs().pow(2).sum()
            loss.backward()
            return loss

        losses = [opt.step(closure).item() for _ in range(3)]
        results.append((losses, w.detach().clone()))
    (ours, w_ours), (theirs, w_torch) = results
    assert ours == theirs
    torch.testing.assert_close(w_ours, w_torch, rtol=0, atol=0)


def test_sparse_gradients_are_densified_as_in_torch():
    """torch's LBFGS gathers a sparse gradient densely (``to_dense``); so does optgen's."""
    results = []
    for cls in (optgen.LBFGS, torch.optim.LBFGS):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(5, 3, sparse=True).double()
        opt = cls(emb.parameters(), max_iter=4)

        def closure():
            opt.zero_grad()
            loss = (emb(torch.tensor([0, 2])) ** 2).sum()
            loss.backward()
            return loss

        results.append(([opt.step(closure).item() for _ in range(2)], emb.weight.detach().clone()))
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
