"""Peak memory of a training step, ordinary loop against ``optgen.step_in_backward`` (docs/memory.md).

    python -m optgen.tools.memory_in_backward [--layers 8] [--width 2048] [--batch 32] [--optimizers Adam,SGD]

Note [Measuring a CPU step's peak memory]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
torch keeps no allocator statistics for CPU tensors and ``tracemalloc`` does not see them, so each
step is measured twice, in a fresh process per (optimizer, mode), after two warm-up steps (state
created, kernel loaded):

- *tensor peak*: ``torch.profiler`` with ``profile_memory=True`` records every CPU allocation and
  free torch makes; the largest running sum over one step, in time order, is the most memory torch
  tensors held above what they held when it began (parameters and optimizer state);
- *RSS peak*: the process's peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``
  just before the step) above its resident memory then: what the OS saw, allocator slack, the
  kernels' own buffers and the profiler's absence included (it runs on another step).

Both are taken around ``loss.backward(); opt.step(); opt.zero_grad()`` (ordinary) or
``loss.backward()`` (in backward); a forward pass's activations are in both.  The step's time
(forward, backward and update) is printed too: the median of 9 rounds that time one step of each
mode in turn, in a process of their own with glibc's usual settings (under a fixed mmap threshold
every gradient would be mapped and unmapped, page faults included).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

MIB = 2**20
#: glibc's mmap threshold, fixed: by default it grows to the size of a freed block (up to 32 MiB), so
#: a freed gradient's memory would stay in the heap, resident, and the RSS peak would not see it
_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024  # type: ignore[union-attr]


def _training_step(optimizer: str, mode: str, layers: int, width: int, batch: int):
    """A model of ``layers`` square Linear layers, its optimizer in ``mode``, and its training step."""
    import torch

    import optgen

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = optgen.OPTIMIZERS[optimizer](model.parameters(), lr=1e-4)
    if mode == "in_backward":
        optgen.step_in_backward(opt)
    x = torch.randn(batch, width)

    def step():
        model(x).square().mean().backward()
        if mode == "ordinary":
            opt.step()
            opt.zero_grad()

    for _ in range(2):  # state created, kernel loaded
        step()
    gc.collect()
    return model, opt, step


def _measure_memory(*setting) -> dict:
    import torch

    model, opt, step = _training_step(*setting)
    param_bytes = sum(p.nbytes for p in model.parameters())
    state_bytes = sum(v.nbytes for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # an op's own allocations less its frees (its children's are theirs), in the order the ops began
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    running = tensor_peak = 0
    for _, change in changes:
        running += change
        tensor_peak = max(tensor_peak, running)
    del prof, changes
    gc.collect()

    resident = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    step()
    rss_peak = _status("VmHWM") - resident
    return dict(param_bytes=param_bytes, state_bytes=state_bytes, tensor_peak=tensor_peak, rss_peak=rss_peak)


def _measure_times(optimizer: str, layers: int, width: int, batch: int, rounds: int = 9) -> dict:
    """The median time of a training step in each mode, the modes interleaved round by round in one
    process, so both see the same machine load."""
    steps = {mode: _training_step(optimizer, mode, layers, width, batch)[2] for mode in ("ordinary", "in_backward")}
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for _ in range(rounds):
        for mode, step in steps.items():
            start = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - start)
    return {mode: 1e3 * statistics.median(values) for mode, values in times.items()}


def _child(what: str, name: str, mode: str, args) -> dict:
    command = [sys.executable, "-m", "optgen.tools.memory_in_backward", "--child", what, name, mode,
               "--layers", str(args.layers), "--width", str(args.width), "--batch", str(args.batch)]
    env = {**os.environ, **(_MALLOC if what == "memory" else {})}  # timed with glibc's usual settings
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--optimizers", default="Adam,SGD,Adafactor")
    parser.add_argument("--child", nargs=3, metavar=("WHAT", "OPTIMIZER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        what, name, mode = args.child
        if what == "memory":
            print(json.dumps(_measure_memory(name, mode, args.layers, args.width, args.batch)))
        else:
            print(json.dumps(_measure_times(name, args.layers, args.width, args.batch)))
        return
    shape = f"{args.layers} × Linear({args.width}, {args.width}), batch {args.batch}, float32"
    print(f"Peak memory of one training step above the memory held when it begins ({shape}), MiB; "
          "in all: parameters + state + tensor peak:\n")
    print("| optimizer | parameters | optimizer state | mode | tensor peak | RSS peak | in all at the peak "
          "| step (ms) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for name in args.optimizers.split(","):
        times = _child("time", name, "both", args)
        for mode in ("ordinary", "in_backward"):
            result = {**_child("memory", name, mode, args), "step_ms": times[mode]}
            label = "`loss.backward(); opt.step()`" if mode == "ordinary" else "`optgen.step_in_backward`"
            print(f"| {name} | {result['param_bytes'] / MIB:.0f} | {result['state_bytes'] / MIB:.1f} | {label} "
                  f"| {result['tensor_peak'] / MIB:.1f} | {result['rss_peak'] / MIB:.1f} "
                  f"| {(result['param_bytes'] + result['state_bytes'] + result['tensor_peak']) / MIB:.0f} "
                  f"| {result['step_ms']:.0f} |")


if __name__ == "__main__":
    main()
