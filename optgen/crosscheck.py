"""The build's numerical cross-check: every backend of a freshly compiled spec against the
reference interpreter, before anything is written.

Note [Build-time cross-check]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
`optgen build` renders every output to memory (Note [One door to disk]); before writing, it
imports the rendered modules from a private temporary folder (optgen/packages.py) and runs each
implementation — for-loop, foreach, differentiable, C (when a compiler is there), Triton (in its
interpreter, when triton is installed) — for every flag variant, on the default hyperparameters
and on every zero-default one switched on (Triton, interpreted, on the latter only), for ``STEPS``
steps on small float64 tensors, against the float64 reference interpreter (optgen/ir/interpret.py).
Any difference above ``TOLERANCE`` refuses the build with a SpecError that names the spec, the
backend, the variant and the first statement (in rule order) that writes a value that differs.

It is a smoke test sized for every build — the exhaustive comparison is `optgen verify` and the
test suite (tests/backends/, tests/fuzz/) — but it is what stops a compiler bug from shipping a
wrong optimizer: a kernel that computes something other than the rule never reaches the disk.
"""
from __future__ import annotations

import os
from pathlib import Path

from optgen.errors import SpecError, internal_errors

STEPS = 3           # state feeds back into the update from step 2 on; 3 steps see it twice
CONFIGURATIONS = 2  # the defaults, and every zero-default hyperparameter switched on
TOLERANCE = 1e-9    # float64 against float64: rounding differences stay ~1e-14
#: implementations run in an interpreter (Triton's, ~100× slower than the others): checked on the
#: last configuration only (every zero-default hyperparameter on: the most code runs)
INTERPRETED = ("triton",)


def crosscheck(compiled: list, files: dict[str, str], target) -> list[str]:
    """Runs the check on ``compiled`` (specs whose modules are in ``files``); returns their names."""
    from optgen.packages import import_rendered
    from optgen.verify import float64_counters

    try:
        package = import_rendered(files, "build")
    except Exception as e:  # noqa: BLE001 - generated code that does not import is a compiler bug
        failure = import_failure(e, compiled)
        raise SpecError(failure.loc, f"build refused: {failure.message}") from e
    _compile_c_ahead(package, compiled)
    with float64_counters():
        return _check(package, compiled)


def _check(package, compiled: list) -> list[str]:
    from optgen.verify import configurations, run_backend, run_reference, runnable

    checked = []
    for c in compiled:
        if c.spec.algorithm:  # an intrinsic step (LBFGS): no generated kernels; tests/oracle covers it
            continue
        cls = package.OPTIMIZERS[c.spec.name]
        implementations = [i for i in cls._kernels if runnable(i)]
        ran = False
        for variant in c.variants:
            flags = dict(variant.flags)
            configs = configurations(c, flags, cls=cls)[:CONFIGURATIONS]
            for k, kwargs in enumerate(configs):
                with internal_errors("the reference interpreter", c.spec):
                    reference = run_reference(c, kwargs, STEPS, cls=cls)
                for implementation in implementations:
                    if implementation in INTERPRETED and k != len(configs) - 1:
                        continue
                    try:
                        result = run_backend(c, implementation, kwargs, STEPS, cls=cls)
                    except Exception as e:  # noqa: BLE001 - a generated kernel that fails is a compiler bug
                        raise SpecError(c.spec.rule_loc, f"build refused: the {implementation} implementation of "
                                                         f"{c.spec.name} ({_flags(variant)}, {_kwargs(kwargs)}) "
                                                         f"raised {type(e).__name__}: {e}. {_BUG}") from e
                    _compare(c, variant, implementation, kwargs, result, reference)
                    ran = True
        if ran:  # else the spec's own checks reject every configuration tried: not cross-checked
            checked.append(c.spec.name)
    return checked


_BUG = ("This is a bug in optgen, not in your spec: please report it with the spec; "
        "`optgen build --no-verify` writes the code anyway")


def _compile_c_ahead(package, compiled: list) -> None:
    """Starts compiling every spec's C kernels (float64, what the check runs) in the background,
    while the other implementations are checked: gcc runs in its own processes, and on a cold
    kernel cache compiling is the longest part of a full build (Library._compile writes each
    library atomically, so a kernel that needs one first simply compiles it or finds it there)."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from optgen.verify import runnable

    if not runnable("c"):
        return
    modules = (sys.modules.get(f"{package.__name__}.{c.spec.name.lower()}_c") for c in compiled)
    libraries = [lib for lib in (getattr(m, "LIBRARY", None) for m in modules) if lib is not None]
    if libraries:
        pool = ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2))))
        for lib in libraries:
            pool.submit(_quietly, lib._compile, torch.float64)
        pool.shutdown(wait=False)


def _quietly(compile_, dtype) -> None:
    try:
        compile_(dtype)
    except Exception:  # noqa: BLE001 - the check itself runs the kernel and reports what fails
        pass


def import_failure(error: Exception, compiled: list) -> SpecError:
    """The spec whose rendered module failed to import, found from the innermost frame of the
    traceback that is in the temporary package (or the SyntaxError's file)."""
    import traceback

    files = [getattr(error, "filename", None) or ""]  # a SyntaxError's own file first
    files += [frame.filename for frame in reversed(traceback.extract_tb(error.__traceback__))]
    module = next((Path(f).stem for f in files if "optgen-check-" in f), "")
    owners = [c.spec for c in compiled if module == c.spec.name.lower() or module.startswith(c.spec.name.lower() + "_")]
    spec = max(owners, key=lambda s: len(s.name), default=None)
    where = f"the generated module {module}.py" if module else "the generated package"
    return SpecError(spec.rule_loc if spec is not None else None,
                     f"{where}{f' of {spec.name}' if spec is not None else ''} does not import: "
                     f"{type(error).__name__}: {error}. {_BUG}")


def _flags(variant) -> str:
    return ", ".join(f"{k}={v}" for k, v in variant.flags) or "no flags"


def _compare(compiled, variant, implementation, kwargs, result, reference) -> None:
    from optgen.verify import differences

    worst = {name: d for name, d in differences(result, reference).items() if not d <= TOLERANCE}
    if not worst:
        return
    spec = compiled.spec
    flags = _flags(variant)
    statement = next((a for a in variant.program.body if a.target in worst), None)
    shown = ", ".join(f"{n} off by {d:.1e}" for n, d in sorted(worst.items()))
    where = (f"; the first statement whose value differs is '{statement.text}'" if statement is not None else "")
    raise SpecError(statement.loc if statement is not None else None,
                    f"build refused: the {implementation} implementation of {spec.name} ({flags}, "
                    f"{_kwargs(kwargs)}) differs from the reference interpreter after {STEPS} steps "
                    f"({shown}, relative){where}. {_BUG}")


def _kwargs(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if not isinstance(v, bool)) or "defaults"


