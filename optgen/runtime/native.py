"""What the native launchers (c_launch, triton_launch) share: the launch plan type and its cache,
the key a plan is cached under, the creation of lazy states, and the refusal that sends a group to
the for-loop kernel.

Note [Plan keys]
~~~~~~~~~~~~~~~~
A plan (its address tables) is reused while every tensor it was checked for is laid out the
same: address, shape, contiguity (standing for the strides: the launchers' checks refuse other
layouts) and dtype (:func:`layout`); a contiguous view torch made lies inside its storage, so the
storage offset and size add nothing once the address is known.  The address alone is not
enough: a gradient re-viewed in place (``w.grad = buf.view(4, 4).t()``) or a state replaced by a
smaller tensor the allocator put at the same address would reuse a plan checked for another
tensor, and the kernel would read in the wrong order or past the end.  Building the key costs
about 0.4 µs per tensor each step (Adam, 1000 tensors of 100 elements: 2.3 ms a step without it,
see the session note of issue 11).  The key also holds each tensor's storage size
(:func:`storage_sizes`): a storage freed and allocated again smaller in place
(``untyped_storage().resize_(0)``, then ``resize_(n)``, as FSDP frees memory) may get its old
address back, and the layout then reads the same while the kernel would write past the storage's
end.  (torch's own optimizers crash the process on such a tensor; optgen's checks refuse it.)
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

import torch

#: implementations that read tensors' memory directly (by address, or as Triton pointers)
NATIVE_IMPLEMENTATIONS = {"c", "triton"}


class KernelDeclined(RuntimeError):
    """A group the kernel could run only by guessing (a non-contiguous state: a transposed view
    that survived torch.save; counters of two dtypes), found before anything was written: the
    caller runs the for-loop kernel instead, with a warning."""


def layout(tensors, devices: bool = False) -> tuple:
    """What a plan depends on of these tensors (Note [Plan keys]), as one flat tuple: per tensor
    its address (0: a state left absent), shape, contiguity and dtype, and with ``devices`` its
    device index (two GPUs may hand out the same address).
    Flat, not a tuple per tensor: thousands of tuples kept alive per step set off the garbage
    collector's full passes over the optimizer's state (measured: 2 ms became 17 ms a step)."""
    key: list = []
    append, extend = key.append, key.extend
    for t in tensors:
        if t is None:
            append(0)
        else:
            # Ints, bools and dtypes only (no torch.Size kept: the collector tracks those).
            append(t.data_ptr())
            append(t.dim())
            extend(t.shape)
            append(t.is_contiguous())
            append(t.dtype)
            if devices:
                append(t.get_device())
    return tuple(key)


def storage_sizes(lists) -> tuple:
    """The sizes in bytes of the storages under these lists of tensors (0: a tensor left absent):
    part of a plan's key (Note [Plan keys])."""
    return tuple(0 if t is None else t.untyped_storage().nbytes() for values in lists for t in values)


#: launch plans kept per launcher (least recently used dropped first): a training run uses one
#: per (dtype, device) group; more come from reloaded state dicts and new parameters
MAX_PLANS = 32


class LaunchPlan:
    """What both launchers keep per set of tensors (Note [Launch tables] in triton_launch.py): their
    checked address tables (the subclass's), and the gradients' addresses, a table of their own
    that is replaced when the gradients change (``zero_grad(set_to_none=True)`` frees them every
    step)."""

    def __init__(self):
        self.grad_key: tuple | None = None   # layout() of the gradients the table holds
        self.grad_addresses = None           # their data_ptr()s, as the launcher passes them


_P = TypeVar("_P", bound=LaunchPlan)


class PlanCache:
    """Launch plans under their layout key (Note [Plan keys]), at most MAX_PLANS of them."""

    def __init__(self, limit: int = MAX_PLANS):
        self.limit = limit
        self._plans: OrderedDict[tuple, LaunchPlan] = OrderedDict()

    def get(self, key: tuple):
        """The plan under ``key`` (now the most recently used), or None."""
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        return plan

    def put(self, key: tuple, plan: _P) -> _P:
        self._plans[key] = plan
        if len(self._plans) > self.limit:
            self._plans.popitem(last=False)
        return plan

    def values(self):
        return self._plans.values()

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


def creates_states(lists, lazy: dict) -> bool:
    """Whether a launch creates a state (``lazy``: index into ``lists`` → whether to create it)."""
    return any(create and any(t is None for t in lists[index]) for index, create in lazy.items())


