"""Intrinsics: the few operations of an update that are not elementwise, written once by hand.

Specs call them like functions (``newton_schulz(update, a, b, c, steps, eps)``); every backend
and the reference interpreter call the same implementation here.  Each is our own code, checked
against torch's behaviour in tests/intrinsics/.
"""
from __future__ import annotations

import torch


def newton_schulz(grad: torch.Tensor, a: float, b: float, c: float, steps: int, eps: float) -> torch.Tensor:
    """Muon's orthogonalisation: ``steps`` quintic Newton–Schulz iterations in bfloat16.

    X ← X / max(‖X‖, eps), then X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ, on the wide orientation
    (rows ≤ columns) so that A is the smaller Gram matrix.  Returns a bfloat16 tensor of
    ``grad``'s shape, as torch.optim.Muon does.
    """
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if grad.dim() != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    x = grad.bfloat16()
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(int(steps)):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def reduced_shape(shape: torch.Size, dim: int) -> tuple[int, ...]:
    """``shape`` with dimension ``dim`` set to 1: the shape of a reduction that keeps its dim."""
    out = list(shape)
    out[dim] = 1
    return tuple(out)
