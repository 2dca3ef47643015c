"""Launching a generated Triton kernel once for all tensors of a (device, dtype) group.

The generated modules (generated/<spec>_triton.py) map each flag variant to a :class:`Kernel`,
called with the foreach backend's arguments, which calls :func:`launch`; everything here is the
same for every spec, so it is written once, by hand.  While a step is traced (torch.compile,
FakeTensors) the launch is the custom op ``optgen::triton_step`` instead (Note [Triton kernels as
custom ops]).  This module imports triton; optgen imports it only when a triton implementation
is first used (the optimizer classes name their triton module as a string).

Note [Launch tables]
~~~~~~~~~~~~~~~~~~~~
Like torch's ``multi_tensor_apply`` and apex, one launch covers every tensor: program ``pid``
finds its tensor and its chunk of it in tables.  Unlike them, the tables are not rebuilt per
launch: :func:`launch` packs, once per param set, one int64 tensor on the device::

    addresses      [lists, T]     data_ptr() of every param and state tensor (0 where unused)
    counter_addrs  [counters, T]  data_ptr() of every 0-dim counter (``step``)
    numels         [T]            elements per tensor
    first_step     [lazy, T]      1 where a lazily created state is new this step
    chunk_tensors  [P]            for each program: its tensor ...
    chunk_indices  [P]            ... and its chunk (CHUNK elements); an empty tensor gets one
                                  program, which still updates its counters
    arrivals       [T]            zeros: the kernel's per-tensor arrival counts (see Note
                                  [Triton kernel layout] in optgen/backends/triton.py)

and caches it under every address, numel and first-step flag.  The gradients' addresses are a
table of their own (``grad_addresses`` [T]), kept with the plan and replaced when they change:
``zero_grad(set_to_none=True)`` frees the gradients every step, and although the caching
allocator usually hands the same blocks back, a new address must cost no more than one small
non-blocking copy.  While the tensors stay the same — every step of a training run after the
first — a step costs one ``data_ptr()`` call per tensor to check the keys and one kernel launch:
no table copy and no synchronisation, so the step can be captured in a CUDA graph (whose
gradients are static).  A new parameter, a reloaded state dict or a newly created state builds a
new table.  Each section starts on a 16-byte boundary, so Triton's pointer-alignment
specialisation is the same for every table and a kernel compiles once per (variant, dtype,
guards).

On CPU tensors the kernel runs in Triton's interpreter (``triton.runtime.interpreter``) — the
same kernel, the same tables, numpy instead of a GPU — which is how the tests run it without a
GPU.  ``TRITON_INTERPRET=1`` (set before triton is imported) interprets every kernel; real GPUs
then need it unset.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import triton.language as tl  # the first use of a triton implementation imports triton here

from optgen.runtime import quantized_state
from optgen.runtime.native import (
    KernelDeclined,
    LaunchPlan,
    PlanCache,
    check_counter_dtypes,
    create_states,
    creates_states,
    flat_for_op,
    launcher_named,
    layout,
    lists_from_op,
    outside_storage,
    register_launcher,
    storage_sizes,
    traced,
)
from optgen.runtime.quantized_state import Int8State

#: Untuned defaults (no GPU was available when they were chosen): CHUNK elements per program,
#: warps per program, and BLOCK elements per loop iteration — None: 16 bytes per thread and
#: tensor (one 128-bit load each: 512 float32, 1024 bfloat16 with 4 warps).  `optgen bench
#: --device cuda` is where to tune them (PERF-NOTES: register pressure and occupancy decide
#: fused kernels).  Whole blocks of 16-byte-aligned tensors load and store unmasked as 128-bit
#: vectors (checked in the sm_90 PTX); the last, partial block of a chunk is masked.
CONFIG: dict[str, Any] = {"BLOCK": None, "CHUNK": 16 * 1024, "num_warps": 4}

# Note [Low-precision state in Triton]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Under ``state_dtype=torch.bfloat16`` a kernel is launched with ``LOW_STATE=True``: each state the
# spec marks ``low_precision`` is addressed as bfloat16, loaded into COMPUTE like any state, and
# stored rounded stochastically (optgen/backends/triton.py prints it) with the bits of Note
# [Stochastic rounding of state] (optgen/runtime/low_precision.py) — ``mix32`` of the element's
# index xor its tensor's key, read from the ``state_keys`` table ([low-precision states, T],
# int64) — the bits the for-loop reference and the C kernel draw.


DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
          torch.float64: tl.float64}

_PLANS = PlanCache()
_INTERPRETED: dict = {}


class _Plan(LaunchPlan):
    """The launch tables of one param set (see Note [Launch tables])."""

    def __init__(self, table: torch.Tensor, sections: tuple, num_tensors: int, programs: int):
        super().__init__()
        self.table = table            # the one int64 device tensor holding every section
        self.sections = sections      # (addresses, counter_addresses, numels, first_step, chunk_tensors,
        #                                chunk_indices, arrivals): views of `table`
        self.num_tensors = num_tensors
        self.programs = programs
        self.aligned = False          # every param and state address a multiple of 16 bytes
        self.scales: torch.Tensor | None = None  # int8 states' scales' addresses [states, T]
        self.grads_aligned = False


class Kernel:
    """A generated module's ``@triton.jit`` kernel: called as the foreach kernels are
    (``kernel(**lists, **scalars, grad_scale=..., found_inf=...)``), it evaluates its guards,
    picks its lists and hyperparameters by name and launches the kernel once per (device, dtype)
    group.  Its fields, as the generated ``LAUNCH = Kernel(...)`` gives them (each condition is
    over the keyword arguments ``a``):

    - ``tensors``: ``(list, used)`` pairs for params, grads, then states; ``used`` (None: always)
      says when a state a flag or hyperparameter may leave untouched is read;
    - ``counters``: the counter lists; ``lazy``: index → when that state is created on its first
      step; ``hyperparameters``: every scalar it takes, ``tensor_hyperparameters`` those that may
      be a tensor on the device;
    - ``guards``: its ``tl.constexpr`` conditions (the flags and hyperparameter comparisons its
      code branches on), by name."""

    def __init__(self, kernel, *, tensors, counters, lazy, hyperparameters, tensor_hyperparameters, guards,
                 low_precision=()):
        self.kernel, self.tensors, self.counters, self.lazy = kernel, tensors, counters, lazy
        #: indices into ``tensors`` of the states bfloat16 state_dtype keeps in bfloat16, in key order
        self.low_precision = tuple(low_precision)
        #: the kernel takes int8 state too (Note [Blockwise 8-bit state in Triton]): any with low-precision states
        self.int8 = bool(self.low_precision)
        self.hyperparameters, self.tensor_hyperparameters, self.guards = hyperparameters, tensor_hyperparameters, guards
        #: the generated module whose LAUNCH this is: how the custom op finds it again (a string
        #: goes into a graph; the kernel does not)
        self.module = kernel.fn.__module__
        register_launcher(self.module, self)

    def __call__(self, *, grad_scale=None, found_inf=None, state_keys=None, state_scales=None, **arguments) -> None:
        guards = {name: bool(condition(arguments)) for name, condition in self.guards.items()}
        tensors = [(arguments[name], used is None or bool(used(arguments))) for name, used in self.tensors]
        counters = [arguments[c] for c in self.counters]
        lazy = {index: when(arguments) for index, when in self.lazy.items()}
        hyperparameters = {h: arguments[h] for h in self.hyperparameters}
        params = tensors[0][0]
        if params and traced(params[0]):
            _traced_launch(self, tensors, counters, lazy, hyperparameters, guards, grad_scale, found_inf)
            return
        low: tuple[frozenset[int], torch.Tensor] | Int8State | None = None
        if state_keys is not None:  # bfloat16 state: [low-precision lists, T] keys (Note [Low-precision state
            # in Triton])
            keys = [state_keys[self.tensors[index][0]] for index in self.low_precision]
            low = (frozenset(self.low_precision), torch.tensor(keys, dtype=torch.int64, device=params[0].device))
        elif state_scales is not None:  # int8 state: each such list's scales (Note [Blockwise 8-bit state in Triton])
            if not self.int8:
                raise RuntimeError(f"optgen: {self.module} has no Triton kernel for int8 state")
            low = Int8State(self.low_precision, [state_scales[self.tensors[index][0]] for index in self.low_precision])
        launch(self.kernel, tensors=tensors, counters=counters, lazy=lazy, hyperparameters=hyperparameters,
               tensor_hyperparameters=self.tensor_hyperparameters, guards=guards,
               grad_scale=grad_scale, found_inf=found_inf, low=low)


# Note [Triton kernels as custom ops]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# While a step is traced (torch.compile, or make_fx / FakeTensorMode: ``native.traced``) the launch
# is the custom op ``optgen::triton_step``, as the C kernel is ``optgen::c_step`` (Note [C kernels
# as custom ops] in c_launch.py): one node in the graph that mutates the tensors (params, grads —
# GradScaler's unscale writes them back — and states) and counters it is given, with a fake
# implementation that does nothing.  Lazily created state is allocated before the op, in the
# traced code, and the op is told which entries are new; a list the flags leave unused, and any
# absent entry, passes as an empty tensor listed in ``absent`` (functionalization takes no None in
# a mutated list).  Hyperparameters that are tensors (a Tensor lr) pass as tensors, so the traced
# code reads no value.  At run time the op calls the eager launcher's ``_launch``: a compiled step
# computes the eager bits.  Eagerly the kernel is launched directly (no op dispatch per step).
#
# Why ``torch.library.custom_op`` and not ``torch.library.triton_op`` with ``wrap_triton``, which
# torch recommends for Triton kernels: triton_op's function must be traceable by make_fx (torch
# ops and wrapped kernel launches only), because AOTAutograd decomposes the op into it and
# inductor then reads which tensors the kernel mutates from the pointer arguments of the launch.
# optgen's kernels take no tensor pointers: they reach every tensor through a table of addresses
# (Note [Launch tables]), built from data_ptr() and cached across steps.  A FakeTensor's data_ptr()
# means nothing (torch warns: "wrap calls to tensor.data_ptr() in an opaque custom op"), and traced,
# the launch would mutate only the table as far as inductor could see, the params and states not
# at all.  An opaque custom op whose schema names what it mutates is what torch documents for that
# case: inductor neither looks inside it nor moves a read or write of its tensors across it.


def _traced_launch(kernel: Kernel, tensors, counters, lazy, hyperparameters: dict, guards: dict, grad_scale,
                   found_inf) -> None:
    """``launch`` as it is traced (Note [Triton kernels as custom ops])."""
    params = tensors[0][0]
    dtype = params[0].dtype
    if dtype not in DTYPES:
        raise RuntimeError(f"optgen's triton kernels support {', '.join(map(str, DTYPES))} parameters, "
                           f"not {dtype}; use foreach=True")
    lists = [values for values, _ in tensors]
    first = sum(create_states(params, lists, lazy), [])
    used = [bool(u) for _, u in tensors]
    flat, absent = flat_for_op([values if u else [None] * len(values) for values, u in tensors], params[0])
    numbers = [math.nan if isinstance(h, torch.Tensor) or h is None else float(h) for h in hyperparameters.values()]
    given = [h for h in hyperparameters.values() if isinstance(h, torch.Tensor)]
    positions = [k for k, h in enumerate(hyperparameters.values()) if isinstance(h, torch.Tensor)]
    torch.ops.optgen.triton_step(kernel.module, flat, used, absent,
                                 [c for values in counters for c in values], len(params), first, numbers, given,
                                 positions, list(guards.values()), grad_scale, found_inf)


@torch.library.custom_op("optgen::triton_step", mutates_args=("tensors", "counters"))
def _triton_step(module: str, tensors: list[torch.Tensor], used: list[bool], absent: list[int],
                 counters: list[torch.Tensor], n: int, first: list[int], hyperparameters: list[float],
                 tensor_hyperparameters: list[torch.Tensor], tensor_positions: list[int], guards: list[bool],
                 grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    """One launch of the Triton kernel of generated module ``module`` (its ``LAUNCH``).

    tensors: its lists (params, grads, states), each ``n`` long, one after another; ``used[k]``
        whether list k is read; ``absent``: the entries that stand for None.
    counters: its counter lists, ``n`` each; ``first``: the lazily created states' first-step
        flags, ``n`` per lazy state.
    hyperparameters: in ``LAUNCH.hyperparameters`` order (None as NaN); the one at
        ``tensor_positions[k]`` is the tensor ``tensor_hyperparameters[k]``.
    guards: the values of ``LAUNCH.guards``, in order.
    (Note [Triton kernels as custom ops])"""
    kernel = launcher_named(module)
    lists = lists_from_op(tensors, absent, n)
    values: list = [None if math.isnan(h) else h for h in hyperparameters]
    for position, t in zip(tensor_positions, tensor_hyperparameters, strict=True):
        values[position] = t
    _launch(kernel.kernel, tensors=list(zip(lists, used, strict=True)),
            counters=[counters[i:i + n] for i in range(0, len(counters), n)],
            new=[first[i:i + n] for i in range(0, len(first), n)],
            hyperparameters=dict(zip(kernel.hyperparameters, values, strict=True)),
            tensor_hyperparameters=kernel.tensor_hyperparameters,
            guards=dict(zip(kernel.guards, guards, strict=True)), grad_scale=grad_scale, found_inf=found_inf)


@_triton_step.register_fake
def _(module, tensors, used, absent, counters, n, first, hyperparameters, tensor_hyperparameters, tensor_positions,
      guards, grad_scale, found_inf) -> None:
    return None


def q8_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 code tables on ``device``: the maps then their midpoints and infinity (float32,
    1024), and the nearest-code lookup's first codes (int32, 4 x 65025: the C prelude's q8_first),
    both cut from quantized_state._lookup: the buckets of magnitudes up to 1, unsigned and signed
    positive values, then unsigned and signed negative ones."""
    if device not in _Q8_TABLES:
        q = quantized_state
        (first_u, above_u), (first_s, above_s) = q._lookup(False), q._lookup(True)
        buckets, negative = (0x3F800000 >> q._BUCKET_SHIFT) + 1, 1 << (31 - q._BUCKET_SHIFT)
        maps = torch.cat([q.code_map(False), q.code_map(True), above_u, above_s])
        first = torch.cat([first_u[:buckets], first_s[:buckets], first_u[negative:negative + buckets],
                           first_s[negative:negative + buckets]])
        _Q8_TABLES[device] = (maps.to(device), first.to(device))
    return _Q8_TABLES[device]


