"""optgen: PyTorch optimizers compiled from declarative specs.

    import optgen
    opt = optgen.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)   # as torch.optim.AdamW

Every optimizer class here is generated from specs/optimizers/*.toml into generated/ by
`optgen build`; ``optgen.Optimizer`` is the runtime base they share.  Importing optgen loads only
that generated Python code: no compiler, no Triton, no C toolchain.
"""
from __future__ import annotations

from optgen import _generated
from optgen.runtime.optimizer import Optimizer

_package = _generated.load()
OPTIMIZERS = _package.OPTIMIZERS
globals().update(OPTIMIZERS)

__all__ = ["Optimizer", "OPTIMIZERS", *OPTIMIZERS]
__version__ = "0.1.0"
