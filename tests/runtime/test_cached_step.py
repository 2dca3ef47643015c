"""The cached step (Note [Cached steps] in optgen/runtime/step_cache.py): a group's C launch bound
once and revalidated cheaply.  Each test runs the same steps twice, with the cache and with it
disabled (every step the checked path), and requires the same bits — or the same error — after
something changed between steps that a stale launch would get wrong.  The crash cases run in a
subprocess."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import optgen
from optgen.runtime import c_launch, once, step_cache, step_guard
from optgen.runtime.generated import GeneratedOptimizer

pytestmark = pytest.mark.skipif(not c_launch.available(), reason="no C compiler")


def params(shapes=((7, 5), (33,), (4, 4, 3)), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def set_grads(ps, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


@pytest.fixture(autouse=True, params=["python", "native"])
def guard_kind(request, monkeypatch):
    """Every test here runs with each guard of the cached path (Note [Native step guard])."""
    if request.param == "native":
        if step_guard.native(wait=True) is None:
            pytest.skip(f"no native step guard here: {step_guard.unavailable()}")
    else:
        monkeypatch.setattr(step_guard, "native", lambda **_: None)
    return request.param


@pytest.fixture
def uncached(monkeypatch):
    """Runs a function with every step on the checked path."""
    def run(fn):
        with monkeypatch.context() as m:
            m.setattr(step_cache.CachedStep, "__call__", lambda self, optimizer, group: False)
            return fn()
    return run


def both(fn, uncached):
    """``fn()`` with the cache and without it: (cached result, checked result)."""
    return fn(), uncached(fn)


def test_the_default_on_cpu_is_the_c_kernel_and_later_steps_take_the_cached_path(monkeypatch):
    ps = params()
    opt = optgen.Adam(ps, lr=1e-2)
    checked = []
    real = GeneratedOptimizer._choose_implementation

    def spy(self, *args):
        result = real(self, *args)
        checked.append(result[0])
        return result

    monkeypatch.setattr(GeneratedOptimizer, "_choose_implementation", spy)
    for k in range(5):
        set_grads(ps, k)
        opt.step()
    assert checked == ["c"]  # the first step chose C on the checked path; four took the cached one


@pytest.mark.parametrize("name,kwargs", [
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("NAdam", dict(lr=1e-2)),
    ("ASGD", dict(lr=1e-2)),
    ("Adafactor", dict(lr=1e-2)),
    ("Lamb", dict(lr=1e-2, weight_decay=0.01)),
])
def test_cached_steps_equal_checked_steps_bit_for_bit(name, kwargs, uncached):
    def run():
        ps = params()
        opt = getattr(optgen, name)(ps, **kwargs)
        for k in range(6):
            set_grads(ps, k)
            opt.step()
        return [p.detach().clone() for p in ps], opt.state_dict()

    (ours, state), (ref, ref_state) = both(run, uncached)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)
    for s, r in zip(state["state"].values(), ref_state["state"].values(), strict=True):
        assert s.keys() == r.keys() and all(torch.equal(s[k], r[k]) for k in s)


def trajectory(change, steps=6, name="Adam", kwargs=None, seed=0):
    """Steps an optimizer, calling ``change(opt, ps, k)`` before step k; the parameters after."""
    def run():
        ps = params(seed=seed)
        opt = getattr(optgen, name)(ps, **(kwargs or dict(lr=1e-2)))
        for k in range(steps):
            set_grads(ps, k)
            change(opt, ps, k)
            opt.step()
        return [p.detach().clone() for p in ps], opt
    return run


def outcome(run):
    """``run``'s parameters, or the error it raised (type and message)."""
    def wrapped():
        try:
            return run()[0]
        except Exception as e:  # noqa: BLE001 - the two paths must raise the same, whatever it is
            return type(e), str(e)
    return wrapped


def assert_same(run, uncached):
    ours, ref = both(outcome(run), uncached)
    if isinstance(ref, tuple):
        assert ours == ref
        return
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


def replace_param_data(opt, ps, k):
    if k == 3:
        ps[0].data = torch.full_like(ps[0], 0.5)  # a new storage: a stale launch would update the old one


def replace_state(opt, ps, k):
    if k == 3:
        opt.state[ps[1]]["exp_avg"] = torch.ones_like(ps[1])