def create_states(params, lists, lazy: dict, low=()) -> list[list[int]]:
    """Allocates the lazily created states of this step (their None entries in ``lists[index]``,
    stored into the caller's list, which saves them in the optimizer's state); per lazy state, 1
    where the kernel must store its ``first`` value.  (Never read before that store.)  ``low``:
    the indices of states kept in bfloat16 (Note [Stochastic rounding of state])."""
    flags = []
    for index, create in lazy.items():
        values, new = lists[index], [0] * len(params)
        dtype = torch.bfloat16 if index in low else None
        if create:
            for i, t in enumerate(values):
                if t is None:
                    values[i] = torch.empty_like(params[i], dtype=dtype, memory_format=torch.contiguous_format)
                    new[i] = 1
        flags.append(new)
    return flags


#: tensor types that are never fake: traced() skips is_fake for them (~1 µs a call)
_REAL_TYPES = (torch.Tensor, torch.nn.Parameter)


def traced(tensor: torch.Tensor) -> bool:
    """Whether a step on ``tensor`` (a parameter) is being traced rather than run: dynamo compiles it
    (``torch.compile``), or the tensor is a FakeTensor (make_fx, FakeTensorMode, AOTAutograd's
    tracing), which has neither values nor an address.  A native kernel then launches through its
    custom op (Note [Triton kernels as custom ops] in triton_launch.py)."""
    if torch.compiler.is_compiling():
        return True
    if type(tensor) in _REAL_TYPES:
        return False
    # imported here: torch's fake-tensor module imports sympy, which `import optgen` must not load
    # (tests/schedulers/test_derivation.py: importing the runtime loads no compiler)
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)


# A custom op's graph names the launcher it runs by a string (a graph holds no Python objects):
# the generated module's name.  The op looks the name up among the launchers this process built
# rather than importing it, so an op called with any other name imports and runs nothing.
_LAUNCHERS: dict[str, object] = {}


def register_launcher(name: str, launcher: object) -> None:
    """Makes ``launcher`` (a generated module's LAUNCH) reachable by its custom op under ``name``."""
    _LAUNCHERS[name] = launcher


def launcher_named(name: str):
    """The launcher registered as ``name``; a RuntimeError for a name no generated module registered."""
    launcher = _LAUNCHERS.get(name)
    if launcher is None:
        raise RuntimeError(f"optgen: no generated kernel module {name!r} is loaded in this process (a custom op "
                           "runs only the kernels of modules imported here)")
    return launcher


# A custom op takes no None in a list it mutates (AOTAutograd's functionalization), and no list of
# lists: a launch's lists (params, states; an entry None where a state is absent, unused under
# these flags or a vector's Adafactor row_var) go to it as one flat list, None entries as empty
# tensors, with the indices of those entries; the op rebuilds the lists (Note [C kernels as custom
# ops] in c_launch.py).
def flat_for_op(lists, like: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """``lists`` as one list without None (an empty tensor like ``like`` instead) and the indices of
    the Nones."""
    flat = [t for values in lists for t in values]
    absent = [i for i, t in enumerate(flat) if t is None]
    empty = like.new_empty(0)
    return [empty if t is None else t for t in flat], absent


def lists_from_op(tensors: list[torch.Tensor], absent: list[int], n: int) -> list[list[torch.Tensor | None]]:
    """The lists ``flat_for_op`` flattened, each ``n`` long, None back where it was."""
    given: list[torch.Tensor | None] = list(tensors)
    for i in absent:
        given[i] = None
    return [given[i:i + n] for i in range(0, len(given), n)]


def outside_storage(t: torch.Tensor) -> bool:
    """Whether a (contiguous) tensor's elements run past the end of its storage: a storage resized
    in place (``untyped_storage().resize_(0)``, as FSDP frees a parameter) leaves the tensor's
    shape as it was, and a kernel walking that many elements would write through freed memory."""
    return (t.storage_offset() + t.numel()) * t.element_size() > t.untyped_storage().nbytes()


def check_counter_dtypes(counters, kernel: str) -> None:
    """All counters of a launch have one dtype, else KernelDeclined: torch's load casts a float64
    model's eta/mu_product, not its step (a checkpoint torch loaded)."""
    kinds = {c.dtype for values in counters for c in values}
    if len(kinds) > 1:
        raise KernelDeclined(f"optgen's {kernel} reads all counters in one dtype; these are "
                             f"{' and '.join(sorted(str(k) for k in kinds))} (a checkpoint torch loaded)")
