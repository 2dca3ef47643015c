"""The C kernel cache (Note [Kernel cache] in optgen/runtime/native_cache.py): private directories,
verified entries, and compiler trouble that falls back to the for-loop like a missing compiler.
Everything that loads a possibly damaged library runs in a subprocess: a SIGBUS fails the test."""
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

#: doubles t[0][0] in the library's scalar_t, prints the result and the dtype's library file
TWICE = r'''
import sys, torch
from optgen.runtime import c_launch
SOURCE = ("void twice(int64_t n, void **t, void **g, void **c, const int64_t *numels, const int64_t *dims,\n"
          "  const uint8_t *f, const double *h, int c64, int flags, const uint32_t *k)\n"
          "{ ((scalar_t *)t[0])[0] *= 2; }\n")
for dtype in (torch.float32, torch.float64):
    x = torch.full((2,), 1.5, dtype=dtype)
    table = torch.tensor([x.data_ptr()])
    c_launch.Library("test_cache", SOURCE).function(dtype, "twice")(1, table.data_ptr(), 0, 0, 0, 0, 0, 0, 0, 0, 0)
    print(dtype, x.tolist())
'''
TWICE_OUT = "torch.float32 [3.0, 1.5]\ntorch.float64 [3.0, 1.5]\n"

#: three fused Adam steps against torch's for-loop Adam, bit for bit; prints the warnings
ADAM = r'''
import warnings, torch, optgen
torch.manual_seed(0)
w = torch.randn(5, 3)
ours, theirs = w.clone().requires_grad_(), w.clone().requires_grad_()
opts = optgen.Adam([ours], lr=0.1, fused=True), torch.optim.Adam([theirs], lr=0.1, foreach=False)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for step in range(3):
        for p, opt in zip((ours, theirs), opts):
            p.grad = torch.full_like(p, 0.5) * (step + 1)
            opt.step()
assert torch.equal(ours, theirs), (ours, theirs)
for w in caught:
    print("WARNING:", w.message)
print("OK")
'''


def run(code, cache, **env):
    environment = {**os.environ, "OPTGEN_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                          timeout=300)


def libraries(cache):
    return sorted((cache / "c").glob("*.so"))


def _foreign_library(tmp_path) -> tuple[bytes, Path]:
    """A valid library with the kernel's symbol whose constructor writes a marker file."""
    marker = tmp_path / "foreign-ran"
    source = tmp_path / "foreign.c"
    source.write_text('#include <stdio.h>\n#include <stdint.h>\n'
                      '__attribute__((constructor)) static void mark(void) {\n'
                      f'  FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'
                      "void optgen_set_num_threads(int n) {}\n"
                      "void twice(int64_t n, void **t) { ((float *)t[0])[0] = 42; }\n")
    library = tmp_path / "foreign.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library.read_bytes(), marker


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "swapped", "foreign"])
def test_damaged_entry_is_rebuilt_not_loaded(tmp_path, damage):
    first = run(TWICE, tmp_path)
    assert first.returncode == 0 and first.stdout == TWICE_OUT, first.stderr
    single, double = libraries(tmp_path)  # names: test_cache_double_*, test_cache_float_*
    assert "_double_" in single.name and "_float_" in double.name
    single, double = double, single
    data = single.read_bytes()
    foreign, marker = _foreign_library(tmp_path)
    damaged = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(len(data)),
               "swapped": double.read_bytes(), "foreign": foreign}[damage]
    single.write_bytes(damaged)
    second = run(TWICE, tmp_path)
    assert second.returncode == 0, second.stderr  # no SIGBUS, no "invalid ELF header"
    assert second.stdout == TWICE_OUT  # the float32 kernel, not the float64 one
    assert single.read_bytes() != damaged and len(libraries(tmp_path)) == 2
    assert not marker.exists()  # the foreign library's constructor never ran


