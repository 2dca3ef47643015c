"""The fused C (CPU) backend: generated/<spec>_c.py, run through optgen.runtime.c_launch.

Every spec × variant × implementation is also checked against the float64 reference interpreter
by tests/backends/test_against_reference.py (the "c" implementation is one of each class's
``_kernels``); here: float32 against torch, torch's own fused CPU kernels, ``fused=True``, the
cases a flat multi-tensor kernel must get right, and the compile cache.
"""
import copy
import re
from typing import Any

import pytest
import torch

import optgen
from optgen.backends.c import source_version
from optgen.runtime import c_launch, dispatch
from tests.registry import CASES, STEPS, case_id

pytestmark = pytest.mark.skipif(not c_launch.available(), reason="no C compiler on this machine")

C_CASES = [c for c in CASES if "c" in optgen.OPTIMIZERS[c[0]]._kernels]
#: shapes with a tensor above the kernel's PARALLEL_MIN (65536: OpenMP threads share it), an
#: empty one, a 0-dim one and odd sizes (no vector-width assumption)
SHAPES = ((300, 257), (0,), (), (7,), (3, 5))
#: float32 after 25 steps of updates computed in another order (one expression per element
#: instead of torch's op-by-op rounding): a few ulps, accumulated
FLOAT32: dict[str, Any] = dict(rtol=2e-5, atol=1e-6)


