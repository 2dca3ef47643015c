"""Compiling and calling the generated C kernels (generated/<spec>_c.py).

Each generated module holds its C source (``SOURCE``) and a :class:`Library` for it.  On the first
call for a parameter dtype (float32, float64, bfloat16, float16) the source is compiled, with
:func:`prelude` in front, into a shared library under the cache directory (``$OPTGEN_CACHE_DIR``,
else ``~/.cache/optgen``, else the temporary directory when that is not writable), named by a
hash of everything that goes into it, and loaded with ctypes; later processes load the cached
file once its digest checks out (Note [Kernel cache] in native_cache.py).  The compiler is ``$CC`` (arguments
allowed: ``CC='ccache gcc'``) or ``cc``, with ``-O3 -march=native -fopenmp -fno-math-errno
-fno-trapping-math`` (PERF-NOTES: without ``-fno-math-errno`` ``sqrtf`` does not vectorise; without
the second a comparison a select makes unconditional blocks if-conversion — no kernel reads the
floating-point exception flags); no ``-ffast-math``, which would break NaN propagation and the
order of operations.

:func:`launch` passes a group's tensors as tables of addresses (params and states, grads,
counters), their sizes, the first-step flags of lazily created state, and the hyperparameters as
doubles; the kernel does the rest (Note [C kernel layout] in optgen/backends/c.py).
"""
from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import logging
import math
import platform
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import cast

import torch

from optgen.runtime import quantized_state
from optgen.runtime.intrinsics import reduced_shape
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
from optgen.runtime.native_cache import (  # noqa: F401 - CacheError, cache_dir: c_launch's API
    CacheError,
    built,
    cache_dir,
    command,
    compiler_identity,
    cpu_identity,
    writable,
)
from optgen.runtime.quantized_state import Int8State

#: the C every kernel source is compiled after: the element type and its math, counter access
PRELUDE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* a bfloat16's value: its bits are a float's top half */
static inline float bfloat16_to_float(uint16_t x)
{
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* storage_t: the tensors' element type; scalar_t: what the update computes in (float for the
   16-bit types, as torch's fused kernels compute) */
#if STORAGE_BF16
typedef uint16_t storage_t;
typedef float scalar_t;
#define to_compute(x) bfloat16_to_float(x)
static inline uint16_t from_compute(float f)  /* round to nearest even, as torch rounds to bfloat16 */
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#elif STORAGE_F16
typedef _Float16 storage_t;
typedef float scalar_t;
#define to_compute(x) ((float)(x))
#define from_compute(x) ((_Float16)(x))
#else
typedef SCALAR_T storage_t;
typedef SCALAR_T scalar_t;
#define to_compute(x) (x)
#define from_compute(x) (x)
#endif
/* lowp_t: a low-precision state's element type (Note [Stochastic rounding of state] in
   optgen/runtime/low_precision.py): bfloat16 under state_dtype=torch.bfloat16, loaded into float and
   stored back rounded stochastically, the random bits a hash of the element's index and its
   tensor's key (state_keys); otherwise the parameters' type */
#if STATE_BF16
typedef uint16_t lowp_t;
#define lowp_load(x) bfloat16_to_float(x)
static inline uint32_t optgen_mix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x21f0aaadu;
    x ^= x >> 15;
    x *= 0x735a2d97u;
    x ^= x >> 15;
    return x;
}
static inline uint16_t lowp_store(float f, uint32_t key, int64_t i)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t r = optgen_mix32((uint32_t)i ^ key);
    const uint32_t rounded = (u + (r & 0xffffu)) >> 16;
    /* NaN stays NaN (a select, not a branch: the loop vectorises) */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40 : rounded);
}
#define lowp_key(t, k) (state_keys[(k) * n + (t)])
#elif STATE_INT8
@INT8@
#else
typedef storage_t lowp_t;
#define lowp_load(x) to_compute(x)
#define lowp_store(x, key, i) from_compute(x)
#define lowp_key(t, k) 0u
#endif
/* torch.finfo(dtype).eps of the storage type */
#if STORAGE_BF16
#define STORAGE_EPS 0.0078125
#elif STORAGE_F16
#define STORAGE_EPS 0.0009765625
#elif SCALAR_IS_FLOAT
#define STORAGE_EPS 1.1920928955078125e-07
#else
#define STORAGE_EPS 2.220446049250313e-16
#endif
#if SCALAR_IS_FLOAT
#define SQRT sqrtf
#define EXP expf
#define LOG logf
#define FABS fabsf
#define POW powf
#else
#define SQRT sqrt
#define EXP exp
#define LOG log
#define FABS fabs
#define POW pow
#endif

/* tensors smaller than this run on one thread: starting the team costs more than it saves */
#define PARALLEL_MIN 65536

/* every kernel's signature (Note [C kernel layout] in optgen/backends/c.py), and its arguments */
#define OPTGEN_KERNEL_PARAMETERS int64_t n, void **tensors, void **grads, void **counters, \
    const int64_t *numels, const int64_t *dims, const uint8_t *first_step, const double *hyper, \
    int counters_f64, int flags, const uint32_t *state_keys
#define OPTGEN_KERNEL_ARGUMENTS n, tensors, grads, counters, numels, dims, first_step, hyper, counters_f64, flags, \
    state_keys

