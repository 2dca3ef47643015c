"""`optgen bench --vs-compiled`: compiled optimizer steps against the fused kernels, compile time included.

Per optimizer and per case (``COUNTxSIZE``: COUNT float32 tensors of SIZE elements), one process
times, interleaved: torch's eager paths (for-loop, CPU's default and the baseline; foreach; fused
where torch has it), ``torch.compile(opt.step)`` of torch's optimizer, of optgen's for-loop and
foreach kernels, optgen's fused C kernel eagerly and ``torch.compile(opt.step)`` of it (the custom
op ``optgen::c_step``, Note [C kernels as custom ops]).  Every compiled step uses inductor, torch's
default backend.

Note [Timing compilation]
~~~~~~~~~~~~~~~~~~~~~~~~~
Users pay compilation on the first steps, so the first and second step of each implementation are
reported apart from the steady state: a step that creates the optimizer's state inside the traced
code changes what the guards see, and dynamo compiles again on the second step.  Both inductor and
optgen cache compiled code on disk, and a warm cache turns a 40 s compilation into 4 s; this mode
points ``TORCHINDUCTOR_CACHE_DIR`` and ``OPTGEN_CACHE_DIR`` at fresh temporary folders, so the
numbers are a first run's.  One throwaway compilation comes first, so that importing inductor is
charged to nobody.  Within a workload the C library that ``optgen c``'s first step builds is
reused by ``optgen c compiled`` (the same kernel).  Dynamo is reset between workloads, and its
recompile limit raised: every optimizer's ``step`` is torch's one profiling ``wrapper`` code object,
so the compiled implementations of one workload share its cache entries.  ``graphs`` counts the
graphs dynamo compiled for an implementation over the whole run: one per piece between graph
breaks, again for each recompilation; a graph compiled during the steady state would show there
(and in the spread).

Steady state: ``repeats`` rounds, each timing one step of every implementation back to back (the
machine is shared, so only implementations timed in the same round are compared); the table gives
each one's median, its interquartile range, and the median over rounds of torch for-loop's time
divided by its time.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import torch

# (optimizer, kwargs, torch has a fused CPU kernel): torch's three fused CPU optimizers users reach
# for, and NAdam, which torch has no fused kernel for.
WORKLOADS = [
    ("Adam", dict(lr=1e-3), True),
    ("AdamW", dict(lr=1e-3, weight_decay=0.01), True),
    ("SGD", dict(lr=1e-3, momentum=0.9), True),
    ("NAdam", dict(lr=1e-3), False),
]
DEFAULT_CASES = "50x100000"  # 1000x100 takes over 10 minutes per optimizer to compile on 2 cores


class _Timed:
    """An optimizer whose step may be compiled; remembers its first two step times and the graphs
    dynamo compiled while it stepped."""

    backend = "inductor"

    def __init__(self, optimizer, compiled: bool):
        self.optimizer = optimizer
        self._step = torch.compile(optimizer.step, backend=self.backend) if compiled else optimizer.step
        self.first: list[float] = []
        self.graphs = 0

    def step(self) -> float:
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        t = time.perf_counter()
        self._step()
        seconds = time.perf_counter() - t
        self.graphs += counters["stats"]["unique_graphs"] - before
        if len(self.first) < 2:
            self.first.append(seconds)
        return seconds


def parse_cases(text: str) -> list[tuple[int, int]]:
    """``"50x100000,1000x100"`` → [(50, 100000), (1000, 100)]."""
    from optgen.errors import SpecError

    cases = []
    for item in text.split(","):
        count, _, size = item.strip().partition("x")
        try:
            cases.append((int(float(count)), int(float(size))))
        except ValueError:
            raise SpecError(None, f"--cases: {item!r} is not COUNTxSIZE (e.g. 50x100000: 50 tensors of "
                                  "100000 elements)") from None
    return cases


def _implementations(name: str, kwargs: dict[str, Any], fused_ok: bool):
    """Label → constructor, in the order they are timed; the first is the baseline."""
    import optgen
    from optgen.runtime import c_launch

    torch_cls, cls = getattr(torch.optim, name), optgen.OPTIMIZERS[name]

    def ours(impl: str, compiled: bool):
        def make(ps):
            opt = cls(ps, **kwargs)
            opt.implementation = impl
            return _Timed(opt, compiled)
        return make

    impls = {
        "torch forloop": lambda ps: _Timed(torch_cls(ps, foreach=False, **kwargs), False),
        "torch foreach": lambda ps: _Timed(torch_cls(ps, foreach=True, **kwargs), False),
    }
    if fused_ok:
        impls["torch fused"] = lambda ps: _Timed(torch_cls(ps, fused=True, **kwargs), False)
    # foreach=False is what torch picks on CPU when compiling; inductor fuses the loop itself.
    impls["torch compiled"] = lambda ps: _Timed(torch_cls(ps, foreach=False, **kwargs), True)
    impls["optgen forloop compiled"] = ours("forloop", True)
    impls["optgen foreach compiled"] = ours("foreach", True)
    if "c" in cls._kernels and c_launch.available():
        impls["optgen c"] = ours("c", False)
        impls["optgen c compiled"] = ours("c", True)
    return impls


def bench_one(name, kwargs, fused_ok, count: int, size: int, repeats: int):
    """Rows (label, median ms, q1 ms, q3 ms, speed-up, first s, second s, graphs) for one workload."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    params = [torch.randn(size) * 0.1 for _ in range(count)]
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.randn_like(p) * 0.01
    impls = {label: make(params) for label, make in _implementations(name, kwargs, fused_ok).items()}
    for opt in impls.values():  # first and second steps: compilation, state, recompilation
        opt.step()
        opt.step()
    times: dict[str, list[float]] = {label: [] for label in impls}
    for _ in range(repeats):
        for label, opt in impls.items():
            times[label].append(opt.step())
    base = times["torch forloop"]
    rows = []
    for label, ts in times.items():
        q1, median, q3 = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else (ts[0],) * 3
        ratio = statistics.median(b / t for b, t in zip(base, ts, strict=True))
        opt = impls[label]
        rows.append((label, median * 1e3, q1 * 1e3, q3 * 1e3, ratio, opt.first[0], opt.first[1], opt.graphs))
    return rows


