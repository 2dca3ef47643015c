"""The checks a bound launch runs before each step (Note [Cached steps] in step_cache.py): whether a
param group's lists are still those it was bound for, and if so the gradients' address table.

Note [Native step guard]
~~~~~~~~~~~~~~~~~~~~~~~~
The checks read a dozen facts per tensor (the gradient, its contiguity, element count, dtype,
storage and address; the parameter's address, shape and contiguity; each state's object, address,
shape, dtype and contiguity). As Python maps of tensor methods they cost ~50 ns a call, about 1 µs a
tensor: on 1000 tensors of 100 elements ten times the fused kernel's own work. step_guard.cpp does
the same checks in C++, reading each tensor's C++ object through torch's headers: ~0.5 µs a
parameter with its gradient and three states when a forward and backward have evicted them from the
cache (less when warm). That cost is memory latency, so the checks run in four short passes (state
lookups, parameters, gradients, state records) that keep many tensors' misses in flight, not one
loop whose body calls Python (the state dict's lookup goes through the tensor's Python
``__hash__``). Measured: BENCHMARKS.md, "Host overhead on many small tensors" (with the lookups
third; first, since no gradient may be read before the Python code they run, which may replace it).

It is compiled like the C kernels (``$CXX``, else ``c++``; torch's include directories and
libraries; the cache of Note [Kernel cache], keyed on the source, compiler, flags, torch and
Python) and loaded as an extension module once its digest checks out.  A compile takes ~10 s, so
it is never on a step's path: the first group bound with at least :data:`NATIVE_FROM` tensors
starts it on a background thread, and groups bound after it is loaded use it (a bound group's
next step rebinds; one found in the cache is only loaded: milliseconds).  Below that size the
Python guard's cost is small next to the step.  Where no C++ compiler or torch headers exist,
the build fails (logged once, at INFO) and every step keeps the Python guard: the same checks,
slower.  ``OPTGEN_STEP_GUARD=python`` keeps the Python guard everywhere (no compile).
"""
from __future__ import annotations

import array
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shlex
import subprocess
import sys
import sysconfig
import threading
import time
from collections import defaultdict
from itertools import compress, repeat
from operator import add, attrgetter, floordiv, is_, is_not, le
from pathlib import Path
from types import ModuleType

import torch

from optgen.runtime import native_cache

LOGGER = logging.getLogger("optgen")
SOURCE = Path(__file__).with_name("step_guard.cpp")
#: a group bound with this many tensors starts the native guard's build (Note [Native step guard])
NATIVE_FROM = 64
_MODULE_NAME = "optgen_step_guard"  # PyInit_optgen_step_guard in step_guard.cpp
_FLAGS = ("-O2", "-std=c++20", "-shared", "-fPIC", "-w")  # -w: torch's headers warn under some compilers


# --- the native guard's build --------------------------------------------------------------------

class _Build:
    """The native guard's state in this process: not asked for, building, loaded, or failed."""

    def __init__(self):
        self.lock = threading.Lock()
        self.module: ModuleType | None = None
        self.failed: str | None = None
        self.thread: threading.Thread | None = None


_BUILD = _Build()


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads: a lock one of them held stays held, and a
    build under way never ends there.  The child keeps what was loaded or failed, with a lock of
    its own, and builds again if it needs to."""
    global _BUILD
    parent, _BUILD = _BUILD, _Build()
    _BUILD.module, _BUILD.failed = parent.module, parent.failed


os.register_at_fork(after_in_child=_after_fork_in_child)


def cxx_compiler() -> list[str] | None:
    """The C++ compiler's command line (``$CXX``, which may carry arguments, or ``c++``), its program
    resolved on the PATH; None when there is none."""
    return native_cache.command("CXX", "c++")


def _build_command() -> tuple[list[str], list[str]]:
    """The compiler and the flags that build the guard against this torch and Python (torch's
    include and library directories as torch.utils.cpp_extension names them; that module is not
    imported: it takes a second, setuptools included)."""
    cxx = cxx_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++, or $CXX)")
    root = Path(torch.__file__).parent
    includes = (root / "include", root / "include" / "torch" / "csrc" / "api" / "include",
                Path(sysconfig.get_paths()["include"]))
    lib = root / "lib"
    flags = [*_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *(f"-I{d}" for d in includes), f"-L{lib}", f"-Wl,-rpath,{lib}",
             "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    return cxx, flags


def _compiled() -> Path:
    """The verified guard library in the cache, built there when missing (Note [Kernel cache])."""
    cxx, flags = _build_command()
    text = SOURCE.read_text()
    key = hashlib.sha256("\0".join([text, *cxx, native_cache.compiler_identity(cxx), *flags, torch.__version__,
                                    sys.version, sysconfig.get_config_var("EXT_SUFFIX") or ""]).encode()
                         ).hexdigest()[:20]
    target = native_cache.writable(native_cache.cache_dir()) / \
        f"step_guard_{key}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    started = time.perf_counter()
    if native_cache.built(target, lambda folder: _compile_into(folder, text, cxx, flags)):
        LOGGER.info("optgen: compiled the native step guard in %.1f s, cached as %s", time.perf_counter() - started,
                    target)
    return target


def _compile_into(folder: Path, text: str, cxx: list[str], flags: list[str]) -> Path:
    """The guard's library compiled from ``text`` in ``folder``."""
    source, out = folder / "step_guard.cpp", folder / "step_guard.so"
    source.write_text(text)
    result = subprocess.run([*cxx, str(source), "-o", str(out), *flags], capture_output=True, text=True)
    if result.returncode != 0 or not out.exists():
        detail = result.stderr.strip()[-2000:] or f"{shlex.join(cxx)} exited with status {result.returncode}"
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{detail}")
    return out


