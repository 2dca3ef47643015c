"""Shared set-up for the Triton backend's tests.

The kernels run on CPU tensors in Triton's interpreter: optgen.runtime.triton_launch interprets a
kernel whenever its tensors are on the CPU, so these tests need no GPU and no TRITON_INTERPRET=1
(which would also interpret the real-CUDA tests of test_triton_cuda.py, run when a GPU is
present).  One test (test_triton_runtime.py) runs a step under TRITON_INTERPRET=1 in a
subprocess, the path Triton documents.
"""
import pytest


@pytest.fixture
def small_chunks(monkeypatch):
    """BLOCK = 8 and CHUNK = 16 elements, so the tests' tiny tensors span several loop iterations
    and several programs (the defaults, 512 and 16384, would give each tensor one program)."""
    from optgen.runtime import triton_launch

    monkeypatch.setitem(triton_launch.CONFIG, "BLOCK", 8)
    monkeypatch.setitem(triton_launch.CONFIG, "CHUNK", 16)
