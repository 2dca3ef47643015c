"""The IR's vocabulary: the functions an update rule may call, as sympy functions, and the one
way to make a name a symbol.  The spec parser (optgen/spec/expressions.py) builds expressions of
them; every later stage — lowering, passes, printers, the reference interpreter — reads them.
Imports only sympy, so every layer may use it (tests/compiler/test_layering.py)."""
from __future__ import annotations

import sympy


def symbol(name: str) -> sympy.Symbol:
    """Every spec name is one real sympy symbol (complex tensors are viewed as real)."""
    return sympy.Symbol(name, real=True)


class _RealFunction(sympy.Function):
    """A function of the spec language: real-valued, as every name in a spec is.  Without this
    sympy treats an unknown function as possibly complex, and ``abs(exp(clamp(x, a, b)))``
    becomes ``exp(re(clamp(x, a, b)))``, which no backend can print."""

    def _eval_is_extended_real(self):
        return True

    def _eval_is_real(self):
        return True


class Lerp(_RealFunction):
    """``lerp(a, b, w) = a + w * (b - a)``, kept whole so backends can emit ``lerp_``."""

    nargs = 3


class Maximum(_RealFunction):
    """Elementwise maximum of two tensors (``torch.maximum``)."""

    nargs = 2


class Minimum(_RealFunction):
    """Elementwise minimum of two tensors (``torch.minimum``)."""

    nargs = 2


class Where(_RealFunction):
    """``where(condition, a, b)``: per element, ``a`` where the comparison holds, else ``b``."""

    nargs = 3

    @classmethod
    def eval(cls, condition, a, b):
        # sympy decides some comparisons when an expression is rebuilt (``s < s`` is False for
        # every real s): the where is then the branch it picks, so no backend ever sees a
        # condition that is a constant instead of a comparison (the reference and the plain-Python
        # evaluator pick the branch of a non-tensor condition the same way).
        if condition == sympy.true:
            return a
        if condition == sympy.false:
            return b
        return None


class Clamp(_RealFunction):
    """``clamp(x, low, high)`` elementwise (``Tensor.clamp``)."""

    nargs = 3


class Norm(_RealFunction):
    """``norm(x)``: the 2-norm of a whole tensor, a per-tensor scalar (read on the host)."""

    nargs = 1


class Numel(_RealFunction):
    """``numel(x)``: number of elements, a per-tensor scalar."""

    nargs = 1


class Ndim(_RealFunction):
    """``ndim(x)``: number of dimensions, a per-tensor scalar (for shape-dependent branches)."""

    nargs = 1


class Size(_RealFunction):
    """``size(x, d)``: length of dimension ``d`` (an integer literal, may be negative)."""

    nargs = 2


class MachineEps(_RealFunction):
    """``machine_eps(x)``: ``torch.finfo(x.dtype).eps``."""

    nargs = 1


class IfNone(_RealFunction):
    """``if_none(h, fallback)``: a hyperparameter whose default is None, else the fallback."""

    nargs = 2


class NormDim(_RealFunction):
    """``norm_dim(x, d)``: 2-norm over dimension ``d``, keeping it (size 1): a tensor."""

    nargs = 2


class MeanDim(_RealFunction):
    """``mean_dim(x, d)``: mean over dimension ``d``, keeping it (size 1): a tensor."""

    nargs = 2


class NewtonSchulz(_RealFunction):
    """``newton_schulz(x, a, b, c, steps, eps)``: Muon's orthogonalisation of a 2-D tensor (an
    intrinsic: the backends call optgen.runtime.intrinsics.newton_schulz)."""

    nargs = 6


#: functions whose value is a per-tensor *scalar* even though they read tensors
SCALAR_OF_TENSOR = (Norm, Numel, Ndim, Size, MachineEps)
#: functions whose value is a tensor with one dimension reduced to size 1 (Note [Shapes] in
#: optgen/passes/select_ops.py; checked by optgen/ir/validate.py)
REDUCE_DIM = (NormDim, MeanDim)