_Q8_TABLES: dict = {}


def block_for(dtype: torch.dtype) -> int:
    """BLOCK, the elements of one loop iteration, for parameters of ``dtype`` (CONFIG)."""
    return CONFIG["BLOCK"] or 32 * CONFIG["num_warps"] * 16 // dtype.itemsize


def int8_unsupported() -> str | None:
    """Why the kernels cannot step int8 state with this CONFIG (None: they can): a loop block
    must hold whole quantization blocks (Note [Blockwise 8-bit state in Triton])."""
    block = block_for(torch.float32)
    if block % quantized_state.BLOCK or CONFIG["CHUNK"] % block:
        return (f"the Triton kernels step int8 state in loop blocks of whole quantization blocks: BLOCK={block} is not "
                f"a multiple of {quantized_state.BLOCK} (or CHUNK={CONFIG['CHUNK']} of BLOCK)")
    return None


def launch(kernel, *, tensors, counters, lazy, hyperparameters, tensor_hyperparameters, guards,
           grad_scale=None, found_inf=None, low=None) -> None:
    """Runs ``kernel`` once over every tensor of one (device, dtype) group.

    tensors: ``(list, used)`` pairs in the kernel's order — params, grads, then states; ``used`` is
        False for a state the kernel does not touch under these hyperparameters (its entries may
        be None).
    counters: lists of 0-dim counters (``step``), on the parameters' device.
    lazy: index into ``tensors`` → whether that state is created now: its None entries are
        allocated here (and stored into the caller's list, which saves them in the state).
    hyperparameters: float64 kernel arguments; those named in ``tensor_hyperparameters`` may be
        1-element tensors, read in the kernel when on the parameters' device (no synchronisation).
    guards: the kernel's constexpr conditions, evaluated on the host.
    grad_scale, found_inf: GradScaler's tensors (None when not scaling).
    low: (indices into ``tensors`` of the bfloat16 states, their keys [states, T] on the device), or
        an Int8State, or None: every state in the parameters' dtype (Note [Low-precision state in
        Triton]).  An int8 launch creates no state (the reference does).
    """
    params = tensors[0][0]
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    if dtype not in DTYPES:
        raise RuntimeError(f"optgen's triton kernels support {', '.join(map(str, DTYPES))} parameters, "
                           f"not {dtype}; use foreach=True")
    lists = [values for values, _ in tensors]
    if isinstance(low, Int8State) and creates_states(lists, lazy):
        raise RuntimeError("optgen: the triton kernel's int8 launch creates no state: the step that creates it runs "
                           "on the reference (Note [Blockwise 8-bit state in Triton])")
    if creates_states(lists, lazy):
        # Checked before the new state exists: a group declined here (KernelDeclined: the caller
        # runs the for-loop instead) leaves nothing allocated behind in the caller's lists.
        _check(device, dtype, params, _named(tensors), counters, allow_missing=True, low=_low_lists(tensors, low))
    new = create_states(params, lists, lazy, _low_indices(low))
    _launch(kernel, tensors=tensors, counters=counters, new=new, hyperparameters=hyperparameters,
            tensor_hyperparameters=tensor_hyperparameters, guards=guards, grad_scale=grad_scale, found_inf=found_inf,
            low=low)