/* Note [Small tensors in parallel]: a kernel steps each tensor with its own function, here.  A
   tensor of PARALLEL_MIN elements or more is split among the threads (its walks open their own
   parallel regions); smaller ones each run on one thread, and the threads share them out, a few
   at a time: a model's many biases and norms (1000 tensors of 100 elements) would otherwise run
   one after another on one core.  Each tensor's update reads and writes only its own tensors and
   counters, so the order they run in does not change a bit.  Each kernel prints a tensor's
   function twice: split (its walks' parallel regions) and one thread (without them, which cost
   more than a small tensor's arithmetic even when their `if` is false: backends/c.py _one_thread). */
typedef void (*tensor_step_t)(int64_t t, OPTGEN_KERNEL_PARAMETERS);
static void for_each_tensor(tensor_step_t one_thread, tensor_step_t split, OPTGEN_KERNEL_PARAMETERS)
{
    int64_t small = 0;
    for (int64_t t = 0; t < n; ++t)
        if (numels[t] < PARALLEL_MIN) small += numels[t];
#pragma omp parallel for schedule(dynamic, 8) if (small >= PARALLEL_MIN)
    for (int64_t t = 0; t < n; ++t)
        if (numels[t] < PARALLEL_MIN) one_thread(t, OPTGEN_KERNEL_ARGUMENTS);
    for (int64_t t = 0; t < n; ++t)
        if (numels[t] >= PARALLEL_MIN) split(t, OPTGEN_KERNEL_ARGUMENTS);
}

/* the threads a kernel's parallel loops use: torch.get_num_threads(), set from Python */
#ifdef _OPENMP
#include <omp.h>
void optgen_set_num_threads(int n) { omp_set_num_threads(n); }
#else
void optgen_set_num_threads(int n) { (void)n; }
#endif

/* where this thread's share of a walk's numel elements starts (next = 0) or ends (next = 1), as
   schedule(static) shares them out among the threads of the walk's parallel region */
static inline int64_t thread_share(int64_t numel, int next)
{
#ifdef _OPENMP
    const int64_t k = omp_get_num_threads(), t = omp_get_thread_num() + next;
#else
    const int64_t k = 1, t = next;
#endif
    const int64_t q = numel / k, r = numel % k;
    return t * q + (t < r ? t : r);
}

/* as thread_share, in whole blocks of `block` elements (the last share ends at numel) */
static inline int64_t block_share(int64_t numel, int64_t block, int next)
{
    const int64_t end = thread_share((numel + block - 1) / block, next) * block;
    return end < numel ? end : numel;
}

/* 0-dim counters (torch's `step`) are float32 unless the default dtype is float64 */
static inline double load_counter(void *p, int f64) { return f64 ? *(double *)p : (double)*(float *)p; }
static inline void store_counter(void *p, double v, int f64)
{
    if (f64) *(double *)p = v; else *(float *)p = (float)v;
}
static inline double round_counter(double v, int f64) { return f64 ? v : (double)(float)v; }

/* torch.maximum / torch.minimum: NaN if either is NaN */
/* (two selects of one comparison each: GCC vectorises these, not `a != a || a > b`) */
static inline scalar_t max_nan(scalar_t a, scalar_t b) { scalar_t m = a > b ? a : b; return a != a ? a : m; }
static inline scalar_t min_nan(scalar_t a, scalar_t b) { scalar_t m = a < b ? a : b; return a != a ? a : m; }
/* a reduction's terms are buffered per block of elements and summed here, in double, in 8
   independent lanes: vectorised without -ffast-math (Note [Sweeps]) */
#define OPTGEN_BLOCK 1024
static inline double sum_terms(const scalar_t *x, int64_t n, int squares)
{
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    if (squares) {
        for (; k + 8 <= n; k += 8)
            for (int l = 0; l < 8; ++l) lane[l] += (double)x[k + l] * (double)x[k + l];
        for (; k < n; ++k) lane[0] += (double)x[k] * (double)x[k];
    } else {
        for (; k + 8 <= n; k += 8)
            for (int l = 0; l < 8; ++l) lane[l] += (double)x[k + l];
        for (; k < n; ++k) lane[0] += (double)x[k];
    }
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}
/* torch.lerp: a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w) */
static inline scalar_t lerp_of(scalar_t a, scalar_t b, scalar_t w)
{
    scalar_t near_a = a + w * (b - a), near_b = b - (b - a) * ((scalar_t)1 - w);
    return FABS(w) < (scalar_t)0.5 ? near_a : near_b;
}
/* torch.sign: 0 for zeros and NaN */
static inline scalar_t sign_of(scalar_t x) { return (scalar_t)((x > 0) - (x < 0)); }  /* branch-free: vectorises */
"""


def _int8_prelude() -> str:
    """The STATE_INT8 part of PRELUDE (Note [Blockwise 8-bit state in C] in optgen/backends/c.py):
    the code maps and their midpoints as exact hex-float literals, from quantized_state."""
    def table(values) -> str:
        return "{" + ", ".join("INFINITY" if math.isinf(v) else float(v).hex() + "f" for v in values) + "}"

    maps = [*quantized_state.code_map(False).tolist(), *quantized_state.code_map(True).tolist()]
    mids = [*quantized_state._midpoints(False).tolist(), math.inf, *quantized_state._midpoints(True).tolist(), math.inf]
    return INT8_PRELUDE.replace("@BLOCK_SHIFT@", str(quantized_state.BLOCK.bit_length() - 1)) \
        .replace("@MAPS@", table(maps)).replace("@MIDS@", table(mids)) \
        .replace("@BUCKET_SHIFT@", str(quantized_state._BUCKET_SHIFT))


#: int8 state (Note [Blockwise 8-bit state in C]): uint8 codes, a float scale per block of 256
INT8_PRELUDE = r"""typedef uint8_t lowp_t;
#define Q8_BLOCK_SHIFT @BLOCK_SHIFT@
#define Q8_BLOCK (1 << Q8_BLOCK_SHIFT)
#define Q8_BUCKET_SHIFT @BUCKET_SHIFT@
#define Q8_BUCKETS ((0x3f800000 >> Q8_BUCKET_SHIFT) + 1)  /* magnitudes up to 1 */
/* the values of the codes, ascending: [0, 256) the unsigned map (nonnegative states), then the
   signed one (flat, with int32 indices: GCC vectorizes the loads as gathers) */
