"""The fused C kernel traced on FakeTensors (make_fx), outside torch.compile: the launch is the custom
op ``optgen::c_step`` (Note [C kernels as custom ops] in optgen/runtime/c_launch.py).  A FakeTensor's
``data_ptr()`` is no address: the kernel launched on one wrote through it and the process died of a
segmentation fault, hence the subprocess.  (The Triton kernels on FakeTensors:
test_compile_triton.py.)"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from optgen.runtime import c_launch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRACE = """
import torch, optgen
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

with FakeTensorMode():
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((3, 4), (3,), (2, 3), (2,))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = optgen.{name}(params, fused=True, {kwargs})

def step(*tensors):
    opt.step()
    return list(params)

gm = make_fx(step, tracing_mode="fake")(*params)
print([str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "optgen" in str(n.target)])
"""


@pytest.mark.skipif(not c_launch.available(), reason="needs a C compiler")
@pytest.mark.parametrize("name,kwargs", [("Adam", ""), ("SGD", "lr=0.1, momentum=0.9")], ids=["Adam", "SGD-momentum"])
def test_fused_c_step_traces_on_fake_tensors(name, kwargs):
    """A first fused C step over FakeTensors traces to a graph whose one optgen node is ``c_step``."""
    result = subprocess.run([sys.executable, "-c", TRACE.format(name=name, kwargs=kwargs)], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "['optgen.c_step.default']", result.stdout


UNKNOWN_MODULE = """
import sys, torch
import optgen.runtime.c_launch, optgen.runtime.triton_launch  # registers both ops
marker = "optgen_test_marker_module_that_must_not_be_imported"
t = torch.zeros(2)
for call in (
    lambda: torch.ops.optgen.c_step(marker, [t], [], [t], [], 1, [], [0.1], 0),
    lambda: torch.ops.optgen.triton_step(marker, [t, t], [True, True], [], [], 1, [], [0.1], [], [], [], None, None),
):
    try:
        call()
    except RuntimeError as e:
        assert "no generated kernel module" in str(e), e
    else:
        raise AssertionError("an op named an unknown module and ran")
    assert marker not in sys.modules
print("ok")
"""


def test_ops_run_only_kernels_this_process_loaded(tmp_path):
    # The ops take the generated module's name from the graph: a name no generated module
    # registered is an error, never an import (a module found on sys.path would run its code).
    (tmp_path / "optgen_test_marker_module_that_must_not_be_imported.py").write_text(
        "raise SystemExit('imported a module an op named')\n")
    path = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    result = subprocess.run([sys.executable, "-c", UNKNOWN_MODULE], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
