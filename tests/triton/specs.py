"""The specs the Triton backend generates kernels for (those it does not decline)."""
from optgen.backends.triton import BACKEND
from optgen.build import compile_all

# A spec that shares its parent's kernels (AdamW runs Adam's) has no module of its own.
COMPILED = [c for c in compile_all() if BACKEND.unsupported(c) is None and not c.spec.kernels_from]