static const float q8_map[512] = @MAPS@;
/* the midpoints between consecutive values, then infinity, as q8_map */
static const float q8_mid[512] = @MIDS@;
/* per magnitude bucket (a float's bits without the sign, over 2**Q8_BUCKET_SHIFT): how many
   midpoints lie below the bucket's smallest value (quantized_state._lookup: a bucket holds at
   most one midpoint), for [0] unsigned and [1] signed positive values, [2] unsigned (none: -0
   only) and [3] signed negative ones */
static int32_t q8_first[4 * Q8_BUCKETS];
static float q8_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
__attribute__((constructor)) static void q8_init(void)
{
    for (int32_t b = 0; b < Q8_BUCKETS; ++b)
        for (int k = 0; k < 4; ++k) {
            const uint32_t bits = (uint32_t)b << Q8_BUCKET_SHIFT;
            const float low = k < 2 ? q8_float(bits) : -q8_float(bits | ((1u << Q8_BUCKET_SHIFT) - 1));
            const float *mid = q8_mid + 256 * (k & 1);
            int32_t below = 0;  /* the midpoints below `low`, by binary search (they ascend) */
            for (int32_t step = 128; step > 0; step >>= 1)
                if (below + step <= 255 && mid[below + step - 1] < low) below += step;
            q8_first[k * Q8_BUCKETS + b] = k == 2 ? 0 : below;
        }
}
/* an element's value: its code's, times its block's scale (a negative scale of an unsigned state:
   its block holds a negative value and uses the signed map) */
static inline float q8_load(uint8_t code, float s, int is_signed)
{
    const int32_t map = is_signed | (s < 0);
    return q8_map[(map << 8) | (int32_t)code] * fabsf(s);
}
/* the nearest code of x in [-1, 1] (ties to the lower code: the number of midpoints below x);
   beyond (a NaN block's scale is 1): 255 above, 0 below, 255 for NaN, as quantized_state's.
   Branch-free: the magnitude clamped to 1's bucket, NaN counted as positive. */
static inline int32_t q8_code(float x, int32_t map)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint32_t m = u & 0x7fffffffu;
    const int32_t negative = (int32_t)(u >> 31) & (m <= 0x7f800000u);
    const int32_t bucket = (int32_t)((m < 0x3f800000u ? m : 0x3f800000u) >> Q8_BUCKET_SHIFT);
    const int32_t first = q8_first[(map + 2 * negative) * Q8_BUCKETS + bucket];
    return first + (x > q8_mid[(map << 8) | first]);
}
/* one block of new values, quantized: its absmax (NaN if it holds one: the largest magnitude's
   bits, as integers, order NaN above infinity), each element's code */
static inline void q8_block(const float *restrict x, int64_t m, uint8_t *restrict codes, float *absmax, int is_signed)
{
    uint32_t amax = 0;
    int32_t negative = 0;
    for (int64_t k = 0; k < m; ++k) {
        uint32_t u;
        memcpy(&u, &x[k], 4);
        u &= 0x7fffffffu;
        amax = u > amax ? u : amax;
        negative |= x[k] < 0;
    }
    const float largest = q8_float(amax);
    const float scale = largest > 0 ? largest : 1.0f;
    const int32_t map = is_signed | negative;
    for (int64_t k = 0; k < m; ++k) codes[k] = (uint8_t)q8_code(x[k] / scale, map);
    *absmax = !is_signed && negative ? -largest : largest;
}
/* the new values of elements i0..i1 (whole blocks, but at the tensor's end) into codes and scales */
static inline void q8_store(const float *stage, int64_t i0, int64_t i1, uint8_t *codes, float *scale, int is_signed)
{
    for (int64_t b = i0; b < i1; b += (1 << Q8_BLOCK_SHIFT)) {
        const int64_t m = i1 - b < (1 << Q8_BLOCK_SHIFT) ? i1 - b : (1 << Q8_BLOCK_SHIFT);
        q8_block(stage + (b - i0), m, codes + b, scale + (b >> Q8_BLOCK_SHIFT), is_signed);
    }
}
#define lowp_key(t, k) 0u"""


