"""Choosing an implementation for a param group, with torch's errors.

``foreach=None, fused=None`` (the defaults) mean "pick the fastest that applies", as in torch, and
optgen has faster implementations than torch's defaults (Note [The fastest by default]):

- CPU: the fused C kernel (one pass over each tensor, compiled on first use and cached), when a C
  compiler works on this machine and the parameters suit it (floating or complex, contiguous);
  else the for-loop.  torch picks its for-loop on CPU: its foreach is 1.3–2× *slower* there.
- CUDA and other foreach-capable devices: foreach, unless :data:`FASTEST_ON_CUDA` names an
  implementation ``optgen bench --device cuda --ready`` measured faster
  (optgen/runtime/cuda_defaults.py, which that command writes).
- ``differentiable=True``: the for-loop (the differentiable kernel), as in torch; ``capturable=True``
  (CUDA graphs): torch's choice, and its error for CPU parameters.

``OPTGEN_DEFAULTS=torch`` in the environment, or ``optgen.set_defaults("torch")``, restores
torch's own rule (the for-loop on CPU), for code that needs torch's exact for-loop numerics.

``fused=True`` selects the fused Triton kernels (one launch per step per (device, dtype) group)
on CUDA parameters — and on CPU parameters under ``TRITON_INTERPRET=1``, where Triton's
interpreter runs them (tests) — and the fused C kernels on other CPU parameters.
``foreach=True`` / ``foreach=False`` / ``fused=False`` keep their torch meaning: foreach, the
for-loop, not fused.  ``optimizer.implementation = "forloop"`` (or any name in the class's
``implementations``) overrides the choice for every group; tests and ``optgen bench`` use it to
reach each backend by name.

Note [The fastest by default]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
torch's documented intent for ``foreach=None`` is "the fastest implementation for the device";
on CPU that is optgen's C kernel, for every optimizer: level with torch's fused kernels where torch
has one and 1.3–15× faster than torch's best path where it has none (BENCHMARKS.md).  The C
kernel's numbers are not bit-identical to torch's for-loop (it evaluates the same formula in one
fused pass; tests hold it to a few ulps), which is why the switch back exists.  A group the C
kernel cannot take (a dtype it lacks, a non-contiguous tensor, no working compiler, an untrusted
kernel cache) quietly runs the for-loop: the user asked for nothing in particular.
"""
from __future__ import annotations

import os

import torch

from optgen.runtime import quantized_state

# FASTEST_ON_CUDA: optimizer name → its default implementation on CUDA, as `optgen bench --device cuda --ready`
# measured it (Note [CUDA defaults]); empty until a GPU has: CUDA then defaults to foreach, as torch does.
from optgen.runtime.cuda_defaults import FASTEST_ON_CUDA
from optgen.runtime.once import warn_once
from optgen.runtime.subclasses import PLAIN_TYPES, _dtensor_type

#: device types where torch's foreach kernels are real multi-tensor kernels
FOREACH_DEVICES = {"cuda", "xpu", "hpu", "mtia"}

#: parameter dtypes the fused Triton kernels update (complex ones as real views)
TRITON_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128}


#: the environment variable that picks what ``foreach=None, fused=None`` means (Note [The fastest by default])
DEFAULTS_VARIABLE = "OPTGEN_DEFAULTS"
#: its values: optgen's fastest implementation, or torch's own rule
DEFAULTS_POLICIES = ("fastest", "torch")
_defaults_set: str | None = None  # set_defaults(); None: from the environment


def set_defaults(policy: str) -> str:
    """What ``foreach=None, fused=None`` picks from now on, in this process: ``"fastest"``
    (optgen's default: the C kernel on CPU) or ``"torch"`` (torch's rule: the for-loop on CPU).
    Overrides ``$OPTGEN_DEFAULTS``; returns the policy in force before."""
    global _defaults_set
    if policy not in DEFAULTS_POLICIES:
        raise ValueError(f"optgen.set_defaults: unknown policy {policy!r}; use one of {', '.join(DEFAULTS_POLICIES)}")
    before, _defaults_set = defaults_policy(), policy
    return before


def defaults_policy() -> str:
    """The policy in force: ``set_defaults``'s, else ``$OPTGEN_DEFAULTS``'s, else ``"fastest"``."""
    if _defaults_set is not None:
        return _defaults_set
    value = os.environ.get(DEFAULTS_VARIABLE, "").strip().lower() or "fastest"
    if value not in DEFAULTS_POLICIES:
        raise ValueError(f"{DEFAULTS_VARIABLE}={os.environ[DEFAULTS_VARIABLE]!r} is not a policy optgen knows; "
                         f"use one of {', '.join(DEFAULTS_POLICIES)} (or unset it)")
    return value


def triton_applies(params: list[torch.Tensor]) -> bool:
    """Whether the fused Triton kernels can update these parameters: floating CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1 (Triton's interpreter), with triton installed."""
    import importlib.util
    import os

    if not params or any(p.dtype not in TRITON_DTYPES for p in params):
        return False
    on_cuda = all(p.device.type == "cuda" for p in params)
    interpreted = all(p.device.type == "cpu" for p in params) and os.environ.get("TRITON_INTERPRET") == "1"
    return (on_cuda or interpreted) and importlib.util.find_spec("triton") is not None


