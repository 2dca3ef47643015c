"""Low-precision optimizer state: ``state_dtype=torch.bfloat16`` (issue 15).

Note [Stochastic rounding of state]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
With ``state_dtype=torch.bfloat16`` each state the spec marks ``low_precision`` (Note
[Low-precision state] in optgen/spec/load.py) is kept in bfloat16: half the bytes of float32.
A step loads it into float32, updates it there, and stores it back *rounded stochastically*: the
float32 bits plus 16 uniformly random bits, truncated to their top 16.  A value a fraction ``f``
of the way from one bfloat16 neighbour to the next rounds up with probability exactly ``f``, so the
rounding is unbiased: an update smaller than half a bfloat16 step (Adam's ``exp_avg_sq`` moving by
``(1 - beta2) * grad**2``) still moves the stored value on average, where round-to-nearest would
drop it every time and the state stalls.

The random bits are a counter-based hash, not a generator: ``mix32`` (a 32-bit integer hash) of the
element's index (its low 32 bits: elements 2**32 apart in a tensor of more draw the same bits, which
biases neither) xor a key per (parameter, step, state).  Every backend draws the same bits for the
same element — the for-loop and foreach references here, with torch integer ops, and the fused C
kernel (``optgen_state_store`` in optgen/runtime/c_launch.py's prelude) — whatever the thread count,
and a run resumed from a checkpoint draws what the uninterrupted run would have drawn.  The key:

    key(param, step, state) = mix32(mix32(mix32(SEED ^ index) ^ count) ^ crc32(state key))

``index`` is the parameter's position in the optimizer (its number in ``state_dict()``), ``count``
how many steps it has taken with low-precision state (``state["state_rounding_step"]``, saved in
the checkpoint), and the state's own key (``"exp_avg"``) separates its bits from its neighbours'.
``mix32`` multiplies only by constants below 2**31, so torch's int64 arithmetic on 32-bit values
never overflows and equals C's uint32 arithmetic.  (Mixing in the index's high half as well made
the C kernel's step 1.4x slower than with float32 state, where this one is about 1.1x.)  NaN stays
NaN (quiet); values round in magnitude, so the sign never changes.

The for-loop and foreach kernels are the readable reference: the runtime hands them float32
copies of the bfloat16 states, runs the generated kernel unchanged, and rounds the results back
(:class:`Rounded`).  The C kernel does the same in registers, in one pass.
"""
from __future__ import annotations

import zlib

import torch

from optgen.runtime import quantized_state

#: what ``state_dtype`` takes besides None: bfloat16 (here), and "int8" (Note [Blockwise 8-bit state]
#: in optgen/runtime/quantized_state.py)
STATE_DTYPES = (torch.bfloat16, quantized_state.INT8)
#: the state entry counting a parameter's low-precision steps (Note [Stochastic rounding of state])
COUNT_KEY = "state_rounding_step"
SEED = 0x5EED0F57
_MASK = 0xFFFFFFFF


def checked_state_dtype(optimizer, state_dtype):
    """``state_dtype`` as the constructor takes it, or torch's ValueError."""
    if not any(state_dtype is d or (isinstance(state_dtype, str) and state_dtype == d) for d in STATE_DTYPES):
        raise ValueError(f"state_dtype must be None, torch.bfloat16 or 'int8', not {state_dtype!r}")
    if not optimizer._low_precision_state or not optimizer._kernels:
        raise ValueError(f"{type(optimizer).__name__} has no state that may be stored in low precision; "
                         "leave state_dtype=None")
    return state_dtype


def check_param(optimizer, param: torch.Tensor, state_dtype) -> None:
    """Low-precision state is for float32 parameters (bfloat16 ones keep bfloat16 state already)."""
    if param.dtype != torch.float32:
        raise ValueError(f"{type(optimizer).__name__}(state_dtype={state_dtype!r}) needs float32 parameters, "
                         f"not {param.dtype}")


def mix32(x: int) -> int:
    """The 32-bit integer hash of Note [Stochastic rounding of state], on a Python int."""
    x &= _MASK
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & _MASK
    x ^= x >> 15
    x = (x * 0x735A2D97) & _MASK
    x ^= x >> 15
    return x