def swap_state_storage(opt, ps, k):
    if k == 3:
        opt.state[ps[1]]["exp_avg_sq"].data = torch.full_like(ps[1], 2.0)  # same tensor object, new memory


def reset_state(opt, ps, k):
    if k == 3:
        del opt.state[ps[2]]


def clear_state(opt, ps, k):
    if k == 3:
        opt.state.clear()  # every state made again, as on a first step


def new_gradients_each_step(opt, ps, k):
    for p in ps:  # zero_grad(set_to_none=True) then backward: new gradient tensors every step
        p.grad = p.grad.clone()


def toggle_amsgrad(opt, ps, k):
    opt.param_groups[0]["amsgrad"] = k >= 3  # a state the step did not touch is created and used


def change_lr_and_betas(opt, ps, k):
    opt.param_groups[0]["lr"] = 1e-2 / (k + 1)
    opt.param_groups[0]["betas"] = (0.8, 0.99) if k >= 3 else (0.9, 0.999)


def drop_a_gradient(opt, ps, k):
    if k in (2, 3):
        ps[1].grad = None  # that parameter is not stepped, its state untouched
    if k == 4:
        ps[2].grad = None


def add_a_parameter(opt, ps, k):
    if k == 3:
        extra = torch.linspace(-1, 1, 6).requires_grad_()
        extra.grad = torch.linspace(0.5, -0.5, 6)
        ps.append(extra)
        opt.param_groups[0]["params"].append(extra)


def switch_to_forloop(opt, ps, k):
    opt.implementation = "forloop" if k == 3 else None


def set_state_dtype(opt, ps, k):
    if k == 3:  # the checked path rounds into bfloat16 state (here: its error for the float32 states)
        opt.param_groups[0]["state_dtype"] = torch.bfloat16


# a state changed in place: the same object at the same address, laid out otherwise
def shrink_state_in_place(opt, ps, k):
    if k == 3:
        opt.state[ps[1]]["exp_avg"].resize_(5)


def transpose_state_in_place(opt, ps, k):
    if k == 3:
        opt.state[ps[0]]["exp_avg_sq"].t_()  # (7, 5) -> (5, 7), not contiguous


def reshape_state_in_place(opt, ps, k):
    if k == 3:
        opt.state[ps[0]]["exp_avg"].resize_(5, 7)  # the same memory and element count, another shape


def reshape_param_in_place(opt, ps, k):
    if k == 3:
        ps[0].data = ps[0].data.view(5, 7)
        ps[0].grad = ps[0].grad.view(5, 7)


def retype_state_in_place(opt, ps, k):
    if k == 3:
        state = opt.state[ps[2]]["exp_avg"]
        state.data = state.data.view(torch.int32)


def transpose_param_in_place(opt, ps, k):
    if k == 3:  # the same memory and shape (4, 4, 3), not contiguous: its gradients still are
        ps[2].data = ps[2].data.transpose(0, 1)


def shrink_param_under_its_gradient(opt, ps, k):
    if k == 3:  # the same address, 10 of its 33 elements; the gradient set before still has 33
        ps[1].data = ps[1].data[:10]


@pytest.mark.parametrize("change", [
    replace_param_data, transpose_param_in_place, shrink_param_under_its_gradient,
    replace_state, swap_state_storage, reset_state, clear_state, new_gradients_each_step,
    toggle_amsgrad,
    change_lr_and_betas, drop_a_gradient, add_a_parameter, switch_to_forloop, set_state_dtype,
    shrink_state_in_place, transpose_state_in_place, retype_state_in_place,
], ids=lambda f: f.__name__)
def test_a_change_between_steps_is_seen(change, uncached):
    assert_same(trajectory(change), uncached)


@pytest.mark.parametrize("change", [reshape_state_in_place, reshape_param_in_place], ids=lambda f: f.__name__)
def test_a_shape_changed_in_place_is_seen(change, uncached):
    assert_same(trajectory(change), uncached)


@pytest.mark.parametrize("change", [clear_state, reset_state, replace_param_data], ids=lambda f: f.__name__)
def test_a_change_to_a_lazily_created_state_is_seen(change, uncached):
    """SGD's momentum buffer is created by the kernel on the first step, not by the state's initialiser."""
    assert_same(trajectory(change, name="SGD", kwargs=dict(lr=0.1, momentum=0.9)), uncached)