@functools.cache
def prelude() -> str:
    """PRELUDE with its int8 part's tables filled in: computed on first use (the first compile),
    outside any mode a step is traced under — c_launch may first be imported inside one
    (FakeTensorMode: make_fx), where the torch ops building the tables would be fake."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return PRELUDE.replace("@INT8@", _int8_prelude())

FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")
#: flags a compiler may not take (clang on macOS has no -fopenmp): dropped, in this order, after a
#: failed compile — a slower kernel rather than none
OPTIONAL_FLAGS = ("-fopenmp", "-march=native")
#: parameter dtype → (its name in the cache, the -D flags that compile the kernels for it)
C_TYPES = {
    torch.float32: ("float", ("-DSCALAR_T=float", "-DSCALAR_IS_FLOAT=1")),
    torch.float64: ("double", ("-DSCALAR_T=double", "-DSCALAR_IS_FLOAT=0")),
    torch.bfloat16: ("bfloat16", ("-DSTORAGE_BF16=1", "-DSCALAR_IS_FLOAT=1")),
    torch.float16: ("half", ("-DSTORAGE_F16=1", "-DSCALAR_IS_FLOAT=1")),
}
#: reports each compile (INFO: ``logging.basicConfig(level=logging.INFO)`` shows them): the first
#: step of an optimizer on a new machine or dtype takes a second or two longer, once
LOGGER = logging.getLogger("optgen")
_ARGTYPES = [ctypes.c_int64, *[ctypes.c_void_p] * 7, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
#: the -D flag that compiles a library for bfloat16 low-precision state (Note [Stochastic rounding of state])
STATE_BF16_DEFINE = "-DSTATE_BF16=1"
#: and the one for int8 state (Note [Blockwise 8-bit state in C] in optgen/backends/c.py)
STATE_INT8_DEFINE = "-DSTATE_INT8=1"


def compiler() -> list[str] | None:
    """The C compiler's command line (``$CC``, which may carry arguments: ``CC='ccache gcc'``, or
    ``cc``), its program resolved on the PATH; None when there is none."""
    return command("CC", "cc")


def available() -> bool:
    return compiler() is not None


#: per thread: id of a loaded library → the OpenMP thread count last set through it
_OMP_THREADS = threading.local()


class Library:
    """The C source of one generated module, compiled per dtype on first use."""

    def __init__(self, name: str, source: str):
        self.name, self.source = name, source
        #: keyed by (parameter dtype, low-precision state: False, True for bfloat16, or "int8")
        self._loaded: dict[tuple[torch.dtype, bool | str], ctypes.CDLL] = {}
        #: why a library cannot be built or loaded: remembered, so a step does not compile again
        self._failed: dict[tuple[torch.dtype, bool | str], str] = {}

    def unusable(self, dtype: torch.dtype) -> str | None:
        """Why this library cannot run ``dtype`` (compiled and loaded now if need be); None when it can."""
        if (dtype, False) not in self._loaded:
            try:
                self._load(dtype)
            except RuntimeError as e:
                return str(e)
        return None

    def _load(self, dtype: torch.dtype, low_state: bool | str = False) -> ctypes.CDLL:
        which = (dtype, low_state)
        if which in self._failed:
            raise RuntimeError(self._failed[which])
        try:
            path = self._compile(dtype, low_state)
            lib = ctypes.CDLL(str(path))
            lib.optgen_set_num_threads  # noqa: B018 - a library without it is not one of ours
        except (RuntimeError, OSError, AttributeError) as e:
            self._failed[which] = str(e) if isinstance(e, RuntimeError) else \
                f"optgen: loading the C kernels of {self.name} failed: {e}"
            raise RuntimeError(self._failed[which]) from None
        self._loaded[which] = lib
        return lib

    def function(self, dtype: torch.dtype, name: str, low_state: bool | str = False):
        """C function ``name`` compiled for ``dtype`` parameters (``low_state``: and bfloat16
        low-precision state, or "int8" state)."""
        lib = self._loaded.get((dtype, low_state)) or self._load(dtype, low_state)
        # As many threads as torch's own CPU kernels use, asked at every call: OpenMP's count is
        # per calling thread (a worker thread starts at OMP_NUM_THREADS whatever the main thread
        # set), so what was set is remembered per thread and library.
        threads = torch.get_num_threads()
        set_here = cast(dict[int, int], _OMP_THREADS.__dict__)  # keyed by id(lib), not attribute names
        if set_here.get(id(lib)) != threads:
            lib.optgen_set_num_threads(threads)
            set_here[id(lib)] = threads
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _ARGTYPES, None
        return fn

    def _compile(self, dtype: torch.dtype, low_state: bool | str = False) -> Path:
        """The verified library for ``dtype`` in the cache, built there when missing or damaged
        (Note [Kernel cache])."""
        ctype, defines = C_TYPES[dtype][0], tuple(C_TYPES[dtype][1])
        if low_state == "int8":
            ctype, defines = f"{ctype}_int8state", (*defines, STATE_INT8_DEFINE)
        elif low_state:
            ctype, defines = f"{ctype}_bf16state", (*defines, STATE_BF16_DEFINE)
        cc = compiler()
        if cc is None:
            raise RuntimeError("optgen's fused CPU kernels need a C compiler (cc, or $CC); none was found")
        text = prelude() + self.source
        key = hashlib.sha256("\0".join([text, *cc, compiler_identity(cc), *FLAGS, *defines, platform.machine(),
                                        cpu_identity()]).encode()).hexdigest()[:20]
        target = writable(cache_dir()) / f"{self.name.rpartition('.')[2]}_{ctype}_{key}.so"
        started = time.perf_counter()
        if built(target, lambda folder: self._build(folder, text, cc, defines)):
            LOGGER.info("optgen: compiled the C kernels of %s for %s in %.1f s, cached as %s (later processes load "
                        "it)", self.name, dtype, time.perf_counter() - started, target)
        return target

    def _build(self, folder: Path, text: str, cc: list[str], defines: tuple[str, ...]) -> Path:
        """The library compiled from ``text`` in ``folder``: with every flag, else without the optional
        ones, one after another (a compiler without -fopenmp or -march=native)."""
        source, out = folder / "kernels.c", folder / "kernels.so"
        source.write_text(text)
        flags = list(FLAGS)
        for dropped in (None, *OPTIONAL_FLAGS):
            if dropped is not None:
                flags.remove(dropped)
            try:
                result = subprocess.run([*cc, *flags, *defines, "-o", str(out), str(source)],
                                        capture_output=True, text=True)
            except OSError as e:
                raise RuntimeError(f"optgen: compiling the C kernels of {self.name} failed: "
                                   f"{shlex.join(cc)}: {e.strerror}") from None
            if result.returncode == 0 and out.exists():
                return out
        detail = result.stderr.strip() or f"{shlex.join(cc)} exited with status {result.returncode}"
        raise RuntimeError(f"optgen: compiling the C kernels of {self.name} failed:\n{detail}")


class Kernel:
    """A generated module's C function: called as the foreach kernels are (``kernel(**lists,
    **scalars, **flags)``), it picks its lists, hyperparameters and flags by name and launches it
    once per dtype group.  Its fields, as the generated ``LAUNCH = Kernel(...)`` gives them:

    - ``tensors``: the lists it touches, params first, then the states, in table order;
    - ``present``: index into ``tensors`` → whether that list is touched under these arguments
      (a condition over the keyword arguments ``a``); a list a flag or hyperparameter leaves
      unused passes as None entries, which the kernel never reads;
    - ``counters``: the counter lists; ``lazy``: index → when that state is created on its first
      step; ``hyperparameters``: in the order the C function reads ``hyper``;
    - ``flags``: in the order of the bits of its ``flags`` argument;
    - ``reduced``: index → the dimension a state shaped like a reduction of the parameter keeps as 1;
    - ``low_precision``: the indices of the states ``state_dtype=torch.bfloat16`` keeps in bfloat16,
      in the order of their keys in ``state_keys`` (Note [Stochastic rounding of state]);
    - ``int8``: the source has a version for int8 state (codes, their scales in ``state_scales``:
      Note [Blockwise 8-bit state in C])."""

    def __init__(self, library: Library, function: str, *, tensors, counters, lazy, hyperparameters, flags=(),
                 present=None, reduced=None, low_precision=(), int8=False):
        self.library, self.function = library, function
        self.tensors, self.counters, self.lazy, self.hyperparameters = tensors, counters, lazy, hyperparameters
        self.flags, self.present, self.reduced = flags, present or {}, reduced or {}
        self.low_precision, self.int8 = tuple(low_precision), int8
        register_launcher(library.name, self)  # what optgen::c_step runs (Note [C kernels as custom ops])

    def __call__(self, **arguments) -> None:
        n = len(arguments["params"])
        tensors = self._lists(arguments, n)
        counters = [arguments[c] for c in self.counters]
        lazy = {index: when(arguments) for index, when in self.lazy.items()}
        hyperparameters = [arguments[h] for h in self.hyperparameters]
        flags = sum(1 << k for k, f in enumerate(self.flags) if arguments[f])
        if n and traced(arguments["params"][0]):  # torch.compile, or FakeTensors: no address to pass
            _traced_launch(self, tensors, arguments["grads"], counters, lazy, hyperparameters, flags)
            return
        low: LowState | Int8State | None = None
        if arguments.get("state_keys") is not None:  # bfloat16 state: each such list's keys, in kernel order
            keys = arguments["state_keys"]
            low = LowState(self.low_precision, [keys[self.tensors[index]] for index in self.low_precision])
        elif arguments.get("state_scales") is not None:  # int8 state: each such list's scales, in kernel order
            if not self.int8:
                raise RuntimeError(f"optgen: {self.library.name} has no C kernel for int8 state")
            scales = arguments["state_scales"]
            low = Int8State(self.low_precision, [scales[self.tensors[index]] for index in self.low_precision])
        launch(self.library, self.function, tensors=tensors, grads=arguments["grads"], counters=counters,
               lazy=lazy, hyperparameters=hyperparameters, reduced=self.reduced, flags=flags, low=low)

    def _lists(self, arguments, n: int) -> list[list]:
        """The tensor lists in table order, a list these arguments leave unused as None entries."""
        return [arguments[t] if index not in self.present or self.present[index](arguments) else [None] * n
                for index, t in enumerate(self.tensors)]

    def _uses(self, arguments) -> tuple[bool, ...]:
        """Which of the lists with a condition these arguments use (``present``)."""
        return tuple(bool(when(arguments)) for when in self.present.values())

    def bind(self, **arguments) -> BoundLaunch | None:
        """This launch over these lists (every state created: a step ran), checked and tabled once,
        to run again while the lists stay the same (Note [Cached steps] in runtime/step_cache.py);
        None where it cannot be bound (a state still to be created, a check that fails)."""
        params = arguments["params"]
        n = len(params)
        tensors = self._lists(arguments, n)
        counters = [arguments[c] for c in self.counters]
        # a list with some entries missing has states still to be created (or lost): the checked path's
        if not n or params[0].dtype not in C_TYPES or any(_missing(values) and not all(t is None for t in values)
                                                           for values in tensors):
            return None
        if any(when(arguments) and _missing(tensors[index]) for index, when in self.lazy.items()):
            return None
        try:
            _check(params, tensors, arguments["grads"], counters, self.reduced)
            check_counter_dtypes(counters, "fused CPU kernel")
        except RuntimeError:  # KernelDeclined included: the next step takes the checked path, and says why
            return None
        return BoundLaunch(self, tensors, counters, self._uses(arguments))


def _missing(values) -> bool:
    return any(t is None for t in values)


class LowState:
    """A launch's bfloat16 low-precision states: their indices into the lists, and their rounding
    keys, one per tensor, as the uint32 table ``state_keys[k * n + t]`` the kernel reads."""

    def __init__(self, indices: tuple[int, ...], keys: list[list[int]]):
        self.indices = frozenset(indices)
        self.table = array.array("I", [k for per_list in keys for k in per_list] or [0])


class BoundLaunch:
    """One group's C launch, bound to its lists (Note [Cached steps] in runtime/step_cache.py): the
    address tables of its parameters, states and counters, built and checked once, and the storages
    they point into, held so no address in them is ever freed and handed to another tensor; per step
    the caller passes the gradients' table (step_guard.py builds it as it checks them)."""

    def __init__(self, kernel: Kernel, tensors, counters, uses: tuple[bool, ...]):
        params = tensors[0]
        self.kernel, self.uses, self.n, self.dtype = kernel, uses, len(params), params[0].dtype
        addresses = tuple(t.data_ptr() if t is not None else 0 for values in tensors for t in values)
        self.plan = _Plan(self.dtype, tensors, counters, addresses, tuple(c.data_ptr() for values in counters
                                                                           for c in values))
        self.storages = [t.untyped_storage() for values in (*tensors, *counters) for t in values if t is not None]
        self.first_step = torch.zeros(max(1, self.n * len(kernel.lazy)), dtype=torch.uint8)  # no state is new

    def __call__(self, grad_table: array.array, arguments: dict) -> bool:
        """One step with the gradients at these addresses (checked by the caller: contiguous, shaped
        like their parameters, one per parameter) and these hyperparameters; False, with nothing
        done, when the arguments use other lists than the bound ones (a flag or hyperparameter
        changed which states the step touches)."""
        kernel = self.kernel
        if len(grad_table) != self.n or kernel._uses(arguments) != self.uses:
            return False
        hyper = array.array("d", [math.nan if (h := arguments[name]) is None else float(h)
                                  for name in kernel.hyperparameters] or [0.0])
        flags = sum(1 << k for k, f in enumerate(kernel.flags) if arguments[f])
        plan = self.plan
        kernel.library.function(self.dtype, kernel.function)(
            self.n, plan.addresses.data_ptr(), grad_table.buffer_info()[0], plan.counter_addresses.data_ptr(),
            plan.numels.data_ptr(), plan.dims.data_ptr(), self.first_step.data_ptr(), hyper.buffer_info()[0],
            plan.counters_f64, flags, None)
        return True


