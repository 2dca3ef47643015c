"""`optgen bench`: step time of every implementation against torch.optim, interleaved.

This machine's memory bandwidth drifts (up to 2× between runs, see shared PERF-NOTES), so every
repeat times each implementation back to back and we report the median over repeats of the
per-repeat ratio to the baseline (torch's for-loop; optgen's own for-loop for an optimizer
torch.optim lacks), plus each one's median time and the fraction of the bandwidth roofline it
reaches.  The roofline is measured in the same run: an in-place ``a.add_(b)`` over as many
elements (12 bytes per element) gives the achievable GB/s; an ideal optimizer step moves
(3 + 2·S)·4 bytes per fp32 parameter (read param, grad, S states; write param and S states).
:data:`EXPLANATION` says the same to whoever reads the table: it is printed with it.

What is timed (Note [What bench times]):

- the optimizers: the built-in ones of :data:`WORKLOADS` (or those named), and a user's — a spec
  file, a folder of them, or a package ``optgen build DIR --out PKG`` wrote — with the spec's
  defaults (:func:`default_kwargs`);
- the implementations: torch.optim's for-loop, foreach and fused (where torch has the optimizer
  and a fused CPU kernel for it), optgen's for-loop, foreach and C kernel (each forced by name),
  and **optgen's default**: the class constructed plainly, no ``foreach``/``fused`` argument, as a
  user who swaps ``torch.optim.X`` for ``optgen.X`` gets it (the row names what
  optgen/runtime/dispatch.py picked);
- the workloads (:class:`Case`): a model-shaped set of tensors (``--params`` in ``--tensors``:
  half weight matrices, half 1024-element vectors) for every optimizer, and the many-small-tensor
  sets of issue 14 (1000 × 100, 200 × 1000, 50 × 20000 elements) for :data:`TINY_BY_DEFAULT`,
  where the host's per-tensor overhead shows; ``--cases`` picks others.

Peak temporary memory is measured by watching every tensor the step allocates (a
TorchDispatchMode), so it counts optgen's and torch's foreach intermediates the same way.
"""
from __future__ import annotations

import inspect
import re
import statistics
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from optgen.errors import SpecError
from optgen.runtime import step_guard

if TYPE_CHECKING:
    from optgen.runtime.generated import GeneratedOptimizer

#: the built-in optimizers `optgen bench` times by default, with the hyperparameters it times them with
WORKLOADS: dict[str, dict[str, Any]] = {
    "Adam": dict(lr=1e-3),
    "AdamW": dict(lr=1e-3, weight_decay=0.01),
    "SGD": dict(lr=1e-3, momentum=0.9),
    "Adagrad": dict(lr=1e-3),
    "Adadelta": dict(),
    "Adamax": dict(lr=1e-3),
    "ASGD": dict(lr=1e-3),
    "NAdam": dict(lr=1e-3),
    "RAdam": dict(lr=1e-3),
    "RMSprop": dict(lr=1e-3),
    "Rprop": dict(lr=1e-3),
    "Adafactor": dict(lr=1e-3),
    # not in torch.optim: compared with optgen's own for-loop
    "Lion": dict(lr=1e-4, weight_decay=0.1),
    "AdaBelief": dict(lr=1e-3),
    "Lamb": dict(lr=1e-3, weight_decay=0.01),
}
#: built-in optimizers bench does not time, and why
NOT_TIMED = {
    "Muon": "its parameters must be 2-D and its time is the Newton–Schulz matmuls, not memory",
    "SparseAdam": "it steps sparse gradients only",
    "LBFGS": "its step is driven by a closure that re-evaluates the loss",
}
#: issue 14's many-small-tensor workloads (COUNTxSIZE), where the host's time per tensor shows
TINY_CASES = ("1000x100", "200x1000", "50x20000")
#: the optimizers timed on TINY_CASES by default (every one with ``--cases``): a few seconds each
TINY_BY_DEFAULT = ("Adam",)
#: a hyperparameter without a default (none of optgen's specs has one; a hand-written class may)
REQUIRED_VALUE = 1e-3

