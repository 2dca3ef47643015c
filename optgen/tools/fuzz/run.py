"""Build random specs, run every implementation, compare with both references, report.

Note [Fuzzing many specs in one package]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Building is the slow part, so a batch of random specs becomes ONE package in a temporary
directory (one import), and the C kernels of all of them are compiled as ONE library (one gcc
run instead of one per spec; each kernel function is named after its module, so the sources
concatenate).  Nothing is cached outside the temporary directory: ``$OPTGEN_CACHE_DIR`` points
into it while the batch runs.  A spec that fails to load or compile is reported on its own and
left out of the package, so one compiler crash does not hide the other specs' results.

Every implementation (forloop, foreach, differentiable — through the constructor's
``differentiable=True`` —, c, triton in Triton's interpreter on CPU tensors) runs every flag
combination and each of the spec's hyperparameter configurations for a few steps on float64
tensors of a few shapes; params and every state are compared with the reference interpreter
(``optgen.verify.run_reference``) and with the rule executed as plain Python
(:mod:`optgen.tools.fuzz.evaluate`), and the two references with each other.
"""
from __future__ import annotations

import ast
import contextlib
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from optgen import verify
from optgen.tools.fuzz.evaluate import Evaluator
from optgen.tools.fuzz.generate import KNOWN_BUGS, RandomSpec, generate

#: the implementations; FAST ones run for every spec, the others for a subset (see run_batch)
FAST = ("forloop", "foreach", "differentiable")
ALL = FAST + ("c", "triton")
SHAPES = [(7, 5), (13,), (3, 4, 2)]
STEPS = 4
TOLERANCE = 1e-9


@dataclass
class Failure:
    seed: int
    name: str
    implementation: str   # an implementation, "evaluator" (interpreter vs evaluator), "load" or "compile"
    flags: dict
    kwargs: dict
    where: str            # the param or state that differed, or the exception
    difference: float
    text: str

    def header(self) -> str:
        flags = ", ".join(f"{k}={v}" for k, v in self.flags.items()) or "none"
        lines = [f"seed {self.seed}: {self.name}", f"implementation: {self.implementation}", f"flags: {flags}",
                 f"hyperparameters: {self.kwargs}", f"differs in: {self.where}",
                 f"relative difference: {self.difference:.3g}"]
        return "".join(f"# {line}\n" for line in "\n".join(lines).splitlines())


@dataclass
class Report:
    specs: int = 0
    runs: int = 0
    failures: list[Failure] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.specs} specs, {self.runs} runs, {len(self.failures)} failures"


# -- comparing ---------------------------------------------------------------------------------
def difference(result, reference) -> tuple[float, str]:
    """Largest difference of params and states, relative to the reference's magnitude (and absolute
    below 1e-3, where cancellation makes relative differences meaningless), and where it is."""
    (pa, sa), (pb, sb) = result, reference
    worst, where = 0.0, ""
    pairs = [(f"param[{i}]", x, y) for i, (x, y) in enumerate(zip(pa, pb, strict=True))]
    for i, (s1, s2) in enumerate(zip(sa, sb, strict=True)):
        if set(s1) != set(s2):
            return float("inf"), f"state keys of param[{i}]: {sorted(s1)} vs {sorted(s2)}"
        pairs += [(f"state {k} of param[{i}]", s1[k], s2[k]) for k in s1]
    for name, x, y in pairs:
        x = torch.as_tensor(x, dtype=torch.float64).detach()
        y = torch.as_tensor(y, dtype=torch.float64).detach()
        if x.shape != y.shape:
            return float("inf"), f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if not x.numel():
            continue
        both_nan = torch.isnan(x) & torch.isnan(y)
        d = ((x - y).abs() / (1e-3 + y.abs())).masked_fill(both_nan, 0.0)
        d = d.nan_to_num(nan=float("inf"))
        if d.max().item() > worst:
            worst, where = d.max().item(), name
    return worst, where


# -- building ----------------------------------------------------------------------------------
def _load(path: Path):
    from optgen.spec.load import load_spec

    return load_spec(path)


def _compile(spec):
    from optgen.passes import compile_spec

    return compile_spec(spec)


