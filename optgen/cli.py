"""The `optgen` command: build, check, list, show, new, verify, bench.

User mistakes (a bad spec, an unknown name) print one line to stderr and exit 1 — never a
traceback.  Tracebacks are for bugs in optgen itself.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optgen.errors import SpecError

SPEC_TEMPLATE = '''# {name}: describe the algorithm in one line.
[optimizer]
name = "{name}"
paper = ""
signature = "lr, weight_decay, *, maximize, foreach, differentiable, fused"

[hyperparameters]
lr = 1e-3
weight_decay = 0
maximize = false

[[check]]
assert = "0.0 <= lr"
error = "Invalid learning rate: {{lr}}"

[state]
step = "0"
exp_avg = "zeros_like(param)"

[update]
rule = """
if maximize:
    grad = -grad
step = step + 1
if weight_decay != 0:
    grad = grad + weight_decay * param
exp_avg = lerp(exp_avg, grad, 0.1)
param = param - lr * exp_avg
"""
'''


def _find_spec(name: str):
    """A spec file's path, or the name of a built-in optimizer, loaded."""
    from optgen.build import spec_paths
    from optgen.spec.load import load_spec

    path = Path(name)
    if name.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise SpecError(None, f"{name}: no such spec file")
        return load_spec(path)
    for path in spec_paths():
        if path.stem == name.lower():
            return load_spec(path)
    known = ", ".join(p.stem for p in spec_paths())
    raise SpecError(None, f"no spec named '{name}' among the built-in optimizers (have: {known}); "
                          "for a spec of yours, pass its file: optgen show my_specs/yogi.toml")


def _target(args):
    """The build's target: the spec files/folders given (with --out), or optgen's own package."""
    from optgen.build import builtin_target, refuse_installed_builtin_build, user_target

    sources = [Path(s) for s in getattr(args, "specs", None) or []]
    out = getattr(args, "out", None)
    if sources:
        if not out:
            raise SpecError(None, "building spec files needs --out PKG_DIR: the package folder to write "
                                  "(its name is the package name), e.g. optgen build my_specs --out my_optimizers")
        return user_target(sources, Path(out))
    if out:
        raise SpecError(None, "--out needs the spec files or folders to build, e.g. optgen build my_specs --out "
                              f"{out}")
    if not getattr(args, "check", False):
        refuse_installed_builtin_build()
    return builtin_target()


def cmd_build(args) -> int:
    import time

    from optgen.build import build

    started = time.perf_counter()
    target = _target(args)
    shown = target.out_dir if not target.builtin else "generated"
    result = build(check=args.check, target=target, verify=not args.no_verify)
    if isinstance(result, list):  # --check: the stale files
        if result:
            print(f"{shown}/ is stale; run `optgen build`. Stale files:", file=sys.stderr)
            for name in result:
                print(f"  {shown}/{name}", file=sys.stderr)
            return 1
        print(f"{shown}/ is up to date")
        return 0
    seconds = time.perf_counter() - started
    if not result.written and not result.removed and not result.compiled:
        print(f"optgen build: {shown}/ is up to date, nothing to do ({seconds:.2f} s)")
        return 0
    verified = f", {len(result.verified)} cross-checked" if result.verified else \
        (", not cross-checked (--no-verify)" if args.no_verify else "")
    print(f"optgen build: {len(result.compiled)} spec(s) compiled{verified}; {len(result.written)} written, "
          f"{len(result.removed)} removed, {len(result.unchanged)} unchanged ({seconds:.1f} s)")
    for name in result.written:
        print(f"  wrote {shown}/{name}")
    for name in result.removed:
        print(f"  removed {shown}/{name}")
    if not target.builtin:
        print(f"import it with the folder {target.out_dir.resolve().parent} on sys.path: "
              f"import {target.package}; {target.package}.{result.names[0] if result.names else 'Name'}(params)")
    return 0


def cmd_list(args) -> int:
    from optgen.build import builtin_target, compile_all, user_target

    sources = [Path(s) for s in args.specs or []]
    target = user_target(sources, Path("unused")) if sources else builtin_target()
    for c in compile_all(target=target):
        flags = ", ".join(h.name for h in c.spec.flags)
        print(f"{c.spec.name:<10} {len(c.variants):>2} variants  flags: {flags or '-':<45} {c.spec.path}")
    return 0


