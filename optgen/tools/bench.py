"""`optgen bench`: step time of every implementation against torch.optim, interleaved.

This machine's memory bandwidth drifts (up to 2× between runs, see shared PERF-NOTES), so every
repeat times each implementation back to back and we report the median over repeats of the
per-repeat ratio to torch's for-loop, plus each one's median time and the fraction of the
bandwidth roofline it reaches.  The roofline is measured in the same run: an in-place
``a.add_(b)`` over as many elements (12 bytes per element) gives the achievable GB/s; an ideal
optimizer step moves (3 + 2·S)·4 bytes per fp32 parameter (read param, grad, S states; write
param and S states).

Peak temporary memory is measured by watching every tensor the step allocates (a
TorchDispatchMode), so it counts optgen's and torch's foreach intermediates the same way.
"""
from __future__ import annotations

import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Workloads: (optimizer, kwargs, torch fused available on CPU)
WORKLOADS = [
    ("Adam", dict(lr=1e-3), True),
    ("AdamW", dict(lr=1e-3, weight_decay=0.01), True),
    ("SGD", dict(lr=1e-3, momentum=0.9), True),
    ("Adagrad", dict(lr=1e-3), True),
    ("Adadelta", dict(), False),
    ("Adamax", dict(lr=1e-3), False),
    ("ASGD", dict(lr=1e-3), False),
    ("NAdam", dict(lr=1e-3), False),
    ("RAdam", dict(lr=1e-3), False),
    ("RMSprop", dict(lr=1e-3), False),
    ("Rprop", dict(lr=1e-3), False),
    ("Adafactor", dict(lr=1e-3), False),
    # not in torch.optim: compared with optgen's own for-loop
    ("Lion", dict(lr=1e-4, weight_decay=0.1), False),
    ("AdaBelief", dict(lr=1e-3), False),
    ("Lamb", dict(lr=1e-3, weight_decay=0.01), False),
]
# Not here: Muon (2-D parameters only; its time is the Newton–Schulz matmuls, not memory),
# SparseAdam (sparse gradients) and LBFGS (a closure-driven step).