# Note [C kernels as custom ops]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# dynamo cannot trace a ctypes call (nor the address tables, data_ptr()), so while a step is traced
# (torch.compile, or FakeTensors — make_fx, FakeTensorMode: ``native.traced``; a FakeTensor's
# data_ptr() is no address, and the kernel would write through it) the C kernel is the custom op
# ``optgen::c_step``: one node in the graph, which mutates the tensors and counters it is given,
# with a fake implementation that does nothing (a step creates no tensor: lazily created state is
# allocated before the op, in the traced code, and the op is told which entries are new).  At run
# time the op calls ``launch`` as the eager step does, so a compiled fused step computes the eager
# bits.  Eagerly the kernel is called directly (the op's dispatch would add its overhead to every
# step).  Under torch.compile a state the kernel declines (KernelDeclined: not contiguous) is an
# error, not a fall-back to the for-loop: the fall-back is decided on values the trace does not see.


def _traced_launch(kernel: Kernel, tensors, grads, counters, lazy, hyperparameters, flags: int) -> None:
    """``launch`` as dynamo traces it (Note [C kernels as custom ops])."""
    params = tensors[0]
    if not params:
        return
    first = sum(create_states(params, tensors, lazy), [])
    flat, absent = flat_for_op(tensors, params[0])
    torch.ops.optgen.c_step(kernel.library.name, flat, absent, list(grads),
                            [c for values in counters for c in values], len(params), first,
                            [math.nan if h is None else float(h) for h in hyperparameters], flags)


