"""The specs the Triton backend generates kernels for (those it does not decline)."""
from optgen.backends.triton import BACKEND
from optgen.build import compile_all

COMPILED = [c for c in compile_all() if BACKEND.unsupported(c) is None]
