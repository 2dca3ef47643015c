"""optgen's optimizer base class: torch 2.13's ``torch.optim.Optimizer`` behaviour, reimplemented.

Generated optimizers subclass :class:`Optimizer` and implement only
``_step_group(self, group)``; everything else (param groups, state, ``state_dict`` /
``load_state_dict``, ``zero_grad``, step/state-dict hooks, pickling, ``repr``) lives here
and behaves like torch's base class, so torch tooling (LR schedulers, ``GradScaler``,
``ZeroRedundancyOptimizer``, checkpointing) treats generated optimizers like built-in ones.

Why subclass ``torch.optim.Optimizer`` without calling its ``__init__``: torch code checks
``isinstance(opt, torch.optim.Optimizer)``, but torch's base class is not a stable API to
build on (its private methods change between releases), so every method that optimizers
or torch tooling use is defined again here and none of torch's are called.
"""
from __future__ import annotations

import functools
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Iterable
from copy import deepcopy
from itertools import chain
from typing import Any, TypeAlias

import torch
import torch.optim.optimizer as _torch_optimizer_module  # global step-hook registries
from torch.optim.optimizer import required  # re-exported: see the note below
from torch.utils.hooks import RemovableHandle

from optgen.runtime.hooks import add_hook, run_step_post_hooks, run_step_pre_hooks

# ``required`` is torch's sentinel for hyperparameters without a default. It is shared,
# not copied, so ``default is required`` holds whichever module a subclass imported it from.

__all__ = ["Optimizer", "required"]

StateDict: TypeAlias = dict[str, Any]
ParamsT: TypeAlias = (
    Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]
)

# Names of the per-instance hook registries (the attribute names torch uses).
_HOOK_REGISTRIES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def _global_step_pre_hooks() -> Iterable[Callable[..., Any]]:
    """Hooks registered with ``torch.optim.optimizer.register_optimizer_step_pre_hook``.

    Read from torch's module at every step so that hooks registered for all torch
    optimizers apply to optgen's too.
    """
    return _torch_optimizer_module._global_optimizer_pre_hooks.values()


def _global_step_post_hooks() -> Iterable[Callable[..., Any]]:
    """Hooks registered with ``torch.optim.optimizer.register_optimizer_step_post_hook``."""
    return _torch_optimizer_module._global_optimizer_post_hooks.values()