@torch.library.custom_op("optgen::c_step", mutates_args=("tensors", "counters"), device_types="cpu")
def _c_step(module: str, tensors: list[torch.Tensor], absent: list[int], grads: list[torch.Tensor],
            counters: list[torch.Tensor], n: int, first: list[int], hyperparameters: list[float],
            flags: int) -> None:
    """One launch of the C kernel of generated module ``module`` (its ``LAUNCH``): ``tensors`` and
    ``counters`` are its lists, each ``n`` long, one after another, ``absent`` the entries of
    ``tensors`` that stand for None; ``first``: the lazily created states' first-step flags
    (Note [C kernels as custom ops])."""
    kernel = launcher_named(module)
    lists = lists_from_op(tensors, absent, n)
    counter_lists = [counters[i:i + n] for i in range(0, len(counters), n)]
    _launch(kernel.library, kernel.function, lists, grads, counter_lists, first,
            [None if math.isnan(h) else h for h in hyperparameters], kernel.reduced, flags)


@_c_step.register_fake
def _(module, tensors, absent, grads, counters, n, first, hyperparameters, flags) -> None:
    return None


def launch(library: Library, function: str, *, tensors, grads, counters, lazy, hyperparameters,
           reduced=None, flags: int = 0, low: LowState | Int8State | None = None) -> None:
    """Calls ``function`` of ``library`` once for every tensor of one dtype group.

    tensors: lists in the kernel's order — params, then the states it touches (entries of a state
        the hyperparameters leave unused may be None: the kernel never touches them).
    counters: lists of 0-dim counters (``step``) on the CPU.
    lazy: index into ``tensors`` → whether that state is created now: its None entries are
        allocated here (and stored into the caller's list, which saves them in the state).
    hyperparameters: numbers (None, a hyperparameter left unset, passes as NaN), in the kernel's order.
    reduced: index into ``tensors`` → the dimension a state keeps with size 1 (Adafactor's row_var:
        ``zeros_reduced(param, -1)``); every other state is shaped like its parameter.
    flags: the flag values, bit k the kernel's k-th flag.
    low: the states kept in bfloat16 and their rounding keys, or in int8 and their scales (None:
        every state in the params' dtype).  An int8 launch creates no state (the reference does).
    """
    params = tensors[0]
    if not params:
        return
    dtype = params[0].dtype
    if dtype not in C_TYPES:
        raise RuntimeError(f"optgen's fused CPU kernels support {', '.join(map(str, C_TYPES))} parameters, "
                           f"not {dtype}; use foreach=True or fused=None")
    if isinstance(low, Int8State) and creates_states(tensors, lazy):
        raise RuntimeError("optgen: the C kernel's int8 launch creates no state: the step that creates it runs on "
                           "the reference (Note [Blockwise 8-bit state in C])")
    if creates_states(tensors, lazy):
        # Checked before the new state exists: a step refused here (KernelDeclined: the caller runs
        # the for-loop instead) leaves nothing allocated behind in the caller's lists.
        _check(params, tensors, grads, counters, reduced or {}, low)
    first = sum(create_states(params, tensors, lazy, low.indices if low else ()), [])
    _launch(library, function, tensors, grads, counters, first, hyperparameters, reduced, flags, low)


