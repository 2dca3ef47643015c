"""Blockwise 8-bit optimizer state: ``state_dtype="int8"`` (issue 15).

Note [Blockwise 8-bit state]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
With ``state_dtype="int8"`` each state the spec marks ``low_precision`` (Note [Low-precision
state] in optgen/spec/load.py) of a parameter with at least :data:`MIN_NUMEL` elements is kept as
one byte per element plus one float32 scale per block of :data:`BLOCK` elements: about 2 bytes of
state per parameter for Adam instead of 8.  Smaller tensors (biases, norms) keep float32 state: the
bytes saved there are few, and their statistics are the least forgiving (bitsandbytes' choice
too, with the same threshold).

- **Blocks of 256.**  Each block's values are divided by the block's largest magnitude (its
  ``absmax``, the scale kept in float32), so one outlier costs precision in its own block only.
  256 as torchao's AdamW8bit: the scales add 4/256 = 0.016 bytes per element, and a block is small
  enough that a gradient's large entries do not flatten the rest of the tensor (bitsandbytes'
  2048 saves 0.014 bytes per element for coarser blocks).
- **The dynamic code map** of Dettmers' 8-bit optimizers (bitsandbytes' ``create_dynamic_map``,
  7 exponent bits): 256 values in [-1, 1] spaced by powers of ten, linear within a decade, so a
  block keeps relative precision across seven decades below its absmax, where a linear map
  keeps it across one.  A state the spec marks ``nonnegative`` (second moments: Adam's
  ``exp_avg_sq``) uses the unsigned map, twice the codes over [0, 1].  A block of one that holds
  a negative value anyway (RMSprop's ``square_avg`` with alpha > 1, which torch allows) uses the
  signed map, its scale stored negated to say so: the promise buys precision, and breaking it
  costs neither a wrong value nor an error raised after the parameters were updated.
- **Rounding** to the nearest code (ties to the lower code): deterministic, as both libraries do;
  the map's relative spacing keeps an update small next to a value from vanishing unless it is
  below the value's ~5% quantum (7 bits across a decade).
- The state entry ``state[p][key]`` holds the codes (uint8, shaped like the parameter) and
  ``state[p][key + ".absmax"]`` the scales (float32, one per block): ``state_dict()`` carries both
  and loads back bit for bit; loading a float32 or bfloat16 checkpoint into an int8 optimizer
  quantizes it, an int8 checkpoint into another one dequantizes it (:func:`convert_loaded_state`).
- A block a step left as it was keeps its codes and scale (:func:`requantize`): quantized again,
  one whose largest magnitude is negative would shrink 0.7% (the signed map has no -1), step after
  step — in the rows a sparse gradient does not touch, or in a state a flag leaves unused
  (RMSprop's ``grad_avg`` once ``centered`` is off).  The reference compares the blocks of every
  signed state (an unsigned block requantizes to itself: its map has 1); the fused kernels never
  store a state their step does not write.
- A NaN in a block makes the block's absmax NaN, so the whole block's state dequantizes to NaN on
  the next step (as in bitsandbytes and torchao); a float32 state would keep it to the element.

The for-loop and foreach kernels are the reference: the runtime hands them float32 copies of the
quantized states, runs the generated kernel unchanged, and quantizes the results back
(:class:`Quantized`).  **Transient memory**: it does so for a batch of at most
:data:`BATCH_ELEMENTS` parameter elements at a time, a larger parameter of an elementwise spec in
chunks of that size (:func:`chunked`), so a step's float32 copies are a few MiB, not the whole
group's float32 state.  (Before: 91.6 MiB of temporaries for 8 parameters of 1M elements whose
float32 state is 61 MiB, 191 MiB for one of 8M; now 27.7 and 25.0 MiB.)  The fused C and Triton
kernels update the codes in place instead (Note [Blockwise 8-bit state in C] in
optgen/backends/c.py, Note [Blockwise 8-bit state in Triton] in optgen/backends/triton.py): the
default on CPU is the C kernel; ``fused=True`` picks a fused kernel, or says why none applies.
"""
from __future__ import annotations