def test_a_loaded_state_dict_drops_the_bound_launch(uncached):
    def run():
        ps = params()
        opt = optgen.Adam(ps, lr=1e-2)
        for k in range(3):
            set_grads(ps, k)
            opt.step()
        saved = opt.state_dict()
        for k in range(3, 5):
            set_grads(ps, k)
            opt.step()
        opt.load_state_dict(saved)  # new state tensors, the old ones freed
        assert "_cached_steps" not in vars(opt)
        for k in range(5, 7):
            set_grads(ps, k)
            opt.step()
        return [p.detach().clone() for p in ps], opt

    assert_same(run, uncached)


@pytest.mark.parametrize("fused", [None, True])
def test_a_non_contiguous_gradient_takes_the_checked_path(fused, uncached):
    """The default quietly steps that group with the for-loop; fused=True says so (a warning)."""
    def change(opt, ps, k):
        if k == 3:
            ps[0].grad = torch.linspace(-1, 1, 35).view(5, 7).t()  # the right shape, transposed

    def run():
        once._WARNED.clear()  # said once per process: here once per run (conftest.py: once per test)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = trajectory(change, kwargs=dict(lr=1e-2, fused=fused))()
        assert any("not contiguous" in str(w.message) for w in caught) == bool(fused)
        return result

    assert_same(run, uncached)


def test_a_sparse_gradient_takes_the_checked_path(uncached):
    def change(opt, ps, k):
        if k == 3:
            ps[1].grad = ps[1].grad.to_sparse()

    assert_same(trajectory(change, name="SGD", kwargs=dict(lr=0.1, momentum=0.9)), uncached)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        trajectory(change)()


@pytest.mark.parametrize("fused", [None, True])
def test_a_grad_scaler_step_takes_the_checked_path(fused, uncached):
    """GradScaler unscales (default) or hands the fused kernel its scale; an inf skips the step."""
    def run():
        ps = params()
        opt = optgen.Adam(ps, lr=1e-2, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        for k in range(5):
            opt.zero_grad()
            loss = sum((p * torch.linspace(-1, 1, p.numel()).view(p.shape)).sum() for p in ps) * (k + 1)
            scaler.scale(loss).backward()
            if k == 2:
                ps[0].grad.view(-1)[0] = float("inf")  # a skipped step
            scaler.step(opt)
            scaler.update()
        return [p.detach().clone() for p in ps], opt

    assert_same(run, uncached)


def test_a_step_under_torch_defaults_is_the_forloop(monkeypatch):
    monkeypatch.setenv("OPTGEN_DEFAULTS", "torch")
    ps, ref = params(), params()
    ours, theirs = optgen.Adam(ps, lr=1e-2), torch.optim.Adam(ref, lr=1e-2)
    for k in range(4):
        set_grads(ps, k)
        set_grads(ref, k)
        ours.step()
        theirs.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, ref, strict=True))
    assert "_cached_steps" not in vars(ours) or not ours._cached_steps


CRASH = textwrap.dedent("""
    import torch, optgen
    {first}
    for change in {changes!r}:
        ps = [torch.randn(1000, requires_grad=True) for _ in range(3)]
        opt = optgen.Adam(ps, lr=1e-2)
        for k in range(8):
            for p in ps:
                p.grad = torch.randn(p.shape)
            if k == 4:
                exec(change)
            try:
                opt.step()
            except RuntimeError as e:
                print("error:", e)
        intact = [p for p in ps if p.untyped_storage().nbytes() >= p.numel() * 4]  # (torch reads freed ones)
        print("finite:", all(bool(torch.isfinite(p).all()) for p in intact), "after", change, flush=True)
""")

MEMORY_CHANGES = [
    # memory under a parameter or state freed or shrunk between steps: never written through
    "ps[0].untyped_storage().resize_(0)",
    "ps[1].data = torch.randn(10)",
    "ps[1].data = ps[1].data[:10]",
    "opt.state[ps[2]]['exp_avg'].untyped_storage().resize_(0)",
    "opt.state[ps[2]]['exp_avg'].data = torch.zeros(10)",
    "opt.state[ps[2]]['step'].data = torch.zeros(0)",
    # a gradient's storage freed or shrunk after backward: never read past its end
    "ps[0].grad.untyped_storage().resize_(0)",
    "ps[1].grad.untyped_storage().resize_(8)",
]


