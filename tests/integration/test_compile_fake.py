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
