"""Differential testing of the compiler with random valid specs (optgen/tools/fuzz/).

Fixed seeds, so CI is deterministic: FAST_SEEDS run on the for-loop, foreach and differentiable
(``differentiable=True``) implementations, EVERY_BACKEND_SEEDS also on C (gcc) and Triton (its
interpreter, CPU tensors); each against the reference interpreter and the rule executed as plain
Python, for every flag combination and two hyperparameter configurations.  Constructs of known,
unfixed compiler bugs are left out (optgen.tools.fuzz.generate.KNOWN_BUGS); `optgen fuzz --seconds N`
runs more seeds, and tests/fuzz/regressions/ holds every failure found so far.
"""
from collections import Counter
from pathlib import Path

import pytest
import torch

from optgen.runtime import c_launch
from optgen.tools.fuzz import run
from optgen.tools.fuzz.generate import CONSTRUCTS, KNOWN_BUGS, generate

CHUNK = 20
FAST_SEEDS = range(1000, 1260)
EVERY_BACKEND_SEEDS = range(2000, 2040)
SIZE, STEPS, SHAPES = 5, 3, [(7, 5), (13,)]
REGRESSIONS = sorted((Path(__file__).parent / "regressions").glob("*.toml"))


def _failures(report):
    return "\n".join(f"seed {f.seed} {f.implementation} flags={f.flags} kwargs={f.kwargs}: "
                     f"{f.where} ({f.difference:.3g})" for f in report.failures)


@pytest.mark.parametrize("start", range(FAST_SEEDS.start, FAST_SEEDS.stop, CHUNK))
def test_random_specs_python_backends(start):
    report = run.run_batch(range(start, start + CHUNK), implementations=run.FAST, size=SIZE, steps=STEPS,
                           shapes=SHAPES)
    assert report.specs == CHUNK and report.runs > 4 * CHUNK
    assert not report.failures, _failures(report)


@pytest.mark.parametrize("start", range(EVERY_BACKEND_SEEDS.start, EVERY_BACKEND_SEEDS.stop, 8))
def test_random_specs_every_backend(start):
    pytest.importorskip("triton")
    if not c_launch.available():
        pytest.skip("no C compiler")
    report = run.run_batch(range(start, start + 8), implementations=run.ALL, size=SIZE, steps=STEPS, shapes=SHAPES)
    assert not report.failures, _failures(report)


def test_generator_is_deterministic():
    assert generate(1234).text == generate(1234).text
    assert generate(1234).text != generate(1235).text


def test_generator_covers_every_construct():
    """Over the CI seeds every construct of the spec language listed in CONSTRUCTS appears (bar
    those of known bugs, left out on purpose), most of them many times."""
    seen: Counter[str] = Counter()
    for seed in [*FAST_SEEDS, *EVERY_BACKEND_SEEDS]:
        seen.update(generate(seed, size=SIZE).constructs)
    missing = [c for c in CONSTRUCTS if seen[c] == 0 and c not in KNOWN_BUGS]
    assert not missing, f"never generated: {missing}; counts: {dict(seen)}"


def test_comparison_catches_a_wrong_result():
    """A deliberately wrong evaluator result (one state entry off by 1e-6) is reported."""
    spec = generate(1000, size=SIZE)
    clean = run.check_text(spec.text, implementations=("forloop",), steps=STEPS, shapes=SHAPES, configs=[{}])
    assert not clean.failures, _failures(clean)

    from optgen.tools.fuzz.evaluate import Evaluator

    def wrong(params, gradients, kwargs, steps):
        params, states = Evaluator(spec.text).run(params, gradients, kwargs, steps)
        name = next(k for k, v in states[0].items() if isinstance(v, torch.Tensor))
        states[0][name] = states[0][name] + 1e-6
        return params, states

    import tempfile

    from optgen.tools.fuzz.run import _compile, _load, import_package, render_package

    report = run.Report()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / spec.file_name
        path.write_text(spec.text)
        compiled = _compile(_load(path))
        package = import_package(render_package([compiled], ("forloop",)), Path(tmp) / "pkg")
        run.check_spec(spec, compiled, getattr(package, spec.name), ("forloop",), report, steps=STEPS, shapes=SHAPES,
                       evaluator_result=wrong)
    assert report.failures and all(f.implementation == "evaluator" for f in report.failures)
    assert "state" in report.failures[0].where and report.failures[0].difference > 1e-9


def test_a_failure_is_written_with_its_header(tmp_path):
    spec = generate(1001, size=SIZE)
    failure = run.Failure(1001, spec.name, "foreach", {"f0": True}, {"f0": True, "wd": 0.05}, "state s0 of param[0]",
                          1e-3, spec.text)
    path = run.write_failure(failure, tmp_path, shrink=False)
    assert path.name == "seed-1001.toml"
    text = path.read_text()
    assert text.startswith("# seed 1001: Fuzz1001\n# implementation: foreach\n# flags: f0=True\n")
    assert "# differs in: state s0 of param[0]" in text and spec.text in text


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
def test_regression_spec(path):
    """Each spec found by the fuzzer (header: the bug it showed and its seed), on every backend."""
    implementations = tuple(i for i in run.ALL if i != "c" or c_launch.available())
    report = run.check_text(path.read_text(), implementations=implementations)
    assert not report.failures, _failures(report)
