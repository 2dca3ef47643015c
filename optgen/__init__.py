"""optgen: PyTorch optimizers compiled from declarative specs.

    import optgen
    opt = optgen.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)   # as torch.optim.AdamW

Every optimizer class here is generated from specs/optimizers/*.toml into generated/ by
`optgen build`; ``optgen.Optimizer`` is the runtime base they share.  The generated package (and
with it torch) is loaded on first use of one of its names, so the compiler (`optgen build`) never
depends on the code it is about to regenerate, a build with nothing to do never imports torch,
and importing optgen loads no compiler, Triton or C toolchain.
"""
from __future__ import annotations

from optgen import _generated as _generated_package

__version__ = "0.1.0"

_generated_package.install()  # `import optgen.generated` finds this checkout's generated/


def _optimizers() -> dict:
    import importlib

    return importlib.import_module("optgen._generated").load().OPTIMIZERS


#: submodules importable as attributes: optgen.lr_scheduler.StepLR, optgen.swa_utils.AveragedModel
_SUBMODULES = ("lr_scheduler", "swa_utils")


def __getattr__(name: str):
    if name in _SUBMODULES:  # imported on first use, like the optimizers
        import importlib

        return importlib.import_module(f"optgen.{name}")
    if name == "__all__":
        return ["Optimizer", "OPTIMIZERS", "set_defaults", "step_in_backward", *_optimizers()]
    if name.startswith("_"):  # submodules and dunders resolve through the import system
        raise AttributeError(f"module 'optgen' has no attribute {name!r}")
    if name == "Optimizer":  # torch is imported on first use: `optgen build` with nothing to do stays fast
        from optgen.runtime.optimizer import Optimizer

        return Optimizer
    if name == "OPTIMIZERS":
        return _optimizers()
    if name == "set_defaults":  # what foreach=None, fused=None picks (Note [The fastest by default])
        from optgen.runtime.dispatch import set_defaults

        return set_defaults
    if name == "step_in_backward":  # Note [The step inside backward]
        from optgen.runtime.in_backward import step_in_backward

        return step_in_backward
    optimizers = _optimizers()
    if name in optimizers:
        return optimizers[name]
    raise AttributeError(f"module 'optgen' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), "Optimizer", "OPTIMIZERS", "set_defaults", "step_in_backward", *_optimizers()})
