"""``python -m optgen.tools.host_overhead``: the host side of a step on many small tensors
(BENCHMARKS.md, "Host overhead on many small tensors"; issue 14's target: Adam on 1000 tensors of
100 elements in at most 1 ms, at most 0.3x torch's fused step).

Each row times optgen's default Adam (the C kernel through its cached launch, Note [Cached steps])
and torch's fused Adam in the same process, alternately, the median of ``--steps`` steps:

- warm: step after step, the gradients kept (the optimizer's tensors stay in the cache) or new
  ones every step (``backward`` after ``zero_grad(set_to_none=True)`` makes new tensors);
- cold: a 64 MiB buffer written between steps, as a forward and backward evict the cache;
- per guard (Note [Native step guard]): the native one and the Python one.

The guard's checks and the bound kernel are also timed apart (cold), so the rest of the step is
the difference.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import optgen
from optgen.runtime import step_guard


def _params(count: int, size: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(size, generator=g).requires_grad_() for _ in range(count)]


def _time_steps(make, count: int, size: int, steps: int, new_grads: bool, cold: bool) -> float:
    ps = _params(count, size)
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(size, generator=g) for _ in range(count)] for _ in range(2)]
    opt = make(ps)
    evict = torch.zeros(16 * 2**20) if cold else None
    times = []
    for k in range(steps + 5):
        for p, grad in zip(ps, grads[k % 2], strict=True):
            p.grad = grad.clone() if new_grads else grad
        if evict is not None:
            evict.add_(1.0)
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[5:]) * 1e3


def _parts(count: int, size: int, steps: int) -> tuple[float, float]:
    """The cached step's guard and its kernel alone, cold: (guard ms, kernel ms)."""
    ps = _params(count, size)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = optgen.Adam(ps, lr=1e-3)
    opt.step()
    opt.step()
    (cached,) = opt._cached_steps.values()
    group = opt.param_groups[0]
    evict = torch.zeros(16 * 2**20)
    guard, kernel = [], []
    for _ in range(steps):
        evict.add_(1.0)
        t = time.perf_counter()
        table = cached.guard(opt, group)
        guard.append(time.perf_counter() - t)
        assert table is not None
        arguments = opt._kernel_scalars(cached.kernel, group)
        arguments.update((f, bool(group[f])) for f in opt._flags)
        evict.add_(1.0)
        t = time.perf_counter()
        cached.launch(table, arguments)
        kernel.append(time.perf_counter() - t)
    return statistics.median(guard) * 1e3, statistics.median(kernel) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optgen.tools.host_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    native = step_guard.native(wait=True)
    print(f"Adam, {args.count} float32 tensors of {args.size} elements, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps; torch {torch.__version__}")
    print()
    print("| guard | gradients | caches | optgen default (ms) | torch fused (ms) | time ratio |")
    print("|---|---|---|---:|---:|---:|")
    guards = ["native", "python"] if native is not None else ["python"]
    real_native = step_guard.native
    for guard in guards:
        if guard == "python":
            step_guard.native = lambda **_: None  # (this process only: the tool's last rows)
        for new_grads, cold in [(False, False), (True, False), (True, True)]:
            ours = _time_steps(lambda ps: optgen.Adam(ps, lr=1e-3), args.count, args.size, args.steps, new_grads, cold)
            theirs = _time_steps(lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), args.count, args.size,
                                 args.steps, new_grads, cold)
            print(f"| {guard} | {'new' if new_grads else 'kept'} | {'cold' if cold else 'warm'} | {ours:.2f} | "
                  f"{theirs:.2f} | {ours / theirs:.2f}× |")
        guard_ms, kernel_ms = _parts(args.count, args.size, args.steps)
        print(f"| {guard} | (parts, cold) | guard {guard_ms:.2f} ms, kernel {kernel_ms:.2f} ms | | | |")
    step_guard.native = real_native
    if native is None:
        print(f"\n(no native step guard: {step_guard.unavailable() or 'OPTGEN_STEP_GUARD=python'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
