"""The kernel backends, in the order their modules are generated and listed in ``_kernels``."""
from __future__ import annotations

from optgen.backends.c import BACKEND as C
from optgen.backends.differentiable import BACKEND as DIFFERENTIABLE
from optgen.backends.foreach import BACKEND as FOREACH
from optgen.backends.forloop import BACKEND as FORLOOP
from optgen.backends.triton import BACKEND as TRITON

KERNEL_BACKENDS = (FORLOOP, FOREACH, DIFFERENTIABLE, TRITON, C)
