"""`optgen bench --device cuda`: the fused Triton kernels against torch on a GPU.

UNTESTED ON A GPU: written when no GPU was available (the Triton backend was developed on CPU,
under Triton's interpreter).  Run it on the first GPU machine and check it before trusting it.

For every optimizer `optgen bench` times (the built-in ones, or the names, spec files and
packages given: ``optgen.tools.bench.resolve``), at 1M / 10M / 100M parameters spread over
about 200 tensors (``optgen.tools.bench.shapes``), fp32, it times one ``step()`` of:

- optgen triton (``fused=True`` where the signature has it, else ``implementation = "triton"``;
  where the spec has a Triton kernel), optgen foreach, optgen forloop, and optgen's default (the
  class constructed plainly: what optgen/runtime/dispatch.py picks on CUDA);
- torch forloop, foreach, fused (Adam, AdamW, SGD, Adagrad have one), and with ``--compile``
  ``torch.compile(opt.step)`` with a Tensor lr (so a changing lr does not recompile), whose
  compile time is reported apart.

Timing: CUDA events around each step, every implementation back to back within a repeat
(interleaved, as the CPU bench), medians over repeats.  Bandwidth: the bytes an ideal fused step
moves — read param, grad and every state, write param and every state — over the step time, as
a fraction of the copy bandwidth measured in the same run (``b.copy_(a)``, read + write).
The issue's targets: triton Adam/AdamW/SGD/Adagrad at least torch fused at 100M, at least 85 %
of copy bandwidth, and at least 3× torch foreach where torch has no fused kernel.

``--ready`` (optgen/tools/cuda_ready.py) runs this after the real-CUDA tests and turns its
measurements into BENCHMARKS.md's CUDA table and optgen's CUDA defaults.
"""
from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from optgen.errors import SpecError
from optgen.tools.bench import DEFAULT, Target, default_pick, resolve, shapes

SIZES = (1_000_000, 10_000_000, 100_000_000)


def _cuda_time(fn, repeats: int = 1) -> float:
    """Milliseconds of GPU time for one call (CUDA events; the host does not wait in between)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def copy_gbps(n: int) -> float:
    a, b = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    b.copy_(a)
    ms = statistics.median(_cuda_time(lambda: b.copy_(a)) for _ in range(20))
    return 8 * n / (ms * 1e-3) / 1e9


def implementations(target: Target, compiled: bool = False) -> dict:
    """label → factory(params) → (a zero-argument step function, its optimizer); ``compiled``: with
    torch.compile(opt.step) of torch's optimizer (tens of seconds of compilation per workload)."""
    cls, kwargs, theirs = target.cls, target.kwargs, target.torch_cls
    out: dict[str, Callable[..., tuple]] = {}  # label → make(params) -> (step, optimizer)
    takes_fused = "fused" in inspect.signature(cls).parameters  # as in torch: Adam, AdamW, SGD, Adagrad
    ours = (("triton",) if "triton" in cls._kernels else ()) + ("foreach", "forloop")
    for impl in ours:
        def make(ps, impl=impl):
            fused: dict[str, Any] = {"fused": True} if impl == "triton" and takes_fused else {}
            opt = cls(ps, **fused, **kwargs)
            opt.implementation = impl
            return opt.step, opt
        out[f"optgen {impl}"] = make

    def default(ps):  # constructed plainly: what dispatch picks (its row names the pick)
        opt = cls(ps, **kwargs)
        return opt.step, opt
    out[DEFAULT] = default
    if theirs is None:
        return out
    options = [("torch forloop", dict(foreach=False)), ("torch foreach", dict(foreach=True))]
    if "fused" in inspect.signature(theirs).parameters:
        options.append(("torch fused", dict(fused=True)))
    for label, option in options:
        def make(ps, option=option):
            opt = theirs(ps, **option, **kwargs)
            return opt.step, opt
        out[label] = make

    def compile_step(ps):
        lr = kwargs.get("lr", 1e-3)
        opt = theirs(ps, **{**kwargs, "lr": torch.tensor(lr, device="cuda")})
        return torch.compile(opt.step), opt
    if compiled:
        out["torch.compile(step)"] = compile_step
    return out