def _fresh_caches() -> tempfile.TemporaryDirectory:
    """Note [Timing compilation]: cold caches, and inductor imported before anything is timed."""
    folder = tempfile.TemporaryDirectory(prefix="optgen-bench-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(folder.name, "inductor")
    os.environ["OPTGEN_CACHE_DIR"] = os.path.join(folder.name, "optgen")
    torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    torch._dynamo.config.recompile_limit = 64
    return folder


def main(args) -> int:
    cases = parse_cases(args.cases or DEFAULT_CASES)
    only = set(args.only.split(",")) if args.only else None
    names = {w[0] for w in WORKLOADS}
    if only and only - names:
        from optgen.errors import SpecError

        raise SpecError(None, f"bench --vs-compiled has no workload for {', '.join(sorted(only - names))} "
                              f"(have: {', '.join(w[0] for w in WORKLOADS)})")
    _Timed.backend = args.compile_backend or "inductor"
    folder = _fresh_caches()
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats "
             f"after two steps each; compiled = torch.compile(opt.step) ({_Timed.backend}), cold caches; "
             "speed-up = median over repeats of torch forloop's time / this time (higher is better).", ""]
    print(lines[0], flush=True)
    try:
        for count, size in cases:
            for name, kwargs, fused_ok in WORKLOADS:
                if only and name not in only:
                    continue
                load = os.getloadavg()[0]
                t = time.perf_counter()
                rows = bench_one(name, kwargs, fused_ok, count, size, args.repeats)
                minutes = (time.perf_counter() - t) / 60
                kw = ", ".join(f"{k}={v}" for k, v in kwargs.items())
                table = [f"### {name}({kw}) — {count} × {size} fp32 parameters ({count * size / 1e6:.3g}M); "
                         f"load average {load:.1f} → {os.getloadavg()[0]:.1f}, {minutes:.1f} min", "",
                         "| implementation | ms / step (median) | q1–q3 ms | speed-up vs torch forloop "
                         "| first step (s) | second step (s) | graphs |",
                         "|---|---:|---:|---:|---:|---:|---:|"]
                for label, ms, q1, q3, ratio, first, second, graphs in rows:
                    table.append(f"| {label} | {ms:.2f} | {q1:.2f}–{q3:.2f} | {ratio:.2f}× | {first:.2f} "
                                 f"| {second:.2f} | {graphs} |")
                table.append("")
                print("\n".join(table), flush=True)
                lines += table
    finally:
        folder.cleanup()
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0
