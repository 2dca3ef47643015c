"""Malformed specs must fail with one exact, located message — and must never be executed.

Every ``malformed/NAME.toml`` is ``minimal.toml`` (a valid spec) with one mistake; its first
line says which.  ``malformed/NAME.expected`` is the exact error line the compiler must print,
``path:line:col: message``, the path relative to the repository root.  Each golden was checked by
hand: the line and column point at the offending text and the message says what is wrong.

Regenerate the goldens after an intended change of wording with::

    OPTGEN_ACCEPT=1 .venv/bin/python -m pytest tests/spec -q

and review the diff of ``tests/spec/malformed/*.expected`` before committing it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from optgen.build import build
from optgen.errors import SpecError
from optgen.passes import compile_spec
from optgen.spec.load import load_spec

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MALFORMED = HERE / "malformed"
MINIMAL = HERE / "minimal.toml"
CASES = sorted(MALFORMED.glob("*.toml"))
ACCEPT = os.environ.get("OPTGEN_ACCEPT") == "1"


def compile_error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        compile_spec(load_spec(path))
    return info.value


@pytest.fixture
def at_root(monkeypatch):
    """Messages name spec files relative to the directory they are reported from."""
    monkeypatch.chdir(ROOT)


# --------------------------------------------------------------------------- the corpus


def test_minimal_spec_compiles(at_root):
    compiled = compile_spec(load_spec(MINIMAL.relative_to(ROOT)))
    assert compiled.spec.name == "Mini"


def test_corpus_is_complete():
    assert len(CASES) >= 20
    goldens = {p.stem for p in MALFORMED.glob("*.expected")}
    if not ACCEPT:
        assert goldens == {p.stem for p in CASES}, "every case needs its golden and vice versa"


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_malformed_spec(path: Path, at_root):
    rel = path.relative_to(ROOT)
    error = compile_error(rel)
    text = str(error)
    golden = path.with_suffix(".expected")
    if ACCEPT:
        golden.write_text(text + "\n")
        return
    assert golden.is_file(), f"no golden for {rel}; run with OPTGEN_ACCEPT=1 and review it"
    assert text + "\n" == golden.read_text()
    # The location is real: this file, a line it has, a column on (or just after) that line.
    assert error.loc is not None and error.loc.path == str(rel)
    lines = path.read_text().splitlines()
    assert 1 <= error.loc.line <= len(lines)
    assert 1 <= error.loc.col <= len(lines[error.loc.line - 1]) + 1


BRANCHES = """\
if amsgrad:
    max_exp_avg = maximum(max_exp_avg, abs(exp_avg))
    denom = max_exp_avg + eps
else:
    denom = abs(exp_avg) + eps
"""
ELSE_OF_A_COMPARISON = """\
if amsgrad:
    max_exp_avg = maximum(max_exp_avg, abs(exp_avg))
if {cond}:
    denom = abs(exp_avg) + eps
elif amsgrad:
    denom = max_exp_avg + eps
else:
    denom = abs(exp_avg) + 2 * eps
