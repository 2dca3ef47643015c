"""The build's numerical cross-check: every backend of a freshly compiled spec against the
reference interpreter, before anything is written.

Note [Build-time cross-check]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
`optgen build` renders every output to memory (Note [One door to disk]); before writing, it
imports the rendered modules from a private temporary folder (optgen/packages.py) and runs each
implementation — for-loop, foreach, differentiable, C (when a compiler is there), Triton (in its
interpreter, when triton is installed) — for every flag variant, on the default hyperparameters
and on every zero-default one switched on (Triton, interpreted, on the latter only), for ``STEPS`` steps on small float64 tensors, against
the float64 reference interpreter (optgen/ir/interpret.py).  Any difference above ``TOLERANCE``
refuses the build with a SpecError that names the spec, the backend, the variant and the first
statement (in rule order) that writes a value that differs.

It is a smoke test sized for every build — the exhaustive comparison is `optgen verify` and the
test suite (tests/backends/, tests/fuzz/) — but it is what stops a compiler bug from shipping a
wrong optimizer: a kernel that computes something other than the rule never reaches the disk.
"""
from __future__ import annotations

from optgen.errors import SpecError

STEPS = 3           # state feeds back into the update from step 2 on; 3 steps see it twice
CONFIGURATIONS = 2  # the defaults, and every zero-default hyperparameter switched on
TOLERANCE = 1e-9    # float64 against float64: rounding differences stay ~1e-14
#: implementations run in an interpreter (Triton's, ~100× slower than the others): checked on the
#: last configuration only (every zero-default hyperparameter on: the most code runs)
INTERPRETED = ("triton",)


def crosscheck(compiled: list, files: dict[str, str], target) -> list[str]:
    """Runs the check on ``compiled`` (specs whose modules are in ``files``); returns their names."""
    from optgen.packages import import_rendered
    from optgen.verify import configurations, run_backend, run_reference, runnable

    package = import_rendered(files, "build")
    checked = []
    for c in compiled:
        if c.spec.algorithm:  # an intrinsic step (LBFGS): no generated kernels; tests/oracle covers it
            continue
        cls = package.OPTIMIZERS[c.spec.name]
        implementations = [i for i in cls._kernels if runnable(i)]
        for variant in c.variants:
            flags = dict(variant.flags)
            configs = configurations(c, flags, cls=cls)[:CONFIGURATIONS]
            for k, kwargs in enumerate(configs):
                reference = run_reference(c, kwargs, STEPS, cls=cls)
                for implementation in implementations:
                    if implementation in INTERPRETED and k != len(configs) - 1:
                        continue
                    result = run_backend(c, implementation, kwargs, STEPS, cls=cls)
                    _compare(c, variant, implementation, kwargs, result, reference)
        checked.append(c.spec.name)
    return checked


def _compare(compiled, variant, implementation, kwargs, result, reference) -> None:
    import torch

    (params, states), (ref_params, ref_states) = result, reference
    worst: dict[str, float] = {}

    def note(name, x, y):
        x = torch.as_tensor(x, dtype=torch.float64)
        y = torch.as_tensor(y, dtype=torch.float64)
        if x.shape != y.shape:
            worst[name] = float("inf")
            return
        if x.numel():
            diff = ((x - y).abs() / (1e-12 + y.abs())).max().item()
            if not diff <= TOLERANCE:  # NaN counts as a difference
                worst[name] = max(worst.get(name, 0.0), diff if diff == diff else float("inf"))

    for p, q in zip(params, ref_params):
        note("param", p, q)
    for s, r in zip(states, ref_states):
        for name in set(s) | set(r):
            if name not in s or name not in r:
                worst[name] = float("inf")
            else:
                note(name, s[name], r[name])
    if not worst:
        return
    spec = compiled.spec
    flags = ", ".join(f"{k}={v}" for k, v in variant.flags) or "no flags"
    statement = next((a for a in variant.program.body if a.target in worst), None)
    shown = ", ".join(f"{n} off by {d:.1e}" for n, d in sorted(worst.items()))
    where = (f"; the first statement whose value differs is '{statement.text}'" if statement is not None else "")
    raise SpecError(statement.loc if statement is not None else None,
                    f"build refused: the {implementation} implementation of {spec.name} ({flags}, "
                    f"{_kwargs(kwargs)}) differs from the reference interpreter after {STEPS} steps "
                    f"({shown}, relative){where}. This is a bug in optgen's {implementation} backend, not in "
                    "your spec: please report it with the spec; `optgen build --no-verify` writes the code anyway")


def _kwargs(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if not isinstance(v, bool)) or "defaults"


