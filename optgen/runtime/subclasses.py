"""Tensor subclasses and the native (C, Triton) kernels.

Note [Tensor subclasses]
~~~~~~~~~~~~~~~~~~~~~~~~
A native kernel reads and writes a tensor's memory by address.  A tensor subclass may have no
memory of its own: FSDP2's DTensor has ``data_ptr() == 0`` and a *global* ``numel()``; its data is
the local shard ``t.to_local()``.  So:

- a group of DTensors whose gradients and states are sharded exactly like their parameters runs
  the kernel on the local shards, as torch's fused AdamW does — when the spec is *elementwise*
  (``_elementwise``, decided by the compiler: optgen.ir.nodes.elementwise), because then the
  update of each shard is the update of the whole.  ``to_local()`` is a view of the shard, so
  the kernel's in-place writes land in the DTensor; state the kernel creates (a ``first`` state)
  is wrapped back into a DTensor sharded like its parameter, as torch's own step would make it;
- anything else — a spec that reads whole tensors (``norm``, a shape, reduced-shape state), a
  DTensor sharded unlike its parameter, a complex DTensor, any other subclass — runs the
  for-loop kernel, whose torch ops dispatch through the subclass, with one warning per
  optimizer class and cause.
"""
from __future__ import annotations

import torch

from optgen.runtime.native import NATIVE_IMPLEMENTATIONS, traced
from optgen.runtime.once import warn_once

#: the types of an ordinary tensor, whose memory is its data (None: a state left absent)
PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter, type(None)})


def plain(t: torch.Tensor | None) -> bool:
    """Whether ``t`` is an ordinary tensor (or Parameter) whose memory is its data, or None."""
    return type(t) in PLAIN_TYPES


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def for_native_kernel(optimizer, implementation: str, params: list, tensors: dict[str, list]):
    """The implementation to run and the kernel's lists it runs on: ``tensors`` itself for plain
    tensors; the local shards for DTensors a native kernel can update; the for-loop (and
    ``tensors``) otherwise.  Returns ``(implementation, lists, to_global)``, where ``to_global``
    turns the lists back after the step (see Note [Tensor subclasses])."""
    # Traced (torch.compile, FakeTensors): the kernel is a custom op, which takes these tensors as they are.
    if implementation not in NATIVE_IMPLEMENTATIONS or not params or traced(params[0]):
        return implementation, tensors, None
    if all(PLAIN_TYPES.issuperset(map(type, values)) for values in tensors.values()):  # ~13 ns a tensor
        return implementation, tensors, None
    cause = _why_not_local(optimizer, params, tensors)
    if cause is not None:
        warn_once(f"optgen.{type(optimizer).__name__} runs its for-loop kernel instead of the {implementation} "
                   f"one on these parameters: {cause}")
        return "forloop", tensors, None
    local = {name: [t if plain(t) else t.to_local() for t in values]
             for name, values in tensors.items()}
    return implementation, local, lambda lists, created: _to_global(optimizer, params, lists, created)


def _why_not_local(optimizer, params: list, tensors: dict[str, list]) -> str | None:
    """None when every subclass tensor is a DTensor the kernel may update through its local
    shard; else the reason it may not."""
    dtensor = _dtensor_type()
    for values in tensors.values():
        for t in values:
            if not plain(t) and (dtensor is None or type(t) is not dtensor):
                return f"a tensor subclass ({type(t).__name__}) has no memory of its own to update"
    if not optimizer._elementwise:
        return ("a DTensor's kernel sees only its local shard, and this update reads whole tensors "
                "(a norm, a shape or reduced-shape state)")
    if any(p.is_complex() for p in params):
        return "complex DTensors are not run on their local shards"
    for i, p in enumerate(params):
        if plain(p):
            return "a group mixes DTensors with plain tensors"
        for name, values in tensors.items():
            t = values[i]
            if t is None or (t.dim() == 0 and plain(t)):  # an absent optional state; a counter
                continue
            if plain(t) or t.device_mesh != p.device_mesh or t.placements != p.placements \
                    or t.shape != p.shape or t.to_local().shape != p.to_local().shape:
                return f"its {name} are not sharded like the parameters"
    return None


def _to_global(optimizer, params: list, lists: dict[str, list], created: dict[str, list[bool]]) -> dict[str, list]:
    """The lists after a step on local shards, with each state the kernel created (a ``first``
    state, a plain tensor) wrapped into a DTensor sharded like its parameter."""
    from torch.distributed.tensor import DTensor

    out = dict(lists)
    for name, key in optimizer._tensor_state:
        if key in created:
            out[name] = [DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                                            shape=p.shape, stride=p.stride()) if new and t is not None else t
                         for p, t, new in zip(params, lists[name], created[key], strict=True)]
    return out
