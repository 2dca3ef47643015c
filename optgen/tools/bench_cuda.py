"""`optgen bench --device cuda`: the fused Triton kernels against torch on a GPU.

UNTESTED ON A GPU: written when no GPU was available (the Triton backend was developed on CPU,
under Triton's interpreter).  Run it on the first GPU machine and check it before trusting it.

For every optimizer with a triton implementation, at 1M / 10M / 100M parameters spread over
about 200 tensors (``optgen.tools.bench.shapes``), fp32, it times one ``step()`` of:

- optgen triton (``fused=True`` where the signature has it, else ``implementation = "triton"``),
  optgen foreach, optgen forloop;
- torch forloop, foreach, fused (Adam, AdamW, SGD, Adagrad have one), and
  ``torch.compile(opt.step)`` with a Tensor lr (so a changing lr does not recompile), whose
  compile time is reported apart.

Timing: CUDA events around each step, every implementation back to back within a repeat
(interleaved, as the CPU bench), medians over repeats.  Bandwidth: the bytes an ideal fused step
moves — read param, grad and every state, write param and every state — over the step time, as
a fraction of the copy bandwidth measured in the same run (``b.copy_(a)``, read + write).
The issue's targets: triton Adam/AdamW/SGD/Adagrad at least torch fused at 100M, at least 85 %
of copy bandwidth, and at least 3× torch foreach where torch has no fused kernel.
"""
from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable

import torch

from optgen.tools.bench import shapes

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


def implementations(name: str, kwargs: dict) -> dict:
    """label → factory(params) → a zero-argument step function (and its optimizer)."""
    import optgen

    cls, theirs = optgen.OPTIMIZERS[name], getattr(torch.optim, name, None)
    out: dict[str, Callable[..., tuple]] = {}  # label → make(params) -> (step, optimizer)
    takes_fused = "fused" in inspect.signature(cls).parameters  # as in torch: Adam, AdamW, SGD, Adagrad
    for impl in ("triton", "foreach", "forloop"):
        def make(ps, impl=impl):
            opt = cls(ps, fused=True, **kwargs) if impl == "triton" and takes_fused else cls(ps, **kwargs)
            opt.implementation = impl
            return opt.step, opt
        out[f"optgen {impl}"] = make
    if theirs is None:
        return out
    for label, options in (("torch forloop", dict(foreach=False)), ("torch foreach", dict(foreach=True)),
                           ("torch fused", dict(fused=True))):
        def make(ps, options=options):
            opt = theirs(ps, **options, **kwargs)
            return opt.step, opt
        out[label] = make

    def compiled(ps):
        lr = kwargs.get("lr", 1e-3)
        opt = theirs(ps, **{**kwargs, "lr": torch.tensor(lr, device="cuda")})
        return torch.compile(opt.step), opt
    out["torch.compile(step)"] = compiled
    return out


def bench(name: str, kwargs: dict, total: int, tensors: int, repeats: int) -> tuple[list, float, float | None]:
    torch.manual_seed(0)
    params = [(torch.randn(s, device="cuda") * 0.1).requires_grad_() for s in shapes(total, tensors)]
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    n = sum(p.numel() for p in params)
    steps, compile_s, states = {}, None, 0
    for label, make in implementations(name, kwargs).items():
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
        rows.append((label, ms, vs_foreach, bytes_per_step / (ms * 1e-3) / 1e9 / gbps))
    return rows, gbps, compile_s


def main(args) -> int:
    from optgen.build import compile_all, kernel_backends

    if not torch.cuda.is_available():
        print("optgen bench --device cuda: no CUDA device", flush=True)
        return 1
    only = set(args.only.split(",")) if args.only else None
    names = [c.spec.name for c in compile_all() if "triton" in {b.name for b in kernel_backends(c)}]
    sizes = tuple(int(float(x)) for x in args.sizes.split(",")) if getattr(args, "sizes", None) else SIZES
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp32, {args.tensors} tensors, "
             f"{args.repeats} interleaved repeats; `vs torch foreach` = median of per-repeat time ratios; "
             "`% of copy` = ideal bytes moved per step / step time / copy bandwidth.", ""]
    for name in names:
        if only and name not in only:
            continue
        for total in sizes:
            rows, gbps, compile_s = bench(name, {"lr": 1e-3}, total, args.tensors, args.repeats)
            lines += [f"### {name} — {total / 1e6:.0f}M params, copy bandwidth {gbps:.0f} GB/s"
                      + (f", torch.compile took {compile_s:.1f} s" if compile_s is not None else ""), "",
                      "| implementation | ms / step | vs torch foreach | % of copy bandwidth |", "|---|---:|---:|---:|"]
            lines += [f"| {label} | {ms:.3f} | {ratio:.2f}× | {100 * frac:.0f}% |" for label, ms, ratio, frac in rows]
            lines.append("")
            print("\n".join(lines[-(len(rows) + 5):]), flush=True)
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0