def render_package(compiled: list, implementations: tuple[str, ...]) -> dict[str, str]:
    """File name → text of a package with these specs and only these kernel backends (optgen.build's
    rendering, without the schedulers)."""
    from optgen.build import render_spec

    files = {}
    for c in compiled:
        files.update(render_spec(c, implementations))
    files["__init__.py"] = "".join(f"from .{c.spec.name.lower()} import {c.spec.name}\n" for c in compiled)
    return files


def import_package(files: dict[str, str], root: Path):
    """Imports the package under ``root``, inside the batch's temporary folder (removed with it)."""
    from optgen.packages import import_rendered

    return import_rendered(files, "fuzz", parent=root)


def _one_c_library(package, compiled: list) -> None:
    """Point every C kernel of the package at one library of all their sources (Note [Fuzzing many
    specs in one package]); where that does not compile, each keeps its own."""
    from optgen.backends.base import module_name
    from optgen.runtime.c_launch import Library

    found = [getattr(package, module_name(c.spec.name, "c"), None)
             or sys.modules.get(f"{package.__name__}.{module_name(c.spec.name, 'c')}") for c in compiled]
    modules = [m for m in found if m is not None]
    if len(modules) < 2:
        return
    merged = Library(f"{package.__name__}.all_c", "\n".join(m.SOURCE for m in modules))
    try:
        merged._compile(torch.float64)
    except RuntimeError:
        return
    for m in modules:
        m.LAUNCH.library = merged


# -- running -----------------------------------------------------------------------------------
def _run_implementation(compiled, cls, implementation: str, kwargs: dict, steps: int, shapes):
    if implementation == "differentiable":
        # Through the constructor, as a user gets it; params that are not leaves (as autograd wants)
        params = [p.clone().requires_grad_() for p in verify.initial_params(cls, shapes=shapes)]
        work = [p.clone() for p in params]
        opt = cls(work, **kwargs, differentiable=True)
        for k in range(steps):
            for p, g in zip(work, verify.gradients(k, work), strict=True):
                p.grad = g
            opt.step()
        keys = {s.key: s.name for s in compiled.spec.state.values()}
        counters = {s.name for s in compiled.spec.state.values() if s.is_scalar}
        states = [{keys[k]: (float(v) if keys[k] in counters else v.detach()) for k, v in opt.state[p].items()}
                  for p in work]
        return [p.detach() for p in work], states
    return verify.run_backend(compiled, implementation, kwargs, steps, cls=cls, shapes=shapes)


def check_spec(spec: RandomSpec, compiled, cls, implementations, report: Report, *, steps: int = STEPS,
               shapes=SHAPES, evaluator_result=None, only_flags: dict | None = None) -> None:
    """Every flag variant × configuration × implementation of one built spec (``only_flags``: just
    that variant; ``evaluator_result``: replaces the evaluator, for the test that a wrong result is
    caught)."""
    with verify.float64_counters():  # as `optgen verify` and the build's cross-check run
        _check_spec(spec, compiled, cls, implementations, report, steps, shapes, evaluator_result, only_flags)


def _check_spec(spec, compiled, cls, implementations, report, steps, shapes, evaluator_result, only_flags):
    evaluator = Evaluator(spec.text)
    params0 = verify.initial_params(cls, shapes=shapes)
    impls = [i for i in implementations if i in cls._kernels]
    for variant in compiled.variants:
        flags = dict(variant.flags)
        if only_flags is not None and flags != only_flags:
            continue
        for config in spec.configs:
            kwargs = {**flags, **config}

            def fail(implementation, where, diff):
                report.failures.append(Failure(spec.seed, spec.name, implementation, flags, kwargs, where, diff,
                                               spec.text))
            try:
                reference = verify.run_reference(compiled, kwargs, steps, cls=cls, shapes=shapes)
            except Exception as e:  # noqa: BLE001 - a crash of the interpreter is a finding
                fail("interpreter", _exception(e), float("inf"))
                continue
            plain = (evaluator_result or evaluator.run)(params0, verify.gradients, kwargs, steps)
            report.runs += 1
            diff, where = difference(plain, reference)
            if not diff <= TOLERANCE:
                fail("evaluator", where, diff)
                continue
            for implementation in impls:
                report.runs += 1
                try:
                    result = _run_implementation(compiled, cls, implementation, kwargs, steps, shapes)
                except Exception as e:  # noqa: BLE001
                    fail(implementation, _exception(e), float("inf"))
                    continue
                diff, where = difference(result, reference)
                if not diff <= TOLERANCE:
                    fail(implementation, where, diff)
                    continue
                diff, where = difference(result, plain)
                if not diff <= TOLERANCE:
                    fail(implementation + " (vs evaluator)", where, diff)