@dataclass(frozen=True)
class Measured:
    """One (optimizer, size): its table rows (label, median ms, vs torch foreach, fraction of copy
    bandwidth), the copy bandwidth, torch.compile's first step, and each optgen implementation's
    median ms by name (what :func:`optgen.tools.cuda_ready.fastest` chooses from)."""

    target: Target
    total: int
    rows: list[tuple[str, float, float, float]]
    gbps: float
    compile_s: float | None
    optgen_ms: dict[str, float]


def bench(target: Target, total: int, tensors: int, repeats: int, compiled: bool = False) -> Measured:
    torch.manual_seed(0)
    params = [(torch.randn(s, device="cuda") * 0.1).requires_grad_() for s in shapes(total, tensors)]
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    n = sum(p.numel() for p in params)
    steps, compile_s, states, labels = {}, None, 0, {}
    for label, make in implementations(target, compiled).items():
        try:
            step, opt = make(params)
            t = time.perf_counter()
            step()  # warm-up: state, launch tables, Triton / Inductor compilation
            torch.cuda.synchronize()
            if label == "torch.compile(step)":
                compile_s = time.perf_counter() - t
            step()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 — an implementation torch lacks for this optimizer
            print(f"  {label}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            continue
        steps[label] = step
        labels[label] = f"{DEFAULT} ({default_pick(opt)})" if label == DEFAULT else label
        if label == "optgen foreach":
            states = sum(1 for v in opt.state[params[0]].values()
                         if isinstance(v, torch.Tensor) and v.shape == params[0].shape)
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            times[label].append(_cuda_time(step))
    gbps = copy_gbps(n)
    bytes_per_step = (3 + 2 * states) * 4 * n
    rows = []
    base = times.get("torch foreach")
    for label, ts in times.items():
        ms = statistics.median(ts)
        vs_foreach = statistics.median(b / t for b, t in zip(base, ts, strict=True)) if base else float("nan")
        rows.append((labels[label], ms, vs_foreach, bytes_per_step / (ms * 1e-3) / 1e9 / gbps))
    optgen_ms = {label.removeprefix("optgen "): statistics.median(ts) for label, ts in times.items()
                 if label.startswith("optgen ") and label != DEFAULT}
    return Measured(target, total, rows, gbps, compile_s, optgen_ms)


def require_cuda() -> None:
    """A one-line error (exit 1) where there is no GPU to measure, saying why."""
    import importlib.util

    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise SpecError(None, f"--device cuda needs a CUDA GPU: torch.cuda.is_available() is False here (torch "
                              f"{torch.__version__}, {built}); run it on a machine with one")
    if importlib.util.find_spec("triton") is None:
        raise SpecError(None, "--device cuda times optgen's Triton kernels, and triton is not installed "
                              "(pip install triton)")


def header(args) -> list[str]:
    return [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp32, {args.tensors} tensors, "
            f"{args.repeats} interleaved repeats; `vs torch foreach` = median of per-repeat time ratios; "
            "`% of copy` = ideal bytes moved per step / step time / copy bandwidth; `optgen default (X)`: "
            "optgen's class constructed with no foreach or fused argument, X what it picked.", ""]


def run(args, print_tables: bool = True) -> tuple[list[Measured], list[str]]:
    """Every (optimizer, size) of the command line timed: the measurements and the Markdown lines."""
    targets = resolve(list(getattr(args, "specs", None) or []), args.only)
    sizes = tuple(int(float(x)) for x in args.sizes.split(",")) if getattr(args, "sizes", None) else SIZES
    lines = header(args)
    if print_tables:
        print("\n".join(lines), flush=True)
    measured = []
    for target in targets:
        for total in sizes:
            m = bench(target, total, args.tensors, args.repeats, compiled=getattr(args, "compile", False))
            measured.append(m)
            table = [f"### {target.title} — {total / 1e6:.0f}M params, copy bandwidth {m.gbps:.0f} GB/s"
                     + (f", torch.compile took {m.compile_s:.1f} s" if m.compile_s is not None else ""), "",
                     "| implementation | ms / step | vs torch foreach | % of copy bandwidth |", "|---|---:|---:|---:|"]
            table += [f"| {label} | {ms:.3f} | {ratio:.2f}× | {100 * frac:.0f}% |" for label, ms, ratio, frac in m.rows]
            table.append("")
            lines += table
            if print_tables:
                print("\n".join(table), flush=True)
    return measured, lines


def main(args) -> int:
    require_cuda()
    _, lines = run(args)
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0
