"""The Triton implementation inside an optimizer: GradScaler (grad_scale / found_inf), Tensor
hyperparameters read on the device, the cached launch tables and one launch per (device, dtype)
group, selection by ``fused=True``, lazy import, and `optgen show`."""
import copy
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the Triton backend's tests need triton (pip install triton)")

import torch

import optgen
from optgen.runtime import c_launch, dispatch, triton_launch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _params(shapes=((6, 5), (17,), (0,), (3, 3)), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _grads(params, seed):
    g = torch.Generator().manual_seed(100 + seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in params])


def _assert_same(a, b, **tol):
    (pa, sa), (pb, sb) = a, b
    torch.testing.assert_close(pa, pb, **tol)
    for x, y in zip(sa, sb, strict=True):
        assert list(x) == list(y)
        for k in x:
            torch.testing.assert_close(x[k], y[k], **tol)


# -- GradScaler ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs", [("Adam", dict(lr=0.01, weight_decay=0.1)),
                                         ("SGD", dict(lr=0.1, momentum=0.9)),
                                         ("Adagrad", dict(lr=0.1))])
def test_found_inf_skips_the_step(name, kwargs, small_chunks):
    """found_inf != 0: params, every state (step included) and the grads stay as they were."""
    params = _params()
    opt = getattr(optgen, name)(params, **kwargs)
    opt.implementation = "triton"
    for k in range(2):
        for p, g in zip(params, _grads(params, k), strict=True):
            p.grad = g
        opt.step()
    before = _snapshot(opt, params)
    grads = [p.grad.clone() for p in params]
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    opt.step()
    _assert_same(_snapshot(opt, params), before, rtol=0, atol=0)
    torch.testing.assert_close([p.grad for p in params], grads, rtol=0, atol=0)


@pytest.mark.parametrize("name,kwargs", [("Adam", dict(lr=0.01, amsgrad=True)), ("SGD", dict(lr=0.1, momentum=0.9))])
def test_grad_scale_unscales_in_the_kernel(name, kwargs, small_chunks):
    """Grads scaled by a power of two and unscaled in the kernel give the unscaled run exactly; the
    grads are left unscaled, as GradScaler.unscale_ (and torch's fused kernels) leave them."""
    runs = []
    for scale in (None, 2.0 ** 12):
        params = _params()
        opt = getattr(optgen, name)(params, **kwargs)
        opt.implementation = "triton"
        for k in range(3):
            grads = _grads(params, k)
            for p, g in zip(params, grads, strict=True):
                p.grad = g if scale is None else g * scale
            if scale is not None:
                opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
            opt.step()
            torch.testing.assert_close([p.grad for p in params], grads, rtol=0, atol=0)
        runs.append(_snapshot(opt, params))
    _assert_same(*runs, rtol=0, atol=0)