def cmd_show(args) -> int:
    from optgen.backends.fused import FusedBackend
    from optgen.backends.optimizer_class import OptimizerClassBackend
    from optgen.backends.registry import KERNEL_BACKENDS
    from optgen.build import kernel_backends
    from optgen.passes import compile_spec, merge_variants
    from optgen.tools.dump_ir import dump

    spec = _find_spec(args.name)
    flags = _parse_flags(args.flags, spec)
    if args.dump_ir:
        print(dump(spec, tuple(flags.items()), args.dump_ir))
        return 0
    compiled = compile_spec(spec)
    # The IR every backend prints: all variants merged into one program with flag branches, or
    # the one variant --flags names.
    ir = (("IR after passes", ", ".join(f"{k}={v}" for k, v in flags.items()),
           compiled.variant(flags).program.describe())
          if args.flags else ("IR after passes", "every flag variant, merged", merge_variants.describe(compiled)))
    sections = [("spec", spec.path, Path(spec.path).read_text() if Path(spec.path).is_file() else spec.source), ir]
    available = kernel_backends(compiled)
    backends = [OptimizerClassBackend(tuple(b.name for b in available),
                                      imported_on_first_use=tuple(b.name for b in available if b.lazy)),
                *KERNEL_BACKENDS]
    for backend in backends:
        if args.backend in (None, backend.name):
            reason = backend.unsupported(compiled)
            if reason is not None:  # e.g. the Triton backend and a reduction: the others run it
                refused = ("\nfused=True is refused for it; its other implementations run instead."
                           if isinstance(backend, FusedBackend) else "")
                sections.append((f"{backend.name} code", "not generated",
                                 f"{spec.name} has no {backend.name} implementation: {reason}." + refused))
                continue
            sections.append((f"{backend.name} code", "", backend.render(compiled)))
    for title, sub, text in sections:
        print(f"==== {title}" + (f" ({sub})" if sub else "") + " " + "=" * 20)
        print(text.rstrip("\n"))
        print()
    return 0


def _parse_flags(text: str | None, spec) -> dict[str, bool]:
    flags = {h.name: h.default for h in spec.flags}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        if name not in flags:
            raise SpecError(None, f"{spec.name} has no flag '{name}' (flags: {', '.join(flags) or 'none'})")
        flags[name] = value.strip().lower() in ("1", "true", "yes", "")
    return flags


