"""The native step guard (Note [Native step guard] in optgen/runtime/step_guard.py): when it is built,
what happens where it cannot be, and that its library is trusted like the kernels'.  That both
guards see every change between steps is test_cached_step.py's job (each of its tests runs with
each guard)."""
from __future__ import annotations

import array
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import optgen
from optgen.runtime import c_launch, native_cache, step_guard

pytestmark = pytest.mark.skipif(not c_launch.available(), reason="no C compiler")


def steps(n_params: int, n_steps: int = 3):
    """An Adam on ``n_params`` small tensors, stepped ``n_steps`` times; (optimizer, params)."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(4, generator=g).requires_grad_() for _ in range(n_params)]
    opt = optgen.Adam(ps, lr=1e-2)
    for _ in range(n_steps):
        for p in ps:
            p.grad = torch.randn(4, generator=g)
        opt.step()
    return opt, ps


def guard_of(opt):
    (cached,) = opt._cached_steps.values()
    return cached.guard


WITHOUT_GUARD = textwrap.dedent("""
    import logging, torch, optgen
    from optgen.runtime import step_guard
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(4, generator=g).requires_grad_() for _ in range(100)]
    ref = [p.detach().clone().requires_grad_() for p in ps]
    opt, torch_opt = optgen.Adam(ps, lr=1e-2), torch.optim.Adam(ref, lr=1e-2, foreach=False)
    for k in range(4):
        for p, q in zip(ps, ref):
            p.grad = torch.randn(4, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        torch_opt.step()
        if k == 0:
            print("native:", step_guard.native(wait=True))
    (cached,) = opt._cached_steps.values()
    print("guard:", type(cached.guard).__name__)
    print("close:", all(torch.allclose(p, q, rtol=1e-6, atol=1e-7) for p, q in zip(ps, ref)))
""")


@pytest.mark.parametrize("cxx", ["/nonexistent/c++", "false"])
def test_without_a_working_cxx_compiler_steps_keep_the_python_guard(cxx, tmp_path):
    result = subprocess.run([sys.executable, "-c", WITHOUT_GUARD], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CXX": cxx, "OPTGEN_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "native: None" in result.stdout and "guard: PythonGuard" in result.stdout
    assert "close: True" in result.stdout
    said = [line for line in result.stderr.splitlines() if "native step guard is unavailable" in line]
    assert len(said) == 1 and said[0].startswith("INFO"), result.stderr[-2000:]
    assert ("no C++ compiler" if cxx.startswith("/") else "compiling step_guard.cpp failed") in said[0]


def test_a_large_group_starts_the_build_and_switches_to_it(monkeypatch):
    module = step_guard.native(wait=True)
    if module is None:
        pytest.skip(f"no native step guard here: {step_guard.unavailable()}")
    built = []

    def build():  # the real build's outcome, without its compile
        built.append(True)
        step_guard._BUILD.module = module

    monkeypatch.setattr(step_guard, "_BUILD", step_guard._Build())
    monkeypatch.setattr(step_guard, "_build", build)
    opt, _ = steps(step_guard.NATIVE_FROM - 1)
    assert not built and isinstance(guard_of(opt), step_guard.PythonGuard)  # a small group: not worth a compile
    opt, _ = steps(step_guard.NATIVE_FROM, n_steps=1)
    thread = step_guard._BUILD.thread
    assert thread is not None
    thread.join()
    assert built == [True]
    opt.step()  # the first step after the build: the checked path, which binds with the native guard
    assert isinstance(guard_of(opt), step_guard.NativeGuard)


def test_the_environment_switch_keeps_the_python_guard(monkeypatch):
    monkeypatch.setattr(step_guard, "_BUILD", step_guard._Build())
    monkeypatch.setenv("OPTGEN_STEP_GUARD", "python")
    opt, _ = steps(step_guard.NATIVE_FROM)
    assert step_guard._BUILD.thread is None and isinstance(guard_of(opt), step_guard.PythonGuard)


def test_revalidate_refuses_inconsistent_arguments_without_crashing():
    module = step_guard.native(wait=True)
    if module is None:
        pytest.skip(f"no native step guard here: {step_guard.unavailable()}")
    opt, ps = steps(3)
    guard = guard_of(opt)
    assert isinstance(guard, step_guard.NativeGuard)
    args = [opt.param_groups[0]["params"], guard.bound.group_params, guard.with_grad, opt.state, guard.keys,
            guard.objects, guard.expected, guard.table]
    assert module.revalidate(*args) is True
    assert list(guard.table) == [p.grad.data_ptr() for p in ps]
    for index, wrong in [(7, array.array("q", [0])),              # a table of another length
                         (6, guard.expected[:-8]),                  # records cut short
                         (2, b"\x01"),                              # with_grad of another length
                         (5, guard.objects[:-1]),                   # one state object missing
                         (7, array.array("i", [0, 0, 0, 0, 0, 0]))]:  # a table of 4-byte items
        with pytest.raises(ValueError, match="inconsistent sizes"):
            module.revalidate(*args[:index], wrong, *args[index + 1:])
    for index, wrong in [(0, tuple(args[0])), (3, list(opt.state.items())), (4, list(guard.keys)), (7, b"x" * 24)]:
        with pytest.raises((TypeError, BufferError)):
            module.revalidate(*args[:index], wrong, *args[index + 1:])
    assert module.snapshot([ps[0], "not a tensor"]) is None
    assert module.snapshot([ps[0], torch.randn(3, 4).t()]) is None  # not contiguous: no launch addresses it
    assert module.snapshot([ps[0], torch.randn(3).to_sparse()]) is None
    # a group's params replaced by a tuple: the checked path, not a TypeError out of step()
    opt.param_groups[0]["params"] = tuple(opt.param_groups[0]["params"])
    assert guard(opt, opt.param_groups[0]) is None


DROPPED_DURING_LOOKUP = textwrap.dedent("""
    import torch, optgen
    from optgen.runtime import step_guard
    assert step_guard.native(wait=True) is not None
    ps = [torch.randn(4).requires_grad_() for _ in range(3)]
    opt = optgen.Adam(ps, lr=1e-2)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(4)
        opt.step()
    (cached,) = opt._cached_steps.values()
    assert type(cached.guard).__name__ == "NativeGuard"
    armed = [False]

    class DropsTheState:  # a key the lookup of "exp_avg" compares with, which drops the dict looked in
        def __hash__(self):
            return hash("exp_avg")

        def __eq__(self, other):
            if armed[0]:
                armed[0] = False
                del opt.state[ps[1]]
            return False

    opt.state[ps[1]] = {DropsTheState(): 0, **opt.state[ps[1]], **{f"k{i}": i for i in range(40)}}
    armed[0] = True
    opt.step()
    print("stepped", armed[0], ps[1] in opt.state)
""")


def test_a_state_dict_dropped_during_its_lookup_never_crashes():
    """The state lookups call Python (a key's ``__eq__``), which may drop the dict being looked in
    from the optimizer's state: the native guard holds it meanwhile (it read freed memory: a
    segfault)."""
    if step_guard.native(wait=True) is None:
        pytest.skip(f"no native step guard here: {step_guard.unavailable()}")
    result = subprocess.run([sys.executable, "-c", DROPPED_DURING_LOOKUP], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.split() == ["stepped", "False", "False"]


GRADIENT_REPLACED_DURING_LOOKUP = textwrap.dedent("""
    import sys, torch, optgen
    from optgen.runtime import step_guard
    if sys.argv[1] == "native":
        assert step_guard.native(wait=True) is not None
    else:
        step_guard.native = lambda **_: None
    n = 1 << 20  # 4 MiB gradients: mapped for themselves (MALLOC_MMAP_THRESHOLD_), unmapped when freed
    ps = [torch.zeros(n).requires_grad_() for _ in range(2)]
    opt = optgen.Adam(ps, lr=1.0)
    for _ in range(2):
        for p in ps:
            p.grad = torch.ones(n)
        opt.step()
    armed = [False]

    class ReplacesAGradient:  # a key the lookup of "exp_avg" compares with
        def __hash__(self):
            return hash("exp_avg")

        def __eq__(self, other):
            if armed[0]:
                armed[0] = False
                ps[0].grad = torch.full((n,), -1.0)
            return False

    opt.state[ps[1]] = {ReplacesAGradient(): 0, **opt.state[ps[1]]}
    for p in ps:
        p.grad = torch.ones(n)
    armed[0] = True
    opt.step()
    (cached,) = opt._cached_steps.values()
    print(type(cached.guard).__name__, armed[0], ps[0].unique().numel())
""")


@pytest.mark.parametrize("kind", ["python", "native"])
def test_a_gradient_replaced_during_the_state_lookups_is_never_read_freed(kind):
    """The state lookups call Python (a key's ``__eq__``; a tensor's ``__hash__`` under a torch
    function mode), which may replace a gradient: the guards read the gradients after them, so the
    table holds no freed one (it did: a segfault, or the freed memory's bytes read as a gradient).
    The step is then one with the new gradient (the checked path, which holds the gradients it
    collected, steps with the old one: either is one gradient's step, every element alike)."""
    if kind == "native" and step_guard.native(wait=True) is None:
        pytest.skip(f"no native step guard here: {step_guard.unavailable()}")
    result = subprocess.run([sys.executable, "-c", GRADIENT_REPLACED_DURING_LOOKUP, kind], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    guard, armed, values = result.stdout.split()
    assert guard == f"{kind.capitalize()}Guard" and armed == "False"
    assert values == "1"  # (one value: every element had the same gradient and state)


def test_a_tampered_guard_library_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    if step_guard.native(wait=True) is None:
        pytest.skip(f"no native step guard here: {step_guard.unavailable()}")
    good = step_guard._compiled()  # the verified library in this session's cache
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path))
    directory = native_cache.writable(native_cache.cache_dir())
    planted = directory / good.name
    shutil.copy(good, planted)
    shutil.copy(good.with_name(good.name + ".sha256"), planted.with_name(planted.name + ".sha256"))
    assert step_guard._compiled() == planted  # published whole: loaded as it is
    with open(planted, "ab") as f:
        f.write(b"\x00")  # one byte more: not the library published under this name
    compiles = []
    real_run = subprocess.run

    def compile_by_copying(command, **kwargs):  # the build, without its ten seconds
        if "-o" in command:
            compiles.append(command)
            shutil.copy(good, command[command.index("-o") + 1])
            return subprocess.CompletedProcess(command, 0, "", "")
        return real_run(command, **kwargs)

    monkeypatch.setattr(subprocess, "run", compile_by_copying)
    assert step_guard._compiled() == planted and len(compiles) == 1
    assert native_cache.verified(planted) and planted.read_bytes() == good.read_bytes()


def test_the_host_overhead_tool_times_every_row(capsys):
    from optgen.tools import host_overhead

    real = step_guard.native
    assert host_overhead.main(["--count", "20", "--size", "10", "--steps", "3"]) == 0
    assert step_guard.native is real  # the tool's Python-guard rows leave the process as it was
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    timed = [r for r in rows if r[1].strip() in ("kept", "new")]
    guards = ["native", "python"] if step_guard.native(start=False) is not None else ["python"]
    assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in timed] == \
        [(g, grads, caches) for g in guards for grads, caches in [("kept", "warm"), ("new", "warm"), ("new", "cold")]]
    for r in timed:
        assert float(r[3]) > 0 and float(r[4]) > 0 and float(r[5].strip().rstrip("×")) > 0
    parts = [r for r in rows if "parts" in r[1]]
    assert len(parts) == len(guards) and all("guard" in r[2] and "kernel" in r[2] for r in parts)


FORK = """
import os, sys, threading
from optgen.runtime import step_guard
step_guard._BUILD.lock.acquire()  # as a build thread holds it for a moment
pid = os.fork()
if pid == 0:
    done = threading.Event()
    threading.Thread(target=lambda: (step_guard.native(start=False), done.set()), daemon=True).start()
    os._exit(0 if done.wait(20) else 3)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_child_forked_while_the_build_lock_is_held_does_not_hang():
    result = subprocess.run([sys.executable, "-c", FORK], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OPTGEN_STEP_GUARD": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "child exit 0" in result.stdout
