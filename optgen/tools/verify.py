"""``optgen verify``: every generated implementation of every spec (or of a user's specs) against
the float64 reference interpreter, as a table of the worst relative difference per spec, flag
variant and implementation.  The comparison itself is optgen/verify.py (the build's cross-check
uses it too)."""
from __future__ import annotations

from optgen.verify import (
    _optimizer_class,
    configurations,
    float64_counters,
    max_difference,
    run_backend,
    run_reference,
    runnable,
)


def verify_all(steps: int = 10, tolerance: float = 1e-9, sources: list | None = None) -> bool:
    """Prints a table of the worst relative difference per spec × variant × implementation (``-``:
    not generated, or not runnable here). ``sources``: a user's spec files or folders (built into a
    temporary package); else the built-ins."""
    if sources:
        from optgen.build import build_temporary

        specs, package = build_temporary(sources)
        classes = package.OPTIMIZERS
    else:
        from optgen.build import compile_all

        specs, classes = compile_all(), None
    with float64_counters():
        return _verify(specs, classes, steps, tolerance)


def _verify(specs, classes, steps: int, tolerance: float) -> bool:
    ok = True
    # triton runs on CPU tensors in Triton's interpreter; c needs a C compiler
    columns = ("forloop", "foreach", "differentiable", "c", "triton")
    print(f"{'optimizer':<10} {'flags':<48} {'configs':>7} " + " ".join(f"{c:>10}" for c in columns))
    for compiled in specs:
        if compiled.spec.algorithm:  # an intrinsic step (LBFGS): no generated kernels to check
            continue
        cls = classes[compiled.spec.name] if classes is not None else _optimizer_class(compiled.spec.name)
        impls = [i for i in cls._kernels if runnable(i)]
        for variant in compiled.variants:
            flags = dict(variant.flags)
            configs = configurations(compiled, flags, cls=cls)
            worst = {impl: 0.0 for impl in impls}
            errors: dict[str, str] = {}  # implementation → the exception a generated kernel raised
            for kwargs in configs:
                reference = run_reference(compiled, kwargs, steps, cls=cls)
                for impl in impls:
                    if impl in errors:
                        continue
                    try:
                        result = run_backend(compiled, impl, kwargs, steps, cls=cls)
                    except Exception as e:  # noqa: BLE001 - a failing kernel is a finding, shown in the table
                        errors[impl] = f"{type(e).__name__}: {e}"
                        worst[impl] = float("inf")
                        continue
                    worst[impl] = max(worst[impl], max_difference(result, reference))
            ok &= bool(configs) and all(w <= tolerance for w in worst.values())
            shown = ",".join(k for k, v in flags.items() if v) or "-"
            print(f"{compiled.spec.name:<10} {shown:<48} {len(configs):>7} "
                  + " ".join(f"{'ERROR':>10}" if i in errors else f"{worst[i]:>10.1e}" if i in worst else f"{'-':>10}"
                             for i in columns))
            for impl, error in errors.items():
                print(f"  {impl}: {error} (a bug in optgen: please report it with the spec)")
    print("all backends match the reference" if ok else f"MISMATCH (relative difference above {tolerance:g})")
    return ok