def cmd_new(args) -> int:
    if not args.name.isidentifier():
        raise SpecError(None, f"'{args.name}' is not a valid class name")
    folder = Path(args.dir)
    if folder.exists() and not folder.is_dir():
        raise SpecError(None, f"--dir {folder}: not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{args.name.lower()}.toml"
    if path.exists():
        raise SpecError(None, f"{path} already exists")
    path.write_text(SPEC_TEMPLATE.format(name=args.name))
    print(f"wrote {path}; edit it, then run `optgen verify {path}` and `optgen build {folder} --out PKG_DIR`")
    return 0


def cmd_verify(args) -> int:
    from optgen.tools.verify import verify_all

    return 0 if verify_all(steps=args.steps, sources=[Path(s) for s in args.specs] or None) else 1


def cmd_schedule(args) -> int:
    from optgen.schedules.show import main as schedule_main

    return schedule_main(args)


def cmd_bench(args) -> int:
    if args.ready and args.device != "cuda":
        raise SpecError(None, "--ready measures the CUDA defaults: use it with --device cuda")
    if args.device == "cuda":  # the Triton kernels on a GPU
        from optgen.tools.bench_cuda import main as cuda_main
        from optgen.tools.cuda_ready import main as ready_main

        return ready_main(args) if args.ready else cuda_main(args)
    if args.vs_compiled:  # compiled steps against the fused kernels, compile time included
        from optgen.tools.bench_compile import main as compiled_main

        return compiled_main(args)
    from optgen.tools.bench import main as bench_main

    return bench_main(args)


def cmd_fuzz(args) -> int:
    """Random valid specs against every backend and two references (optgen/tools/fuzz/)."""
    from optgen.tools.fuzz.run import fuzz

    report = fuzz(args.seconds, seed=args.seed, out=Path(args.out), avoid=() if args.all_constructs else None)
    print(report.summary())
    return 1 if report.failures else 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    # torch warns on import when numpy is missing; nothing optgen's commands do needs numpy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    parser = argparse.ArgumentParser(prog="optgen", description="PyTorch optimizers compiled from specs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="compile specs: optgen's own (specs/ → generated/), or yours (DIR --out PKG_DIR)",
                       description="optgen build                      regenerate optgen's generated/ (a source "
                                   "checkout)\noptgen build DIR... --out PKG_DIR  compile every DIR/*.toml (or the "
                                   "files given) into the package PKG_DIR",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="*", help="spec files or folders of *.toml (default: optgen's own specs)")
    p.add_argument("--out", metavar="PKG_DIR", help="the package folder to write (its name is the package name)")
    p.add_argument("--check", action="store_true", help="fail (exit 1) if the output is stale; write nothing")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the cross-check of every backend against the reference interpreter")
    p.set_defaults(run=cmd_build)
    p = sub.add_parser("list", help="list the specs (optgen's, or the files and folders given)")
    p.add_argument("specs", nargs="*", help="spec files or folders of *.toml")
    p.set_defaults(run=cmd_list)
    p = sub.add_parser("show", help="a spec, its IR after the passes, and the code of each backend")
    p.add_argument("name", help="a built-in optimizer's name, or a spec file")
    p.add_argument("--backend", help="only this backend's code (optimizer, forloop, foreach, differentiable, "
                                     "triton, c)")
    p.add_argument("--flags", help="the variant to show the IR of, e.g. amsgrad=true,maximize=false "
                                   "(default: every variant, merged)")
    p.add_argument("--dump-ir", metavar="PASS",
                   help="print the IR after this pass (lower, specialize, cse, name_reduction_arguments, "
                        "hoist_scalars, select_ops, reuse_buffers, preserve_values, merge_variants)")
    p.set_defaults(run=cmd_show)
    p = sub.add_parser("new", help="scaffold a spec: DIR/<name>.toml")
    p.add_argument("name")
    p.add_argument("--dir", default=".", help="the folder to write it in (default: the current folder)")
    p.set_defaults(run=cmd_new)
    p = sub.add_parser("verify", help="cross-check every backend of every spec against the reference interpreter")
    p.add_argument("specs", nargs="*", help="spec files or folders of *.toml (default: optgen's own specs)")
    p.add_argument("--steps", type=int, default=10)
    p.set_defaults(run=cmd_verify)
    p = sub.add_parser("bench", help="time every implementation, optgen's default included, against torch.optim",
                       description="optgen bench [NAME|SPEC|DIR|PKG ...]: one step of every implementation "
                                   "(torch.optim's, optgen's, and optgen's default), interleaved; the tables and "
                                   "how to read them are printed (and appended to --output)")
    p.add_argument("specs", nargs="*", metavar="NAME|SPEC|DIR|PKG",
                   help="built-in optimizer names, spec files or folders of yours, or packages built by "
                        "`optgen build DIR --out PKG` (default: every built-in optimizer bench times)")
    p.add_argument("--params", type=float, default=60e6,
                   help="the model-shaped workload's total parameters (default 60M)")
    p.add_argument("--tensors", type=int, default=200,
                   help="the model-shaped workload's number of tensors (default 200)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--only", help="comma-separated optimizer names")
    p.add_argument("--output", help="append the Markdown tables (and their explanation) to this file")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile(opt.step) of torch's optimizer (tens of seconds to compile each; "
                        "its for-loop on CPU)")
    p.add_argument("--vs-compiled", action="store_true",
                   help="time torch.compile(opt.step) of torch's and optgen's optimizers against torch's and "
                        "optgen's fused kernels, first steps (compilation) apart (optgen/tools/bench_compile.py; "
                        "minutes per optimizer)")
    p.add_argument("--cases", help="the workloads, comma-separated: `model` (--params in --tensors, shaped like a "
                                   "network's) or COUNTxSIZE (COUNT tensors of SIZE elements), for every optimizer "
                                   "(default: model, and 1000x100,200x1000,50x20000 for Adam; with --vs-compiled "
                                   "50x100000: 1000x100 compiles for over 10 minutes per optimizer)")
    p.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="with --vs-compiled: torch.compile's backend (default inductor; the others trace "
                        "without generating code, for a quick check)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the Triton kernels against torch fused/foreach/forloop/compile "
                        "(optgen/tools/bench_cuda.py)")
    p.add_argument("--sizes", help="with --device cuda: total parameters to run, e.g. 1e6,1e7,1e8 (the default)")
    p.add_argument("--ready", action="store_true",
                   help="with --device cuda, in a source checkout: run the real-CUDA tests, time every optimizer, "
                        "write the CUDA table of BENCHMARKS.md and the measured CUDA defaults "
                        "(optgen/runtime/cuda_defaults.py, read by optgen/runtime/dispatch.py)")
    p.set_defaults(run=cmd_bench)
    p = sub.add_parser("schedule", help="plot a learning-rate schedule (terminal chart, or a PNG with -o)",
                       description="optgen schedule NAME [key=value ...] [--steps N] [--lr LR] [-o lr.png] [--explain]")
    p.add_argument("name", help="a scheduler of optgen.lr_scheduler (or SWALR)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="key=value constructor arguments and the options above")
    p.set_defaults(run=cmd_schedule)
    p = sub.add_parser("fuzz", help="differential testing: random valid specs on every backend against two references")
    p.add_argument("--seconds", type=float, default=60, help="how long to run (default 60)")
    p.add_argument("--seed", type=int, help="first seed (default: from the clock); seeds count up from it")
    p.add_argument("--out", default="fuzz-failures", help="folder for failing specs (default fuzz-failures/)")
    p.add_argument("--all-constructs", action="store_true",
                   help="also generate the constructs of known, unfixed bugs (optgen.tools.fuzz.generate.KNOWN_BUGS)")
    p.set_defaults(run=cmd_fuzz)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SpecError as e:
        print(f"optgen: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