def _hook_step(step_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a class's ``step`` so that each call runs the step pre- and post-hooks.

    Order, as in torch: global pre-hooks, instance pre-hooks, ``step``, instance
    post-hooks, global post-hooks. ``args`` passed to hooks include the optimizer itself.
    """

    @functools.wraps(step_fn)
    def hooked_step(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        # A wrapped step that calls another wrapped step (``super().step()`` in a
        # subclass of a class whose step was wrapped first): hooks already ran once.
        if self.__dict__.get("_step_hooks_running", False):
            return step_fn(*args, **kwargs)
        profile_name = f"Optimizer.step#{self.__class__.__name__}.step"
        with torch.autograd.profiler.record_function(profile_name):
            pre_hooks = chain(_global_step_pre_hooks(), self._optimizer_step_pre_hooks.values())
            args, kwargs = run_step_pre_hooks(self, pre_hooks, args, kwargs, step_fn)
            self._step_hooks_running = True
            try:
                out = step_fn(*args, **kwargs)
            finally:
                self._step_hooks_running = False
            self._optimizer_step_code()
            post_hooks = chain(self._optimizer_step_post_hooks.values(), _global_step_post_hooks())
            run_step_post_hooks(self, post_hooks, args, kwargs)
            return out

    hooked_step.hooked = True  # type: ignore[attr-defined]
    return hooked_step


def _grad_mode_for(group: dict[str, Any]) -> torch.set_grad_enabled:
    """Grad mode for a group's update: off, unless the group is ``differentiable``.

    Like torch's ``_use_grad_for_differentiable``, a differentiable update runs with
    grad *enabled* (even if the caller disabled it), so autograd can record it.
    """
    return torch.set_grad_enabled(bool(group.get("differentiable", False)))


class Optimizer(torch.optim.Optimizer):
    r"""Base class of optgen's generated optimizers (torch 2.13 ``Optimizer`` semantics).

    Args:
        params (iterable): tensors, ``(name, tensor)`` pairs, or dicts defining
            parameter groups (each with a ``"params"`` entry).
        defaults (dict): default hyperparameters, used where a group does not set them;
            a default of ``required`` makes the hyperparameter mandatory in every group.

    Subclasses implement ``_step_group(group)``; the generic :meth:`step` calls it once
    per param group.
    """

    # GradScaler looks this up: False means "unscale grads and skip step on inf for me".
    # Generated fused optimizers that consume ``grad_scale``/``found_inf`` set it True.
    _step_supports_amp_scaling = False

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        # torch.optim.Optimizer.__init__ is deliberately not called (see module docstring).
        self.defaults = defaults
        for registry in _HOOK_REGISTRIES:
            setattr(self, registry, OrderedDict())

        self._patch_step_function()

        if isinstance(params, torch.Tensor):
            raise TypeError(
                "params argument given to the optimizer should be "
                "an iterable of Tensors or dicts, but got " + torch.typename(params)
            )

        self.state: defaultdict[torch.Tensor, Any] = defaultdict(dict)
        self.param_groups: list[dict[str, Any]] = []

        param_groups = list(params)
        if len(param_groups) == 0:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]
        for param_group in param_groups:
            self.add_param_group(param_group)

        # Read by torch's capturable health check; kept so torch-style helpers work.
        self._warned_capturable_if_run_uncaptured = True

    # ------------------------------------------------------------------ pickling, repr

    def __getstate__(self) -> dict[str, Any]:
        return {
            "defaults": self.defaults,
            "state": self.state,
            "param_groups": self.param_groups,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # Hooks are not pickled; an unpickled (or deep-copied) optimizer starts without any.
        for registry in _HOOK_REGISTRIES:
            if registry not in self.__dict__:
                setattr(self, registry, OrderedDict())
        self._patch_step_function()  # the class may be new in this process (multiprocessing)
        self.defaults.setdefault("differentiable", False)

    def __repr__(self) -> str:
        format_string = self.__class__.__name__ + " ("
        for i, group in enumerate(self.param_groups):
            format_string += "\n"
            format_string += f"Parameter Group {i}\n"
            for key in sorted(group.keys()):
                if key != "params":
                    format_string += f"    {key}: {group[key]}\n"
        format_string += ")"
        return format_string

    # ------------------------------------------------------------------ step and its hooks

    @staticmethod
    def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
        """Return ``func`` (a ``step``) wrapped to run step hooks and a profiler range."""
        return _hook_step(func)

    def _patch_step_function(self) -> None:
        """Wrap ``type(self).step`` with the hook runner, once per class.

        Done at ``__init__``/``__setstate__`` rather than at class creation so that a
        subclass overriding ``step`` (an LBFGS-like closure loop) gets hooks too.
        """
        self._zero_grad_profile_name = (
            f"Optimizer.zero_grad#{self.__class__.__name__}.zero_grad"
        )
        if not getattr(self.__class__.step, "hooked", None):
            self.__class__.step = _hook_step(self.__class__.step)  # type: ignore[method-assign]

    def _optimizer_step_code(self) -> None:
        """No-op called after every step: a place for profilers to hook (as in torch)."""

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook(optimizer, args, kwargs) -> None | (new_args, new_kwargs)``,
        called before each :meth:`step`."""
        return add_hook(self._optimizer_step_pre_hooks, hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook(optimizer, args, kwargs) -> None``, called after each :meth:`step`."""
        return add_hook(self._optimizer_step_post_hooks, hook)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; return ``closure()``'s loss (or None).

        The closure is evaluated with grad enabled; each group's update then runs in
        ``_step_group`` under no_grad (with grad enabled for ``differentiable`` groups).
        """
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
        """The group's params that have a gradient, and those gradients (same order)."""
        params = [p for p in group["params"] if p.grad is not None]
        return params, [p.grad for p in params]

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
            for sublist, tensors in zip(sublists, tensorlists):
                sublist.append(tensors[i])
            indices.append(i)
        return buckets

    # ------------------------------------------------------------------ param groups

    @torch._disable_dynamo
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (e.g. unfrozen layers mid-training), filling in defaults."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")

        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            param_group["params"] = [params]
        elif isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but "
                "the ordering of tensors in sets will change between runs. Please use a list instead."
            )
        else:
            param_group["params"] = list(params)

        self._split_param_names(param_group)
        self._check_params_optimizable(param_group["params"])
        self._fill_defaults(param_group)

        params = param_group["params"]
        if len(params) != len(set(params)):
            warnings.warn(
                "optimizer contains a parameter group with duplicate parameters; "
                "in future, this will cause an error; "
                "see github.com/pytorch/pytorch/issues/40967 for more information",
                stacklevel=3,
            )

        param_set: set[torch.Tensor] = set()
        for group in self.param_groups:
            param_set.update(set(group["params"]))
            if ("param_names" in param_group) != ("param_names" in group):
                current_group_txt = (
                    "with names" if "param_names" in param_group else "without names"
                )
                raise ValueError(
                    "all optimizer param groups should be with/without names. "
                    f"cannot add param group {current_group_txt} to the optimizer"
                )
        if not param_set.isdisjoint(set(param_group["params"])):
            raise ValueError("some parameters appear in more than one parameter group")

        self.param_groups.append(param_group)

    @staticmethod
    def _split_param_names(param_group: dict[str, Any]) -> None:
        """Turn ``(name, tensor)`` entries into ``params`` plus a ``param_names`` list."""
        tensors, names = [], []
        for param in param_group["params"]:
            if isinstance(param, tuple):
                names.append(param[0])
                tensors.append(param[1])
            else:
                tensors.append(param)
        param_group["params"] = tensors
        if len(names) != 0:
            if len(names) != len(tensors):
                raise ValueError(
                    "all optimizer params should be with/without names. Some param names are missing"
                )
            param_group["param_names"] = names

    def _check_params_optimizable(self, params: list[Any]) -> None:
        """Only tensors, and (unless differentiable) only leaves, can be optimized."""
        for param in params:
            if not isinstance(param, torch.Tensor):
                raise TypeError(
                    "optimizer can only optimize Tensors, "
                    "but one of the params is " + torch.typename(param)
                )
            if not self.defaults.get("differentiable", None) and not (
                param.is_leaf or param.retains_grad
            ):
                raise ValueError("can't optimize a non-leaf Tensor")

    def _fill_defaults(self, param_group: dict[str, Any]) -> None:
        """Set every hyperparameter the group lacks from ``defaults``; ``required`` ones must be given."""
        for name, default in self.defaults.items():
            if default is required and name not in param_group:
                raise ValueError(
                    f"parameter group didn't specify a value of required optimization parameter {name}"
                )
            param_group.setdefault(name, default)

    # ------------------------------------------------------------------ gradients

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset gradients: drop them (default), or zero them in place if ``set_to_none=False``."""
        foreach = self.defaults.get("foreach", False) or self.defaults.get("fused", False)

        if not hasattr(self, "_zero_grad_profile_name"):
            self._patch_step_function()

        to_zero: list[torch.Tensor] = []
        with torch.autograd.profiler.record_function(self._zero_grad_profile_name):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if set_to_none:
                        p.grad = None
                        continue
                    # Zeroed grads must stop being part of any graph, as in torch.
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    if not foreach or p.grad.is_sparse:
                        p.grad.zero_()
                    else:
                        to_zero.append(p.grad)
            for (grads,), _ in self._group_by_device_and_dtype([to_zero]).values():
                torch._foreach_zero_(grads)

    # ------------------------------------------------------------------ state dict

    def register_state_dict_pre_hook(
        self, hook: Callable[[Any], None], prepend: bool = False
    ) -> RemovableHandle:
        """Register ``hook(optimizer) -> None``, called before :meth:`state_dict`."""
        return add_hook(self._optimizer_state_dict_pre_hooks, hook, prepend)

    def register_state_dict_post_hook(
        self, hook: Callable[[Any, StateDict], StateDict | None], prepend: bool = False
    ) -> RemovableHandle:
        """Register ``hook(optimizer, state_dict) -> state_dict | None``, called after
        :meth:`state_dict`; a returned dict replaces the result."""
        return add_hook(self._optimizer_state_dict_post_hooks, hook, prepend)

    def register_load_state_dict_pre_hook(
        self, hook: Callable[[Any, StateDict], StateDict | None], prepend: bool = False
    ) -> RemovableHandle:
        """Register ``hook(optimizer, state_dict) -> state_dict | None``, called before
        :meth:`load_state_dict` with a shallow copy; a returned dict is loaded instead."""
        return add_hook(self._optimizer_load_state_dict_pre_hooks, hook, prepend)

    def register_load_state_dict_post_hook(
        self, hook: Callable[[Any], None], prepend: bool = False
    ) -> RemovableHandle:
        """Register ``hook(optimizer) -> None``, called after :meth:`load_state_dict`."""
        return add_hook(self._optimizer_load_state_dict_post_hooks, hook, prepend)

    @torch._disable_dynamo
    def state_dict(self) -> StateDict:
        """Return ``{"state": {index: per-param state}, "param_groups": [group with
        "params": [indices]]}``; indices number params in group order (torch's layout).

        Like torch, state values are not copied: the dict aliases the live state tensors.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)

        # Save order indices instead of tensors.
        param_mappings: dict[int, int] = {}
        start_index = 0

        def pack_group(group: dict[str, Any]) -> dict[str, Any]:
            nonlocal start_index
            packed = {k: v for k, v in group.items() if k != "params"}
            param_mappings.update(
                {
                    id(p): i
                    for i, p in enumerate(group["params"], start_index)
                    if id(p) not in param_mappings
                }
            )
            packed["params"] = [param_mappings[id(p)] for p in group["params"]]
            start_index += len(packed["params"])
            return packed

        param_groups = [pack_group(g) for g in self.param_groups]
        # State keyed by something other than a param (legacy) is kept under its own key.
        packed_state = {
            (param_mappings[id(k)] if isinstance(k, torch.Tensor) else k): v
            for k, v in self.state.items()
        }
        state_dict = {"state": packed_state, "param_groups": param_groups}

        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hook_result = post_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        return state_dict

    @staticmethod
    def _process_value_according_to_param_policy(
        param: torch.Tensor,
        value: torch.Tensor,
        param_id: int,
        param_groups: list[dict[Any, Any]],
        key: Hashable = None,
    ) -> torch.Tensor:
        """Move a loaded state tensor next to its param, with torch's casting policy.

        ``step`` keeps its dtype and device (torch issue 74424) unless the saved group is
        fused or capturable, which keep it as float32 on the param's device. Other
        tensors go to the param's device and, for floating params, the param's dtype.
        ``.to`` returns ``value`` itself when nothing changes, so no copy is made then.
        """
        if param_groups is None:
            raise AssertionError("Expected param_groups to be set")
        fused = capturable = False
        for pg in param_groups:
            if param_id in pg["params"]:
                fused = pg.get("fused", False)
                capturable = pg.get("capturable", False)
                break
        if key == "step":
            if capturable or fused:
                return value.to(dtype=torch.float32, device=param.device)
            return value
        if param.is_floating_point():
            return value.to(dtype=param.dtype, device=param.device)
        return value.to(device=param.device)

    @staticmethod
    def _cast_state(
        param: torch.Tensor,
        value: Any,
        param_id: int,
        param_groups: list[dict[Any, Any]],
        key: Hashable = None,
    ) -> Any:
        """Rebuild a saved state value for ``param``: containers are recreated, tensors
        go through the casting policy, anything else is kept as is."""
        if isinstance(value, torch.Tensor):
            return Optimizer._process_value_according_to_param_policy(
                param, value, param_id, param_groups, key
            )
        if isinstance(value, dict):
            return {
                k: Optimizer._cast_state(param, v, param_id, param_groups, key=k)
                for k, v in value.items()
            }
        # Strings are iterable but are leaves (torch would recurse forever on them).
        if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
            return type(value)(  # type: ignore[call-arg]
                Optimizer._cast_state(param, v, param_id, param_groups) for v in value
            )
        return value

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: StateDict) -> None:
        """Load a state dict from :meth:`state_dict` (ours or any torch optimizer's).

        Saved params are matched to this optimizer's by position. Param groups are
        deep-copied; state tensors are moved/cast by the casting policy (and, like in
        torch, not copied when already of the right dtype and device).
        """
        # Shallow copy, consistent with nn.Module.load_state_dict.
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result

        groups = self.param_groups
        # Deep copy: the saved groups become ours and must not alias the caller's dict.
        saved_groups = deepcopy(state_dict["param_groups"])
        self._check_groups_match(groups, saved_groups)

        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in groups),
                strict=True,
            )
        )
        # State of saved params is cast; state under other keys is kept as is (legacy).
        state: defaultdict[Any, Any] = defaultdict(dict)
        for k, v in state_dict["state"].items():
            if k in id_map:
                param = id_map[k]
                state[param] = self._cast_state(param, v, k, state_dict["param_groups"])
            else:
                state[k] = v

        param_groups = [
            self._with_live_params(g, ng) for g, ng in zip(groups, saved_groups, strict=True)
        ]
        self.__setstate__({"state": state, "param_groups": param_groups})

        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    @staticmethod
    def _check_groups_match(
        groups: list[dict[str, Any]], saved_groups: list[dict[str, Any]]
    ) -> None:
        """A state dict loads only into the same number of groups, of the same sizes."""
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError(
                "loaded state dict contains a parameter group "
                "that doesn't match the size of optimizer's group"
            )

    @staticmethod
    def _with_live_params(group: dict[str, Any], new_group: dict[str, Any]) -> dict[str, Any]:
        """Put the current group's tensors (and names, if the saved group has none) into
        the loaded group, which otherwise holds indices."""
        new_group["params"] = group["params"]
        if "param_names" in group and "param_names" not in new_group:
            new_group["param_names"] = group["param_names"]
        return new_group