def _mix32_tensor(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` on an int64 tensor of values in [0, 2**32), in place."""
    x ^= x >> 16
    x.mul_(0x21F0AAAD).bitwise_and_(_MASK)
    x ^= x >> 15
    x.mul_(0x735A2D97).bitwise_and_(_MASK)
    x ^= x >> 15
    return x


def state_key(index: int, count: int, key: str) -> int:
    """The rounding key of a state of the parameter numbered ``index`` at its ``count``-th step."""
    return mix32(mix32(mix32(SEED ^ index) ^ count) ^ zlib.crc32(key.encode()))


def random_bits(numel: int, key: int, device=None) -> torch.Tensor:
    """The 32 random bits of each element 0..numel-1 under ``key`` (int64 values in [0, 2**32))."""
    x = torch.arange(numel, dtype=torch.int64, device=device).bitwise_and_(_MASK).bitwise_xor_(key)
    return _mix32_tensor(x)


def stochastic_round(value: torch.Tensor, key: int) -> torch.Tensor:
    """``value`` (float32) rounded stochastically to bfloat16, element ``i`` (in C order) with the
    bits ``random_bits(i, key)``: bit-for-bit what the C kernel stores."""
    flat = value.detach().contiguous().reshape(-1)
    bits = flat.view(torch.int32).to(torch.int64) & _MASK
    rounded = (bits + (random_bits(flat.numel(), key, flat.device) & 0xFFFF)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = torch.where(nan, (bits >> 16) | 0x40, rounded)
    as_int16 = rounded - ((rounded & 0x8000) << 1)  # (the 16 bits as a signed value)
    return as_int16.to(torch.int16).view(torch.bfloat16).reshape(value.shape)


def parameter_indices(optimizer) -> dict[int, int]:
    """id(param) → its number in ``state_dict()`` (the order of the param groups).  Kept while the
    groups' lists stay the same objects of the same lengths (add_param_group and load_state_dict
    change them): step_in_backward asks once per parameter per step, and rebuilding the map each
    time made a backward quadratic in the number of parameters."""
    groups = optimizer.param_groups
    shape = (id(groups), *((id(g), id(g["params"]), len(g["params"])) for g in groups))
    cached = optimizer.__dict__.get("_parameter_indices")
    if cached is None or cached[0] != shape:
        cached = optimizer.__dict__["_parameter_indices"] = (
            shape, {id(p): i for i, p in enumerate(p for g in groups for p in g["params"])})
    return cached[1]


def step_keys(optimizer, params, states, names: list[tuple[str, str]]) -> dict[str, list[int]]:
    """Each low-precision list's rounding keys for this step (list name → one per parameter), the
    step counted in each parameter's state."""
    numbers = parameter_indices(optimizer)
    counts = [s.get(COUNT_KEY, 0) for s in states]
    for p, c in zip(params, counts, strict=True):
        optimizer.state[p][COUNT_KEY] = c + 1  # (a state still empty is a temporary dict in ``states``)
    return {name: [state_key(numbers[id(p)], c, key) for p, c in zip(params, counts, strict=True)]
            for name, key in names}


class Rounded:
    """The readable reference (Note [Stochastic rounding of state]): the low-precision lists of a
    kernel's ``lists`` replaced by float32 copies for the kernel, and rounded back afterwards."""

    def __init__(self, lists: dict[str, list], keys: dict[str, list[int]]):
        self.lists, self.keys = lists, keys
        self.stored = {name: list(lists[name]) for name in keys}
        for name in keys:
            lists[name][:] = [None if t is None else t.float() for t in lists[name]]

    def store(self) -> None:
        for name, keys in self.keys.items():
            values = self.lists[name]
            for i, (new, old, key) in enumerate(zip(values, self.stored[name], keys, strict=True)):
                if new is None:
                    continue
                rounded = stochastic_round(new, key)
                if old is None:  # created by the kernel on this step (SGD's momentum_buffer)
                    values[i] = rounded
                else:
                    old.copy_(rounded)
                    values[i] = old


def convert_loaded_state(optimizer) -> None:
    """After ``load_state_dict`` (torch has cast every floating state to its parameter's dtype) or
    unpickling: a group's low-precision states in its ``state_dtype``, a float32 checkpoint's
    rounded to nearest (a conversion, not a step: no rounding key); a group without one drops the
    rounding counter a bfloat16 checkpoint brought."""
    for group in optimizer.param_groups:
        dtype = group.get("state_dtype")
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            # an int8 checkpoint's codes and scales: dequantized unless this group keeps int8 state;
            # a float one's states quantized if it does (Note [Blockwise 8-bit state])
            quantized_state.convert_state(optimizer, p, state, dtype)
            if dtype is None or quantized_state.is_int8(dtype):
                state.pop(COUNT_KEY, None)
                continue
            for key in optimizer._low_precision_state:
                value = state.get(key)
                if isinstance(value, torch.Tensor) and value.dtype != dtype:
                    state[key] = value.to(dtype)
