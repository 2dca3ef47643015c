"""Weight averaging: a drop-in for ``torch.optim.swa_utils`` (torch 2.13).

    ema = optgen.swa_utils.AveragedModel(model, multi_avg_fn=optgen.swa_utils.get_ema_multi_avg_fn(0.999))
    ...
    ema.update_parameters(model)            # after each optimizer step

:class:`AveragedModel`, :func:`update_bn` and the ``get_*_avg_fn`` factories behave as torch's;
:class:`SWALR` is generated from specs/schedulers/swalr.toml (a ``torch.optim.lr_scheduler.LRScheduler``,
like every optgen scheduler: Note [optgen's schedulers are torch's]).  The averaging update itself —
SWA's running mean and EMA are both ``avg = lerp(avg, model, weight)`` — is the spec
specs/averaging/weight_average.toml, compiled by the optimizer pipeline into a for-loop and a
foreach kernel and two fused kernels, Triton and C (generated/weightaverage_{forloop,foreach,
triton,c}.py).  The default is the Triton kernel on CUDA (one launch for every tensor; Triton is
imported only then) and foreach elsewhere (on CPU the C kernel measures the same: the update is
memory-bound); ``lerp_(..., implementation=...)`` picks one.  All update in place, where torch's
default CPU path allocates three temporaries per tensor.
"""
from __future__ import annotations

import importlib
import importlib.util
import itertools
from collections.abc import Callable, Iterable
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from optgen import _generated

__all__ = ["AveragedModel", "update_bn", "SWALR", "get_ema_multi_avg_fn", "get_swa_multi_avg_fn",
           "get_ema_avg_fn", "get_swa_avg_fn"]

PARAM_LIST = tuple[Tensor, ...] | list[Tensor]

_generated.load()
SWALR = importlib.import_module(f"{_generated.NAME}.lr_scheduler").SWALR
IMPLEMENTATIONS = ("forloop", "foreach", "triton", "c")
_KERNELS: dict = {}


def kernel(implementation: str) -> Callable:
    """The generated averaging kernel ``(averaged, current, *, weight)`` of one implementation;
    the Triton one is imported on first use only (importing optgen never loads Triton)."""
    if implementation not in _KERNELS:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"unknown implementation {implementation!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
        module = importlib.import_module(f"{_generated.NAME}.weightaverage_{implementation}")
        _KERNELS[implementation] = module.KERNEL.step
    return _KERNELS[implementation]


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _implementation(tensors: PARAM_LIST) -> str:
    """The fused Triton kernel on GPUs (one launch for all tensors) where Triton is installed and the
    dtype is one it handles; foreach otherwise.  On CPU foreach, not the C kernel: the update is
    one memory-bound op per tensor, and both move it at the machine's bandwidth (BENCHMARKS.md), so
    compiling C on first use would buy nothing."""
    first = tensors[0]
    if first.device.type == "cuda" and first.dtype in _TRITON_DTYPES and _triton_available():
        return "triton"
    return "foreach"


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def lerp_(averaged: PARAM_LIST, current: PARAM_LIST, weight: float | Tensor, implementation: str | None = None) -> None:
    """``averaged[i] += weight * (current[i] - averaged[i])`` in place, through a generated kernel."""
    # (the averaging spec's rule names the average `param` and the model `grad`)
    if not averaged:
        return
    kernel(implementation or _implementation(averaged))(params=list(averaged), grads=list(current), weight=weight)


def get_ema_multi_avg_fn(decay: float = 0.999) -> Callable[[PARAM_LIST, PARAM_LIST, Any], None]:
    """The EMA update over lists of tensors: ``ema = decay * ema + (1 - decay) * model``."""
    if decay < 0.0 or decay > 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")

    @torch.no_grad()
    def ema_update(ema_param_list: PARAM_LIST, current_param_list: PARAM_LIST, _) -> None:
        if torch.is_floating_point(ema_param_list[0]) or torch.is_complex(ema_param_list[0]):
            lerp_(ema_param_list, current_param_list, 1 - decay)
        else:  # lerp is for floating types only; integer buffers as torch averages them
            for p_ema, p_model in zip(ema_param_list, current_param_list, strict=True):
                p_ema.copy_(p_ema * decay + p_model * (1 - decay))

    return ema_update


def get_swa_multi_avg_fn() -> Callable[[PARAM_LIST, PARAM_LIST, Tensor | int], None]:
    """The SWA update over lists of tensors: the running mean, ``avg += (model - avg) / (n + 1)``."""

    @torch.no_grad()
    def swa_update(averaged_param_list: PARAM_LIST, current_param_list: PARAM_LIST,
                   num_averaged: Tensor | int) -> None:
        if torch.is_floating_point(averaged_param_list[0]) or torch.is_complex(averaged_param_list[0]):
            lerp_(averaged_param_list, current_param_list, 1 / (num_averaged + 1))
        else:
            diffs = torch._foreach_sub(current_param_list, averaged_param_list)
            if isinstance(num_averaged, Tensor):
                torch._foreach_addcdiv_(averaged_param_list, diffs, [num_averaged + 1] * len(averaged_param_list))
            else:
                torch._foreach_add_(averaged_param_list, diffs, alpha=1.0 / (num_averaged + 1))

    return swa_update