def _exception(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" (at {Path(last.filename).name}:{last.lineno})" if last else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{at}"[:300]


def run_batch(seeds, *, implementations=ALL, avoid=None, size: int = 8, steps: int = STEPS, shapes=SHAPES,
              report: Report | None = None) -> Report:
    """Generates, builds (as one package) and checks the specs of ``seeds``."""
    report = report or Report()
    with tempfile.TemporaryDirectory(prefix="optgen-fuzz-") as tmp, _cache_in(Path(tmp) / "cache"):
        root = Path(tmp)
        (root / "specs").mkdir()
        good = []
        for seed in seeds:
            spec = generate(seed, avoid=avoid, size=size)
            report.specs += 1
            path = root / "specs" / spec.file_name
            path.write_text(spec.text)
            stage = "load"
            try:
                loaded = _load(path)
                stage = "compile"
                good.append((spec, _compile(loaded)))
            except Exception as e:  # noqa: BLE001 - SpecError from load: a generator bug, else the compiler's
                report.failures.append(Failure(seed, spec.name, stage, {}, {}, _exception(e), float("inf"), spec.text))
        if not good:
            return report
        try:
            package = import_package(render_package([c for _, c in good], implementations), root / "pkg")
        except Exception as e:  # noqa: BLE001 - one module does not render or import: build them one by one
            if len(good) == 1:
                spec, _ = good[0]
                report.failures.append(Failure(spec.seed, spec.name, "render", {}, {},
                                               _exception(e), float("inf"), spec.text))
                return report
            for spec, _ in good:
                report.specs -= 1
                run_batch([spec.seed], implementations=implementations, avoid=avoid, size=size, steps=steps,
                          shapes=shapes, report=report)
            return report
        if "c" in implementations:
            _one_c_library(package, [c for _, c in good])
        for spec, compiled in good:
            check_spec(spec, compiled, getattr(package, spec.name), implementations, report, steps=steps,
                       shapes=shapes)
    return report


@contextlib.contextmanager
def _cache_in(directory: Path):
    old = os.environ.get("OPTGEN_CACHE_DIR")
    os.environ["OPTGEN_CACHE_DIR"] = str(directory)
    try:
        yield
    finally:
        if old is None:
            del os.environ["OPTGEN_CACHE_DIR"]
        else:
            os.environ["OPTGEN_CACHE_DIR"] = old


# -- reporting ---------------------------------------------------------------------------------
def _fails_like(failure: Failure, implementations, steps, shapes):
    """A predicate for the shrinker: does a spec text fail the same way (same implementation kind)?"""
    from optgen.errors import SpecError

    impl = failure.implementation.split(" ")[0]
    config = {k: v for k, v in failure.kwargs.items() if k not in failure.flags}

    def still_fails(text: str) -> bool:
        if failure.implementation in ("load", "compile", "render"):
            report = check_text(text, failure.seed, implementations=implementations, run=False)
        else:
            report = check_text(text, failure.seed, implementations=(impl,) if impl in ALL else (),
                                steps=steps, shapes=shapes, configs=[config], only_flags=failure.flags)
        return any(f.implementation == failure.implementation and _same_kind(f.where, failure.where)
                   for f in report.failures)

    def loads(text: str) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "x.toml"
            path.write_text(text)
            try:
                _load(path)
            except SpecError:
                return False
            except Exception:  # noqa: BLE001 - a loader crash is kept only when that is the failure
                return failure.implementation == "load"
        return True
    return still_fails, loads


def _same_kind(a: str, b: str) -> bool:
    """Two failure descriptions name the same problem: a difference, or the same exception with the
    same message once file locations are left out (a SpecError of another kind is another failure:
    the shrinker must not drift from "'u' is a scalar but this value is a tensor" to "unknown name")."""
    def kind(s: str) -> str:
        if s.startswith(("param", "state")) or ":" not in s:
            return "difference"
        s = re.sub(r"\S*:\d+:\d+: ", "", s)          # path:line:col of a spec
        s = re.sub(r" \(at [^)]*\)$", "", s)           # where in optgen it was raised
        return re.sub(r"'\w+'", "'…'", s)             # names may be renamed by shrinking
    return kind(a) == kind(b)


def check_text(text: str, seed: int = 0, *, implementations=ALL, steps: int = STEPS, shapes=SHAPES,
               configs: list[dict] | None = None, only_flags: dict | None = None, run: bool = True) -> Report:
    """Runs one spec text (a regression spec, or a candidate of the shrinker) like a generated one;
    its configurations are those of its ``# configs:`` line unless given (``run=False``: only build)."""
    from optgen.tools.fuzz.generate import RandomSpec

    found = re.search(r'^name = "(\w+)"', text, re.M)
    if found is None:
        raise ValueError("a spec text names itself: no `name = \"...\"` line")
    name = found.group(1)
    configs = configs if configs is not None else _configs_of(text)
    flags = tuple(re.findall(r"^(\w+) = (?:true|false)$", text, re.M))
    spec = RandomSpec(seed, name, text, flags, configs)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="optgen-fuzz-") as tmp, _cache_in(Path(tmp) / "cache"):
        root = Path(tmp)
        path = root / f"{name.lower()}.toml"
        path.write_text(text)
        report.specs += 1
        stage = "load"
        try:
            loaded = _load(path)
            stage = "compile"
            compiled = _compile(loaded)
            stage = "render"
            package = import_package(render_package([compiled], implementations), root / "pkg")
        except Exception as e:  # noqa: BLE001
            report.failures.append(Failure(seed, name, stage, {}, {}, _exception(e), float("inf"), text))
            return report
        if run:
            check_spec(spec, compiled, getattr(package, name), implementations, report, steps=steps, shapes=shapes,
                       only_flags=only_flags)
    return report


