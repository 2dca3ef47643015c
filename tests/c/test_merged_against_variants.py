"""The C module's one function per optimizer (every flag variant merged: optgen.passes.
merge_variants.merged_program) computes bit for bit what the per-variant C functions of
PER_VARIANT computed, for every built-in spec, flag combination and hyperparameter configuration,
in float32 and float64, and bfloat16 for a few.

The per-variant modules are read from git (the commit before the merge) and run with today's
runtime (their C functions take no `flags` argument: the extra one is ignored by the calling
convention); without git history the test is skipped.
"""
import dataclasses
import subprocess
import types
from pathlib import Path

import pytest
import torch

from optgen.build import compile_all
from optgen.runtime import c_launch
from optgen.verify import configurations, run_backend

#: the last commit whose generated/<spec>_c.py held one C function per flag combination (VARIANTS)
PER_VARIANT = "c1b9172"
ROOT = Path(__file__).resolve().parents[2]
COMPILED = [c for c in compile_all() if (ROOT / "generated" / f"{c.spec.name.lower()}_c.py").exists()]
CASES = [(c, v) for c in COMPILED for v in c.variants]
SHAPES = ((3, 5), (70000,), (17, 33), ())  # one above PARALLEL_MIN: the OpenMP loops

pytestmark = pytest.mark.skipif(not c_launch.available(), reason="no C compiler")


def _old_module(name: str, monkeypatch) -> types.ModuleType:
    try:
        source = subprocess.run(["git", "show", f"{PER_VARIANT}:generated/{name}_c.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git history with {PER_VARIANT} is not available")
    module = types.ModuleType(f"per_variant_{name}_c")
    exec(compile(source, f"{PER_VARIANT}:generated/{name}_c.py", "exec"), module.__dict__)
    return module


def _id(case):
    compiled, variant = case
    on = [k for k, v in variant.flags if v]
    return compiled.spec.name + ("[" + ",".join(on) + "]" if on else "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_merged_kernel_matches_per_variant_kernels(case, monkeypatch):
    import importlib

    compiled, variant = case
    name = compiled.spec.name.lower()
    new = importlib.import_module(f"optgen.generated.{name}_c")
    old = _old_module(name, monkeypatch)
    dtypes = (torch.float32, torch.float64) + ((torch.bfloat16,) if compiled.spec.name in ("Adam", "SGD") else ())
    for kwargs in configurations(compiled, dict(variant.flags)):
        for dtype in dtypes:
            mine = run_backend(compiled, "c", kwargs, 4, dtype, shapes=SHAPES)
            calls = []

            def per_variant(**arguments):
                calls.append(1)
                old.KERNEL.step(**arguments)

            with monkeypatch.context() as m:
                m.setattr(new, "KERNEL", dataclasses.replace(old.KERNEL, step=per_variant))
                theirs = run_backend(compiled, "c", kwargs, 4, dtype, shapes=SHAPES)
            assert calls, "the per-variant kernel did not run"
            _assert_identical(mine, theirs, (kwargs, dtype))


def _assert_identical(mine, theirs, what) -> None:
    (p1, s1), (p2, s2) = mine, theirs
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a.view(-1).view(torch.uint8) if a.dim() else a.reshape(1).view(torch.uint8),
                           b.view(-1).view(torch.uint8) if b.dim() else b.reshape(1).view(torch.uint8)), what
    assert [sorted(s) for s in s1] == [sorted(s) for s in s2], what
    for x, y in zip(s1, s2, strict=True):
        for key in x:
            u, v = x[key], y[key]
            if isinstance(u, torch.Tensor):
                assert torch.equal(u.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), (what, key)
            else:
                assert u == v, (what, key)


def test_the_comparison_can_fail():
    """A one-ulp difference in one element is noticed."""
    a = torch.ones(3)
    b = a.clone()
    b[1] = torch.nextafter(b[1], torch.tensor(2.0))
    _assert_identical(([a], [{}]), ([a.clone()], [{}]), "same")
    with pytest.raises(AssertionError):
        _assert_identical(([a], [{}]), ([b], [{}]), "differs")