def _launch(kernel, *, tensors, counters, new, hyperparameters, tensor_hyperparameters, guards, grad_scale,
            found_inf, low=None) -> None:
    """``launch`` once the lazily created states exist (``new``: their first-step flags)."""
    params, grads = tensors[0][0], tensors[1][0]
    device, dtype = params[0].device, params[0].dtype
    plan = _plan(device, dtype, tensors, counters, new, low)
    grad_key = layout(grads, devices=True)
    if grad_key != plan.grad_key:  # zero_grad(set_to_none=True) hands out new gradients each step
        _check(device, dtype, params, [(grads, True, "gradient")], [])
        grad_addresses = [g.data_ptr() for g in grads]
        plan.grad_addresses = _to_device(grad_addresses, device)
        plan.grad_key = grad_key
        plan.grads_aligned = all(a % 16 == 0 for a in grad_addresses)
    addresses, counter_addresses, numels, first_step, chunk_tensors, chunk_indices, arrivals = plan.sections

    dummy = plan.table  # any device tensor: the pointer argument of a disabled feature
    kwargs = {}
    for name, value in hyperparameters.items():
        on_device = isinstance(value, torch.Tensor) and value.device == device
        if name in tensor_hyperparameters:
            kwargs[f"{name}_ptr"] = value if on_device else dummy
            kwargs[f"{name.upper()}_IS_TENSOR"] = on_device
            kwargs[name] = 0.0 if on_device else _number(value)
        else:
            kwargs[name] = _number(value)
    if grad_scale is not None:
        grad_scale = grad_scale.to(device, non_blocking=True)
    if found_inf is not None:
        found_inf = found_inf.to(device, non_blocking=True)
    counter_dtype = counters[0][0].dtype if counters and counters[0] else torch.float32
    block = block_for(dtype)
    if "LOW_STATE" in kernel.arg_names:  # a kernel with low-precision states (Note [Low-precision state in Triton])
        int8 = isinstance(low, Int8State)
        kwargs["state_keys"] = dummy if low is None or int8 else low[1]
        kwargs["LOW_STATE"] = low is not None and not int8
        kwargs["state_scales"], kwargs["q8_map"], kwargs["q8_first"] = dummy, dummy, dummy
        kwargs["INT8_STATE"], kwargs["Q8_BLOCK"] = int8, quantized_state.BLOCK
        kwargs["Q8_BITS"] = quantized_state.BLOCK.bit_length() - 1
        kwargs["Q8_SHIFT"] = quantized_state._BUCKET_SHIFT
        if int8:  # Note [Blockwise 8-bit state in Triton]
            reason = int8_unsupported()
            if reason is not None:
                raise RuntimeError(f"optgen: {reason}")
            kwargs["state_scales"] = plan.scales
            kwargs["q8_map"], kwargs["q8_first"] = q8_tables(device)
    elif low is not None:
        raise RuntimeError("optgen: this triton kernel keeps no low-precision state")
    run = _runner(kernel, device)
    with _on(device), _quiet(device):
        run[(plan.programs,)](
            addresses, plan.grad_addresses, counter_addresses, numels, first_step, chunk_tensors,
            chunk_indices, arrivals, plan.num_tensors,
            **kwargs,
            grad_scale=dummy if grad_scale is None else grad_scale,
            found_inf=dummy if found_inf is None else found_inf,
            **guards,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            ALIGNED=plan.aligned and plan.grads_aligned,
            DTYPE=DTYPES[dtype],
            COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
            COUNTER_DTYPE=DTYPES.get(counter_dtype, tl.float32),
            CHUNK=CONFIG["CHUNK"],
            BLOCK=block,
            num_warps=CONFIG["num_warps"],
            enable_fp_fusion=True,  # a * b + c as one FMA, as nvcc compiles torch's fused kernels
        )


