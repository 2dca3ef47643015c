"""bfloat16 optimizer state (``state_dtype=torch.bfloat16``): memory, speed and convergence.

Run:  python examples/low_precision_state.py [--steps 200 2000] [--numel 10_000_000]

Prints, for docs/memory.md ("Low-precision state"):
- bytes of state per parameter (Adam: float32 state 8, bfloat16 state 4);
- the final loss of a small MLP regression (a fixed random teacher network; 200 and 2000 steps) with float32
  state, bfloat16 state rounded stochastically (optgen's), and bfloat16 state rounded to nearest
  (what ``state.to(torch.bfloat16)`` would give: the same kernels with the rounding swapped), for
  Adam, AdamW, SGD with momentum, Lion and Adafactor;
- the C kernel's step time with float32 and with bfloat16 state at ``--numel`` parameters,
  interleaved (alternating runs, median of each), as a ratio: the machine may be shared.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

import optgen
from optgen.runtime import low_precision

OPTIMIZERS = {
    "Adam": dict(lr=1e-3),
    "AdamW": dict(lr=1e-3, weight_decay=0.01),
    "SGD": dict(lr=0.02, momentum=0.9),
    "Lion": dict(lr=1e-3),
    "Adafactor": dict(lr=1e-2),
}


@contextmanager
def rounding_to_nearest():
    """The reference kernels with round-to-nearest in place of stochastic rounding."""
    saved = low_precision.stochastic_round
    low_precision.stochastic_round = lambda value, key: value.to(torch.bfloat16)
    try:
        yield
    finally:
        low_precision.stochastic_round = saved


def regression_loss(name: str, kwargs: dict, state_dtype, steps: int, implementation: str | None = None,
                    seed: int = 0) -> float:
    """Final training loss (mean of the last 10 steps) of a 2-layer MLP fitting a random teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 32, generator=g)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    student = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))
    with torch.no_grad():
        for p in [*teacher.parameters(), *student.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        y = teacher(x)
    opt = getattr(optgen, name)(student.parameters(), state_dtype=state_dtype, **kwargs)
    if implementation is not None:
        opt.implementation = implementation
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(student(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


def state_bytes_per_parameter(state_dtype) -> float:
    p = torch.nn.Parameter(torch.randn(1000, 100))
    opt = optgen.Adam([p], state_dtype=state_dtype)
    p.grad = torch.randn_like(p)
    opt.step()
    return sum(v.numel() * v.element_size() for v in opt.state[p].values()
               if isinstance(v, torch.Tensor) and v.dim() > 0) / p.numel()


def step_times(numel: int, repeats: int) -> dict:
    """Median C-kernel step time of Adam with float32 and bfloat16 state, runs interleaved."""
    runs: dict = {}
    for state_dtype in (None, torch.bfloat16):
        p = torch.nn.Parameter(torch.randn(numel))
        p.grad = torch.randn(numel)
        opt = optgen.Adam([p], lr=1e-3, fused=True, state_dtype=state_dtype)
        opt.step()
        runs[state_dtype] = (opt, [])
    for _ in range(repeats):
        for opt, times in runs.values():
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
    return {("float32" if d is None else "bfloat16"): statistics.median(t) for d, (_, t) in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--numel", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"bytes of Adam state per parameter: float32 {state_bytes_per_parameter(None):g}, "
          f"bfloat16 {state_bytes_per_parameter(torch.bfloat16):g}")
    for steps in args.steps:
        print(f"\nfinal loss after {steps} steps (mean of the last 10), small MLP regression:")
        print(f"{'optimizer':<10} {'float32':>10} {'bf16 stoch.':>12} {'ratio':>7} {'bf16 nearest':>13} {'ratio':>9}")
        for name, kwargs in OPTIMIZERS.items():
            full = regression_loss(name, kwargs, None, steps)
            sr = regression_loss(name, kwargs, torch.bfloat16, steps)
            with rounding_to_nearest():
                rn = regression_loss(name, kwargs, torch.bfloat16, steps, implementation="forloop")
            print(f"{name:<10} {full:>10.4g} {sr:>12.4g} {sr / full:>7.3f} {rn:>13.4g} {rn / full:>9.3f}")
    times = step_times(args.numel, args.repeats)
    print(f"\nC kernel, Adam step at {args.numel:,} parameters ({torch.get_num_threads()} threads, median of "
          f"{args.repeats} interleaved): float32 state {times['float32'] * 1e3:.2f} ms, bfloat16 state "
          f"{times['bfloat16'] * 1e3:.2f} ms, ratio {times['bfloat16'] / times['float32']:.2f}")


if __name__ == "__main__":
    main()