def _load(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(_MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, str(path), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _build() -> None:
    """Builds (or finds) and loads the guard; records why not where it cannot."""
    try:
        module = _load(_compiled())
        module.snapshot, module.revalidate  # noqa: B018 - a module without them is not ours
    except Exception as e:  # noqa: BLE001 - any failure leaves the Python guard, said once
        with _BUILD.lock:
            _BUILD.failed = str(e) or type(e).__name__
        LOGGER.info("optgen: the native step guard is unavailable (%s); cached steps check on the Python side",
                    _BUILD.failed)
        return
    with _BUILD.lock:
        _BUILD.module = module


def native(*, start: bool = True, wait: bool = False) -> ModuleType | None:
    """The native guard module when it is loaded, else None.  ``start``: start its build (on a
    background thread) if not yet asked for; ``wait``: and wait for it (tests, benchmarks)."""
    build = _BUILD
    if build.module is not None or build.failed is not None:
        return build.module
    if os.environ.get("OPTGEN_STEP_GUARD", "").lower() == "python":
        return None
    with build.lock:
        if build.thread is None and (start or wait):
            build.thread = threading.Thread(target=_build, name="optgen-step-guard-build", daemon=True)
            build.thread.start()
        thread = build.thread
    if wait and thread is not None:
        thread.join()
    return build.module


def unavailable() -> str | None:
    """Why the native guard could not be built (None: it was, or was not tried yet)."""
    return _BUILD.failed


# --- the guards ------------------------------------------------------------------------------------

_GRAD = attrgetter("grad")
_DTYPE = attrgetter("dtype")
_SHAPE = attrgetter("shape")
_DATA_PTR = torch.Tensor.data_ptr
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_IS_CONJ = torch.Tensor.is_conj
_IS_NEG = torch.Tensor.is_neg
_NUMEL = torch.Tensor.numel
_OFFSET = torch.Tensor.storage_offset
_STORAGE = torch.Tensor.untyped_storage
_NBYTES = torch.UntypedStorage.nbytes


class Bound:
    """What a guard compares against: a group's parameters and states when its launch was bound."""

    def __init__(self, optimizer, group: dict, params: list[torch.Tensor], keys: list[str]):
        self.group_params = list(group["params"])
        self.with_grad = [p.grad is not None for p in self.group_params]
        self.params, self.keys = params, keys
        held = list(map(optimizer.state.get, params))
        #: per launch parameter, its states under ``keys`` (the objects the optimizer's state holds)
        self.states = [[h[key] for key in keys] for h in held]


class PythonGuard:
    """The checks as maps of tensor methods over the group (Note [Cached steps])."""

    def __init__(self, bound: Bound):
        params = bound.params
        self.bound = bound
        self.all_with_grad = all(bound.with_grad)
        self.param_addresses = list(map(_DATA_PTR, params))
        self.numels = list(map(_NUMEL, params))
        self.shapes = [tuple(p.shape) for p in params]  # (plain tuples: the collector skips those)
        self.dtype = params[0].dtype  # (one dtype: GeneratedOptimizer._bind)
        self.element_size = params[0].element_size()
        self.complex = params[0].is_complex()
        self.grad_bytes = [k * self.element_size for k in self.numels]
        # the bytes each parameter and state needs of its storage (offset and elements): one resized
        # in place to less (as FSDP frees storages) may keep its address, and the kernel would write
        # past its end (the native guard's ``addressable``)
        self.param_ends = [(p.storage_offset() + p.numel()) * p.element_size() for p in params]
        # key by key (one pass per key: flattening every key's states into one list measured slower):
        # the objects, their addresses, shapes and dtypes
        self.states = []
        for k, key in enumerate(bound.keys):
            objects = [states[k] for states in bound.states]
            self.states.append((key, objects, list(map(_DATA_PTR, objects)), [tuple(t.shape) for t in objects],
                                list(map(_DTYPE, objects)),
                                [(t.storage_offset() + t.numel()) * t.element_size() for t in objects]))

    def __call__(self, optimizer, group: dict):
        """The gradients' address table when the group's lists are unchanged, else None."""
        bound = self.bound
        params = bound.params
        # the states looked up first: a lookup calls Python (a key's __eq__, a tensor's __hash__ under a
        # torch function mode), which may replace a gradient (freeing it) or the group's list
        try:
            held = list(map(optimizer.state.get, params))
            now_states = [[h[key] for h in held] for key, *_ in self.states]
        except (TypeError, KeyError):  # a state that is not there
            return None
        current = group["params"]
        if len(current) != len(bound.group_params) or not all(map(is_, current, bound.group_params)):
            return None
        grads = list(map(_GRAD, current))
        if not self.all_with_grad:
            if list(map(is_not, grads, repeat(None))) != bound.with_grad:
                return None
            grads = list(compress(grads, bound.with_grad))
        try:  # (a None or sparse gradient fails is_contiguous)
            if not all(map(_IS_CONTIGUOUS, grads)) or list(map(_NUMEL, grads)) != self.numels \
                    or not all(map(is_, map(_DTYPE, grads), repeat(self.dtype))) \
                    or list(map(_DATA_PTR, params)) != self.param_addresses \
                    or not all(map(_IS_CONTIGUOUS, params)) \
                    or list(map(_SHAPE, params)) != self.shapes \
                    or not all(map(le, self.param_ends, map(_NBYTES, map(_STORAGE, params)))):
                return None  # (same memory, viewed otherwise: `.data =`; a storage shrunk in place)
            if any(map(_IS_NEG, grads)):  # a lazily negated view: the checked path resolves it
                return None
            if self.complex and any(map(_IS_CONJ, grads)):  # a lazily conjugated view: other values, same memory
                return None
            # every gradient inside its storage (one resized in place, as FSDP frees memory, is not)
            if any(map(_OFFSET, grads)):  # (some inside a larger buffer: DDP's bucket views)
                if not all(map(le, map(add, map(_OFFSET, grads), self.numels),
                               map(floordiv, map(_NBYTES, map(_STORAGE, grads)), repeat(self.element_size)))):
                    return None
            elif not all(map(le, self.grad_bytes, map(_NBYTES, map(_STORAGE, grads)))):
                return None
            for (_, objects, addresses, shapes, dtypes, ends), now in zip(self.states, now_states, strict=True):
                if not all(map(is_, now, objects)) or list(map(_DATA_PTR, now)) != addresses \
                        or list(map(_SHAPE, now)) != shapes or list(map(_DTYPE, now)) != dtypes \
                        or not all(map(_IS_CONTIGUOUS, now)) \
                        or not all(map(le, ends, map(_NBYTES, map(_STORAGE, now)))):
                    return None  # (changed in place: same object, same address; its storage shrunk in place)
            return array.array("q", map(_DATA_PTR, grads))
        except (RuntimeError, TypeError):
            return None


class NativeGuard:
    """The same checks in one C++ call (Note [Native step guard])."""

    def __init__(self, module: ModuleType, bound: Bound):
        self.module, self.bound = module, bound
        self.with_grad = bytes(bound.with_grad)
        self.keys = tuple(bound.keys)
        self.objects = [state for states in bound.states for state in states]
        expected = module.snapshot(list(bound.params)) if bound.params else b""
        states = module.snapshot(self.objects) if self.objects else b""
        if expected is None or states is None:
            raise ValueError("a tensor the launch addresses is not addressable")
        self.expected = expected + states
        self.table = array.array("q", bytes(8 * len(bound.params)))

    def __call__(self, optimizer, group: dict):
        bound = self.bound
        try:  # (TypeError: a group's params or the optimizer's state replaced by another type)
            if self.module.revalidate(group["params"], bound.group_params, self.with_grad, optimizer.state,
                                      self.keys, self.objects, self.expected, self.table):
                return self.table
        except TypeError:
            pass
        return None


def guard(optimizer, group: dict, params: list[torch.Tensor], keys: list[str]):
    """The guard for a launch bound over ``params`` and the states under ``keys``: the native one
    where it is loaded (its build started for a large group), else the Python one."""
    bound = Bound(optimizer, group, params, keys)
    module = native(start=len(params) >= NATIVE_FROM)
    if module is not None and type(group["params"]) is list and type(optimizer.state) in (dict, defaultdict):
        try:
            return NativeGuard(module, bound)
        except ValueError:
            pass
    return PythonGuard(bound)

