"""The runtime side of a generated optimizer: gather a group's tensors, call the generated kernel.

A generated class (generated/<name>.py) subclasses :class:`GeneratedOptimizer` and supplies data
and small generated methods:

- ``_flags``: the names of its flag hyperparameters;
- ``_kernels``: implementation name → generated kernel module, whose ``KERNEL`` record
  (optgen/runtime/kernels.py) is all the runtime reads of it; a module named by a string (the
  triton one) is imported on first use, so importing optgen never imports triton; a
  ``differentiable=True`` group runs the ``"differentiable"`` module (Note [differentiable=True]);
- ``_tensor_state`` / ``_counter_state``: (rule name, state key) pairs in kernel argument order;
- ``_lazy_state``: state keys created by the kernel itself on their first step;
- ``_low_precision_state``: state keys ``state_dtype=torch.bfloat16`` stores in bfloat16 (Note
  [Stochastic rounding of state] in optgen/runtime/low_precision.py);
- ``_scalars``: kernel keyword → (group key, tuple index or None);
- ``_init_state(param, group)``: creates ``self.state[param]`` (generated from the spec);
- ``_loaded_group_defaults`` / ``_loaded_group_fixed``: group keys a loaded state (an older
  checkpoint) may lack, and keys a class always has (AdamW's ``decoupled_weight_decay``), set by
  ``__setstate__`` as torch's optimizers set them;
- ``_complex_as_real``: view complex tensors as real before calling the kernel;
- ``_elementwise``: each element's update reads only that element (Note [Tensor subclasses]).

Everything here is the same for every spec, so it is written once, by hand, and tested once.
"""
from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, cast

import torch

from optgen.runtime import dispatch, low_precision, quantized_state, subclasses
from optgen.runtime.kernels import KernelModule
from optgen.runtime.native import KernelDeclined
from optgen.runtime.optimizer import Optimizer
from optgen.runtime.step_cache import CachedStep

if TYPE_CHECKING:
    from optgen.runtime import c_launch, triton_launch