def test_memory_changed_under_a_bound_launch_never_crashes(guard_kind):
    """Each change in turn, in one subprocess per guard (a crash fails the test; the last line
    printed names the change before it)."""
    first = "from optgen.runtime import step_guard; assert step_guard.native(wait=True) is not None" \
        if guard_kind == "native" else "pass"
    result = subprocess.run([sys.executable, "-c", CRASH.format(changes=MEMORY_CHANGES, first=first)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OPTGEN_STEP_GUARD": guard_kind})
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-2000:]
    done = [line for line in result.stdout.splitlines() if line.startswith("finite:")]
    assert done == [f"finite: True after {change}" for change in MEMORY_CHANGES], result.stdout


class Marked(torch.Tensor):
    """A tensor subclass (as a library's quantized or tracked parameters are): its memory may not
    be its data, so no native kernel runs on it."""


def test_the_default_quietly_steps_a_tensor_subclass_with_the_forloop():
    ours = [torch.randn(4, 3).as_subclass(Marked).requires_grad_() for _ in range(2)]
    ref = [p.detach().clone().as_subclass(torch.Tensor).requires_grad_() for p in ours]
    opt, theirs = optgen.Adam(ours, lr=1e-2), torch.optim.Adam(ref, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "runs its for-loop kernel instead" warning: nothing was asked for
        for k in range(3):
            for p, q in zip(ours, ref, strict=True):
                p.grad = q.grad = torch.full(p.shape, 0.1 * (k + 1))
            opt.step()
            theirs.step()
    assert all(torch.equal(p.as_subclass(torch.Tensor), q) for p, q in zip(ours, ref, strict=True))


def test_a_conjugated_gradient_is_seen():
    """A complex parameter's gradient may be a lazily conjugated view (autograd hands one out for
    ``z.conj()``): the same memory as the plain gradient, another value.  The checked path raises
    torch's error for it (view_as_real), as torch.optim.Adam does; a bound launch read the memory."""
    def run(cls):
        z = torch.linspace(-1, 1, 12).view(4, 3).to(torch.complex64).requires_grad_()
        opt = cls([z], lr=1e-2)
        w = torch.linspace(0.5, -0.5, 12).view(4, 3) * (1 + 2j)
        for k in range(4):
            z.grad = None
            ((z.conj() if k == 3 else z) * w).real.sum().backward()
            assert z.grad is not None and z.grad.is_conj() == (k == 3)
            try:
                opt.step()
            except RuntimeError as e:
                return str(e)
        return z.detach().clone()

    expected = run(torch.optim.Adam)
    assert isinstance(expected, str) and "view_as_real" in expected
    assert run(optgen.Adam) == expected


def test_a_negated_view_gradient_steps_as_its_values():
    """``x.conj().imag`` (or ``torch._neg_view``) is a real tensor with the neg bit: its memory holds
    the negation of its values.  A step must take the values: the same bits as with a plain copy."""
    def run(neg_view):
        ps = params()
        opt = optgen.Adam(ps, lr=1e-2)
        for k in range(4):
            set_grads(ps, k)
            if neg_view and k >= 2:
                for p in ps:
                    p.grad = torch._neg_view(-p.grad)  # the same values, through the neg bit
                    assert p.grad.is_neg()
            opt.step()
        return [p.detach().clone() for p in ps]

    for ours, ref in zip(run(True), run(False), strict=True):
        assert torch.equal(ours, ref)


def test_a_gradient_of_another_dtype_is_seen():
    """torch 2.13's ``grad_dtype`` lets a parameter take gradients of another dtype: a float64
    gradient of a float32 parameter has as many elements and more bytes.  The checked path raises
    the C kernel's dtype error for it (torch's Adam raises too); a bound launch read its bytes as floats."""
    def run():
        p = torch.linspace(-1, 1, 24).view(6, 4).requires_grad_()
        opt = optgen.Adam([p], lr=1e-2)
        for k in range(4):
            p.grad = None
            if k == 2:
                p.grad_dtype = torch.float64
            p.grad = torch.linspace(1, -1, 24, dtype=p.grad_dtype or torch.float64).view(6, 4) * (k + 1)
            opt.step()
        return [p.detach().clone()], opt

    with pytest.raises(RuntimeError, match="the gradient of parameter 0 is torch.float64"):
        run()