def shapes(total: int, count: int) -> list[tuple[int, ...]]:
    """``count`` tensors summing to about ``total`` elements, shaped like a network's: half large
    weight matrices, half small bias/norm vectors."""
    matrices = count // 2
    vector = 1024
    per_matrix = max(1, (total - (count - matrices) * vector) // matrices)
    cols = 1024
    return [(max(1, per_matrix // cols), cols)] * matrices + [(vector,)] * (count - matrices)


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


def _implementations(name, kwargs, fused_ok, compiled=False, cls=None, torch_cls=None):
    """Label → constructor of every implementation to time: torch.optim's (where it has the
    optimizer) and optgen's for-loop, foreach and C kernel (``cls``: a class built from a user's
    spec; by default the built-in optimizer of that name)."""
    import optgen

    cls = cls or optgen.OPTIMIZERS[name]
    torch_cls = torch_cls or getattr(torch.optim, name, None)
    impls = {}
    if torch_cls is not None:
        impls["torch forloop"] = lambda ps: torch_cls(ps, foreach=False, **kwargs)
        impls["torch foreach"] = lambda ps: torch_cls(ps, foreach=True, **kwargs)
    if fused_ok and torch_cls is not None:
        impls["torch fused"] = lambda ps: torch_cls(ps, fused=True, **kwargs)
    if compiled and torch_cls is not None:
        impls["torch compiled"] = lambda ps: _CompiledStep(torch_cls(ps, foreach=False, **kwargs))
    from optgen.runtime import c_launch

    ours = ("forloop", "foreach") + (("c",) if "c" in cls._kernels and c_launch.available() else ())
    for impl in ours:
        def make(ps, impl=impl):
            opt = cls(ps, **kwargs)
            opt.implementation = impl
            return opt
        impls[f"optgen {impl}"] = make
    return impls


def stream_gbps(n: int, repeats: int) -> float:
    a, b = torch.ones(n), torch.ones(n)
    best = []
    for _ in range(repeats):
        t = time.perf_counter()
        a.add_(b)
        best.append(time.perf_counter() - t)
    return 12 * n / statistics.median(best) / 1e9


def bench_one(name, kwargs, fused_ok, params_total, tensors, repeats, compiled=False, cls=None, torch_cls=None):
    torch.manual_seed(0)
    params = [torch.randn(s) * 0.1 for s in shapes(params_total, tensors)]
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.randn_like(p) * 0.01
    n = sum(p.numel() for p in params)
    impls = {label: make(params) for label, make in
             _implementations(name, kwargs, fused_ok, compiled, cls, torch_cls).items()}
    for opt in impls.values():  # warm-up: creates state, first-call overheads
        opt.step()
    times: dict[str, list[float]] = {label: [] for label in impls}
    gbps = []
    for _ in range(repeats):
        gbps.append(stream_gbps(n, 1))
        for label, opt in impls.items():
            t = time.perf_counter()
            opt.step()
            times[label].append(time.perf_counter() - t)
    baseline = next(iter(impls))  # torch's for-loop; optgen's where torch has no such optimizer
    state_tensors = sum(1 for v in next(iter(impls[baseline].state.values())).values()
                        if isinstance(v, torch.Tensor) and v.dim() > 0)
    bytes_per_step = (3 + 2 * state_tensors) * 4 * n
    # (a compiled step is not measured: the dispatch mode that watches allocations would recompile it)
    peak = {label: None if isinstance(opt, _CompiledStep) else peak_temporary_bytes(opt, params)
            for label, opt in impls.items()}
    base = times[baseline]
    rows = []
    for label, ts in times.items():
        ratio = statistics.median(b / t for b, t in zip(base, ts, strict=True))
        ms = statistics.median(ts) * 1e3
        roofline = bytes_per_step / statistics.median(gbps) / 1e9 * 1e3
        temporary = peak[label]
        mib = None if temporary is None else temporary / 2**20
        if isinstance(impls[label], _CompiledStep):
            label = f"{label} (first step: {impls[label].seconds:.0f} s)"
        rows.append((label, ms, ratio, roofline / ms, mib))
    return n, statistics.median(gbps), rows, baseline


def main(args) -> int:
    total, tensors = int(args.params), args.tensors
    workloads = [(name, kwargs, fused_ok, None, None) for name, kwargs, fused_ok in WORKLOADS]
    if getattr(args, "specs", None):  # a user's spec files: their defaults, against their for-loop
        from pathlib import Path

        from optgen.build import build_temporary

        compiled, package = build_temporary([Path(s) for s in args.specs])
        workloads = [(c.spec.name, {}, False, package.OPTIMIZERS[c.spec.name],
                      getattr(torch.optim, c.spec.torch_name) if c.spec.torch_name else None)
                     for c in compiled if not c.spec.algorithm]
    only = set(args.only.split(",")) if args.only else None
    unknown = sorted((only or set()) - {w[0] for w in workloads})
    if unknown:
        from optgen.errors import SpecError

        raise SpecError(None, f"bench has no workload for {', '.join(unknown)} (have: "
                              f"{', '.join(w[0] for w in workloads)}); to time a spec of yours, pass its file: "
                              "optgen bench my_specs/yogi.toml")
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {total / 1e6:.1f}M fp32 parameters "
             f"in {tensors} tensors, {args.repeats} interleaved repeats; speed-up = median over repeats of "
             "baseline time / this time (higher is better).", ""]
    for name, kwargs, fused_ok, cls, torch_cls in workloads:
        if only and name not in only:
            continue
        has_torch = torch_cls is not None or (cls is None and hasattr(torch.optim, name))
        n, gbps, rows, baseline = bench_one(name, kwargs, fused_ok, total, tensors, args.repeats,
                                            compiled=getattr(args, "compile", False) and has_torch,
                                            cls=cls, torch_cls=torch_cls)
        kw = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        lines += [f"### {name}({kw or 'defaults'}) — {n / 1e6:.1f}M params, stream bandwidth {gbps:.1f} GB/s", "",
                  f"| implementation | ms / step | speed-up vs {baseline} | % of roofline | peak temporaries (MiB) |",
                  "|---|---:|---:|---:|---:|"]
        for label, ms, ratio, frac, mib in rows:
            memory = "—" if mib is None else f"{mib:.0f}"
            lines.append(f"| {label} | {ms:.1f} | {ratio:.2f}× | {100 * frac:.0f}% | {memory} |")
        lines.append("")
        print("\n".join(lines[-(len(rows) + 5):]), flush=True)
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0