def _launch(library: Library, function: str, tensors, grads, counters, first: list[int], hyperparameters,
            reduced, flags: int, low: LowState | Int8State | None = None) -> None:
    """``launch`` once the lazily created states exist (``first``: their first-step flags)."""
    params = tensors[0]
    dtype, n = params[0].dtype, len(params)
    if dtype not in C_TYPES:
        raise RuntimeError(f"optgen's fused CPU kernels support {', '.join(map(str, C_TYPES))} parameters, "
                           f"not {dtype}; use foreach=True or fused=None")
    plan = _plan(dtype, tensors, counters, reduced or {}, low)
    grad_key = layout(grads)
    if grad_key != plan.grad_key:  # zero_grad(set_to_none=True) hands out new gradients each step
        _check(params, [], grads, [])
        plan.grad_key = grad_key
        plan.grad_addresses = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
    assert plan.grad_addresses is not None  # a new plan's grad_key is None: set just above
    first_step = torch.tensor(first or [0], dtype=torch.uint8)
    hyper = torch.tensor([math.nan if h is None else float(h) for h in hyperparameters] or [0.0],
                         dtype=torch.float64)
    keys = low.table.buffer_info()[0] if isinstance(low, LowState) else None  # (int8: none; its scales are tabled)
    library.function(dtype, function, "int8" if isinstance(low, Int8State) else low is not None)(
        n, plan.addresses.data_ptr(), plan.grad_addresses.data_ptr(), plan.counter_addresses.data_ptr(),
        plan.numels.data_ptr(), plan.dims.data_ptr(), first_step.data_ptr(), hyper.data_ptr(), plan.counters_f64,
        flags, keys)