def _number(value) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _plan(device, dtype, tensors, counters, new, low=None) -> _Plan:
    """The cached launch tables for these tensors, built on a miss (see Note [Launch tables])."""
    params = tensors[0][0]
    rows = [tensors[0], *tensors[2:]]  # params and states; the grads have their own table
    # Keyed on every tensor's layout, not its address alone (Note [Plan keys] in native.py).
    key = (device, dtype, CONFIG["CHUNK"], layout((t if used else None for values, used in rows for t in values),
                                                  devices=True),
           layout((c for values in counters for c in values), devices=True), tuple(map(tuple, new)),
           low is not None and (type(low).__name__, _low_indices(low)),
           isinstance(low, Int8State) and layout((s for per in low.scales for s in per), devices=True),
           # (and their storages' sizes: one shrunk in place may keep its address, Note [Plan keys])
           storage_sizes([*(values for values, used in rows if used), *counters,
                          *(low.scales if isinstance(low, Int8State) else ())]))
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    _check(device, dtype, params, [named for named in _named(tensors) if named[2] != "gradient"], counters,
           low=_low_lists(tensors, low), int8=isinstance(low, Int8State))
    if isinstance(low, Int8State):
        quantized_state.check_scales(params, [tensors[index][0] for index in low.order], low.scales, device,
                                     "triton kernel")
    addresses = [[t.data_ptr() for t in values] if used else [0] * len(params) for values, used in rows]
    counter_addresses = [[t.data_ptr() for t in values] for values in counters]
    numels = [p.numel() for p in params]
    chunk_tensors: list[int] = []
    chunk_indices: list[int] = []
    for i, n in enumerate(numels):
        chunks = max(1, -(-n // CONFIG["CHUNK"]))
        chunk_tensors += [i] * chunks
        chunk_indices += range(chunks)
    sections = [sum(addresses, []), sum(counter_addresses, []), numels, sum(new, []), chunk_tensors,
                chunk_indices, [0] * len(params)]
    flat: list[int] = []
    bounds = []
    for values in sections:
        start = len(flat)
        flat += values
        bounds.append((start, len(flat)))
        flat += [0] * (len(flat) % 2)  # 16-byte aligned sections
    table = _to_device(flat, device)
    plan = _Plan(table, tuple(table[a:b] for a, b in bounds), len(params), len(chunk_tensors))
    plan.aligned = all(a % 16 == 0 for row in addresses for a in row)
    if isinstance(low, Int8State):  # [states, T]: each int8 state's scales (Note [Blockwise 8-bit state in Triton])
        plan.scales = _to_device([0 if s is None else s.data_ptr() for per in low.scales for s in per] or [0], device)
    return _PLANS.put(key, plan)


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 table on the device: one host→device copy, non-blocking from pinned memory."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _named(tensors) -> list[tuple[list, bool, str]]:
    """The launch's ``(list, used)`` pairs with what each holds, for error messages."""
    names = ["parameter", "gradient", *(f"state {k}" for k in range(1, len(tensors) - 1))]
    return [(values, used, name) for (values, used), name in zip(tensors, names, strict=True)]


def _low_lists(tensors, low) -> frozenset[int]:
    """The ids of the lists a launch keeps in bfloat16 (``low``: see ``launch``)."""
    return frozenset(id(tensors[index][0]) for index in _low_indices(low))


def _low_indices(low) -> frozenset[int]:
    """The indices of the lists a launch keeps in low precision (``low``: see ``launch``)."""
    return frozenset() if low is None else low.indices if isinstance(low, Int8State) else low[0]


def _check(device, dtype, params, lists, counters, allow_missing: bool = False, low=frozenset(),
           int8: bool = False) -> None:
    """Every tensor the kernel will address is there, on the group's device and dtype (bfloat16 for
    the lists whose ids are in ``low``), shaped like its parameter and contiguous (the kernel walks
    it as one flat array); every counter is one element on the device, all of one dtype (run only
    when a table is built, not every step).  A tensor that is only not contiguous, or counters of
    two dtypes, raise KernelDeclined."""
    if low and dtype != torch.float32:
        raise RuntimeError(f"optgen's triton kernel keeps {'int8' if int8 else 'bfloat16'} state for float32 "
                           f"parameters, not {dtype}")
    for values, used, what in lists:
        if not used:
            continue
        expected = (torch.uint8 if int8 else torch.bfloat16) if id(values) in low else dtype
        for i, t in enumerate(values):
            if t is None:
                if allow_missing:  # a state this step creates
                    continue
                raise RuntimeError(f"optgen triton launch: the {what} of parameter {i} is missing")
            if t.device != device or t.dtype != expected or t.shape != params[i].shape:
                raise RuntimeError(f"optgen's triton kernel needs every tensor of a group on one device and dtype, "
                                   f"shaped like its parameter: the {what} of parameter {i} is {t.dtype} "
                                   f"{tuple(t.shape)} on {t.device}, the parameter {params[i].dtype} "
                                   f"{tuple(params[i].shape)} on {device}")
            if not t.is_contiguous():
                raise KernelDeclined(f"optgen's triton kernel needs contiguous tensors; the {what} of parameter {i} "
                                     "is not contiguous")
            if outside_storage(t):
                raise RuntimeError(f"optgen's triton kernel: the {what} of parameter {i} ({tuple(t.shape)}) lies "
                                   "outside its storage (the storage was resized or freed in place)")
    for values in counters:
        for i, t in enumerate(values):
            if t.device != device or t.numel() != 1 or outside_storage(t):
                raise RuntimeError(f"optgen's triton kernel reads its counters (step) as 1-element tensors on the "
                                   f"parameters' device ({device}); parameter {i}'s is {t.dtype} {tuple(t.shape)} "
                                   f"on {t.device}")
    check_counter_dtypes(counters, "triton kernel")


def _runner(kernel, device):
    """The kernel itself on a GPU; its interpreted form on CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    if device.type != "cpu":
        if isinstance(kernel, InterpretedFunction):
            raise RuntimeError("TRITON_INTERPRET=1 interprets kernels on CPU tensors only; unset it to run "
                               f"optgen's triton kernels on {device}")
        return kernel
    if isinstance(kernel, InterpretedFunction):
        return kernel
    if kernel not in _INTERPRETED:
        _INTERPRETED[kernel] = InterpretedFunction(kernel.fn)
    return _INTERPRETED[kernel]


def _quiet(device: torch.device):
    """The interpreter computes with numpy, which warns where a kernel computes a value it then
    does not select (``tl.where`` over sqrt of a negative, a state created this step): silence it."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    import numpy as np

    return np.errstate(all="ignore")


def _on(device: torch.device):
    """The device a launch needs current (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