import functools

import torch

from optgen.runtime.subclasses import _dtensor_type

#: the ``state_dtype`` value that selects this
INT8 = "int8"
#: elements per block (one float32 scale each)
BLOCK = 256
#: parameters with fewer elements keep their states in float32
MIN_NUMEL = 4096
#: the suffix of the state entry holding a quantized state's scales
ABSMAX = ".absmax"


@functools.cache
def code_map(signed: bool) -> torch.Tensor:
    """The 256 values the codes stand for, ascending (Note [Blockwise 8-bit state]): per decade
    k = 0..6 below 1, 2**k (signed) or 2**(k+1) (unsigned) values evenly inside (0.1, 1] * 10**(k-6),
    the midpoints of that many equal steps; their negatives when signed; then 0 and 1."""
    values: list[float] = []
    for k in range(7):
        steps = 2 ** k if signed else 2 ** (k + 1)
        edges = torch.linspace(0.1, 1.0, steps + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)).tolist()
        values += mids
        if signed:
            values += [-v for v in mids]
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _midpoints(signed: bool) -> torch.Tensor:
    m = code_map(signed)
    return (m[:-1] + m[1:]) / 2


#: the float32 bits below a lookup bucket: 18 bits left (sign, exponent, 9 of the mantissa)
_BUCKET_SHIFT = 14


