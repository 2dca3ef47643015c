"""Train one small model with optgen's optimizers and with torch.optim's, side by side.

Run after `optgen build`:  python examples/demo.py   (`--plot PATH`, `--steps N`, `--no-timing`)

Each pair starts from the same weights and sees the same batches, each optimizer with its
defaults: optgen's fused C kernel on CPU (compiled on first use; its fastest implementation),
torch's for-loop.  The losses agree to float32 rounding: the C kernel evaluates the same formula in
one pass.  With `OPTGEN_DEFAULTS=torch` optgen runs its for-loop, which performs torch's arithmetic
in torch's order, and the losses are bit-equal.  The loss curves of both are drawn to a PNG
(matplotlib: the `demo` extra, `pip install -e ".[demo]"`).

Then a rough timing of one step of an 8M-parameter model: torch's fastest CPU path against
optgen's default (the fused C kernel), for optimizers torch has a fused CPU kernel for and some it
has not.  Those numbers are indicative only: one step takes milliseconds and this
may be a shared machine, so each row is the median of several steps, torch's and optgen's
interleaved so both see the same load, with the spread printed; `optgen bench` measures ratios
properly (more repeats, a bandwidth roofline; BENCHMARKS.md).
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

import optgen
from optgen.runtime import c_launch, dispatch

CONFIGS = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)),
    ("Adam", dict(lr=3e-3, amsgrad=True)),
    ("AdamW", dict(lr=3e-3, weight_decay=0.1)),
    ("Adagrad", dict(lr=0.05, lr_decay=1e-3)),
]
PLOT = Path(__file__).with_name("demo_losses.png")


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def train(model, optimizer, steps):
    """The loss at every step (same batches for every call: the generator is seeded here)."""
    g = torch.Generator().manual_seed(1)
    target_w = torch.randn(16, 1, generator=g) / 4  # a target the small net learns in 200 steps
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 16, generator=g)
        y = torch.sin(x @ target_w)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def plot(curves, path):
    """One panel per optimizer: torch.optim's loss curve and optgen's on top of it (dashed)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), sharey=True)
    for ax, (name, (ours, theirs)) in zip(axes, curves.items(), strict=True):
        ax.plot(theirs, label="torch.optim", linewidth=3, alpha=0.5)
        ax.plot(ours, "--", label="optgen", linewidth=1.2, color="black")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0].set_ylabel("training loss (MSE)")
    axes[0].legend()
    fig.suptitle("optgen vs torch.optim: same model, same batches")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def step_times(optimizers, min_samples=5, max_samples=15, budget_s=2.0):
    """Seconds per step of each optimizer: two warm-up steps each (state, optgen's C compile),
    then rounds of one step of each, interleaved, until ``max_samples`` rounds or ``budget_s``
    seconds have passed (at least ``min_samples`` rounds)."""
    for opt in optimizers:
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
        opt.step()
    samples: list[list[float]] = [[] for _ in optimizers]
    start = time.perf_counter()
    while len(samples[0]) < max_samples and (len(samples[0]) < min_samples or time.perf_counter() - start < budget_s):
        for opt, times in zip(optimizers, samples, strict=True):
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
    return samples


def timing():
    print("\nindicative timing, not a benchmark (shared machine; `optgen bench` measures properly):")
    print("one step, 8M parameters in 16 tensors, median over interleaved steps (ms) [min-max]")
    print(f"{'optimizer':<9} {'torch fastest':>27} {'optgen default':>21} {'torch/optgen':>13}")
    noisy = False
    for name, fused in [("Adam", True), ("SGD", True), ("NAdam", False), ("RMSprop", False), ("Rprop", False)]:
        params = [torch.zeros(500_000, requires_grad=True) for _ in range(16)]
        theirs = getattr(torch.optim, name)(params, **(dict(fused=True) if fused else dict(foreach=False)))
        ours = getattr(optgen, name)([p.detach().clone().requires_grad_() for p in params])  # the C kernel
        t_theirs, t_ours = step_times([theirs, ours])
        label = "fused" if fused else "for-loop"
        cells = []
        for times in (t_theirs, t_ours):
            lo, hi = min(times) * 1e3, max(times) * 1e3
            noisy |= hi > 2 * lo
            cells.append(f"{statistics.median(times) * 1e3:7.1f} [{lo:5.1f}-{hi:6.1f}]")
        ratio = statistics.median(t_theirs) / statistics.median(t_ours)
        print(f"{name:<9} {cells[0]} ({label:>8}) {cells[1]:>21} {ratio:>12.1f}x"
              f"   ({len(t_ours)} steps each)")
    if noisy:
        print("note: some steps took over twice the fastest one: the machine is busy, so these ratios are rough")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per optimizer (default 200)")
    parser.add_argument("--plot", type=Path, default=PLOT, help=f"where to write the loss curves (default {PLOT})")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table")
    args = parser.parse_args()

    if dispatch.defaults_policy() == "torch":
        ours_runs = "its for-loop (OPTGEN_DEFAULTS=torch: torch's rule)"
    else:
        ours_runs = "its fused C kernel (its default on CPU)" if c_launch.available() else "its for-loop (no C compiler)"
    print(f"optgen runs {ours_runs}, torch.optim its for-loop (its default)")
    print(f"{'optimizer':<9} {'optgen loss':>12} {'torch loss':>12} {'max |diff| over the run':>24}")
    curves = {}
    for name, kwargs in CONFIGS:
        ours_model, torch_model = make_model(), make_model()
        ours = train(ours_model, getattr(optgen, name)(ours_model.parameters(), **kwargs), args.steps)
        theirs = train(torch_model, getattr(torch.optim, name)(torch_model.parameters(), **kwargs), args.steps)
        curves[name] = (ours, theirs)
        diff = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
        print(f"{name:<9} {ours[-1]:>12.6f} {theirs[-1]:>12.6f} {diff:>24.1e}")
    try:
        plot(curves, args.plot)
        print(f"\nloss curves: {args.plot}")
    except ImportError:
        print('\nno plot: matplotlib is not installed (pip install -e ".[demo]")')
    if c_launch.available() and not args.no_timing:
        timing()


if __name__ == "__main__":
    main()