EXPLANATION = """\
How to read these tables:
- Every repeat times one step of each implementation back to back (interleaved), on the same
  tensors; the machine is shared and its speed drifts, so only steps of one repeat are compared.
  "ms / step" is an implementation's median over the repeats; "speed-up" the median over repeats
  of (the baseline's time / its time) in that repeat: higher is faster, 1.00× is the baseline, and
  the two columns need not divide exactly.
- The baseline is torch.optim's for-loop (foreach=False), or, for an optimizer torch.optim does
  not have, optgen's own for-loop.
- torch forloop / foreach / fused: torch.optim's class with foreach=False / foreach=True /
  fused=True (fused only where torch has a fused CPU kernel for it).
- optgen forloop / foreach / c: optgen's class with that implementation forced by name
  (optimizer.implementation = ...); c is the fused C kernel, one pass over each tensor.
- optgen default (X): optgen's class constructed plainly, with no foreach or fused argument, as a
  user who replaces torch.optim.Name with optgen.Name gets it; X is the implementation
  optgen/runtime/dispatch.py picked for it.
- % of roofline: the time an ideal fused step would take at the stream bandwidth measured in the
  same repeats (a.add_(b) over as many elements), over this step's time.  An ideal step reads the
  parameter, its gradient and S state tensors and writes the parameter and the states:
  (3 + 2·S)·4 bytes per float32 parameter.  100% is the memory bound; a small workload fits in the
  cache, and its bandwidth is the cache's.
- peak temporaries: the most memory the step holds beyond parameters, gradients and state
  (every allocation watched alike; "—" where not measured)."""