@functools.cache
def _lookup(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code lookup by bit pattern (Note [Blockwise 8-bit state], "rounding"): the code of a
    value x is the number of midpoints below it.  Values sharing their top 18 bits fall in one
    bucket; ``first[bucket]`` counts the midpoints below the bucket's smallest value, and a bucket
    holds at most one midpoint (checked here: the map's closest codes are 0.7% apart, a bucket
    0.2% wide), so code = first + (x > ``above[first]``, the next midpoint).  Two table reads and a
    comparison per element: ~7x faster than a binary search of the 255 midpoints (torch.bucketize)."""
    mid = _midpoints(signed)
    keys = torch.arange(1 << (32 - _BUCKET_SHIFT), dtype=torch.int64)
    low = keys << _BUCKET_SHIFT  # the bucket's smallest magnitude; for negative floats its largest value
    negative = keys >= 1 << (31 - _BUCKET_SHIFT)
    smallest = torch.where(negative, low | ((1 << _BUCKET_SHIFT) - 1), low)
    smallest = (smallest - ((smallest & (1 << 31)) << 1)).to(torch.int32).view(torch.float32)
    first = torch.searchsorted(mid, smallest.contiguous(), side="left").clamp_(max=255).to(torch.int32)
    mid_bits = mid.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    assert len(set((mid_bits >> _BUCKET_SHIFT).tolist())) == mid.numel(), "two midpoints share a lookup bucket"
    above = torch.cat([mid, torch.tensor([float("inf")])])
    return first, above


#: a step's float32 copies of int8 states cover at most this many parameter elements at a time (a
#: larger parameter in chunks of this many, or alone: :func:`chunked`): Note [Blockwise 8-bit state]
BATCH_ELEMENTS = 1 << 20


def is_int8(state_dtype) -> bool:
    return isinstance(state_dtype, str) and state_dtype == INT8


def quantizable(param: torch.Tensor) -> bool:
    return param.numel() >= MIN_NUMEL


def blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _nearest_codes(normalized: torch.Tensor, signed: bool) -> torch.Tensor:
    """The nearest code of each value in [-1, 1] (``_lookup``), as int32."""
    first, above = (t.to(normalized.device) for t in _lookup(signed))
    bucket = (normalized.view(torch.int32) >> _BUCKET_SHIFT) & ((1 << (32 - _BUCKET_SHIFT)) - 1)
    code = first.index_select(0, bucket)
    return code + (normalized > above.index_select(0, code))


def quantize(value: torch.Tensor, signed: bool, name: str = "state") -> tuple[torch.Tensor, torch.Tensor]:
    """``value`` (float32) as (codes: uint8 shaped like it, absmax: float32, one per block).  A block
    of a nonnegative state (``signed`` False) that holds a negative value (RMSprop with alpha > 1:
    torch allows it) is quantized with the signed map instead, its scale stored negated to say so
    (Note [Blockwise 8-bit state]: the spec's promise buys precision, and is never a wrong value)."""
    flat = value.detach().reshape(-1).float()
    n = flat.numel()
    padded = flat.view(-1, BLOCK) if n % BLOCK == 0 else \
        torch.nn.functional.pad(flat, (0, blocks(n) * BLOCK - n)).view(-1, BLOCK)
    absmax = padded.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # (an all-zero block: codes for 0)
    normalized = (padded / scale[:, None]).reshape(-1)[:n]
    codes = _nearest_codes(normalized, signed)
    if not signed:
        negative = (padded < 0).any(dim=1)
        if bool(negative.any()):
            in_negative = negative.repeat_interleave(BLOCK)[:n]
            codes = torch.where(in_negative, _nearest_codes(normalized, True), codes)
            absmax = torch.where(negative, -absmax, absmax)
    return codes.to(torch.uint8).view(value.shape), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """The float32 values ``quantize`` stood for (the codes' values times their block's absmax; a
    negative scale of an unsigned state: its block's codes are the signed map's)."""
    n = codes.numel()
    flat_codes = codes.reshape(-1).int()
    values = code_map(signed).to(codes.device).index_select(0, flat_codes)
    if not signed and bool((absmax < 0).any()):
        in_signed = (absmax < 0).repeat_interleave(BLOCK)[:n]
        values = torch.where(in_signed, code_map(True).to(codes.device).index_select(0, flat_codes), values)
        absmax = absmax.abs()
    if n % BLOCK == 0:  # (no partial block: no padded copy)
        return (values.view(-1, BLOCK) * absmax[:, None]).view(codes.shape)
    padded = torch.nn.functional.pad(values, (0, blocks(n) * BLOCK - n)).view(-1, BLOCK)
    return (padded * absmax[:, None]).reshape(-1)[:n].view(codes.shape)


def requantize(value: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, signed: bool,
               name: str = "state") -> tuple[torch.Tensor, torch.Tensor]:
    """``value`` quantized, except that a block still equal to what ``codes`` and ``absmax`` stand for
    keeps them: quantized again, a block whose largest magnitude is negative would shrink by 0.7%
    (the signed map has no -1), so a state a step leaves alone (a sparse gradient's other rows)
    would decay step after step."""
    new_codes, new_absmax = quantize(value, signed, name)
    n = value.numel()
    equal = value.detach().reshape(-1) == dequantize(codes, absmax, signed).reshape(-1)
    same = torch.nn.functional.pad(equal, (0, blocks(n) * BLOCK - n), value=True).view(-1, BLOCK).all(dim=1)
    if bool(same.any()):
        keep = same.repeat_interleave(BLOCK)[:n].view(codes.shape)
        new_codes, new_absmax = torch.where(keep, codes, new_codes), torch.where(same, absmax, new_absmax)
    return new_codes, new_absmax


def check_scales(params, codes: list, scales: list, device: torch.device, kernel: str) -> None:
    """Each int8 state's scales, as a fused kernel addresses them: a contiguous float32 tensor on
    ``device`` of one per block of its codes (the kernel reads and writes that many: a shorter one
    would be written past its end).  ``codes``, ``scales``: per state, its list over ``params``."""
    from optgen.runtime.native import outside_storage

    for values, per_tensor in zip(codes, scales, strict=True):
        for i, (c, s) in enumerate(zip(values, per_tensor, strict=True)):
            if c is None:
                continue
            wanted = blocks(params[i].numel())
            if s is None or s.device != device or s.dtype != torch.float32 or s.numel() != wanted \
                    or not s.is_contiguous() or outside_storage(s):
                if s is None:
                    got = "are missing"
                elif s.is_contiguous() and outside_storage(s):
                    got = "lie outside their storage (resized or freed in place)"
                else:
                    layout = "" if s.is_contiguous() else " (not contiguous)"
                    got = f"are {s.dtype} {tuple(s.shape)}{layout} on {s.device}"
                raise RuntimeError(f"optgen's {kernel} needs an int8 state's scales as a contiguous float32 tensor "
                                   f"of {wanted} elements (one per block of {BLOCK}) on {device}: parameter {i}'s "
                                   f"{got}")


class Int8State:
    """A fused launch's int8 states: their indices into its lists (``order``, as the kernel reads
    them; ``indices``, as a set) and each one's scales per tensor (float32, one per block), which
    the C kernel finds in its address table's rows after the lists and the Triton kernel in its
    ``state_scales`` table (Note [Blockwise 8-bit state in C] in optgen/backends/c.py)."""

    def __init__(self, order: tuple[int, ...], scales: list[list[torch.Tensor | None]]):
        self.order, self.indices, self.scales = order, frozenset(order), scales


def is_quantized(state: dict, key: str) -> bool:
    """Whether ``state[key]`` holds codes: it has scales beside it.  (Not its dtype: torch's
    ``load_state_dict`` casts every non-counter state of a floating parameter to the parameter's
    dtype, codes included: 201 becomes 201.0.)"""
    return isinstance(state.get(key), torch.Tensor) and key + ABSMAX in state


class Quantized:
    """The readable reference (Note [Blockwise 8-bit state]): a kernel's quantized lists replaced
    by float32 copies for the kernel, and quantized back afterwards into the same codes and scales.
    A state the kernel creates on this step (SGD's momentum buffer) is quantized into new ones.
    ``states``: per entry of the lists, the mapping holding its codes and scales (a parameter's
    state, or a chunk's views of them: :func:`chunked`); ``params``: the parameter of each entry.
    ``partial``: the step updates some elements only (a sparse gradient's rows): the blocks it left
    as they were keep their codes and scales (:func:`requantize`), as a signed state's always do."""

    def __init__(self, optimizer, params, states, lists: dict[str, list], names: list[tuple[str, str]],
                 partial: bool = False):
        self.optimizer, self.params, self.states, self.lists = optimizer, params, states, lists
        self.partial = partial
        self.names = names  # (list name, state key) of each low-precision list
        self.signed = {key: key not in optimizer._nonnegative_state for _, key in names}
        self.stored = {}
        for name, key in names:
            values = lists[name]
            self.stored[name] = list(values)
            for i, (state, t) in enumerate(zip(states, values, strict=True)):
                if t is not None and t.dtype == torch.uint8:
                    values[i] = dequantize(t, state[key + ABSMAX], self.signed[key])

    def store(self) -> None:
        for name, key in self.names:
            values, stored = self.lists[name], self.stored[name]
            for i, (p, state, new, old) in enumerate(zip(self.params, self.states, values, stored, strict=True)):
                if new is None:
                    continue
                if old is not None and old.dtype == torch.uint8:
                    scales = state[key + ABSMAX]
                    # (a block left as it was keeps its codes: Note [Blockwise 8-bit state])
                    codes, absmax = requantize(new, old, scales, self.signed[key], key) \
                        if self.partial or self.signed[key] else quantize(new, self.signed[key], key)
                    old.copy_(codes)
                    scales.copy_(absmax)
                    values[i] = old
                elif old is None and quantizable(p) and not new.is_sparse:  # created by the kernel on this step
                    # (a sparse one, SGD's momentum buffer of sparse gradients, has no blocks: kept as torch keeps it)
                    values[i], self.optimizer.state[p][key + ABSMAX] = quantize(new, self.signed[key], key)


def chunked(optimizer, params, states, lists: dict[str, list]):
    """The lists with each parameter over BATCH_ELEMENTS elements split into chunks of that many
    (a whole number of blocks) — views of its parameter, gradient, states, codes and scales, so the
    reference's float32 copies of one chunk at a time are the transient memory — where that is
    the same step: an elementwise spec (its DTensor shards step alike), with no lazily created
    state, every tensor contiguous.  A counter goes to the last chunk, each other chunk gets a
    copy to advance (every chunk computes its scalars from the counters' values before the step).
    Returns (params, states, lists) with one entry per chunk."""
    counters = {name for name, _ in optimizer._counter_state}
    if not optimizer._elementwise or optimizer._lazy_state:
        return params, states, lists
    out_params, out_states = [], []
    out_lists: dict[str, list] = {name: [] for name in lists}
    for i, (p, state) in enumerate(zip(params, states, strict=True)):
        entries = {name: values[i] for name, values in lists.items()}
        tensors = [t for name, t in entries.items() if name not in counters and t is not None]
        if p.numel() <= BATCH_ELEMENTS or not all(t.is_contiguous() and t.numel() == p.numel() for t in tensors):
            out_params.append(p)
            out_states.append(state)
            for name, t in entries.items():
                out_lists[name].append(t)
            continue
        starts = range(0, p.numel(), BATCH_ELEMENTS)
        for k, a in enumerate(starts):
            b = min(a + BATCH_ELEMENTS, p.numel())
            last = k == len(starts) - 1
            out_params.append(p)
            out_states.append({key: value[a // BLOCK:blocks(b)]
                               for key, value in state.items() if key.endswith(ABSMAX)})
            for name, t in entries.items():
                if name in counters:
                    out_lists[name].append(t if last or t is None else t.clone())
                else:
                    out_lists[name].append(None if t is None else t.view(-1)[a:b])
    return out_params, out_states, out_lists


def chunk_batches(lists: dict[str, list], params: list[torch.Tensor]) -> list[range]:
    """Consecutive runs of the entries of at most BATCH_ELEMENTS elements together (at least one each)."""
    sizes = [t.numel() for t in lists["params"]] if "params" in lists else [p.numel() for p in params]
    out: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > BATCH_ELEMENTS:
            out.append(range(start, i))
            start, total = i, 0
        total += size
    out.append(range(start, len(sizes)))
    return out


def initial(optimizer, param: torch.Tensor, state: dict) -> dict:
    """A new state with its low-precision tensors quantized (a parameter too small keeps float32)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        raise ValueError(f"{type(optimizer).__name__}(state_dtype='int8') does not take DTensor parameters yet (FSDP2, "
                         "tensor parallel): a block of the state would span shards; use state_dtype=torch.bfloat16 "
                         "or None")
    if not quantizable(param):
        return state
    out = {}
    for key, value in state.items():
        if key in optimizer._low_precision_state and isinstance(value, torch.Tensor):
            out[key], out[key + ABSMAX] = quantize(value, key not in optimizer._nonnegative_state, key)
        else:
            out[key] = value
    return out


def _codes(value: torch.Tensor, key: str) -> torch.Tensor:
    """A loaded state's codes as uint8 again (torch cast them to the parameter's dtype: whole
    numbers 0..255, exact in float32, float64 and bfloat16)."""
    if value.dtype == torch.uint8:
        return value
    codes = value.to(torch.uint8)
    if not torch.equal(codes.to(value.dtype), value):
        raise ValueError(f"optgen: loaded state {key!r} has scales ({key + ABSMAX!r}) but is not a tensor of codes "
                         "(whole numbers 0..255): not an int8 state")
    return codes


def convert_state(optimizer, param: torch.Tensor, state: dict, dtype) -> None:
    """One parameter's loaded state into the group's ``state_dtype`` (None: the parameter's dtype),
    in place: quantized where int8 asks for it, dequantized (and its scales dropped) elsewhere."""
    for key in optimizer._low_precision_state:
        value = state.get(key)
        if not isinstance(value, torch.Tensor) or value.is_sparse:  # (a sparse one stays as torch keeps it)
            continue
        signed = key not in optimizer._nonnegative_state
        int8 = is_int8(dtype) and quantizable(param)
        if is_quantized(state, key):
            value = state[key] = _codes(value, key)
            if int8:
                continue
            absmax = state.pop(key + ABSMAX)
            value = dequantize(value, absmax.float(), signed)
            state[key] = value.to(param.dtype if dtype is None or is_int8(dtype) else dtype)
        elif int8:
            state[key], state[key + ABSMAX] = quantize(value.float(), signed, key)
        else:
            state.pop(key + ABSMAX, None)