def test_planted_library_in_group_writable_cache_is_refused(tmp_path):
    """Another user who can write the cache plants a library (and its digest file): it is never
    loaded — its constructor never runs — and fused=True warns once and runs the for-loop."""
    cache = tmp_path / "cache"
    first = run(ADAM, cache)
    assert first.returncode == 0 and "WARNING" not in first.stdout, first.stdout + first.stderr
    marker = tmp_path / "planted"
    source = tmp_path / "evil.c"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void plant(void) {\n'
                      f'  FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'
                      "void optgen_set_num_threads(int n) {}\n")
    evil = tmp_path / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(evil), str(source)], check=True)
    planted = libraries(cache)
    assert planted
    for target in planted:  # with matching digests: the attacker can write those too
        shutil.copyfile(evil, target)
        digest = subprocess.run(["sha256sum", str(target)], capture_output=True, text=True).stdout.split()[0]
        target.with_name(target.name + ".sha256").write_text(f"{digest} {target.name}\n")
    os.chmod(cache / "c", 0o775)
    second = run(ADAM, cache)
    assert second.returncode == 0, second.stderr
    assert not marker.exists()
    warnings = [line for line in second.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "runs its for-loop kernel" in warnings[0] \
        and "writable by group or others" in warnings[0], second.stdout


def test_pre_created_fallback_directory_is_refused(tmp_path):
    """Where the cache cannot be created, optgen-<uid> in the temporary directory is used — and
    refused when someone else could have made it first (here: mode 0777)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / f"optgen-{os.getuid()}").mkdir(mode=0o777)
    os.chmod(tmp / f"optgen-{os.getuid()}", 0o777)
    result = run(ADAM, blocker / "cache", TMPDIR=str(tmp))
    assert result.returncode == 0, result.stderr
    assert "writable by group or others" in result.stdout and result.stdout.count("WARNING") == 1
    assert not list(tmp.rglob("*.so"))
    os.chmod(tmp / f"optgen-{os.getuid()}", 0o700)  # private: used
    result = run(TWICE, blocker / "cache", TMPDIR=str(tmp))
    assert result.stdout == TWICE_OUT, result.stderr
    assert len(list((tmp / f"optgen-{os.getuid()}" / "c").glob("*.so"))) == 2


def test_failing_compiler_warns_once_and_runs_the_for_loop(tmp_path):
    counting = ("import subprocess\nfrom optgen.runtime import c_launch\ncalls = []\n_run = subprocess.run\n"
                "def counted(*a, **k):\n    calls.append(a[0])\n    return _run(*a, **k)\n"
                "c_launch.subprocess.run = counted\n") + ADAM + "print('COMPILES', len(calls))\n"
    result = run(counting, tmp_path, CC="/bin/false")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("WARNING") == 1, result.stdout
    assert ("runs its for-loop kernel on these CPU parameters: optgen: compiling the C kernels of "
            "optgen.generated.adam_c failed:\n/bin/false exited with status 1\nOK") in result.stdout
    assert "COMPILES 4" in result.stdout  # --version, then one try per dropped flag — once, not per step
    assert not libraries(tmp_path)


@pytest.mark.parametrize("cc", ["gcc -O2", "ccache gcc"])
def test_compiler_with_arguments(tmp_path, cc):
    if shutil.which(cc.split()[0]) is None:
        pytest.skip(f"no {cc.split()[0]}")
    result = run(TWICE, tmp_path, CC=cc)
    assert result.returncode == 0 and result.stdout == TWICE_OUT, result.stderr


def test_cache_directories_are_private_whatever_the_umask(tmp_path):
    cache = tmp_path / "a" / "b"
    result = run("import os; os.umask(0)\n" + TWICE, cache)
    assert result.stdout == TWICE_OUT, result.stderr
    for directory in (tmp_path / "a", cache, cache / "c"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    os.chmod(cache / "c", 0o700 | stat.S_IWOTH)
    result = run(TWICE, cache)
    assert result.returncode != 0 and "writable by group or others" in result.stderr


def test_stale_build_directories_are_removed(tmp_path):
    (tmp_path / "c").mkdir(mode=0o700)
    old, fresh = tmp_path / "c" / "build-old", tmp_path / "c" / "build-fresh"
    old.mkdir()
    fresh.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    result = run(TWICE, tmp_path)
    assert result.stdout == TWICE_OUT, result.stderr
    assert not old.exists() and fresh.exists()


def test_kill_during_a_compile_leaves_nothing_that_is_loaded_and_is_cleaned_up(tmp_path):
    # A compiler that says it started building the library, then hangs: the process is killed
    # (SIGKILL) mid-compile.
    started = tmp_path / "started"
    slow_cc = tmp_path / "slow-cc"
    slow_cc.write_text(f'#!/bin/sh\ncase "$*" in *-shared*) touch {started}; sleep 60;; esac\nexec gcc "$@"\n')
    slow_cc.chmod(0o755)
    cache = tmp_path / "cache"
    environment = {**os.environ, "OPTGEN_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), "CC": str(slow_cc)}
    proc = subprocess.Popen([sys.executable, "-c", TWICE], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert started.exists(), proc.communicate()[1]
    os.killpg(proc.pid, signal.SIGKILL)  # the process and its compiler, as a job scheduler kills
    proc.wait()
    assert proc.returncode == -9
    assert libraries(cache) == []  # nothing was published
    left = [p for p in (cache / "c").iterdir() if p.is_dir()]
    assert left, "expected the killed compile's build folder"
    # The next process compiles afresh (a working compiler) and, once the folder is old enough
    # that no live compile can own it, removes it.
    two_hours_ago = time.time() - 7200
    for p in left:
        os.utime(p, (two_hours_ago, two_hours_ago))
    result = run(TWICE, cache)
    assert result.returncode == 0 and result.stdout == TWICE_OUT, result.stderr
    assert not any(p.exists() for p in left)
    assert len(libraries(cache)) == 2
