"""Runtime support imported by generated optimizers."""
from optgen.runtime.optimizer import Optimizer

__all__ = ["Optimizer"]