"""


@pytest.mark.parametrize("cond", ["eps > 1", "not eps <= 1", "1 < eps", "eps >= lr", "eps != 1"])
def test_else_of_a_comparison_is_its_negation(cond, tmp_path):
    """No false alarm: sympy turns ``not (eps > 1)`` into ``eps <= 1``; ``denom`` is still
    assigned on every path."""
    base = MINIMAL.read_text()
    assert base.count(BRANCHES) == 1
    spec = tmp_path / "mini.toml"
    spec.write_text(base.replace(BRANCHES, ELSE_OF_A_COMPARISON.format(cond=cond)))
    compile_spec(load_spec(spec))


# --------------------------------------------------------------------------- specs are never run

PAYLOAD = "__import__('os').system('touch {marker}')"

#: (where, original text in minimal.toml, replacement with {payload})
INJECTIONS = [
    ("default", "eps = 1e-8", 'eps = "{payload}"'),
    ("default_list_item", "beta = 0.9", 'beta = {{ default = [0.9, "{payload}"], names = ["b1", "b2"] }}'),
    ("init", 'exp_avg = "zeros_like(param)"', 'exp_avg = "{payload}"'),
    ("init_full_like", 'exp_avg = "zeros_like(param)"', 'exp_avg = "full_like(param, {payload})"'),
    ("first", 'exp_avg = "zeros_like(param)"', 'exp_avg = {{ first = "{payload}" }}'),
    ("state_when", 'when = "amsgrad"', 'when = "{payload}"'),
    ("state_key", 'exp_avg = "zeros_like(param)"',
     """exp_avg = {{ init = "zeros_like(param)", key = 'x"] = {payload}; state["x' }}"""),
    ("rule_value", "step = step + 1\n", "step = step + 1\nx = {payload}\n"),
    ("rule_statement", "step = step + 1\n", "step = step + 1\n{payload}\n"),
    ("rule_condition", "if amsgrad:\n", "if {payload}:\n"),
    ("check_assert", 'assert = "0.0 <= lr"', 'assert = "{payload}"'),
    ("check_when", 'assert = "0.0 <= lr"', 'when = "{payload}"\nassert = "0.0 <= lr"'),
    # The message becomes an f-string in the generated constructor: no code may hide in a field.
    ("check_message_field", 'error = "Invalid learning rate: {lr}"',
     """error = 'Invalid learning rate: {{lr[{payload}]}}'"""),
    ("check_message_format_spec", 'error = "Invalid learning rate: {lr}"',
     """error = 'Invalid learning rate: {{lr:{{{payload}}}}}'"""),
    ("signature", 'signature = "lr, beta, eps, amsgrad, *, maximize"',
     'signature = "lr, beta, eps, amsgrad, *, maximize, {payload}"'),
]


@pytest.mark.parametrize("where, old, new", INJECTIONS, ids=[i[0] for i in INJECTIONS])
def test_spec_text_is_never_executed(where, old, new, tmp_path):
    marker = tmp_path / "pwned_optgen"
    base = MINIMAL.read_text()
    assert base.count(old) == 1
    payload = PAYLOAD.format(marker=marker)
    if "'" in new.split("{payload}")[0].splitlines()[-1]:  # inside a TOML '...' string
        payload = payload.replace("'", '"')
    spec = tmp_path / "mini.toml"
    spec.write_text(base.replace(old, new.format(payload=payload)))
    assert str(marker) in spec.read_text()
    with pytest.raises(SpecError):
        compile_spec(load_spec(spec))
    assert not marker.exists()


# --------------------------------------------------------------------------- build: one door to disk


def copy_project(tmp: Path) -> Path:
    for folder in ("specs", "templates", "generated"):
        shutil.copytree(ROOT / folder, tmp / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_build_leaves_generated_unchanged(tmp_path, monkeypatch):
    root = copy_project(tmp_path)
    monkeypatch.chdir(root)
    before = snapshot(root / "generated")
    optimizers = root / "specs" / "optimizers"
    # A successful build would now rewrite adam.py (its doc changed) ...
    adam = optimizers / "adam.toml"
    adam.write_text(adam.read_text().replace('doc = "Keeps', 'doc = "Still keeps'))
    # ... but a spec sorted after it is broken, so nothing may be written at all.
    shutil.copy(MALFORMED / "unknown_function.toml", optimizers / "zz_broken.toml")
    with pytest.raises(SpecError) as info:
        build(root=root)
    assert "zz_broken.toml:29:19: unknown function 'max'" in str(info.value)
    after = snapshot(root / "generated")
    assert sorted(after) == sorted(before)
    assert after == before


def test_check_lists_stale_files(tmp_path, monkeypatch):
    root = copy_project(tmp_path)
    monkeypatch.chdir(root)  # generated headers name the spec relative to where optgen runs
    assert build(root=root, check=True) == []
    sgd = root / "generated" / "sgd.py"
    edited = sgd.read_bytes() + b"# edited by hand\n"
    sgd.write_bytes(edited)
    assert build(root=root, check=True) == ["sgd.py"]
    assert sgd.read_bytes() == edited  # --check only reads
