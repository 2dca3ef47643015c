"""Times ``AveragedModel.update_parameters``: optgen's against torch's, on a ~60M-parameter model.

    python -m optgen.tools.swa_bench [--params 60e6] [--repeats 9] [--output BENCHMARKS.md]

Both averaged models shadow the same model; calls alternate between them so that machine noise
hits both alike, and each figure is the median of ``repeats`` calls (after the first, which
only copies).  Prints a Markdown table (and appends it to --output).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch.optim import swa_utils as torch_swa

from optgen import swa_utils as optgen_swa


def model_of(params: float, width: int = 2000) -> torch.nn.Sequential:
    layers = max(1, round(params / (width * width + width)))
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))


CASES = {
    "SWA (default running mean)": lambda m: {},
    "EMA (get_ema_multi_avg_fn(0.999))": lambda m: {"multi_avg_fn": m.get_ema_multi_avg_fn(0.999)},
}


def time_case(model: torch.nn.Module, case: str, repeats: int) -> tuple[float, float, float]:
    """Median torch time, median optgen time, and the median of the per-round ratios (a round
    times torch's call and optgen's back to back, so both see the same machine load)."""
    averaged = {m: m.AveragedModel(model, **CASES[case](m)) for m in (torch_swa, optgen_swa)}
    times: dict[object, list[float]] = {m: [] for m in averaged}
    for a in averaged.values():
        a.update_parameters(model)  # the first call copies
    for round_ in range(repeats):
        order = list(averaged.items())[:: 1 if round_ % 2 == 0 else -1]  # alternate who goes first
        for m, a in order:
            start = time.perf_counter()
            a.update_parameters(model)
            times[m].append(time.perf_counter() - start)
    ratios = [t / o for t, o in zip(times[torch_swa], times[optgen_swa], strict=True)]
    return statistics.median(times[torch_swa]), statistics.median(times[optgen_swa]), statistics.median(ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optgen.tools.swa_bench")
    parser.add_argument("--params", type=float, default=60e6)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--output", help="append the table to this Markdown file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with torch.no_grad():
        model = model_of(args.params)
    n = sum(p.numel() for p in model.parameters())
    rows = []
    for case in CASES:
        theirs, ours, ratio = time_case(model, case, args.repeats)
        rows.append(f"| {case} | {theirs * 1e3:.1f} ms | {ours * 1e3:.1f} ms | {ratio:.2f}x |")
    table = "\n".join([
        f"`AveragedModel.update_parameters`, {n / 1e6:.1f}M float32 parameters in {2 * len(model)} tensors "
        f"(CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}); median of {args.repeats} calls each, optgen and torch alternating.",
        "",
        "| averaging | torch.optim.swa_utils | optgen.swa_utils | speed-up (median of paired ratios) |",
        "|---|---|---|---|",
        *rows,
    ])
    print(table)
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