def scalar_dtype() -> torch.dtype:
    """torch's dtype for a `step` counter (float64 only under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def counter_from(value) -> torch.Tensor:
    """A 0-dim counter state filled from a hyperparameter (ASGD's ``eta = lr``): a number, or in a
    differentiable group a Tensor, whose autograd graph the state keeps."""
    if isinstance(value, torch.Tensor):
        return value.to(scalar_dtype(), copy=True).reshape(())
    return torch.tensor(float(value), dtype=scalar_dtype())


def filled_like(param: torch.Tensor, value, complex_pair: bool = False) -> torch.Tensor:
    """A state tensor like ``param`` filled with a hyperparameter (Rprop's ``step_size = lr``); a
    complex parameter's with ``value + value·i`` where the spec says so, as torch fills it."""
    if complex_pair and param.is_complex():
        value = value * (1 + 1j) if isinstance(value, torch.Tensor) else complex(value, value)
    if isinstance(value, torch.Tensor):  # a differentiable group's Tensor lr: keep its graph
        return torch.zeros_like(param, memory_format=torch.preserve_format).add_(value)
    return torch.full_like(param, value, memory_format=torch.preserve_format)


def to_number(value):
    """A hyperparameter as a Python number (1-element Tensor learning rates included)."""
    return value.item() if isinstance(value, torch.Tensor) else value


class GeneratedOptimizer(Optimizer):
    _flags: tuple[str, ...] = ()
    _kernels: dict = {}
    _tensor_state: tuple[tuple[str, str], ...] = ()
    _counter_state: tuple[tuple[str, str], ...] = ()
    _lazy_state: tuple[str, ...] = ()
    _low_precision_state: tuple[str, ...] = ()
    _nonnegative_state: tuple[str, ...] = ()
    _scalars: dict[str, tuple[str, int | None]] = {}
    _loaded_group_defaults: dict[str, object] = {}
    _loaded_group_fixed: dict[str, object] = {}
    _complex_as_real = False
    _elementwise = False  # the safe answer for a class written by hand
    #: which gradients a step takes: "dense" (a sparse one is an error), "sparse" (only sparse ones,
    #: SparseAdam), "dense_or_sparse" (SGD), "dense_or_gathered" (Adagrad); Note [Sparse gradients]
    _gradients = "dense"
    _host_counters: tuple[str, ...] = ()  # counters kept as Python numbers in the state
    # torch 2.13's wordings and quirks where they are not the usual ones (a spec's [torch_parity],
    # optgen.spec.model.TorchParity says what each means)
    _sparse_gradient_error: str | None = None
    _dense_gradient_error: str | None = None
    _sparse_fused_error: str | None = None
    _capturable_error: dict[str, tuple[str, bool]] = {}
    _step_requires_grad_error = False
    _foreach_differentiable = False

    #: force one implementation for every group (None: choose like torch; see runtime/dispatch.py)
    implementation: str | None = None

    @property
    def implementations(self) -> tuple[str, ...]:
        return tuple(self._kernels)

    def _init_state(self, param: torch.Tensor, group: dict) -> dict:
        """The state a parameter starts with (generated from the spec's [state] table)."""
        raise NotImplementedError

    @property
    def in_backward(self):
        """The handle of the step inside backward (``step_in_backward=True``, or
        ``optgen.step_in_backward(self)``): ``opt.in_backward.remove()`` ends it; None when off."""
        return vars(self).get("_step_in_backward")  # (in_backward.ATTRIBUTE: that module imports this one)

    def __getstate__(self) -> dict:
        """torch's (defaults, state, param groups), plus an ``implementation`` set on this
        optimizer: torch keeps only its own three, so a deepcopy or pickle round trip lost it
        (``__setstate__`` puts it back; ``load_state_dict`` passes none and keeps the one set)."""
        state = super().__getstate__()
        if "implementation" in vars(self):
            state["implementation"] = self.implementation
        return state

    def __setstate__(self, state: dict) -> None:
        """Note [Counters saved as numbers]: older torch releases saved ``step`` (ASGD's ``eta`` and
        ``mu``, NAdam's ``mu_product``) as Python numbers, and torch 2.13 still loads them: each
        optimizer's ``__setstate__`` (which ``load_state_dict`` calls) turns them back into 0-dim
        tensors.  The kernels update counters in place, so they do the same here, for every spec,
        into the tensor a fresh state would hold: the scalar dtype on the CPU, or next to the
        parameter when the group is ``capturable`` / ``fused`` (float32 when ``fused``), which is
        where torch puts them.  Host counters (SparseAdam's ``step``) stay numbers."""
        # load_state_dict passes the loaded groups while this optimizer's are still in place: each
        # keeps its own state_dtype, not the checkpoint's (a deepcopy or unpickling has none yet)
        own = self.__dict__.get("param_groups")
        super().__setstate__(state)
        if own is not None and len(own) == len(self.param_groups):
            for group, before in zip(self.param_groups, own, strict=True):
                group.pop("state_dtype", None)
                if before.get("state_dtype") is not None:
                    group["state_dtype"] = before["state_dtype"]
        low_precision.convert_loaded_state(self)  # Note [Stochastic rounding of state]
        self.__dict__.pop("_cached_steps", None)  # bound to the tensors of the state replaced (Note [Cached steps])
        counters = {key for _, key in self._counter_state} - set(self._host_counters)
        for group in self.param_groups:
            for key, value in self._loaded_group_defaults.items():
                group.setdefault(key, value)
            group.update(self._loaded_group_fixed)
            for p in group["params"]:
                p_state = self.state.get(p)
                if not p_state:
                    continue
                numbers = {key: p_state[key] for key in counters
                           if key in p_state and not isinstance(p_state[key], torch.Tensor)}
                if numbers:
                    tensors = {key: torch.tensor(float(v), dtype=scalar_dtype()) for key, v in numbers.items()}
                    p_state.update(dispatch.place_counters(tensors, p, group, counters))

    def _step_group(self, group: dict) -> None:
        """One step for one param group, in order: the parameters with gradients and their state;
        the kernel's lists; which implementation runs them; its hyperparameters (and GradScaler's
        state); the kernel; the state it created, stored.  A step like the last one of this group
        reuses its bound launch instead (Note [Cached steps])."""
        cached = self.__dict__.get("_cached_steps", {}).get(id(group))
        if cached is not None and cached.group is group and cached(self, group):
            return
        params, grads = self._params_with_grad(group)
        single_sparse = self._check_gradients(group, grads)
        if not params:
            return
        if torch.compiler.is_compiling():
            self._init_group(group)  # run by dynamo on the real tensors (Note [State made before tracing])
        states = [self._state_of(p, group) for p in params]
        tensors, created = self._kernel_lists(params, grads, states, group)
        # int8 state (Note [Blockwise 8-bit state]): a sparse step takes float32 copies of the whole
        # group before rows are gathered (rows of codes cannot be dequantized or quantized apart from
        # their blocks' scales); a dense one runs a batch at a time below (_run_int8)
        int8 = quantized_state.is_int8(group.get("state_dtype"))
        sparse = self._gradients == "sparse" or \
            (self._gradients == "dense_or_gathered" and any(g.is_sparse for g in grads))
        quantized = None
        if int8 and sparse:
            quantized = quantized_state.Quantized(self, params, states, tensors, self._low_precision_lists(),
                                                  partial=True)
        scatter = None
        if sparse:
            tensors, scatter = _gather_rows(tensors)  # Note [Sparse gradients]
        implementation, tensors, to_global = self._choose_implementation(group, params, tensors, single_sparse)
        kernel = self._kernel(implementation)
        scalars = self._kernel_scalars(kernel, group)
        if kernel.grad_scaler:
            scalars.update(grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None))
        elif _unscale_or_skip(self, grads):
            return
        if kernel.counters_on_device:
            _counters_on_device(self, params, states, tensors)
        keys = self._rounding_keys(group, params, states, implementation)
        if int8 and quantized is None and implementation in ("c", "triton"):  # dequantized, updated, requantized
            self._run_int8_fused(kernel, group, params, states, tensors, scalars)
        elif int8 and quantized is None:  # the reference, a batch of parameters or chunks at a time
            self._run_int8(kernel, group, params, states, tensors, scalars)
        elif quantized is not None:  # the reference on float32 copies, quantized back below
            self._run_kernel(kernel, group, tensors, scalars)
        elif keys is None:
            self._run_kernel(kernel, group, tensors, scalars)
        elif implementation in ("c", "triton"):  # the kernel rounds in registers
            self._run_kernel(kernel, group, tensors, scalars, state_keys=keys)
        else:  # the readable reference: float32 copies, rounded back after the kernel
            rounded = low_precision.Rounded(tensors, keys)
            self._run_kernel(kernel, group, tensors, scalars)
            rounded.store()
        if scatter is not None:
            scatter()
        if quantized is not None:
            quantized.store()
        if to_global is not None:
            tensors = to_global(tensors, created)
        # The differentiable kernel replaces state tensors instead of updating them (Note [differentiable=True]).
        self._store_results(params, states, tensors, created, replaced=implementation == "differentiable")
        if scatter is None and to_global is None and keys is None:
            self._bind(group, kernel, params, tensors, scalars)

    def _run_int8(self, kernel: KernelModule, group: dict, params, states, tensors: dict, scalars: dict) -> None:
        """The for-loop or foreach kernel over int8 state (Note [Blockwise 8-bit state]): float32
        copies of a batch of parameters' states at a time (a large parameter's in chunks), the
        kernel, quantized back: a step's transient memory is one batch's copies."""
        names = self._low_precision_lists()
        entries, held, lists = quantized_state.chunked(self, params, states, tensors)
        for batch in quantized_state.chunk_batches(lists, entries):
            part = {name: [values[i] for i in batch] for name, values in lists.items()}
            quantized = quantized_state.Quantized(self, [entries[i] for i in batch], [held[i] for i in batch], part,
                                                  names)
            self._run_kernel(kernel, group, part, scalars)
            quantized.store()
            for name, values in lists.items():  # (a state the kernel created: stored from the lists)
                for j, i in enumerate(batch):
                    values[i] = part[name][j]

    def _run_int8_fused(self, kernel: KernelModule, group: dict, params, states, tensors: dict,
                        scalars: dict) -> None:
        """The C or Triton kernel over int8 state (Note [Blockwise 8-bit state in C] in
        optgen/backends/c.py, Note [Blockwise 8-bit state in Triton] in backends/triton.py), in up
        to three parts: the parameters whose states are codes, in one launch of the kernel's int8
        version, given their scales (first: its checks raise before anything is stepped); those too
        small to quantize (float32 state), in one launch of the plain kernel; and any whose quantized
        state this step creates (SGD's momentum buffer on its first step), or that the kernel
        declines (a non-contiguous state), on the reference."""
        names = self._low_precision_lists()
        flags = {f: bool(group[f]) for f in kernel.flags}
        launch = cast("c_launch.Kernel | triton_launch.Kernel", kernel.step)
        names_in_order = [t if isinstance(t, str) else t[0] for t in launch.tensors]  # (Triton's: (name, used))
        lazy = {names_in_order[index]: when for index, when in launch.lazy.items()}
        arguments = {**tensors, **scalars, **flags}
        coded, plain, reference = [], [], []
        for i, p in enumerate(params):
            if not quantized_state.quantizable(p):
                plain.append(i)
            elif any(tensors[name][i] is None and name in lazy and lazy[name](arguments) for name, _ in names):
                reference.append(i)  # (its new state is quantized by the reference)
            else:
                coded.append(i)

        def part(indices: list[int]) -> dict:
            return {name: [values[i] for i in indices] for name, values in tensors.items()}

        def stored(indices: list[int], lists: dict) -> None:  # (the states a kernel created, from its lists)
            for name, values in lists.items():
                for j, i in enumerate(indices):
                    tensors[name][i] = values[j]

        if coded:  # (first: a user's scales of the wrong size are an error before anything is stepped)
            lists = part(coded)
            scales = {name: [None if t is None else states[i][key + quantized_state.ABSMAX]
                             for i, t in zip(coded, lists[name], strict=True)] for name, key in names}
            try:
                kernel.run(group, lists, scalars, state_scales=scales)
            except KernelDeclined:  # raised before the kernel wrote anything
                reference += coded
        if plain:
            lists = part(plain)
            self._run_kernel(kernel, group, lists, scalars)
            stored(plain, lists)
        if reference:
            reference.sort()
            lists = part(reference)
            # (a kernel that applies GradScaler's grad_scale and found_inf itself left the gradients scaled)
            if not (kernel.grad_scaler and _unscale_or_skip(self, lists["grads"])):
                foreach = self._kernel("foreach")
                self._run_int8(foreach, group, [params[i] for i in reference], [states[i] for i in reference], lists,
                               self._kernel_scalars(foreach, group))
                stored(reference, lists)

    def _rounding_keys(self, group: dict, params, states, implementation: str) -> dict[str, list[int]] | None:
        """The rounding keys of this step's low-precision lists (Note [Stochastic rounding of
        state]), None when the group keeps its state in the parameters' dtype."""
        dtype = group.get("state_dtype")
        if dtype is None:
            return None
        if quantized_state.is_int8(dtype):  # (no rounding keys: rounded to nearest; never bound)
            if implementation not in ("forloop", "foreach", "c", "triton"):  # (a fused one: dispatch.choose checked)
                raise dispatch.int8_refused(implementation)
            return {}
        if implementation not in ("forloop", "foreach", "c", "triton"):
            raise RuntimeError(f"optgen: state_dtype=torch.bfloat16 runs on the forloop, foreach, C and Triton "
                               f"kernels, not the {implementation} one yet; use foreach=True")
        return low_precision.step_keys(self, params, states, self._low_precision_lists())

    def _low_precision_lists(self) -> list[tuple[str, str]]:
        """(list name, state key) of each state kept in low precision."""
        return [(name, key) for name, key in self._tensor_state if key in self._low_precision_state]

    def _bind(self, group: dict, kernel: KernelModule, params, tensors: dict, scalars: dict) -> None:
        """Keeps the launch this step ran, bound to its lists, for the next steps (Note [Cached
        steps]): when the group was one launch (one dtype) that is not traced or scaled."""
        cache = self.__dict__.setdefault("_cached_steps", {})
        cache.pop(id(group), None)
        bind = kernel.bind
        if bind is None or torch.compiler.is_compiling() or "grad_scale" in vars(self) or "found_inf" in vars(self) \
                or len({p.dtype for p in params}) != 1 or not all(type(p) in subclasses.PLAIN_TYPES for p in params):
            return
        launch = bind(**tensors, **scalars, **{f: bool(group[f]) for f in kernel.flags})
        if launch is not None:
            try:
                cache[id(group)] = CachedStep(self, group, kernel, params, tensors, launch)
            except (KeyError, TypeError):  # a state the launch addresses that the optimizer's state does not hold
                pass

    def _choose_implementation(self, group: dict, params, tensors: dict, single_sparse: bool):
        """The implementation that steps this group, the lists it runs on, and what turns them back
        afterwards (DTensors run on their local shards: Note [Tensor subclasses]); torch's errors
        for the runtime options are raised here, before anything is updated."""
        implementation = "forloop" if single_sparse else dispatch.choose(self, group, params)
        implementation, tensors, to_global = subclasses.for_native_kernel(self, implementation, params, tensors)
        dispatch.check_step(self, group, implementation, params, tensors)
        if group.get("differentiable") and "differentiable" in self._kernels:
            implementation = "differentiable"  # Note [differentiable=True] (backends/differentiable.py)
        return implementation, tensors, to_global

    def _run_kernel(self, kernel: KernelModule, group: dict, tensors: dict, scalars: dict,
                    state_keys: dict[str, list[int]] | None = None) -> None:
        """The kernel over the group's lists: once, or once per (device, dtype) group for a
        multi-tensor kernel; a group a native kernel declines steps with the for-loop.
        ``state_keys``: a C kernel's rounding keys of low-precision lists (one group: one dtype)."""
        if not kernel.multi_tensor:
            kernel.run(group, tensors, scalars)
            return
        extra = {} if state_keys is None else {"state_keys": state_keys}
        for sub in _split_by_device_and_dtype(self, tensors):
            try:
                kernel.run(group, sub, scalars, **extra)
            except KernelDeclined as e:  # raised before the kernel wrote anything
                # stacklevel: the caller of step() (frames: here, _step_group, step, torch's wrapper)
                warnings.warn(f"optgen: {e}; this group steps with the for-loop kernel instead", stacklevel=5)
                rounded = None if state_keys is None else low_precision.Rounded(sub, state_keys)
                self._step_with_forloop(group, sub, scaled=kernel.grad_scaler)
                if rounded is not None:
                    rounded.store()

    def _kernel_scalars(self, kernel: KernelModule, group: dict) -> dict:
        """The hyperparameters a kernel takes, by keyword: numbers, except those it takes as given
        (``tensor_scalars``: read on the device, or kept in autograd's graph)."""
        as_given = kernel.tensor_scalars
        return {kw: (_raw if kw in as_given else to_number)(group[key] if index is None else group[key][index])
                for kw, (key, index) in self._scalars.items()}

    def _step_with_forloop(self, group: dict, lists: dict[str, list], scaled: bool) -> None:
        """The for-loop kernel on lists a native kernel declined (KernelDeclined, before it wrote
        anything), with its own hyperparameters.  ``scaled``: the gradients are still scaled by
        GradScaler (a fused kernel unscales them itself), so that is done (or the step skipped) here."""
        forloop = self._kernel("forloop")
        if scaled and _unscale_or_skip(self, lists["grads"]):
            return
        forloop.run(group, lists, self._kernel_scalars(forloop, group))

    def _check_gradients(self, group: dict, grads: list[torch.Tensor]) -> bool:
        """torch's errors for gradients the spec does not take; True when this group has a sparse
        gradient where dense ones are the rule: it then runs one parameter at a time, as torch's
        single-tensor path does (Note [Sparse gradients])."""
        has_sparse = any(g.is_sparse for g in grads)
        if self._gradients == "sparse" and not all(g.is_sparse for g in grads):
            raise RuntimeError(self._dense_gradient_error or f"{type(self).__name__} does not support dense gradients")
        if self._gradients == "dense" and has_sparse:
            raise RuntimeError(self._sparse_gradient_error
                               or f"{type(self).__name__} does not support sparse gradients")
        single_sparse = has_sparse and self._gradients != "sparse"
        if single_sparse:
            dispatch.check_sparse_fused(self, group)
            self._check_sparse_step(group)
        return single_sparse

    # Note [State made before tracing]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # A step traced by torch.compile from a fresh optimizer would create the state inside the
    # graph, and the guards dynamo takes on the empty ``self.state`` fail on the next step: a second
    # compilation, as long as the first.  dynamo treats a method named ``_init_group`` of a
    # ``torch.optim.Optimizer`` specially (its OptimizerVariable): it runs it eagerly, on the real
    # tensors, then traces the rest with the state in place, as it does for torch's optimizers.
    # ``_init_group`` creates the state of every parameter of the group that has a gradient; the
    # traced step then finds it.  It also checks that no state is missing (Note [Missing state]),
    # which reads a cache of expected keys: traced, the cache filling up would be one more guard
    # failure.  dynamo re-traces when the state changes (its guards on it), so the check still runs
    # for every state a compiled step sees.  Eagerly it is not called (``_state_of`` creates state
    # as it goes, ``_kernel_lists`` checks).
    def _init_group(self, group: dict) -> None:
        """Creates the state of each parameter of ``group`` that has a gradient, and checks none is
        missing (Note [State made before tracing])."""
        params = [p for p in group["params"] if p.grad is not None]
        states = [self._state_of(p, group) for p in params]
        for _, key in self._tensor_state:
            values = [s.get(key) for s in states]
            if key not in self._lazy_state and any(v is None for v in values):
                self._check_present(key, params, states, values, group)

    def _state_of(self, param: torch.Tensor, group: dict) -> dict:
        """The parameter's state, created on its first step.  self.state[param] is only touched
        when there is state to keep: torch's SGD without momentum has an empty state dict."""
        state = self.state.get(param)
        if not state:
            # A differentiable group's Tensor hyperparameters stay tensors (Note [differentiable=True]).
            initial = self._init_state(param, group if group.get("differentiable") else _numbers(group))
            initial = self._in_state_dtype(param, group, initial)
            if initial:
                counters = {key for _, key in self._counter_state}
                self.state[param].update(dispatch.place_counters(initial, param, group, counters))
            state = self.state.get(param, {})
        return state

    def _in_state_dtype(self, param: torch.Tensor, group: dict, initial: dict) -> dict:
        """A new state with its low-precision tensors in the group's ``state_dtype`` (Note
        [Stochastic rounding of state] in optgen/runtime/low_precision.py), if it has one."""
        if not initial or group.get("state_dtype") is None:
            return initial
        low_precision.checked_state_dtype(self, group["state_dtype"])  # (a group's own is not the constructor's)
        low_precision.check_param(self, param, group["state_dtype"])
        if quantized_state.is_int8(group["state_dtype"]):
            return quantized_state.initial(self, param, initial)
        return {k: v.to(group["state_dtype"]) if k in self._low_precision_state else v for k, v in initial.items()}

    def _kernel_lists(self, params, grads, states, group=None) -> tuple[dict[str, list], dict[str, list[bool]]]:
        """The kernel's per-tensor lists by argument name (complex tensors as real views), and
        for each lazily created state which entries do not exist yet.  A state the parameter's
        state should hold and does not (a partial or foreign checkpoint) is torch's KeyError."""
        tensors = {"params": params, "grads": grads}
        for name, key in self._tensor_state:
            values = tensors[name] = [s.get(key) for s in states]
            if group is not None and key not in self._lazy_state and any(v is None for v in values) \
                    and not torch.compiler.is_compiling():  # (traced: _init_group checked)
                self._check_present(key, params, states, values, group)
        for name, key in self._counter_state:
            # A counter torch keeps as a Python number (SparseAdam's step) runs as a 0-dim tensor.
            tensors[name] = [torch.tensor(float(s[key]), dtype=torch.float64) if key in self._host_counters
                             else s[key] for s in states]
        created = {key: [s.get(key) is None for s in states] for key in self._lazy_state}
        if any(p.is_complex() for p in params):
            if not self._complex_as_real:
                raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
            tensors = _view_complex_as_real(tensors)
        return tensors, created

    def _check_present(self, key: str, params, states, values, group: dict) -> None:
        """Note [Missing state]: an absent state is an optional one (Adam's max_exp_avg_sq without
        amsgrad, Adafactor's row_var of a vector) or one a checkpoint lost.  Which, says the state
        ``_init_state`` would make for the parameter: what torch reads as ``state[key]``, so a lost
        one is torch's ``KeyError: key`` (a None one its TypeError), raised before anything is
        updated; the kernels (the C one addresses every state it touches) never see it."""
        numbers = group if group.get("differentiable") else _numbers(group)
        try:
            hyper = tuple((k, v) for k, v in numbers.items() if k != "params")
            hash(hyper)
        except TypeError:  # a Tensor hyperparameter of a differentiable group: not remembered
            hyper = None
        expected = {}  # (shape, dtype) → the keys, once per step: a group's parameters share a few
        for i, (p, s, v) in enumerate(zip(params, states, values, strict=True)):
            if v is not None:
                continue
            like = (p.shape, p.dtype)
            if like not in expected:
                expected[like] = _expected_state(self, p, numbers, hyper)
            if key in expected[like]:
                if key in s:
                    raise TypeError(f"expected Tensor as element {i} in the state '{key}', but got NoneType")
                raise KeyError(key)

    def _store_results(self, params, states, tensors, created, replaced: bool) -> None:
        """Back into self.state: host counters as numbers, lazily created state from the kernel's
        lists, and — a differentiable step replaces them (Note [differentiable=True]) — every state."""
        for name, key in self._counter_state:
            if key in self._host_counters:
                for s, t in zip(states, tensors[name], strict=True):
                    s[key] = type(s[key])(t.item())
        for name, key in self._tensor_state + self._counter_state:
            if key in created or (replaced and key not in self._host_counters):
                for p, value, is_new in zip(params, tensors[name], created.get(key, [True] * len(params)), strict=True):
                    if (is_new or replaced) and value is not None:
                        as_complex = p.is_complex() and not value.is_complex() and value.dim() > 0
                        self.state[p][key] = torch.view_as_complex(value) if as_complex else value

    def _check_sparse_step(self, group: dict) -> None:
        """torch's errors for a step with a sparse gradient (generated from the spec's
        ``each = "sparse_step"`` checks, if any)."""

    def _kernel(self, implementation: str) -> KernelModule:
        """The kernel record of an implementation (its module's ``KERNEL``)."""
        return self._kernel_module(implementation).KERNEL

    def _kernel_module(self, implementation: str):
        """The kernel module of an implementation, imported on first use if named by a string."""
        module = self._kernels[implementation]
        if isinstance(module, str):
            package = type(self).__module__.rpartition(".")[0]
            try:
                _import_kernel_module(f"{package}.{module}")
                module = sys.modules[f"{package}.{module}"]
            except ImportError as e:
                raise RuntimeError(f"optgen's {implementation} implementation needs the {e.name} package "
                                   "(pip install 'optgen[cuda]')") from e
            # Safe from several threads at once: import_module holds the module's import lock, so
            # a second thread waits for the whole module (never a half-run one), and the class's
            # table is replaced, never changed in place — a racing thread's entry may be lost,
            # which only means importing it again, from sys.modules.
            type(self)._kernels = {**type(self)._kernels, implementation: module}
        return module


# dynamo does not trace importlib.import_module: marked as a constant, the import runs while dynamo
# traces (a first step compiled from a fresh optimizer imports its Triton module there), and the
# module is then looked up in sys.modules, which dynamo reads.
def _import_kernel_module(name: str) -> bool:
    """Imports module ``name`` (the step takes the module from sys.modules)."""
    import importlib

    importlib.import_module(name)
    return True


# What torch.compiler.assume_constant_result does, without its `import torch._dynamo` (which
# imports sympy: importing optgen's runtime loads no compiler, tests/schedulers/test_derivation.py);
# tests/integration/test_compile.py checks that torch's decorator still marks functions this way.
_import_kernel_module._dynamo_marked_constant = True  # type: ignore[attr-defined]


_EXPECTED: dict[tuple, frozenset] = {}


def _expected_state(optimizer, param: torch.Tensor, numbers: dict, hyper: tuple | None) -> frozenset:
    """The state keys ``_init_state`` makes for ``param`` with the hyperparameters ``numbers``
    (Note [Missing state]), from a meta tensor like it, remembered per optimizer class, shape,
    dtype and hyperparameters (``hyper``: their hashable form, None when they have none)."""
    key = None if hyper is None else (type(optimizer), tuple(param.shape), param.dtype, hyper)
    keys = _EXPECTED.get(key) if key is not None else None
    if keys is None:
        try:
            initial = optimizer._init_state(torch.empty_like(param, device="meta"), numbers)
        except (RuntimeError, NotImplementedError):  # an initialiser meta tensors lack
            initial = optimizer._init_state(param.detach(), numbers)
        keys = frozenset(initial or ())
        if key is not None:
            if len(_EXPECTED) > 1024:
                _EXPECTED.clear()
            _EXPECTED[key] = keys
    return keys


def _raw(value):
    """A hyperparameter a kernel takes as given: a 1-element Tensor as a 0-dim one (a view, so
    autograd's graph and in-place fills reach it), as torch's ``_to_scalar`` passes it."""
    return value.squeeze() if isinstance(value, torch.Tensor) and value.dim() != 0 else value


def _counters_on_device(optimizer, params, states, tensors) -> None:
    """A fused kernel reads the counters (``step``) on the parameters' device.  State made where
    torch keeps counters on the CPU (no ``fused`` / ``capturable``: another implementation, or an
    optimizer whose signature has no ``fused``) moves there once, as float32, as torch's fused
    optimizers keep it."""
    for name, key in optimizer._counter_state:
        values = tensors[name]
        for i, (p, s) in enumerate(zip(params, states, strict=True)):
            t = values[i]
            if isinstance(t, torch.Tensor) and t.device != p.device:
                s[key] = values[i] = t.to(device=p.device, dtype=torch.float32)


def _unscale_or_skip(optimizer, grads: list[torch.Tensor]) -> bool:
    """GradScaler hands an optimizer that says ``_step_supports_amp_scaling`` (``fused=True``) its
    ``grad_scale`` and ``found_inf`` instead of unscaling itself; a fused kernel applies them in
    the kernel, any other implementation here: True means skip the step (an inf/NaN gradient)."""
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is not None and found_inf.item():
        return True
    grad_scale = getattr(optimizer, "grad_scale", None)
    if grad_scale is not None:
        inv_scale = grad_scale.double().reciprocal().float()  # GradScaler.unscale_'s rounding
        for g in grads:
            g.mul_(inv_scale.to(g.device))
    return False


def _numbers(group: dict) -> dict:
    """The group with its 1-element Tensor hyperparameters as numbers, for ``_init_state``: torch
    fills state from a Tensor ``lr`` (Rprop's ``step_size``) through the same number."""
    return {k: to_number(v) if k != "params" and isinstance(v, torch.Tensor) else v for k, v in group.items()}


def _gather_rows(tensors: dict[str, list]):
    """Note [Sparse gradients]: a spec says which gradients its step takes (``optimizer.gradients``):

    - ``"dense"``: a sparse gradient is torch's error;
    - ``"dense_or_sparse"`` (SGD): a sparse gradient goes to the for-loop kernel unchanged; the
      kernel's torch ops accept it (``grad.add(param)`` is dense, ``grad.clone()`` a sparse
      momentum buffer, ``param.add_(grad, alpha=-lr)``), as in torch's single-tensor SGD;
    - ``"sparse"`` (SparseAdam: every gradient sparse) and ``"dense_or_gathered"`` (Adagrad: a
      sparse gradient takes this path, a dense one the usual one): the rule runs on *gathered
      rows*, here.

    For each parameter with a sparse gradient: the elements its coalesced gradient touches,
    gathered from the parameter and every state tensor into dense value tensors; the update runs
    on those (the spec's own elementwise rule, so Adagrad's sparse step is its dense rule on the
    touched elements, as torch's sparse branch computes it), then ``scatter()`` writes the new
    values back at the same indices.  Writing the new value equals torch's ``add_`` of a sparse
    update: indices are unique.  A parameter with a dense gradient, and every counter, passes
    through whole.

    A group with a sparse gradient under ``dense_or_*`` runs the for-loop kernel (torch runs its
    single-tensor path for it; ``fused=True`` is torch's error), after the spec's
    ``each = "sparse_step"`` checks (Adagrad's "weight_decay option is not compatible with sparse
    gradients")."""
    grads = [g.coalesce() if g.is_sparse else None for g in tensors["grads"]]
    gathered = {"grads": [g._values() if g is not None else d for g, d in zip(grads, tensors["grads"], strict=True)]}
    # An embedding's gradient is sparse in its first dimension only (whole rows): index_select
    # and index_copy_ move those rows, several times faster than sparse_mask and an indexed store.
    rows = [g._indices()[0] if g is not None and g.sparse_dim() == 1 else None for g in grads]

    def gathered_from(t, g) -> bool:  # a parameter or state tensor (not a counter) of a sparse gradient
        return g is not None and isinstance(t, torch.Tensor) and t.dim() > 0

    def gather(v, g, r):
        if not gathered_from(v, g):
            return v
        return v.index_select(0, r) if r is not None else v.sparse_mask(g)._values()

    for name, values in tensors.items():
        if name != "grads":
            gathered[name] = [gather(v, g, r) for v, g, r in zip(values, grads, rows, strict=True)]

    def scatter():
        for name, values in tensors.items():
            if name == "grads":
                continue
            for full, new, g, r in zip(values, gathered[name], grads, rows, strict=True):
                if g is None or not gathered_from(full, g):
                    continue
                if r is not None:
                    full.index_copy_(0, r, new)
                else:
                    full[tuple(g._indices())] = new

    return gathered, scatter


def _view_complex_as_real(tensors: dict[str, list]) -> dict[str, list]:
    out = {name: list(values) for name, values in tensors.items()}
    for i, p in enumerate(tensors["params"]):
        if p.is_complex():
            for values in out.values():
                if values[i] is not None and values[i].is_complex():
                    values[i] = torch.view_as_real(values[i])
    return out


def _split_by_device_and_dtype(optimizer: Optimizer, tensors: dict[str, list]) -> list[dict[str, list]]:
    """Splits every list by the (device, dtype) of its param: foreach ops need uniform lists.

    A kernel stores lazily created state into its lists; each sub-list writes such assignments
    through to the full list, from which the caller saves them."""
    groups = optimizer._group_by_device_and_dtype([tensors["params"]])
    if len(groups) == 1:
        return [tensors]
    return [_SubLists(tensors, indices) for _, indices in groups.values()]


class _SubLists(dict):
    """The lists of one (device, dtype) group; values the kernel stores are copied back."""

    def __init__(self, tensors: dict[str, list], indices: list[int]):
        super().__init__({name: _Slice(values, indices) for name, values in tensors.items()})


class _Slice(list):
    """A list of some items of ``base`` that writes assignments through to ``base``."""

    def __init__(self, base: list, indices: list[int]):
        super().__init__(base[i] for i in indices)
        self.base, self.indices = base, indices

    def __setitem__(self, i, value):
        super().__setitem__(i, value)
        self.base[self.indices[i]] = value