def _configs_of(text: str) -> list[dict]:
    """The hyperparameter configurations written in a spec's ``# configs:`` comment, else the defaults."""
    m = re.search(r"^# configs: (.*)$", text, re.M)
    return ast.literal_eval(m.group(1)) if m else [{}]  # a literal list of dicts: read, never run


def write_failure(failure: Failure, out_dir: Path, *, shrink: bool = True, implementations=ALL,
                  steps: int = STEPS, shapes=SHAPES, shrink_seconds: float = 60) -> Path:
    """The failing spec (shrunk when possible) with a comment header, as ``out_dir/seed-<n>.toml``."""
    from optgen.tools.fuzz.generate import generate

    text = failure.text
    spec = generate(failure.seed) if f'"Fuzz{failure.seed}"' in text else None
    configs = spec.configs if spec else [{}]
    text = f"# configs: {configs!r}\n" + text
    if shrink:
        from optgen.tools.fuzz.shrink import shrink as shrink_text

        still_fails, loads = _fails_like(failure, implementations, steps, shapes)
        try:
            text = shrink_text(text, still_fails, loads=loads, budget=300, seconds=shrink_seconds)
        except Exception:  # noqa: BLE001 - a shrinker problem must not lose the failure
            pass
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"seed-{failure.seed}.toml"
    path.write_text(failure.header() + text)
    return path


def fuzz(seconds: float, *, seed: int | None = None, out: Path = Path("fuzz-failures"), batch: int = 8,
         implementations=ALL, avoid=None, shrink: bool = True, log=print) -> Report:
    """Random seeds (from ``seed`` on, else from the clock) for about ``seconds``; failing specs are
    written to ``out``."""
    start = time.monotonic()
    next_seed = seed if seed is not None else int(time.time()) % 1_000_000 * 1000
    report = Report()
    written = set()
    while time.monotonic() - start < seconds:
        seeds = range(next_seed, next_seed + batch)
        next_seed += batch
        before = len(report.failures)
        run_batch(seeds, implementations=implementations, avoid=avoid, report=report)
        for failure in report.failures[before:]:
            if failure.seed in written:
                continue
            written.add(failure.seed)
            path = write_failure(failure, out, shrink=shrink, implementations=implementations)
            log(f"seed {failure.seed}: {failure.implementation} differs in {failure.where} -> {path}")
    return report


__all__ = ["ALL", "FAST", "KNOWN_BUGS", "Failure", "Report", "check_text", "difference", "fuzz", "run_batch",
           "write_failure"]