#: parameter dtypes the fused C kernels update (complex ones as real views)
C_DTYPES = {torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64, torch.complex128}


def c_declines(params: list[torch.Tensor], optimizer=None) -> str | None:
    """Why the fused C kernels cannot update these CPU parameters (None: they can): they need
    floating (or complex) contiguous tensors and gradients, a C compiler on the machine, and
    (given the optimizer) its kernels built and loaded — a compiler that fails, or an untrusted
    kernel cache, is a reason like a missing compiler (remembered: compiled once per dtype)."""
    from optgen.runtime import c_launch

    if not c_launch.available():
        return "no C compiler (cc, or $CC) on this machine"
    for p in params:
        if p.dtype not in C_DTYPES:
            return f"a {p.dtype} parameter"
        if not p.is_contiguous() or (p.grad is not None and not p.grad.is_contiguous()):
            return "a parameter or gradient that is not contiguous"
    unusable = optimizer._kernel("c").unusable if optimizer is not None else None
    if unusable is not None:
        for dtype in dict.fromkeys(_C_REAL.get(p.dtype, p.dtype) for p in params):
            reason = unusable(dtype)
            if reason is not None:
                return reason
    return None


#: complex parameters run as real views of their parts
_C_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def choose(optimizer, group: dict, params: list[torch.Tensor]) -> str:
    forced = getattr(optimizer, "implementation", None)
    if forced is not None:
        if forced not in optimizer.implementations:
            raise ValueError(f"unknown implementation {forced!r} for {type(optimizer).__name__}; "
                             f"available: {', '.join(optimizer.implementations)}")
        if forced in ("c", "triton") and quantized_state.is_int8(group.get("state_dtype")):
            reason = int8_declines(forced, params, optimizer)
            if reason is not None:
                raise int8_refused(forced, reason)
        return forced
    int8 = quantized_state.is_int8(group.get("state_dtype"))
    if int8 and torch.compiler.is_compiling():
        # the int8 launches are no custom ops (Note [C kernels as custom ops]): the reference is traced
        return "foreach"
    if int8 and group.get("fused"):
        fused = "triton" if triton_applies(params) else "c"
        reason = int8_declines(fused, params, optimizer)
        if reason is not None:
            raise RuntimeError(f"optgen.{type(optimizer).__name__}: state_dtype='int8' has no fused kernel for these "
                               f"parameters ({reason}; Note [Blockwise 8-bit state]); use foreach=True, or "
                               "fused=None to pick automatically")
        return fused
    if group.get("fused"):
        if "triton" in optimizer.implementations and triton_applies(params):
            return "triton"
        if "c" in optimizer.implementations and params and all(p.device.type == "cpu" for p in params):
            reason = c_declines(params, optimizer)
            if reason is None:
                return "c"
            # torch's fused CPU kernels take these: run the for-loop (torch's single-tensor
            # results) rather than fail, and say so once
            warn_once(f"optgen.{type(optimizer).__name__}(fused=True) runs its for-loop kernel on these "
                       f"CPU parameters: {reason}")
            return "forloop"
        raise RuntimeError(f"optgen.{type(optimizer).__name__} has no fused implementation for these "
                           "parameters yet; use foreach=True, or fused=None to pick automatically")
    if group.get("foreach"):
        return "foreach"
    if group.get("foreach") is not None or group.get("differentiable") or not params:
        return "forloop"
    if int8:  # the C kernel where it applies, else the reference (Note [Blockwise 8-bit state])
        # (CUDA: the Triton kernels' int8 state has run only in Triton's interpreter: the reference;
        # fused=False: no fused kernel, as for float32 state)
        return "c" if group.get("fused") is None and defaults_policy() == "fastest" \
            and int8_declines("c", params, optimizer) is None else "foreach"
    # capturable (CUDA graphs) keeps torch's choice, and with it torch's error on CPU parameters
    if group.get("fused") is None and not group.get("capturable") and "c" in optimizer.implementations \
            and defaults_policy() == "fastest" and all(p.device.type == "cpu" for p in params) \
            and _own_memory(optimizer, params) and c_declines(params, optimizer) is None:
        return "c"  # Note [The fastest by default]
    if all(p.device.type in FOREACH_DEVICES for p in params):
        fastest = FASTEST_ON_CUDA.get(type(optimizer).__name__)
        # (bfloat16 state: the Triton kernels' rounding has run only in Triton's interpreter; foreach)
        if fastest is not None and fastest in optimizer.implementations \
                and (fastest != "triton" or (triton_applies(params) and group.get("state_dtype") is None)):
            return fastest
        return "foreach"
    return "forloop"


def int8_refused(implementation: str, reason: str | None = None) -> RuntimeError:
    """The error for int8 state on an implementation that does not take it (here, or ``reason``)."""
    return RuntimeError(f"optgen: state_dtype='int8' runs on the forloop, foreach, C and Triton kernels, not the "
                        f"{implementation} one{f' ({reason})' if reason else ''} (Note [Blockwise 8-bit state]); "
                        "use foreach=True")