class _Plan(LaunchPlan):
    """The address tables of one set of tensors, checked once (Note [Launch tables] in
    triton_launch.py: the same idea, on the host)."""

    def __init__(self, dtype, tensors, counters, addresses: tuple, counter_addresses: tuple):
        super().__init__()
        self.addresses = torch.tensor(addresses, dtype=torch.int64)
        self.counter_addresses = torch.tensor(counter_addresses or (0,), dtype=torch.int64)
        self.numels = torch.tensor([p.numel() for p in tensors[0]], dtype=torch.int64)
        self.dims = torch.tensor([d for p in tensors[0] for d in _view(p.shape)] or [0], dtype=torch.int64)
        self.counters_f64 = int(bool(counters) and counters[0][0].dtype == torch.float64)


_PLANS = PlanCache()


def _view(shape) -> tuple[int, int, int, int]:
    """(ndim, B, M, C): a tensor seen as B matrices of M rows of C (Note [Sweeps] in
    optgen/backends/sweeps.py)."""
    c = shape[-1] if len(shape) >= 1 else 1
    m = shape[-2] if len(shape) >= 2 else 1
    return len(shape), math.prod(shape[:-2]), m, c


def _plan(dtype, tensors, counters, reduced: dict, low: LowState | Int8State | None = None) -> _Plan:
    """The cached tables for these tensors; a new set (a new parameter, state created or replaced,
    a loaded state dict, a tensor re-viewed in place) is checked and gets new ones.  int8 states'
    scales are rows of the table after the lists (Note [Blockwise 8-bit state in C])."""
    table = [*tensors, *low.scales] if isinstance(low, Int8State) else tensors
    layouts = layout(t for values in table for t in values)
    counter_layouts = layout(c for values in counters for c in values)
    # (and the storages' sizes: one freed and allocated again smaller in place may keep its address,
    # and the kernel would write past its end: Note [Plan keys])
    key = (dtype, layouts, counter_layouts, low is not None and (type(low), low.indices),
           storage_sizes(table), storage_sizes(counters))
    plan = _PLANS.get(key)
    if plan is None:
        _check(tensors[0], tensors, [], counters, reduced, low)
        addresses = tuple(t.data_ptr() if t is not None else 0 for values in table for t in values)
        counter_addresses = tuple(c.data_ptr() for values in counters for c in values)
        plan = _PLANS.put(key, _Plan(dtype, tensors, counters, addresses, counter_addresses))
    return plan


def _check(params, tensors, grads, counters, reduced=None, low: LowState | Int8State | None = None) -> None:
    """Every tensor the kernel addresses is a contiguous CPU tensor of the group's dtype (bfloat16
    for the states ``low`` lists, or uint8 codes and their float32 scales for int8), shaped like
    its parameter (or its reduced shape); every counter a 1-element float32 or float64 CPU tensor,
    all alike.  A state or gradient that is only not contiguous raises KernelDeclined."""
    int8 = isinstance(low, Int8State)
    if low is not None and params[0].dtype != torch.float32:
        raise RuntimeError(f"optgen's fused CPU kernel keeps {'int8' if int8 else 'bfloat16'} state for float32 "
                           f"parameters, not {params[0].dtype}")
    low_indices = low.indices if low is not None else frozenset()
    if isinstance(low, Int8State) and tensors:
        quantized_state.check_scales(params, [tensors[index] for index in low.order], low.scales,
                                     torch.device("cpu"), "fused CPU kernel")
    reduced = reduced or {}
    for index, (what, values) in enumerate((("parameter", params), ("gradient", grads),
                                            *(("state", v) for v in tensors[1:]))):
        for i, t in enumerate(values):
            if t is None:
                continue
            dim = reduced.get(index - 1)
            shape = params[i].shape if dim is None else reduced_shape(params[i].shape, dim)
            dtype = (torch.uint8 if int8 else torch.bfloat16) if index - 1 in low_indices else params[0].dtype
            if t.device.type != "cpu" or t.dtype != dtype or t.shape != shape or not t.is_contiguous():
                wrong = t.device.type != "cpu" or t.dtype != dtype or t.shape != shape
                raise (RuntimeError if wrong else KernelDeclined)(
                    f"optgen's fused CPU kernel needs contiguous CPU tensors of one dtype, shaped "
                    f"like their parameter: the {what} of parameter {i} is {t.dtype} "
                    f"{tuple(t.shape)} on {t.device}"
                    + ("" if t.is_contiguous() else ", not contiguous"))
            if outside_storage(t):
                raise RuntimeError(f"optgen's fused CPU kernel: the {what} of parameter {i} ({tuple(t.shape)}) "
                                   "lies outside its storage (the storage was resized or freed in place)")
    for values in counters:
        for i, c in enumerate(values):
            if c.device.type != "cpu" or c.numel() != 1 or c.dtype not in (torch.float32, torch.float64):
                raise RuntimeError(f"optgen's fused CPU kernel reads counters (step) as 1-element float32 or "
                                   f"float64 CPU tensors, all of one dtype; parameter {i}'s is {c.dtype} "
                                   f"{tuple(c.shape)} on {c.device}")
            if outside_storage(c):
                raise RuntimeError(f"optgen's fused CPU kernel: the counter of parameter {i} lies outside its "
                                   "storage (the storage was resized or freed in place)")
    check_counter_dtypes(counters, "fused CPU kernel")
