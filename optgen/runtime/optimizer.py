"""optgen's optimizer base class: ``torch.optim.Optimizer`` itself, plus optgen's step.

Generated optimizers subclass :class:`Optimizer` and implement ``_step_group(self, group)``.
Everything else is torch's own code, inherited: ``__init__`` (param groups, ``(name, tensor)``
pairs, ``required`` hyperparameters), ``add_param_group``, ``state_dict`` / ``load_state_dict``
(with torch's casting policy) and their hooks, ``zero_grad``, the step pre/post hooks and the
profiler range (torch wraps ``type(self).step`` in ``__init__``), ``_optimizer_step_code``,
pickling and ``repr``.  So torch tooling (LR schedulers, ``GradScaler``,
``ZeroRedundancyOptimizer``, DCP, Lightning, HF Trainer) sees a torch optimizer, and a torch
release that changes its base class changes ours with it.

Note [What optgen overrides in torch's Optimizer]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Only what a generated optimizer must decide itself:

- ``step``: the closure, then ``_step_group`` once per param group in the group's grad mode
  (torch's optimizers each write this loop in their own ``step``; here it is written once);
- state creation: ``GeneratedOptimizer._state_of`` (runtime/generated.py) makes a parameter's
  state from the spec on its first step, as torch's ``_init_group`` does;
- ``__setstate__``: ``GeneratedOptimizer.__setstate__`` turns counters saved as numbers back into
  tensors (Note [Counters saved as numbers] in runtime/generated.py) after torch's;
- ``__getstate__``: ``GeneratedOptimizer`` adds an ``implementation`` set on the optimizer to
  torch's, so deepcopy and pickle keep it;
- ``step`` refuses to run while the optimizer steps inside backward (Note [The step inside
  backward] in runtime/in_backward.py).

torch's generic ``load_state_dict`` fits optgen's state layout as it is: counters named ``step``
become float32 on the parameter's device in fused or capturable groups (where optgen's fused
kernels read them) and keep their dtype otherwise, every other tensor goes to its parameter's
device and floating dtype, and host counters (Python numbers) are kept.  Nothing here reads
torch's private globals.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

import torch
from torch.optim.optimizer import required  # re-exported: see the note below

# ``required`` is torch's sentinel for hyperparameters without a default. It is shared,
# not copied, so ``default is required`` holds whichever module a subclass imported it from.

__all__ = ["Optimizer", "required"]

StateDict: TypeAlias = dict[str, Any]
ParamsT: TypeAlias = (
    Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]
)


def _grad_mode_for(group: dict[str, Any]) -> torch.enable_grad | torch.no_grad:
    """Grad mode for a group's update: off, unless the group is ``differentiable``.

    Like torch's ``_use_grad_for_differentiable``, a differentiable update runs with
    grad *enabled* (even if the caller disabled it), so autograd can record it.

    Note [Grad mode under torch.compile]
    ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    The mode changes when the ``with`` block is entered, never before: ``torch.set_grad_enabled(m)``
    switches it when it is *constructed*, so dynamo, resuming a compiled frame after a graph break
    inside the block, recorded the switched mode as the one to restore, and grad mode stayed off
    after a compiled training step (the next backward: 'element 0 of tensors does not require
    grad').  ``enable_grad`` / ``no_grad`` only record the mode on ``__enter__``
    (tests/integration/test_compile.py).
    """
    return torch.enable_grad() if group.get("differentiable", False) else torch.no_grad()


class Optimizer(torch.optim.Optimizer):
    r"""Base class of optgen's generated optimizers: ``torch.optim.Optimizer`` with optgen's step.

    Args:
        params (iterable): tensors, ``(name, tensor)`` pairs, or dicts defining
            parameter groups (each with a ``"params"`` entry).
        defaults (dict): default hyperparameters, used where a group does not set them;
            a default of ``required`` makes the hyperparameter mandatory in every group.

    Subclasses implement ``_step_group(group)``; :meth:`step` calls it once per param group
    (Note [What optgen overrides in torch's Optimizer]).
    """

    # GradScaler looks this up: False means "unscale grads and skip step on inf for me".
    # Generated fused optimizers that consume ``grad_scale``/``found_inf`` set it True.
    _step_supports_amp_scaling = False

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; return ``closure()``'s loss (or None).

        The closure is evaluated with grad enabled; each group's update then runs in
        ``_step_group`` under no_grad (with grad enabled for ``differentiable`` groups).
        torch's ``__init__`` wraps this method with the step hooks and the profiler range.
        """
        in_backward = self.__dict__.get("_step_in_backward")
        if in_backward is not None:  # Note [The step inside backward]
            in_backward.refuse_step(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with _grad_mode_for(group):
                self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        """Update the params of one param group in place; implemented by subclasses."""
        raise NotImplementedError(
            f"{self.__class__.__name__} must implement _step_group(self, group)"
        )

    # ------------------------------------------------------------------ helpers for subclasses

    def _params_with_grad(
        self, group: dict[str, Any]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The group's params that have a gradient, and those gradients (same order).  A gradient
        with torch's negative bit (a lazy negation view: ``x.conj().imag``, ``torch._neg_view``)
        holds the negation of its values in memory, which a native kernel reads: it is resolved
        into a tensor of its values.  (Not while torch.compile traces the step: dynamo cannot trace
        ``is_neg``, and the traced ops read the values as torch's ops do.)"""
        params = [p for p in group["params"] if p.grad is not None]
        if torch.compiler.is_compiling():
            return params, [p.grad for p in params]
        return params, [g.resolve_neg() if g.is_neg() else g for g in (p.grad for p in params)]

    @staticmethod
    def _group_by_device_and_dtype(
        tensorlists: list[list[torch.Tensor]],
    ) -> dict[tuple[torch.device, torch.dtype], tuple[list[list[torch.Tensor]], list[int]]]:
        """Split parallel tensor lists into buckets that foreach/fused kernels accept.

        The bucket of index ``i`` is the device and dtype of ``tensorlists[0][i]``; each
        bucket holds one sublist per input list, plus the original indices of its entries.
        """
        buckets: dict[Any, tuple[list[list[torch.Tensor]], list[int]]] = {}
        for i, first in enumerate(tensorlists[0]):
            key = (first.device, first.dtype)
            if key not in buckets:
                buckets[key] = ([[] for _ in tensorlists], [])
            sublists, indices = buckets[key]
            for sublist, tensors in zip(sublists, tensorlists, strict=True):
                sublist.append(tensors[i])
            indices.append(i)
        return buckets