def get_ema_avg_fn(decay: float = 0.999) -> Callable[[Tensor, Tensor, Any], Tensor]:
    """The EMA update of one tensor (returns the new average)."""
    if decay < 0.0 or decay > 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")

    @torch.no_grad()
    def ema_update(ema_param: Tensor, current_param: Tensor, num_averaged) -> Tensor:
        return decay * ema_param + (1 - decay) * current_param

    return ema_update


def get_swa_avg_fn() -> Callable[[Tensor, Tensor, Tensor | int], Tensor]:
    """The SWA update of one tensor (returns the new average)."""

    @torch.no_grad()
    def swa_update(averaged_param: Tensor, current_param: Tensor, num_averaged: Tensor | int) -> Tensor:
        return averaged_param + (current_param - averaged_param) / (num_averaged + 1)

    return swa_update


@torch.no_grad()
def _running_mean(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
    """AveragedModel's default update, ``avg += (model - avg) / (n + 1)``.

    On CPU the weight is computed in double precision (torch's CPU path divides per tensor, so a
    float32 weight would drift from it); on accelerators it stays a device tensor, as in torch's
    foreach path, so no host sync is needed.  Integer buffers (``use_buffers=True``) are averaged
    per tensor with truncation, as torch's per-tensor path does.
    """
    if not (torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0])):
        average = get_swa_avg_fn()
        for p_averaged, p_model in zip(averaged, current, strict=True):
            p_averaged.copy_(average(p_averaged, p_model, num_averaged))
        return
    on_cpu = averaged[0].device.type == "cpu"
    lerp_(averaged, current, 1.0 / (int(num_averaged) + 1) if on_cpu else 1 / (num_averaged + 1))


def _group_by_device_and_dtype(averaged: list[Tensor], current: list[Tensor]) -> dict:
    groups: dict = {}
    for a, c in zip(averaged, current, strict=True):
        pair = groups.setdefault((a.device, a.dtype), ([], []))
        pair[0].append(a)
        pair[1].append(c)
    return groups


class AveragedModel(Module):
    """A running average (SWA) or exponential moving average (EMA) of a model's parameters
    (drop-in for torch.optim.swa_utils.AveragedModel: same constructor, ``n_averaged`` buffer and
    state_dict keys, so checkpoints load either way).

    ``update_parameters(model)`` copies the model's weights the first time, and afterwards
    averages them in with ``avg_fn`` (per tensor), ``multi_avg_fn`` (per list of tensors), or by
    default the equal-weight running mean through optgen's generated averaging kernel.
    ``use_buffers=True`` averages the buffers too; otherwise they are copied from the model.
    """

    n_averaged: Tensor

    def __init__(self, model: Module, device: int | torch.device | None = None,
                 avg_fn: Callable[[Tensor, Tensor, Tensor | int], Tensor] | None = None,
                 multi_avg_fn: Callable[[PARAM_LIST, PARAM_LIST, Tensor | int], None] | None = None,
                 use_buffers: bool = False) -> None:
        super().__init__()
        if avg_fn is not None and multi_avg_fn is not None:
            raise AssertionError("Only one of avg_fn and multi_avg_fn should be provided")
        self.module = deepcopy(model)
        if device is not None:
            self.module = self.module.to(device)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def update_parameters(self, model: Module) -> None:
        """Averages ``model``'s current weights into this average."""
        own: Iterable[Tensor]
        theirs: Iterable[Tensor]
        if self.use_buffers:
            own = itertools.chain(self.module.parameters(), self.module.buffers())
            theirs = itertools.chain(model.parameters(), model.buffers())
        else:
            own, theirs = self.parameters(), model.parameters()
        averaged, current = [], []
        first = bool(self.n_averaged == 0)
        for p_averaged, p_model in zip(own, theirs, strict=False):
            p_model_ = p_model.detach().to(p_averaged.device)
            averaged.append(p_averaged.detach())
            current.append(p_model_)
            if first:
                p_averaged.detach().copy_(p_model_)
        if self.n_averaged > 0:
            if self.multi_avg_fn is not None or self.avg_fn is None:
                for (device, _), (own_list, their_list) in _group_by_device_and_dtype(averaged, current).items():
                    n_averaged = self.n_averaged.to(device)
                    if self.multi_avg_fn is not None:
                        self.multi_avg_fn(own_list, their_list, n_averaged)
                    else:
                        _running_mean(own_list, their_list, n_averaged)
            else:
                for p_averaged, p_model in zip(averaged, current, strict=True):
                    n_averaged = self.n_averaged.to(p_averaged.device)
                    p_averaged.copy_(self.avg_fn(p_averaged, p_model, n_averaged))
        if not self.use_buffers:
            # buffers are not averaged: keep them in sync with the model
            for b_swa, b_model in zip(self.module.buffers(), model.buffers(), strict=True):
                b_swa.detach().copy_(b_model.detach().to(b_swa.device))
        self.n_averaged += 1


@torch.no_grad()
def update_bn(loader: Iterable[Any], model: Module, device: int | torch.device | None = None) -> None:
    """Recomputes the BatchNorm running statistics of ``model`` with one pass over ``loader``
    (batches are tensors, or lists/tuples whose first item is the input)."""
    momenta = {}
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            momenta[module] = module.momentum
    if not momenta:
        return
    was_training = model.training
    model.train()
    for module in momenta:
        module.momentum = None  # a cumulative average over the pass
    for batch in loader:
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        if device is not None:
            batch = batch.to(device)
        model(batch)
    for module, momentum in momenta.items():
        module.momentum = momentum
    model.train(was_training)
