"""The fast path of a step: a param group's launch, bound once, revalidated cheaply each step.

Note [Cached steps]
~~~~~~~~~~~~~~~~~~~
A fused kernel's own work on many small tensors is a fraction of a step's host work: gathering the
group's tensors, choosing the implementation, checking every tensor the kernel will address and
building the address tables cost ~4 µs a tensor (Adam, 1000 tensors of 100 elements: 5 ms a step
for 0.3 ms of kernel).  Almost all of it gives the same answer every step.  So after a step the
checked path (``GeneratedOptimizer._step_group``) ran, a group whose kernel can be bound
(``KernelModule.bind``: the C kernels) keeps a :class:`CachedStep`: the lists it ran on, and the
launch with its tables built and checked once.  The next step reuses it after checks that cost a
few tens of nanoseconds per tensor (runtime/step_guard.py: one C++ pass over the group, or where
that cannot be built, a few Python maps of tensor methods, ~1 µs a tensor):

- the same options (the group's ``foreach`` / ``fused`` / ``differentiable`` / ``capturable`` /
  ``state_dtype``, the optimizer's ``implementation``, the defaults policy), no GradScaler state,
  not traced;
- the same parameter objects, and the same ones with a gradient;
- every gradient contiguous with its parameter's element count (torch keeps a gradient shaped like
  its parameter, so that is the parameter's count too) and dtype (torch 2.13's ``grad_dtype`` lets a
  gradient have another: a float64 one has more bytes, read as floats), and inside its storage (gradients are new
  tensors most steps: one whose storage was resized in place would be read past its end); a
  sparse one fails ``is_contiguous``; none a lazily negated view (torch's negative bit: the
  checked path resolves it), and a complex one not a lazily conjugated view (autograd's gradient
  through ``z.conj()``: the checked path raises torch's view_as_real error for it);
- the same address for every parameter, state and counter, and the same object for every state
  and counter (``state[p][key]`` looked up afresh, so a replaced or lost state is seen, and a
  view of other extent at the same address too), with the same shape, dtype and contiguity (one
  changed in place: ``resize_``, ``t_()``, ``.data =`` a view of another shape or dtype), and the
  parameters' shapes and contiguity too;
- the arguments use the same lists (a flag or hyperparameter may change which states the step
  touches: Adam's ``amsgrad``).

The bound launch holds the storages its tables point into, so an address it checks was never freed
and reused by another tensor: a tensor whose address is unchanged still lies in the memory the
launch was checked for.  Anything else, or any failing check, takes the checked path, which
rebinds.  Hyperparameters and flags are read from the group every step, as before.  A loaded state
dict (``__setstate__``) drops the cache.  Measured: BENCHMARKS.md, "Host overhead".
"""
from __future__ import annotations

import torch

from optgen.runtime import dispatch, step_guard

#: the group options the choice of implementation reads (runtime/dispatch.py), and state_dtype (a
#: bfloat16 group is never bound: its launch takes rounding keys that change every step)
_OPTIONS = ("foreach", "fused", "differentiable", "capturable", "state_dtype")


def options(optimizer, group: dict) -> tuple:
    return (optimizer.implementation, dispatch.defaults_policy(), *map(group.get, _OPTIONS))


class CachedStep:
    """A param group's bound launch and what it was bound for (Note [Cached steps])."""

    def __init__(self, optimizer, group: dict, kernel, params: list[torch.Tensor], lists: dict[str, list], launch):
        self.group, self.kernel, self.launch, self.params = group, kernel, launch, params
        self.options = options(optimizer, group)
        # the states the launch addresses: a list absent under these flags is not addressed, and a
        # state created later changes nothing bound
        self.keys = [key for name, key in optimizer._tensor_state + optimizer._counter_state
                     if all(t is not None for t in lists[name])]
        self.guard = step_guard.guard(optimizer, group, params, self.keys)
        self.native = isinstance(self.guard, step_guard.NativeGuard)

    def __call__(self, optimizer, group: dict) -> bool:
        """One step of ``group`` through the bound launch; False, with nothing done, when a check
        fails (the caller then takes the checked path)."""
        if torch.compiler.is_compiling() or "grad_scale" in vars(optimizer) or "found_inf" in vars(optimizer) \
                or options(optimizer, group) != self.options:
            return False
        if not self.native and step_guard.native(start=False) is not None:
            return False  # the native guard's build has finished: the checked step rebinds with it
        grad_table = self.guard(optimizer, group)
        if grad_table is None:
            return False
        arguments = optimizer._kernel_scalars(self.kernel, group)
        arguments.update((f, bool(group[f])) for f in optimizer._flags)
        return self.launch(grad_table, arguments)