def params_like(dtype, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def run(make, params, steps=STEPS):
    opt = make(params)
    for k in range(steps):
        g = torch.Generator().manual_seed(100 + k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        opt.step()
    return opt


def close(a, b, rtol, atol):
    """assert_close with ``atol`` relative to the tensor's largest magnitude (at least 1): float32
    rounding errors scale with the values an element is computed from, and an element that
    cancels to near zero inside a tensor of large values keeps their absolute error."""
    scale = max(1.0, b.detach().abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale, check_device=False)


def assert_same_state(ours, theirs, **tol):
    for p, q in zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"], strict=True):
        close(p.detach(), q.detach(), **tol)
        assert ours.state[p].keys() == theirs.state[q].keys()
        for key, value in theirs.state[q].items():
            close(ours.state[p][key], value, **tol)


@pytest.mark.parametrize("case", C_CASES, ids=case_id)
def test_c_kernel_matches_torch_float32(case):
    """25 float32 steps of optgen's C kernel against torch's for-loop step (params and state)."""
    name, kwargs = case

    def ours(ps):
        opt = getattr(optgen, name)(ps, **kwargs)
        opt.implementation = "c"
        return opt

    mine = run(ours, params_like(torch.float32))
    theirs = run(lambda ps: getattr(torch.optim, name)(ps, foreach=False, **kwargs), params_like(torch.float32))
    assert_same_state(mine, theirs, **FLOAT32)


@pytest.mark.parametrize("case", [c for c in C_CASES
                                  if "fused" in optgen.OPTIMIZERS[c[0]].__init__.__code__.co_varnames],
                         ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_true_on_cpu_runs_the_c_kernel_like_torchs_fused(case, dtype):
    """``fused=True`` on CPU parameters: torch runs its fused CPU kernel, optgen its C kernel;
    same parameters, same state (counters included: float32 on the parameters' device)."""
    name, kwargs = case
    tol: dict[str, Any] = FLOAT32 if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    mine = run(lambda ps: getattr(optgen, name)(ps, fused=True, **kwargs), params_like(dtype))
    theirs = run(lambda ps: getattr(torch.optim, name)(ps, fused=True, **kwargs), params_like(dtype))
    assert_same_state(mine, theirs, **tol)
    assert dispatch.choose(mine, mine.param_groups[0], mine.param_groups[0]["params"]) == "c"


def test_one_call_covers_groups_of_mixed_dtypes_and_complex_params():
    """A group of float32, float64 and complex64 parameters: one call per dtype (complex as real
    views), each equal to the for-loop kernel."""
    shapes = ((70000,), (5,))
    params = [*params_like(torch.float32, shapes), *params_like(torch.float64, shapes, seed=1),
              *params_like(torch.complex64, shapes, seed=2)]
    reference = [p.detach().clone().requires_grad_() for p in params]

    def make(implementation):
        def build(ps):
            opt = optgen.Adam(ps, lr=0.01, weight_decay=0.1)
            opt.implementation = implementation
            return opt
        return build

    ours, forloop = run(make("c"), params, steps=5), run(make("forloop"), reference, steps=5)
    for p, q in zip(params, reference, strict=True):
        tol: dict[str, Any] = dict(rtol=1e-12, atol=1e-14) if p.dtype == torch.float64 else FLOAT32
        torch.testing.assert_close(p, q, **tol)
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"], forloop.state[q]["exp_avg_sq"], **tol)


def test_lazily_created_state_and_state_left_out():
    """SGD's momentum buffer is created by the kernel on its first step (``first = grad``); without
    momentum there is no state at all, as in torch."""
    cases: tuple[dict[str, Any], ...] = (dict(lr=0.1, momentum=0.9), dict(lr=0.1))
    for kwargs in cases:
        mine = run(lambda ps: optgen.SGD(ps, fused=True, **kwargs), params_like(torch.float32), steps=3)
        theirs = run(lambda ps: torch.optim.SGD(ps, foreach=False, **kwargs), params_like(torch.float32), steps=3)
        assert_same_state(mine, theirs, **FLOAT32)
        assert any(mine.state.values()) == ("momentum" in kwargs)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_true_with_16_bit_parameters_like_torchs_fused(name, dtype):
    """bfloat16 / float16 parameters and state: the update computed in float and rounded to the
    storage type each step, as torch's fused CPU kernels do; 10 steps agree to one or two units
    in the last place of the 16-bit type."""
    kwargs = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    mine = run(lambda ps: getattr(optgen, name)(ps, fused=True, **kwargs), params_like(dtype), steps=10)
    # torch's fused SGD in 16 bits leaves its own for-loop's trajectory on tensors it splits
    # across threads (a momentum buffer 5.2 off after two steps of a 300 x 257 bfloat16 tensor,
    # tested below): compare SGD with torch's for-loop, which rounds after every op, so more ulps
    reference = dict(foreach=False) if name == "SGD" else dict(fused=True)
    theirs = run(lambda ps: getattr(torch.optim, name)(ps, **reference, **kwargs), params_like(dtype), steps=10)
    ulp = (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10) * (8 if name == "SGD" else 2)
    assert_same_state(mine, theirs, rtol=ulp, atol=ulp)


def test_torchs_fused_sgd_in_bfloat16_leaves_its_for_loop():
    """Why SGD is compared with torch's for-loop above (torch 2.13; if this starts failing,
    torch fixed it and the comparison above can use its fused kernel again)."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(300, 257, generator=g).bfloat16().requires_grad_()
    q = p.detach().clone().requires_grad_()
    fused, forloop = (torch.optim.SGD([x], lr=0.01, momentum=0.9, **kw) for x, kw in
                      ((p, dict(fused=True)), (q, dict(foreach=False))))
    grad = torch.randn(300, 257, generator=g).bfloat16()
    for _ in range(2):
        p.grad, q.grad = grad.clone(), grad.clone()
        fused.step()
        forloop.step()
    gap = (fused.state[p]["momentum_buffer"].float() - forloop.state[q]["momentum_buffer"].float()).abs().max()
    assert gap > 1.0


def test_fused_true_on_parameters_the_c_kernel_declines_runs_the_for_loop():
    """torch's fused CPU kernels take a transposed parameter; optgen's C kernel walks contiguous
    memory, so fused=True runs the for-loop kernel there (torch's single-tensor results), with a
    warning saying why."""
    results = []
    for lib in (optgen, torch.optim):
        p = torch.arange(12.0).reshape(4, 3).t().requires_grad_()  # a (3, 4) tensor with strides (1, 3)
        assert not p.is_contiguous()
        opt = lib.Adam([p], lr=0.1, fused=True)
        p.grad = torch.ones_like(p)
        if lib is optgen:
            with pytest.warns(UserWarning, match="not contiguous"):
                opt.step()
        else:
            opt.step()
        results.append(p.detach())
    torch.testing.assert_close(results[0], results[1], **FLOAT32)


def test_unsupported_tensors_get_a_clear_error():
    p = torch.zeros(4, 4, requires_grad=True)
    p.grad = torch.ones(4, 4).t()  # not contiguous
    opt = optgen.Adam([p])
    opt.implementation = "c"
    with pytest.warns(UserWarning, match="not contiguous; this group steps with the for-loop kernel"):
        opt.step()  # the for-loop's values: tests/runtime/test_launch_validation.py
    q = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="fused CPU kernels support .* not torch.int32"):
        # the dtype is checked before any library is needed
        c_launch.launch(None, "adam_default",  # type: ignore[arg-type]
                        tensors=[[q]], grads=[q], counters=[], lazy={}, hyperparameters=[])


def test_compiled_once_and_cached(tmp_path, monkeypatch):
    """The first use compiles into the cache directory; a new process (a new Library) loads the
    cached file without a compiler; a failed compile says why."""
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path))
    source = "void twice(int64_t n, void **t, void **g, void **c, const int64_t *numels, const int64_t *dims,\n" \
             "  const uint8_t *f, const double *h, int c64, int flags, const uint32_t *k)\n" \
             "{ ((scalar_t *)t[0])[0] *= 2; }\n"
    x = torch.ones(1)
    table = torch.tensor([x.data_ptr()])  # (alive until the call returns)
    c_launch.Library("test_cache", source).function(torch.float32, "twice")(1, table.data_ptr(), *[0] * 9)
    assert x.item() == 2.0
    assert len(list((tmp_path / "c").glob("*.so"))) == 1

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(c_launch.subprocess, "run", no_compiler)
    c_launch.Library("test_cache", source).function(torch.float32, "twice")  # cached: loaded, not compiled
    monkeypatch.undo()
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="compiling the C kernels of test_broken failed"):
        c_launch.Library("test_broken", source + "syntax error").function(torch.float32, "twice")


def test_grad_scaler_with_fused_true_on_cpu_like_torch():
    """fused=True tells GradScaler the optimizer unscales itself (as torch's fused optimizers):
    the step unscales the gradients and skips — counters included — a step with an inf."""
    results = []
    for lib in (optgen, torch.optim):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = lib.Adam(model.parameters(), lr=0.01, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for k in range(5):
            loss = model(torch.randn(16, 8)).pow(2).mean() * (float("inf") if k == 2 else 1.0)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        results.append(([p.detach().clone() for p in model.parameters()], opt.state[model.weight]["step"].item()))
    (ours, our_steps), (theirs, their_steps) = results
    assert our_steps == their_steps == 4.0
    torch.testing.assert_close(ours, theirs, **FLOAT32)


@pytest.mark.parametrize("name", ["Rprop", "Adamax", "Adam"])
def test_nan_and_inf_gradients_propagate_like_torch(name):
    """A NaN or inf gradient element goes where torch's for-loop sends it: sign(NaN) is 0
    (Rprop), maximum propagates NaN (Adamax, amsgrad) — the C kernel has no -ffast-math."""
    kwargs = dict(amsgrad=True) if name == "Adam" else {}
    results = []
    for lib in (optgen, torch.optim):
        p = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
        opt = getattr(lib, name)([p], lr=0.1, **kwargs)
        if lib is optgen:
            opt.implementation = "c"
        for g in ([0.5, float("nan"), -1.0, float("inf")], [0.5, 1.0, -1.0, 2.0]):
            p.grad = torch.tensor(g)
            opt.step()
        results.append((p.detach(), dict(opt.state[p])))
    (ours, our_state), (theirs, their_state) = results
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    for key, value in their_state.items():
        torch.testing.assert_close(our_state[key], value, equal_nan=True)


def test_checkpoint_from_torchs_fused_continues_in_the_c_kernel():
    """A state_dict saved by torch's fused Adam mid-training loads into optgen's fused Adam (new
    state tensors: new address tables) and the two continue alike; and back."""
    ours_params, their_params = params_like(torch.float32), params_like(torch.float32)
    theirs = run(lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True), their_params, steps=5)
    ours = optgen.Adam(ours_params, lr=0.01, fused=True)
    with torch.no_grad():
        for p, q in zip(ours_params, their_params, strict=True):
            p.copy_(q)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # (loading shares tensors otherwise)
    for k in range(5):
        g = torch.Generator().manual_seed(500 + k)
        for p, q in zip(ours_params, their_params, strict=True):
            p.grad = q.grad = torch.randn(p.shape, generator=g)
        ours.step()
        theirs.step()
    assert_same_state(ours, theirs, **FLOAT32)
    back = torch.optim.Adam(their_params, lr=0.01, fused=True)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    saved, loaded = ours.state_dict()["state"], back.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for i in saved:
        torch.testing.assert_close(loaded[i], saved[i], rtol=0, atol=0)


def test_kernels_compile_without_openmp(tmp_path, monkeypatch):
    """A compiler without -fopenmp (clang on macOS) still gets working, single-threaded kernels."""
    import importlib

    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(c_launch, "FLAGS", tuple(f for f in c_launch.FLAGS if f != "-fopenmp"))
    adam_c = importlib.import_module("optgen.generated.adam_c")
    library = c_launch.Library("adam_c_serial", adam_c.SOURCE)
    kernel = adam_c.LAUNCH
    monkeypatch.setattr(kernel, "library", library)
    mine = run(lambda ps: optgen.Adam(ps, lr=0.01, fused=True), params_like(torch.float64), steps=5)
    theirs = run(lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True), params_like(torch.float64), steps=5)
    assert_same_state(mine, theirs, rtol=1e-12, atol=1e-14)
    assert list((tmp_path / "c").glob("adam_c_serial_double_*.so"))


@pytest.mark.parametrize("name,kwargs",
                         [("Adafactor", dict(lr=0.02, weight_decay=0.1)), ("Lamb", dict(weight_decay=0.1))])
def test_kernels_that_reduce_walk_each_tensor_several_times(name, kwargs):
    """Adafactor's norms per row and per column and both optimizers' whole-tensor norms are
    accumulated in walks split across threads (Note [Sweeps]): on tensors above PARALLEL_MIN, of
    every rank, the C kernel follows the for-loop kernel to float64 rounding."""
    shapes = ((3, 170, 150), (70000,), (400, 200), (5, 1, 3), ())
    mine = run(lambda ps: _implementation(getattr(optgen, name)(ps, **kwargs), "c"), params_like(torch.float64, shapes))
    theirs = run(lambda ps: getattr(optgen, name)(ps, foreach=False, **kwargs), params_like(torch.float64, shapes))
    assert_same_state(mine, theirs, rtol=1e-12, atol=1e-14)


def test_a_state_of_the_wrong_shape_is_refused():
    """Adafactor's row_var is the parameter's shape with the last dimension 1; the kernel reads it
    by that shape, so a state of another shape (here: the column variance's) is an error."""
    p = torch.randn(6, 4, requires_grad=True)
    opt = optgen.Adafactor([p])
    opt.implementation = "c"
    p.grad = torch.randn(6, 4)
    opt.step()
    opt.state[p]["row_var"] = torch.zeros(1, 4)
    with pytest.raises(RuntimeError, match=r"the state of parameter 0 is torch.float32 \(1, 4\)"):
        opt.step()


def _implementation(opt, name):
    opt.implementation = name
    return opt


def test_a_state_final_before_the_last_walk_is_stored_by_the_walk_that_computes_it():
    """Lamb's moments are final in the walk that sums the norms (Note [Sweeps]): that walk stores
    them, and the last walk loads them instead of recomputing them, so it reads no gradient.
    Not with bfloat16 state (the library's STATE_BF16 version: Note [Low-precision state in C]):
    its last walk recomputes them, and stores them rounded."""
    from optgen.generated import lamb_c

    low_state, plain = source_version(lamb_c.SOURCE, "STATE_BF16"), source_version(lamb_c.SOURCE)

    def walks(source):
        found = re.split(r"^/\* walk \d+ of lamb_step", source, flags=re.M)[1:]
        return found[0].split("\n}\n")[0], found[1].split("\n}\n")[0]

    first, last = walks(plain)
    assert "exp_avg_p[i] = lowp_store(exp_avg, exp_avg_key, i);" in first and "exp_avg_sq_p[i] = " in first
    assert "grad_p" not in last and "exp_avg_p[i] = " not in last and "param_p[i] = from_compute(param);" in last
    first, last = walks(low_state)
    assert "exp_avg_p[i] = " not in first and "exp_avg_sq_p[i] = " not in first
    assert "grad_p" in last and "exp_avg_p[i] = lowp_store(exp_avg, exp_avg_key, i);" in last
    # int8 state (Note [Blockwise 8-bit state in C]): as bfloat16, the last walk recomputes the
    # moments, into block buffers that it quantizes after each block of 256
    first, last = walks(source_version(lamb_c.SOURCE, "STATE_INT8"))
    assert "exp_avg_p[i] = " not in first and "exp_avg_stage" not in first
    assert "grad_p" in last and "exp_avg_stage[i - i0] = exp_avg;" in last
    assert "q8_store(exp_avg_stage, i0, i1, exp_avg_p, exp_avg_scale, 1);" in last
    assert "q8_store(exp_avg_sq_stage, i0, i1, exp_avg_sq_p, exp_avg_sq_scale, 0);" in last


OLD_VALUE = '''
[optimizer]
name = "OldValue"
signature = "lr, beta, *, foreach"

[hyperparameters]
lr = 1e-2
beta = 0.9

[state]
step = "0"
buf = "zeros_like(param)"

[update]
rule = """
step = step + 1
u = grad + buf
buf = lerp(buf, grad, 1 - beta)
n = norm(buf)
param = param - lr * (u + buf) / (n + 1)
"""
'''


def test_a_state_whose_old_value_a_later_walk_reads_is_stored_by_the_last_walk(tmp_path, capsys):
    """``buf`` is final in the walk that sums its norm, but ``u`` reads its old value and the last
    walk recomputes ``u``: stored early, that walk would read the new one."""
    from optgen.tools.verify import verify_all

    (tmp_path / "old_value.toml").write_text(OLD_VALUE)
    assert verify_all(steps=5, sources=[tmp_path / "old_value.toml"]), capsys.readouterr().out


@pytest.mark.parametrize("name", ["Adam", "Lamb", "Adafactor", "ASGD"])
def test_small_tensors_stepped_in_parallel_equal_one_thread(name):
    """Note [Small tensors in parallel]: with two threads the small tensors are shared out between
    them (and the large one split); every bit equals the one-thread step."""
    shapes = [(7, 13)] * 300 + [(100,)] * 400 + [(300, 300)]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            g = torch.Generator().manual_seed(0)
            ps = [torch.randn(s, generator=g) for s in shapes]
            opt = getattr(optgen, name)(ps, lr=1e-2)
            opt.implementation = "c"
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
            results.append(ps)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
