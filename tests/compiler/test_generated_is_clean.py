"""The generated package passes pyflakes' checks (ruff's F rules): no unused import, no unused
local, no undefined name — the templates import what the code they print uses, nothing else."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("ruff") is None and not (ROOT / ".venv/bin/ruff").exists(), reason="no ruff")
def test_generated_code_has_no_pyflakes_findings():
    ruff = shutil.which("ruff") or str(ROOT / ".venv/bin/ruff")
    # --isolated: the project's config excludes generated/ from the style rules
    result = subprocess.run([ruff, "check", "--isolated", "--select", "F", str(ROOT / "generated")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_constructor_checks_print_without_double_negation():
    # A check asserting `not (foreach and not capturable)` fails on `foreach and not capturable`
    # (torch's own wording of the condition), not on `not (not (...))`.
    texts = {path.name: path.read_text() for path in (ROOT / "generated").glob("*.py")}
    assert not [name for name, text in texts.items() if "not (not " in text]
    assert "if isinstance(lr, Tensor) and foreach and (not capturable):" in texts["adam.py"]
