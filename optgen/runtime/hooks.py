"""Small hook helpers shared by optgen's optimizer base class.

They reproduce the hook semantics of ``torch.optim.Optimizer`` (torch 2.13): hooks live
in ``OrderedDict``s keyed by the id of a ``torch.utils.hooks.RemovableHandle``, so that
``handle.remove()`` works exactly as with torch's own optimizers.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from torch.utils.hooks import RemovableHandle


def add_hook(
    hooks: OrderedDict[int, Callable[..., Any]],
    hook: Callable[..., Any],
    prepend: bool = False,
) -> RemovableHandle:
    """Store ``hook`` in ``hooks`` (first if ``prepend``) and return its removal handle."""
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    if prepend:
        hooks.move_to_end(handle.id, last=False)
    return handle


def run_step_pre_hooks(
    optimizer: Any,
    pre_hooks: Iterable[Callable[..., Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    step_fn: Callable[..., Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Call step pre-hooks in order; each may replace ``(args, kwargs)`` by returning them.

    ``args`` includes the optimizer itself as its first element, as in torch. Any other
    non-``None`` return value is an error, with torch's message (which names ``step_fn``).
    """
    for pre_hook in pre_hooks:
        result = pre_hook(optimizer, args, kwargs)
        if result is None:
            continue
        if not (isinstance(result, tuple) and len(result) == 2):
            raise RuntimeError(
                f"{step_fn} must return None or a tuple of (new_args, new_kwargs), but got {result}."
            )
        args, kwargs = result
    return args, kwargs


def run_step_post_hooks(
    optimizer: Any,
    post_hooks: Iterable[Callable[..., Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Call step post-hooks in order with the (possibly pre-hook-modified) arguments."""
    for post_hook in post_hooks:
        post_hook(optimizer, args, kwargs)
