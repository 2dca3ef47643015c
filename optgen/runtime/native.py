"""What the native launchers (c_launch, triton_launch) share: the key a launch plan is cached
under, and the refusal that sends a group to the for-loop kernel.

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
see the session note of issue 11).
"""
from __future__ import annotations

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
    key = []
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
