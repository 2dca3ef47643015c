"""Names a spec may not give to a hyperparameter, tuple item, state or local of its rule.

Note [Reserved names]
~~~~~~~~~~~~~~~~~~~~~
Spec names are printed as they are into generated Python (constructor arguments, kernel
parameters and locals), into C kernels and into Triton kernels.  A name the generated code itself
uses — a keyword, a builtin it calls, a module it imports, a list it loops over, a C type or a
macro of the C prelude — would either not parse (``lambda=0.1``), shadow what the code relies on
(a local ``torch`` or ``params``), or fail to compile (``double INFINITY = ...``).  The kernel
backends rename a few skeleton names on their own (``optgen.backends.c.RESERVED`` and
``optgen.backends.triton.RESERVED`` get a trailing underscore); everything below is rejected at
load instead, with the spec's location, because it cannot be renamed everywhere it is printed (the
constructor signature is the user's API).  Each group says why it is here; the tests in
tests/spec/test_spec_limits.py try one name of every group.

Names are also derived from spec names: the foreach kernel keeps one list per name (``exp_avg`` →
``exp_avgs``), a counter lives in ``state_<name>s`` and is read through ``<name>_t``, Triton passes
``<name>_ptr``; :func:`derived_names` lists them so two spec names cannot meet there either.
"""
from __future__ import annotations

import keyword

#: group → (why, names)
GROUPS: dict[str, tuple[str, frozenset[str]]] = {
    "python_keyword": ("a Python keyword", frozenset([*keyword.kwlist, *keyword.softkwlist])),
    # builtins the generated modules call or name (constructor checks, kernels, the class)
    "python_builtin": ("a Python builtin the generated code uses", frozenset({
        "abs", "all", "any", "bool", "complex", "dict", "enumerate", "float", "getattr", "hasattr", "int",
        "isinstance", "iter", "len", "list", "map", "max", "min", "next", "object", "pow", "print", "property",
        "range", "set", "setattr", "sorted", "str", "sum", "super", "tuple", "type", "zip", "Exception",
        "ImportError", "KeyError", "NotImplementedError", "RuntimeError", "TypeError", "ValueError",
    })),
    # what the generated modules import or define at module level, and the names their functions
    # use for the optimizer, its param groups and the per-tensor lists (templates/*/, generated/)
    "generated_module": ("a name the generated modules use", frozenset({
        "self", "params", "grads", "torch", "Tensor", "math", "annotations", "group", "state", "i", "p", "t",
        "closure", "loss", "defaults", "param_groups", "state_steps", "KERNEL", "KernelModule", "VARIANTS",
        "arguments", "LIBRARY", "SOURCE", "OPTIMIZERS", "Kernel", "Library", "GeneratedOptimizer",
        "Optimizer", "Callable", "Iterable", "Literal", "counter_from", "filled_like", "scalar_dtype",
        "check_options", "add", "addcdiv", "addcmul", "sqrt", "newton_schulz", "reduced_shape", "lbfgs",
        "optgen",
        # optgen's own constructor keyword and state entry (Note [Stochastic rounding of state])
        "state_dtype", "checked_state_dtype", "state_rounding_step",
    })),
    # the Triton kernels' modules (the kernel skeleton's own names are renamed by the backend)
    "triton": ("a name of the Triton kernels", frozenset({"tl", "triton"})),
    # C keywords (C11), the integer types of <stdint.h>, macros and functions of <math.h>,
    # <stdlib.h>, <string.h> and OpenMP the kernels use, and everything the prelude defines at file
    # scope (optgen/runtime/c_launch.py PRELUDE): a C local or parameter of that name does not compile
    # or shadows what the kernel calls
    "c": ("a C keyword or a name of the C kernels' prelude", frozenset({
        "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else", "enum",
        "extern", "float", "for", "goto", "if", "inline", "int", "long", "register", "restrict", "return",
        "short", "signed", "sizeof", "static", "struct", "switch", "typedef", "union", "unsigned", "void",
        "volatile", "while", "bool", "true", "false",
        "int8_t", "int16_t", "int32_t", "int64_t", "uint8_t", "uint16_t", "uint32_t", "uint64_t", "size_t",
        "ptrdiff_t", "intptr_t", "uintptr_t",
        "INFINITY", "NAN", "HUGE_VAL", "NULL", "M_PI", "M_E", "isnan", "isinf", "isfinite", "signbit",
        "sqrtf", "expf", "logf", "fabs", "fabsf", "powf", "fmax", "fmaxf", "fmin", "fminf", "copysign",
        "exp", "log", "malloc", "calloc", "realloc", "free", "memcpy", "memset", "omp_set_num_threads",
        "omp_get_thread_num", "omp_get_num_threads",
        "storage_t", "scalar_t", "to_compute", "from_compute", "load_counter", "store_counter",
        "round_counter", "sum_terms", "lerp_of", "max_nan", "min_nan", "sign_of", "optgen_set_num_threads",
        "STORAGE_BF16", "STORAGE_F16", "STORAGE_EPS", "SCALAR_T", "SCALAR_IS_FLOAT", "SQRT", "EXP", "LOG",
        "FABS", "POW", "PARALLEL_MIN", "OPTGEN_BLOCK", "OPTGEN_KERNEL_PARAMETERS", "OPTGEN_KERNEL_ARGUMENTS",
        "tensor_step_t", "for_each_tensor", "bfloat16_to_float", "thread_share", "OPTGEN_WALK_REGION",
        "OPTGEN_WALK_SHARE",
        "lowp_t", "lowp_load", "lowp_store", "lowp_key", "optgen_mix32", "STATE_BF16", "state_keys",
        "STATE_INT8", "q8_map", "q8_mid", "q8_first", "q8_init", "q8_float", "q8_load", "q8_code", "q8_block",
        "q8_store", "Q8_BLOCK", "Q8_BLOCK_SHIFT", "Q8_BUCKET_SHIFT", "Q8_BUCKETS", "block_share",
        "OPTGEN_WALK_BLOCKS",
    })),
}


def reserved_why(name: str) -> str | None:
    """Why ``name`` cannot be a spec name, or None when it can."""
    if name.startswith("_"):  # the compiler's temporaries (_t0, _t1, ...) and private names
        return "names starting with '_' are kept for the compiler's temporaries"
    for why, names in GROUPS.values():
        if name in names:
            return why
    return None


def reserved_message(name: str, what: str) -> str | None:
    """The error for a reserved ``name`` used as ``what`` ("hyperparameter", "local", ...)."""
    why = reserved_why(name)
    if why is None:
        return None
    return f"'{name}' cannot be the name of a {what}: {why} — choose another name"


def derived_names(name: str, counter: bool = False) -> tuple[str, ...]:
    """The names the generated code derives from a spec name (see the Note)."""
    out = (name + "s", name + "_ptr")
    return out + (name + "_t", f"state_{name}s") if counter else out