def shapes(total: int, count: int) -> list[tuple[int, ...]]:
    """``count`` tensors summing to about ``total`` elements, shaped like a network's: half large
    weight matrices, half small bias/norm vectors."""
    matrices = count // 2
    vector = 1024
    per_matrix = max(1, (total - (count - matrices) * vector) // matrices)
    cols = 1024
    return [(max(1, per_matrix // cols), cols)] * matrices + [(vector,)] * (count - matrices)


# -- what to time --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """An optimizer to time: optgen's class, its hyperparameters, and torch.optim's class of that
    name (None where torch has none: the baseline is then optgen's for-loop)."""

    name: str
    cls: type[GeneratedOptimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    torch_cls: type | None = None

    @property
    def title(self) -> str:
        kw = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.name}({kw or 'defaults'})"


@dataclass(frozen=True)
class Case:
    """A set of tensor shapes to step: ``model`` (``shapes(params, tensors)``) or ``COUNTxSIZE``."""

    name: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def title(self) -> str:
        n = sum(_numel(s) for s in self.shapes)
        if self.name == "model":
            return f"{n / 1e6:.3g}M params in {len(self.shapes)} tensors"
        return f"{len(self.shapes)} tensors × {self.shapes[0][0]} ({n / 1e6:.3g}M params)"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parse_cases(text: str, params: int, tensors: int) -> list[Case]:
    """``"model,1000x100"`` → the model-shaped case (``params`` in ``tensors``) and 1000 tensors of 100."""
    cases = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        if item == "model":
            cases.append(Case("model", tuple(shapes(params, tensors))))
            continue
        count, _, size = item.partition("x")
        try:
            n, m = int(float(count)), int(float(size))
        except ValueError:
            n = m = 0
        if n <= 0 or m <= 0:
            raise SpecError(None, f"--cases: {item!r} is neither `model` nor COUNTxSIZE (e.g. 1000x100: 1000 "
                                  "tensors of 100 elements)")
        cases.append(Case(f"{n}x{m}", ((m,),) * n))
    if not cases:
        raise SpecError(None, "--cases: no workload given (e.g. --cases model,1000x100)")
    return cases


def default_kwargs(cls: type) -> dict[str, Any]:
    """The hyperparameters to time a spec's optimizer with: its defaults, except a hyperparameter
    without one (``lr`` in a hand-written class), which gets :data:`REQUIRED_VALUE`."""
    parameters = list(inspect.signature(cls).parameters.values())[1:]  # after `params`
    return {p.name: REQUIRED_VALUE for p in parameters
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def torch_counterpart(cls: type) -> type | None:
    """torch.optim's class that a generated class is a drop-in for (its docstring says so: the
    class backend writes "a drop-in for torch.optim.X" for a spec with ``torch = "X"``)."""
    found = re.search(r"a drop-in for torch\.optim\.(\w+)", cls.__doc__ or "")
    return getattr(torch.optim, found.group(1), None) if found else None


def _is_package(path: Path) -> bool:
    return path.is_dir() and (path / "__init__.py").is_file()


def import_package(path: Path):
    """A package ``optgen build DIR --out PKG`` wrote, imported from its folder (under its own
    name, as the user's code imports it)."""
    import importlib.util
    import sys

    name = path.resolve().name
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    if spec is None or spec.loader is None:
        raise SpecError(None, f"{path}: cannot import this package")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if not isinstance(getattr(module, "OPTIMIZERS", None), dict):
        raise SpecError(None, f"{path}: not a package of optimizers built by `optgen build DIR --out PKG` "
                              "(its __init__.py has no OPTIMIZERS)")
    return module


def resolve(sources: list[str], only: str | None) -> list[Target]:
    """The optimizers to time: every name, spec file or folder, or built package in ``sources``
    (default: the built-in :data:`WORKLOADS`), then those ``only`` names."""
    import optgen

    targets: list[Target] = []
    spec_files: list[Path] = []
    builtin = {name.lower(): name for name in optgen.OPTIMIZERS}
    for source in sources or list(WORKLOADS):
        path = Path(source)
        if _is_package(path):
            package = import_package(path)
            targets += [Target(name, cls, default_kwargs(cls), torch_counterpart(cls))
                        for name, cls in package.OPTIMIZERS.items()]
        elif path.is_file() or path.is_dir() or source.endswith(".toml"):
            spec_files.append(path)  # built below, all together (one may extend another)
        elif source.lower() in builtin:
            name = builtin[source.lower()]
            if name in NOT_TIMED:
                raise SpecError(None, f"bench does not time {name}: {NOT_TIMED[name]}")
            targets.append(Target(name, optgen.OPTIMIZERS[name], WORKLOADS.get(name, {}),
                                  getattr(torch.optim, name, None)))
        else:
            raise SpecError(None, f"bench: {source!r} is no spec file, spec folder, package built by `optgen build "
                                  f"DIR --out PKG`, or built-in optimizer (have: {', '.join(WORKLOADS)})")
    if spec_files:  # a user's spec files: their defaults, against their for-loop (or torch's class)
        from optgen.build import build_temporary

        compiled, package = build_temporary(spec_files)
        for c in compiled:
            if c.spec.algorithm:  # LBFGS-like: a closure-driven step
                continue
            cls = package.OPTIMIZERS[c.spec.name]
            targets.append(Target(c.spec.name, cls, default_kwargs(cls),
                                  getattr(torch.optim, c.spec.torch_name, None) if c.spec.torch_name else None))
    if only:
        wanted = set(only.split(","))
        unknown = sorted(wanted - {t.name for t in targets})
        if unknown:
            raise SpecError(None, f"bench has no workload for {', '.join(unknown)} (have: "
                                  f"{', '.join(t.name for t in targets)}); to time a spec of yours, pass its file: "
                                  "optgen bench my_specs/yogi.toml")
        targets = [t for t in targets if t.name in wanted]
    return targets


def plan(targets: list[Target], cases: str | None, params: int, tensors: int) -> list[tuple[Target, Case]]:
    """(optimizer, workload) pairs in the order they are timed: ``cases`` for every optimizer, or
    by default the model-shaped case for every optimizer and :data:`TINY_CASES` for
    :data:`TINY_BY_DEFAULT`."""
    if cases is not None:
        chosen = parse_cases(cases, params, tensors)
        return [(t, c) for t in targets for c in chosen]
    model = parse_cases("model", params, tensors)
    tiny = parse_cases(",".join(TINY_CASES), params, tensors)
    return [(t, c) for t in targets for c in model + (tiny if t.name in TINY_BY_DEFAULT else [])]


# -- measuring -----------------------------------------------------------------------------------
class _TemporaryBytes(TorchDispatchMode):
    """Peak bytes of tensors created during a step that are not kept by the optimizer."""

    def __init__(self, existing: set[int]):
        super().__init__()
        self.existing = existing
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.existing:
                ptr = t.untyped_storage().data_ptr()
                self.existing.add(ptr)
                size = t.untyped_storage().nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, ptr, size)
        return out

    def _free(self, ptr, size):
        self.live -= size
        self.existing.discard(ptr)


def peak_temporary_bytes(optimizer, params) -> int:
    existing = {p.untyped_storage().data_ptr() for p in params}
    existing |= {p.grad.untyped_storage().data_ptr() for p in params}
    for state in optimizer.state.values():
        existing |= {v.untyped_storage().data_ptr() for v in state.values() if isinstance(v, torch.Tensor)}
    mode = _TemporaryBytes(existing)
    with mode:
        optimizer.step()
    return mode.peak


class _CompiledStep:
    """torch's for-loop optimizer with ``torch.compile(opt.step)``, what PERF-NOTES says users reach
    for instead of a fused kernel; ``seconds`` is set to its first step (the compilation)."""

    def __init__(self, optimizer):
        self.optimizer, self.state = optimizer, optimizer.state
        self._step = torch.compile(optimizer.step)
        self.seconds = None

    def step(self):
        t = time.perf_counter()
        self._step()
        if self.seconds is None:
            self.seconds = time.perf_counter() - t


#: the label of optgen's default implementation; its row adds what dispatch picked
DEFAULT = "optgen default"


def default_pick(optimizer) -> str:
    """The implementation(s) optgen's dispatch picks for an optimizer's param groups, as its
    ``step()`` does (read only: nothing is forced or stepped)."""
    from optgen.runtime import dispatch

    picked = [dispatch.choose(optimizer, group, [p for p in group["params"] if p.grad is not None])
              for group in optimizer.param_groups]
    return "+".join(dict.fromkeys(picked))


def implementations(target: Target, compiled: bool = False) -> dict:
    """Label → constructor of every implementation to time (Note [What bench times] above): the
    first is the baseline."""
    from optgen.runtime import c_launch

    cls, kwargs, theirs = target.cls, target.kwargs, target.torch_cls
    impls: dict = {}
    if theirs is not None:
        impls["torch forloop"] = lambda ps: theirs(ps, foreach=False, **kwargs)
        impls["torch foreach"] = lambda ps: theirs(ps, foreach=True, **kwargs)
        if "fused" in inspect.signature(theirs).parameters:  # Adam, AdamW, SGD, Adagrad in torch 2.13
            impls["torch fused"] = lambda ps: theirs(ps, fused=True, **kwargs)
        if compiled:
            impls["torch compiled"] = lambda ps: _CompiledStep(theirs(ps, foreach=False, **kwargs))
    ours = ("forloop", "foreach") + (("c",) if "c" in cls._kernels and c_launch.available() else ())
    for impl in ours:
        def make(ps, impl=impl):
            opt = cls(ps, **kwargs)
            opt.implementation = impl
            return opt
        impls[f"optgen {impl}"] = make
    impls[DEFAULT] = lambda ps: cls(ps, **kwargs)
    return impls


def stream_gbps(n: int) -> float:
    """GB/s of ``a.add_(b)`` over ``n`` float32 elements (12 bytes each), the median of a few calls
    (enough of them for a small ``n`` to take about a millisecond)."""
    a, b = torch.ones(n), torch.ones(n)
    calls = max(1, 1_000_000 // max(n, 1))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            a.add_(b)
        times.append((time.perf_counter() - t) / calls)
    return 12 * n / statistics.median(times) / 1e9


@dataclass(frozen=True)
class Row:
    label: str                 # "optgen default (c)", "torch compiled (first step: 30 s)", ...
    ms: float                  # median step time
    speedup: float             # median over repeats of baseline time / this time
    roofline: float            # fraction of the roofline reached
    temporaries_mib: float | None


@dataclass(frozen=True)
class Result:
    target: Target
    case: Case
    params: int
    gbps: float
    roofline_ms: float
    baseline: str
    rows: list[Row]

    @property
    def heading(self) -> str:
        return f"### {self.target.title} — {self.case.title}, stream bandwidth {self.gbps:.1f} GB/s"


def bench_one(target: Target, case: Case, repeats: int, compiled: bool = False) -> Result:
    torch.manual_seed(0)
    params = [torch.randn(s) * 0.1 for s in case.shapes]
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.randn_like(p) * 0.01
    n = sum(p.numel() for p in params)
    impls = {label: make(params) for label, make in implementations(target, compiled).items()}
    for opt in impls.values():  # warm-up: creates state, first-call overheads (and the C kernel's build)
        opt.step()
    times: dict[str, list[float]] = {label: [] for label in impls}
    gbps = []
    for _ in range(repeats):
        gbps.append(stream_gbps(n))
        for label, opt in impls.items():
            t = time.perf_counter()
            opt.step()
            times[label].append(time.perf_counter() - t)
    baseline = next(iter(impls))  # torch's for-loop; optgen's where torch has no such optimizer
    state_tensors = sum(1 for v in next(iter(impls[baseline].state.values())).values()
                        if isinstance(v, torch.Tensor) and v.dim() > 0)
    bytes_per_step = (3 + 2 * state_tensors) * 4 * n
    roofline_ms = bytes_per_step / statistics.median(gbps) / 1e9 * 1e3
    # (a compiled step is not measured: the dispatch mode that watches allocations would recompile it)
    peak = {label: None if isinstance(opt, _CompiledStep) else peak_temporary_bytes(opt, params)
            for label, opt in impls.items()}
    base = times[baseline]
    rows = []
    for label, ts in times.items():
        ratio = statistics.median(b / t for b, t in zip(base, ts, strict=True))
        ms = statistics.median(ts) * 1e3
        temporary = peak[label]
        shown = label
        if isinstance(impls[label], _CompiledStep):
            shown = f"{label} (first step: {impls[label].seconds:.0f} s)"
        elif label == DEFAULT:
            shown = f"{label} ({default_pick(impls[label])})"
        rows.append(Row(shown, ms, ratio, roofline_ms / ms, None if temporary is None else temporary / 2**20))
    return Result(target, case, n, statistics.median(gbps), roofline_ms, baseline, rows)


# -- reporting -----------------------------------------------------------------------------------
def _ms(ms: float) -> str:
    """Three significant digits or so: 144.0, 12.34, 1.234, 0.123."""
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def table(result: Result) -> list[str]:
    lines = [result.heading, "",
             f"| implementation | ms / step | speed-up vs {result.baseline} | % of roofline | peak temporaries (MiB) |",
             "|---|---:|---:|---:|---:|"]
    for row in result.rows:
        memory = "—" if row.temporaries_mib is None else f"{row.temporaries_mib:.0f}"
        lines.append(f"| {row.label} | {_ms(row.ms)} | {row.speedup:.2f}× | {100 * row.roofline:.0f}% | {memory} |")
    return lines + [""]


def summary(results: list[Result]) -> list[str]:
    """One row per (optimizer, workload), one column per implementation: its ms / step and speed-up
    (the default's also what it picked)."""
    columns = list(dict.fromkeys(_column(row.label) for r in results for row in r.rows))
    lines = ["### Summary: ms / step (speed-up vs the baseline, the first column each row has)", "",
             "| optimizer | workload | " + " | ".join(columns) + " | roofline (ms) |",
             "|---|---|" + "---:|" * (len(columns) + 1)]
    for r in results:
        cells = {_column(row.label): row for row in r.rows}
        shown = []
        for column in columns:
            row = cells.get(column)
            if row is None:
                shown.append("—")
                continue
            picked = row.label[len(DEFAULT) + 2:-1] + ", " if column == DEFAULT else ""
            shown.append(f"{_ms(row.ms)} ({picked}{row.speedup:.2f}×)")
        lines.append(f"| {r.target.title} | {r.case.title} | " + " | ".join(shown) + f" | {_ms(r.roofline_ms)} |")
    return lines + [""]


def _column(label: str) -> str:
    """A row's label without what varies by workload (the default's pick, a compile time)."""
    return DEFAULT if label.startswith(DEFAULT + " (") else label.split(" (first step")[0]


def main(args) -> int:
    total, tensors = int(args.params), args.tensors
    targets = resolve(list(getattr(args, "specs", None) or []), args.only)
    work = plan(targets, getattr(args, "cases", None), total, tensors)
    # the cached steps' checks in C++ (Note [Native step guard]): built or loaded before any timing,
    # not in the background during it
    header = [f"optgen bench: torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
              f"{args.repeats} interleaved repeats per workload", ""]
    if step_guard.native(wait=True) is None:
        header[-1:] = [f"(cached steps check with the Python step guard: "
                       f"{step_guard.unavailable() or 'OPTGEN_STEP_GUARD=python'}; more host time per tensor)", ""]
    print("\n".join(header), flush=True)
    lines = list(header)
    results = []
    for target, case in work:
        result = bench_one(target, case, args.repeats,
                           compiled=getattr(args, "compile", False) and target.torch_cls is not None)
        results.append(result)
        lines += table(result)
        print("\n".join(table(result)), flush=True)
    tail = (summary(results) if len(results) > 1 else []) + [EXPLANATION]
    print("\n".join(tail), flush=True)
    lines += tail
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0
