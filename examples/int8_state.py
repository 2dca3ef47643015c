"""int8 optimizer state (``state_dtype="int8"``): memory, convergence against float32 and bfloat16
state, and against torchao's AdamW8bit and bitsandbytes' Adam8bit where they are installed.

Run:  python examples/int8_state.py [--steps 300] [--plot curves.png]

The task: the handwritten digits that ship inside scikit-learn (``sklearn/datasets/data/digits.csv.gz``,
1797 8x8 images; read directly, so scikit-learn's own dependencies are not needed: ``pip install
--no-deps scikit-learn``), a 64-256-256-10 MLP (its two large weights, 16384 and 65536 elements,
keep int8 state; the 2560-element output layer and the biases are under the 4096-element threshold
and keep float32), minibatches of 256 from 1500 training images, the rest held out.  Without
scikit-learn, a teacher network's regression stands in.  Prints a Markdown table of the final
training loss (mean of the last 20 steps) and held-out accuracy per optimizer and state;
``--plot`` draws the training curves (matplotlib).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import io
import time
from pathlib import Path

import torch

import optgen

OPTIMIZERS = {
    "Adam": dict(lr=1e-3),
    "AdamW": dict(lr=1e-3, weight_decay=0.01),
    "SGD": dict(lr=0.05, momentum=0.9),
    "Lion": dict(lr=3e-4, weight_decay=0.01),
    "Adafactor": dict(lr=1e-2),
}
STATES = {"float32": None, "bfloat16": torch.bfloat16, "int8": "int8"}


def digits() -> tuple[torch.Tensor, torch.Tensor, str]:
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.exists():
            with gzip.open(path, "rt") as f:
                rows = [list(map(float, row)) for row in csv.reader(f)]
            data = torch.tensor(rows)
            return data[:, :64] / 16.0, data[:, 64].long(), "scikit-learn's digits"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1797, 64, generator=g)
    teacher = torch.randn(64, 10, generator=g)
    return x, (x @ teacher).argmax(dim=1), "a random linear teacher (scikit-learn not installed)"


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 10))


def train(make_optimizer, steps: int, data) -> tuple[list[float], float]:
    x, y = data
    train_x, train_y, test_x, test_y = x[:1500], y[:1500], x[1500:], y[1500:]
    net = model()
    opt = make_optimizer(net.parameters())
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        batch = torch.randint(0, 1500, (256,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(train_x[batch]), train_y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        accuracy = (net(test_x).argmax(dim=1) == test_y).float().mean().item()
    return losses, accuracy


def state_bytes(opt) -> float:
    """Bytes of state per parameter, over the parameters that have state."""
    total = n = 0
    for p, state in opt.state.items():
        n += p.numel()
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                if hasattr(v, "codes"):  # torchao's OptimState8bit
                    total += v.codes.numel() + v.scale.numel() * v.scale.element_size()
                else:
                    total += v.numel() * v.element_size()
    return total / n


def step_times(numel: int, repeats: int, extra: dict) -> dict[str, float]:
    """Median step time of Adam on one tensor of ``numel`` parameters, runs interleaved: float32
    state on the default (C) and foreach paths, bfloat16 state (C), int8 state (C, and the foreach
    reference), and ``extra``'s 8-bit optimizers (torchao, bitsandbytes) where installed."""
    runs = {}
    cases = [("float32, default (C)", None, None), ("float32, foreach", None, True),
             ("bfloat16, default (C)", torch.bfloat16, None), ("int8, default (C)", "int8", None),
             ("int8, foreach (the reference)", "int8", True)]
    for label, dtype, foreach in cases:
        p = torch.nn.Parameter(torch.randn(numel))
        p.grad = torch.randn(numel)
        opt = optgen.Adam([p], lr=1e-3, foreach=foreach, state_dtype=dtype)
        opt.step()
        runs[label] = (opt, [])
    for label, (_, make) in extra.items():
        p = torch.nn.Parameter(torch.randn(numel))
        p.grad = torch.randn(numel)
        opt = make([p])
        opt.step()
        runs[label] = (opt, [])
    for _ in range(repeats):
        for opt, times in runs.values():
            started = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - started)
    return {label: sorted(times)[len(times) // 2] for label, (_, times) in runs.items()}


def others() -> dict:
    """torchao's and bitsandbytes' 8-bit optimizers, where installed."""
    found = {}
    try:
        from torchao.optim import AdamW8bit
        found["torchao AdamW8bit"] = ("AdamW", lambda ps: AdamW8bit(ps, **OPTIMIZERS["AdamW"]))
    except Exception as e:  # noqa: BLE001 - not installed, or not importable with this torch
        print(f"(torchao: {type(e).__name__}: {str(e)[:100]})")
    try:
        import bitsandbytes as bnb
        found["bitsandbytes Adam8bit"] = ("Adam", lambda ps: bnb.optim.Adam8bit(ps, **OPTIMIZERS["Adam"]))
    except Exception as e:  # noqa: BLE001
        print(f"(bitsandbytes: {type(e).__name__}: {str(e)[:100]})")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--numel", type=int, default=4_000_000, help="the step-time measurement's parameters")
    args = parser.parse_args()
    x, y, source = digits()
    print(f"data: {source}; {args.steps} steps of 256, {torch.get_num_threads()} threads\n")
    curves = {}
    rows = []
    for name, kwargs in OPTIMIZERS.items():
        base = None
        for label, dtype in STATES.items():
            started = time.perf_counter()
            losses, accuracy = train(lambda ps, n=name, k=kwargs, d=dtype: getattr(optgen, n)(ps, state_dtype=d, **k),
                                     args.steps, (x, y))
            seconds = time.perf_counter() - started
            final = sum(losses[-20:]) / 20
            base = final if base is None else base
            curves[f"{name} {label}"] = losses
            rows.append((name, f"optgen, {label} state", final, final / base, accuracy, seconds))
    extra = others()
    for label, (name, make) in extra.items():
        started = time.perf_counter()
        losses, accuracy = train(make, args.steps, (x, y))
        final = sum(losses[-20:]) / 20
        base = next(r[2] for r in rows if r[0] == name)
        curves[label] = losses
        rows.append((name, label, final, final / base, accuracy, time.perf_counter() - started))
    print("| optimizer | state | final loss | vs float32 | held-out accuracy | run (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, label, final, ratio, accuracy, seconds in rows:
        print(f"| {name} | {label} | {final:.4f} | {ratio:.3f} | {accuracy:.3f} | {seconds:.1f} |")
    net = model()
    print()
    for label, dtype in STATES.items():
        opt = optgen.Adam(net.parameters(), state_dtype=dtype)
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        print(f"Adam state, {label}: {state_bytes(opt):.3f} bytes per parameter")
    print(f"\nAdam step on one tensor of {args.numel:,} parameters (median of 15, interleaved):")
    for label, seconds in step_times(args.numel, 15, extra).items():
        print(f"  {label}: {seconds * 1e3:.1f} ms")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(OPTIMIZERS), figsize=(4 * len(OPTIMIZERS), 3.2), sharey=False)
        for ax, name in zip(axes, OPTIMIZERS, strict=True):
            for label, losses in curves.items():
                if label.split()[0] == name or (label.startswith(("torchao", "bitsandbytes")) and
                                                 name == {"torchao AdamW8bit": "AdamW"}.get(label, "Adam")):
                    smooth = torch.tensor(losses).unfold(0, 10, 1).mean(dim=1)
                    ax.plot(smooth, label=label.replace(f"{name} ", ""), linewidth=1)
            ax.set_title(name)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("training loss (10-step mean)")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        args.plot.write_bytes(buffer.getvalue())
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