def int8_declines(implementation: str, params: list[torch.Tensor], optimizer) -> str | None:
    """Why the fused ``implementation`` ("c" or "triton") cannot update these parameters' int8
    state (None: it can): it needs float32 parameters (plain tensors) where that kernel runs
    (c_declines; the Triton kernels' CONFIG) and a spec whose kernel has an int8 version (Note [Blockwise
    8-bit state in C] in optgen/backends/c.py, Note [Blockwise 8-bit state in Triton])."""
    name = {"c": "C", "triton": "Triton"}[implementation]
    if implementation not in optimizer.implementations:
        return f"{type(optimizer).__name__} has no {name} kernel"
    if not getattr(optimizer._kernel(implementation).step, "int8", False):
        return f"{type(optimizer).__name__}'s {name} kernel has no int8 version (a walk over rows stores its state)"
    if not params or any(p.dtype != torch.float32 or type(p) not in PLAIN_TYPES for p in params):
        return "it takes float32 parameters"
    if implementation == "triton":  # (chosen where triton_applies; forced, on CPU tensors: interpreted)
        from optgen.runtime import triton_launch  # (imports triton: only where it runs)

        return triton_launch.int8_unsupported()
    if any(p.device.type != "cpu" for p in params):
        return "the C kernel takes CPU parameters"
    return c_declines(params, optimizer)


def _own_memory(optimizer, params: list[torch.Tensor]) -> bool:
    """Whether a native kernel may update these parameters by default: plain tensors, or DTensors
    of an elementwise spec (on their local shards).  Any other subclass runs the for-loop, whose
    torch ops dispatch through it (Note [Tensor subclasses]); fused=True says so, the default
    picks it quietly."""
    dtensor = _dtensor_type() if optimizer._elementwise else None
    return all(type(p) in PLAIN_TYPES or (dtensor is not None and type(p) is dtensor) for p in params)


def check_options(optimizer, defaults: dict) -> None:
    """torch's constructor errors for the runtime options (raised after the param groups exist)."""
    if defaults.get("fused"):
        if defaults.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable`")
        if defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        # As torch's fused optimizers: GradScaler passes grad_scale / found_inf instead of
        # unscaling (the fused kernel applies them; see runtime/generated.py for the others).
        optimizer._step_supports_amp_scaling = True


def place_counters(state: dict, param: torch.Tensor, group: dict, counters: set[str]) -> dict:
    """A new state, with its counters (the keys in ``counters``) where torch keeps them: next to
    the parameter when the group is ``capturable`` (float32 when ``fused``), on the CPU otherwise.
    (A 0-dim parameter's state tensors are 0-dim too: they stay as they are.)"""
    if not (group.get("capturable") or group.get("fused")):
        return state
    dtype = torch.float32 if group.get("fused") else None
    return {key: value.to(device=param.device, dtype=dtype or value.dtype)
            if key in counters and isinstance(value, torch.Tensor) else value for key, value in state.items()}


#: implementations made of ``_foreach_*`` ops, which torch refuses to differentiate through
FOREACH_IMPLEMENTATIONS = {"foreach"}


def check_sparse_fused(optimizer, group: dict) -> None:
    """torch has no fused step for a sparse gradient (Note [Sparse gradients])."""
    if group.get("fused"):
        raise RuntimeError(optimizer._sparse_fused_error or "`fused` does not support sparse gradients")


def capturable_devices(xla: bool) -> list[str]:
    """Device types whose tensors a captured (CUDA-graph-style) step may touch, as torch lists them."""
    return ["cuda", "xpu", "hpu", torch._C._get_privateuse1_backend_name()] + (["xla"] if xla else [])


def check_step(optimizer, group: dict, implementation: str, params: list[torch.Tensor], tensors: dict) -> None:
    """torch's errors at ``step()`` for the runtime options, raised before anything is updated
    (state the step creates already exists, as in torch)."""
    if group.get("differentiable") and optimizer._step_requires_grad_error:
        steps = tensors[dict((key, list_name) for list_name, key in optimizer._counter_state)["step"]]
        if any(isinstance(s, torch.Tensor) and s.requires_grad for s in steps):
            raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
    if group.get("differentiable") and implementation in FOREACH_IMPLEMENTATIONS \
            and not optimizer._foreach_differentiable:
        raise AssertionError("_foreach ops don't support autograd")
    # torch's fused kernels skip this check (Adam(fused=True, capturable=True) steps on the CPU).
    if group.get("capturable") and not group.get("fused") and not torch.compiler.is_compiling():
        lists, xla = optimizer._capturable_error.get(implementation,
                                                     ("params and state_steps", implementation != "foreach"))
        devices = capturable_devices(xla)
        counters = [tensors[list_name] for list_name, _ in optimizer._counter_state]
        for i, p in enumerate(params):
            if p.device.type not in devices or any(
                    isinstance(c[i], torch.Tensor) and c[i].device.type != p.device.type for c in counters):
                raise AssertionError(f"If capturable=True, {lists} must be on supported devices: {devices}.")