def _train(make_opt, steps, inf_at, monkeypatch=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    data = torch.randn(steps, 8, 6, generator=torch.Generator().manual_seed(1))
    for k in range(steps):
        opt.zero_grad()
        loss = model(data[k]).square().mean()
        scaler.scale(loss).backward()
        if k == inf_at:
            grad = next(model.parameters()).grad
            assert grad is not None
            grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    return [p.detach() for p in model.parameters()], scaler.get_scale()


def test_grad_scaler_with_fused_adam(monkeypatch, small_chunks):
    """torch.amp.GradScaler drives optgen.Adam(fused=True) through grad_scale / found_inf (no
    unscale_ pass, the step skipped on an inf) and lands where torch.optim.Adam does with the
    GradScaler unscaling for it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # fused=True on CPU parameters: the interpreter
    ours, our_scale = _train(lambda ps: optgen.Adam(ps, lr=0.01, fused=True), 5, inf_at=2)
    theirs, their_scale = _train(lambda ps: torch.optim.Adam(ps, lr=0.01), 5, inf_at=2)
    assert our_scale == their_scale
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_fused_sets_amp_support_and_others_unscale_for_it(small_chunks):
    """fused=True makes GradScaler hand over grad_scale / found_inf (as torch's fused optimizers);
    an implementation that is not fused then applies them on the host."""
    params = _params()
    assert not optgen.Adam(params)._step_supports_amp_scaling
    opt = optgen.Adam(params, lr=0.01, fused=True)
    assert opt._step_supports_amp_scaling
    opt.implementation = "foreach"
    for p, g in zip(params, _grads(params, 0), strict=True):
        p.grad = g * 8
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    opt.step()
    reference = _params()
    ref = torch.optim.Adam(reference, lr=0.01)
    for p, g in zip(reference, _grads(reference, 0), strict=True):
        p.grad = g
    ref.step()
    torch.testing.assert_close([p.detach() for p in params], [p.detach() for p in reference])


# -- hyperparameters ----------------------------------------------------------------------------

def test_tensor_lr_is_read_on_the_device(small_chunks):
    """A 1-element Tensor lr on the parameters' device is loaded by the kernel (no .item()): the
    same trajectory as the float, and a later in-place change of the tensor takes effect."""
    runs = []
    for lr in (0.01, torch.tensor(0.01, dtype=torch.float64)):
        params = _params(dtype=torch.float64)
        opt = optgen.Adam(params, lr=lr)
        opt.implementation = "triton"
        for k in range(3):
            for p, g in zip(params, _grads(params, k), strict=True):
                p.grad = g
            if k == 2:
                if isinstance(lr, torch.Tensor):
                    lr.fill_(0.05)
                else:
                    opt.param_groups[0]["lr"] = 0.05
            opt.step()
        runs.append(_snapshot(opt, params))
    _assert_same(*runs, rtol=1e-14, atol=1e-15)


# -- launches -----------------------------------------------------------------------------------

def _count_launches(monkeypatch):
    launches = []
    original = triton_launch._runner

    def counting(kernel, device):
        run = original(kernel, device)

        class Counted:
            def __getitem__(self, grid):
                launches.append((kernel.__name__ if hasattr(kernel, "__name__") else kernel, grid))
                return run[grid]
        return Counted()

    monkeypatch.setattr(triton_launch, "_runner", counting)
    return launches


def test_one_launch_per_device_and_dtype_group(monkeypatch):
    params = _params(shapes=[(4, 3)] * 20, dtype=torch.float32) + _params(shapes=[(5,)] * 7, dtype=torch.float64)
    opt = optgen.AdamW(params, lr=0.01)
    opt.implementation = "triton"
    launches = _count_launches(monkeypatch)
    for k in range(2):
        for p, g in zip(params, _grads(params, k), strict=True):
            p.grad = g
        opt.step()
    assert len(launches) == 4  # 2 steps × (float32, float64)


def test_launch_tables_are_cached_while_the_tensors_stay(monkeypatch, small_chunks):
    params = _params()
    opt = optgen.SGD(params, lr=0.1, momentum=0.9)
    opt.implementation = "triton"
    plans = []
    original = triton_launch._plan

    def recording(*a):
        plans.append(original(*a))
        return plans[-1]

    monkeypatch.setattr(triton_launch, "_plan", recording)
    fixed_grads = _grads(params, 0)

    def step(k, same_grads=False):
        for p, g in zip(params, fixed_grads if same_grads else _grads(params, k), strict=True):
            p.grad = g
        opt.step()

    step(0)  # the momentum buffers are new: a table with first-step flags
    step(1)  # then the table without them, kept from here on
    step(2)
    tables = {id(p.table) for p in plans}
    assert len(tables) == 2 and plans[-1] is plans[-2]
    grad_table = plans[-1].grad_addresses
    step(3, same_grads=True)
    step(4, same_grads=True)  # same gradients: not even the gradient table changes
    assert plans[-1].grad_addresses is not grad_table and plans[-1] is plans[-3]
    grad_table = plans[-1].grad_addresses
    step(5, same_grads=True)
    assert plans[-1].grad_addresses is grad_table
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new state tensors: new addresses
    step(6)
    assert len({id(p.table) for p in plans}) == 3
    for plan in triton_launch._PLANS.values():  # every launch left its arrival counts at zero
        assert not plan.sections[-1].any()


def test_counters_advance_once_per_step_over_many_chunks(small_chunks):
    """Every program of a tensor reads `step` before the last one writes it back (arrival counts),
    so a tensor of many chunks still advances by exactly one per step."""
    params = _params(shapes=[(300,), (0,), (16,)])
    opt = optgen.Adam(params, lr=0.01)
    opt.implementation = "triton"
    for k in range(4):
        for p, g in zip(params, _grads(params, k), strict=True):
            p.grad = g
        opt.step()
    assert [opt.state[p]["step"].item() for p in params] == [4.0, 4.0, 4.0]


# -- selection, lazy import, show ---------------------------------------------------------------

def test_fused_true_selects_triton_where_it_applies(monkeypatch):
    params = _params()
    opt = optgen.Adam(params, fused=True)
    # CPU tensors, no interpreter: the fused C kernels (tests/c/), the for-loop without a compiler
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(UserWarning, match="runs its for-loop kernel .* no C compiler"):
        assert dispatch.choose(opt, opt.param_groups[0], params) == "forloop"
    monkeypatch.delenv("CC")
    if c_launch.available():
        assert dispatch.choose(opt, opt.param_groups[0], params) == "c"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.choose(opt, opt.param_groups[0], params) == "triton"
    default = "c" if c_launch.available() else "forloop"  # not triton: fused=None on CPU
    assert dispatch.choose(optgen.Adam(params), opt.param_groups[0] | {"fused": None}, params) == default
    muon_params = [torch.randn(4, 4, requires_grad=True)]
    muon = optgen.OPTIMIZERS["Muon"](muon_params, fused=True) if "fused" in \
        optgen.OPTIMIZERS["Muon"].__init__.__code__.co_varnames else None
    if muon is not None:  # a spec the triton backend declines has no "triton" implementation
        assert "triton" not in muon.implementations
        with pytest.raises(RuntimeError, match="no fused implementation"):
            dispatch.choose(muon, muon.param_groups[0], muon_params)


def test_importing_optgen_does_not_import_triton():
    """(Constructing any torch optimizer, ours included, imports torch._dynamo, which imports triton
    when it is installed; what optgen controls is its own triton code.)"""
    code = ("import sys, torch, optgen\n"
            "assert 'triton' not in sys.modules, 'import optgen imported triton'\n"
            "p = torch.zeros(3, requires_grad=True); p.grad = torch.ones(3)\n"
            "opt = optgen.Adam([p]); opt.step()\n"
            "assert optgen.Adam._kernels['triton'] == 'adam_triton'\n"
            "assert 'optgen.generated.adam_triton' not in sys.modules\n"
            "assert 'optgen.runtime.triton_launch' not in sys.modules\n"
            "opt.implementation = 'triton'; opt.step()\n"
            "assert 'optgen.generated.adam_triton' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_triton_interpret_environment_variable():
    """Triton's documented CPU path: TRITON_INTERPRET=1 set before triton is imported makes every
    @triton.jit kernel interpreted; fused=True then runs on CPU parameters."""
    code = ("import torch, optgen\n"
            "ps = [torch.randn(37, generator=torch.Generator().manual_seed(0)).requires_grad_() for _ in range(2)]\n"
            "qs = [p.detach().clone().requires_grad_() for p in ps]\n"
            "a, b = optgen.AdamW(ps, lr=0.01, fused=True), torch.optim.AdamW(qs, lr=0.01)\n"
            "for k in range(3):\n"
            "    for p, q in zip(ps, qs):\n"
            "        p.grad = torch.full_like(p, 0.1 * (k + 1)); q.grad = p.grad.clone()\n"
            "    a.step(); b.step()\n"
            "from triton.runtime.interpreter import InterpretedFunction\n"
            "from optgen.generated import adam_triton  # AdamW runs Adam's kernels\n"
            "assert any(isinstance(v, InterpretedFunction) for v in vars(adam_triton).values())\n"
            "torch.testing.assert_close(ps, qs)\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)


def test_show_prints_the_triton_code_or_why_there_is_none(capsys):
    from optgen.cli import main

    assert main(["show", "Adam", "--backend", "triton"]) == 0
    out = capsys.readouterr().out
    assert "@triton.jit" in out and "def _adam_kernel(" in out
    assert main(["show", "Adafactor", "--backend", "triton"]) == 0
    assert "Adafactor has no triton implementation: " in capsys.readouterr().out


def test_unaligned_tensors_take_the_unhinted_path(small_chunks):
    """Parameters that are views at an odd offset into one buffer are not 16-byte aligned: the
    kernel runs without alignment hints (no vector loads on a GPU) and computes the same."""
    flat = torch.randn(1 + 30 + 17, generator=torch.Generator().manual_seed(0))
    ours = [flat[1:31].view(5, 6).clone(), flat[31:].clone()]
    views = [flat.clone()[1:31].view(5, 6), flat.clone()[31:]]
    assert any(v.data_ptr() % 16 for v in views)
    results = []
    for params in (ours, views):
        leaves = [p.detach().requires_grad_() for p in params]  # (detach keeps the view's offset)
        opt = optgen.Adam(leaves, lr=0.01)
        opt.implementation = "triton"
        for k in range(2):
            for p, g in zip(leaves, _grads(leaves, k), strict=True):
                p.grad = g
            opt.step()
        results.append([p.detach().clone() for p in leaves])
    aligned = {plan.aligned and plan.grads_aligned for plan in triton_launch._PLANS.values()}
    assert False in aligned
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
