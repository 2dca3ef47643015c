"""Every generated Triton kernel compiles for a real GPU — without one.

The interpreter runs a kernel's Python; it does not type-check it the way Triton's compiler does
(scalar and block types, constexpr branches, pointer casts).  ``triton.compile`` with an explicit
target lowers a kernel through Triton's IR, LLVM and ptxas (shipped in the triton wheel) to a
cubin on a machine without a GPU, so this catches kernels that would fail only on CUDA.
"""
import importlib

import pytest

pytest.importorskip("triton", reason="the Triton backend's tests need triton (pip install triton)")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tests.triton.specs import COMPILED

TARGET = GPUTarget("cuda", 90, 32)  # H100 (sm_90)
OPTIONS = {"num_warps": 4, "enable_fp_fusion": True}  # as optgen.runtime.triton_launch launches them
MODULES = [c.spec.name.lower() for c in COMPILED]


class _Arguments(dict):
    """A step's keyword arguments for evaluating the guards: the flags given, every
    hyperparameter ``value`` (non-zero: the guards on hyperparameters hold)."""

    def __init__(self, flags: dict, value: float):
        super().__init__(flags)
        self.value = value

    def __missing__(self, key):
        return self.value


def signature(kernel, dtype, everything_on: bool, flags: dict | None = None):
    """Argument types and constexpr values of one specialisation of a generated kernel: its
    guards as the module's LAUNCH evaluates them for ``flags`` (all off by default) and
    hyperparameters that are all non-zero (``everything_on``) or all zero."""
    types, constants = {}, {}
    module = importlib.import_module(kernel.fn.__module__)
    arguments = _Arguments(flags or {f: False for f in module.KERNEL.flags}, 0.5 if everything_on else 0.0)
    for p in kernel.params:
        if p.is_constexpr:
            types[p.name] = "constexpr"
            constants[p.name] = {"DTYPE": dtype, "COMPUTE": tl.float64 if dtype == tl.float64 else tl.float32,
                                 "COUNTER_DTYPE": tl.float32, "CHUNK": 16384,
                                 "BLOCK": 32 * 4 * 16 // (dtype.primitive_bitwidth // 8),
                                 "INT8_STATE": False, "Q8_BLOCK": 256, "Q8_BITS": 8,
                                 "Q8_SHIFT": 14}.get(p.name, everything_on)
            if p.name in module.LAUNCH.guards:
                constants[p.name] = bool(module.LAUNCH.guards[p.name](arguments))
        elif p.name == "num_tensors":
            types[p.name] = "i32"
        elif p.annotation_type:  # the float64 hyperparameters
            types[p.name] = p.annotation_type
        elif p.name in ("grad_scale", "found_inf") or p.name.endswith("_ptr"):
            types[p.name] = "*fp32"
        else:  # the launch tables
            types[p.name] = "*i64"
    return types, constants


def kernels(module_name):
    module = importlib.import_module(f"optgen.generated.{module_name}_triton")
    return [k for k in vars(module).values() if isinstance(k, triton.runtime.jit.JITFunction)]


@pytest.mark.parametrize("module_name", MODULES)
def test_kernels_compile_for_sm90(module_name):
    """Every flag combination with every guard, GradScaler input and Tensor lr on, bfloat16 storage."""
    compiled_spec = next(c for c in COMPILED if c.spec.name.lower() == module_name)
    for kernel in kernels(module_name):
        for variant in compiled_spec.variants:
            types, constants = signature(kernel, tl.bfloat16, True, dict(variant.flags))
            compiled = triton.compile(ASTSource(kernel, types, constants), target=TARGET, options=OPTIONS)
            assert compiled.asm["cubin"], (kernel.fn.__name__, variant.flags)


def test_whole_blocks_load_and_store_128_bit_vectors():
    """The loop over whole blocks of 16-byte-aligned tensors is unmasked, so Triton emits one
    128-bit load or store per tensor and thread (PTX ld.global.v4 / st.global.v4): the shape a
    memory-bound kernel needs to approach copy bandwidth."""
    import re

    for dtype in (tl.float32, tl.bfloat16):
        kernel = next(k for k in kernels("adam") if k.fn.__name__ == "_adam_kernel")
        types, constants = signature(kernel, dtype, False)
        constants["ALIGNED"] = True
        ptx = triton.compile(ASTSource(kernel, types, constants), target=TARGET, options=OPTIONS).asm["ptx"]
        assert len(re.findall(r"ld\.global(\.[a-z0-9:_]+)*\.v4", ptx)) >= 4  # param, grad, exp_avg, exp_avg_sq
        assert len(re.findall(r"st\.global(\.[a-z0-9:_]+)*\.v4", ptx)) >= 3  # param, exp_avg, exp_avg_sq


def test_plain_float32_and_float64_kernels_compile():
    """The other specialisations: every feature off, float32 and float64 (float64 compute)."""
    for dtype in (tl.float32, tl.float64):
        for kernel in kernels("adam") + kernels("sgd"):
            types, constants = signature(kernel, dtype, False)
            assert triton.compile(ASTSource(kernel, types, constants), target=TARGET, options=OPTIONS).asm["cubin"]


def test_int8_state_kernels_compile():
    """The int8 state specialisation (Note [Blockwise 8-bit state in Triton]): float32 parameters,
    codes, the code tables (float32 maps, int32 first codes), every guard on, and off."""
    for module_name in ("adam", "sgd", "rmsprop", "lion"):
        for kernel in kernels(module_name):
            for everything_on in (True, False):
                types, constants = signature(kernel, tl.float32, everything_on)
                constants.update(LOW_STATE=False, INT8_STATE=True, Q8_BLOCK=256, Q8_BITS=8, Q8_SHIFT=14)
                types.update(q8_map="*fp32", q8_first="*i32")
                compiled = triton.compile(ASTSource(kernel, types, constants), target=TARGET, options=OPTIONS)
                assert compiled.asm["cubin"], (kernel.fn.__name__, everything_on)
