"""docs/tutorial.md, followed literally: a fresh virtual environment with a regular (non-editable)
install of optgen, then every file the page shows written and every command it shows run in an
empty project folder, each output compared with the page's.

What may differ from the page is normalised, and nothing else: the project folder's path, the
seconds a build took, the benchmark's timings (its table's shape and rows must match), differences
below 1e-9 printed by `optgen verify` (rounding, which depends on the CPU), and the training
losses' last digit (float32 matmuls differ between CPUs).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "docs" / "tutorial.md"
PROJECT = "/home/me/yogi-project"  # where the page pretends to run


def steps(text: str):
    """("file", path, content) and ("run", command, expected output lines), in page order."""
    lines = text.splitlines()
    i = 0
    pending_file = None
    while i < len(lines):
        line = lines[i]
        marker = re.fullmatch(r"<!-- file: (\S+) -->", line.strip())
        if marker:
            pending_file = marker.group(1)
        elif line.startswith("```"):
            kind = line[3:].strip()
            end = lines.index("```", i + 1)
            body = lines[i + 1:end]
            if pending_file is not None:
                yield "file", pending_file, "\n".join(body) + "\n"
                pending_file = None
            elif kind == "console":
                command: str | None = None
                output: list[str] = []
                for b in body:
                    if b.startswith("$ "):
                        if command is not None:
                            yield "run", command, output
                        command, output = b[2:], []
                    else:
                        output.append(b)
                if command is not None:
                    yield "run", command, output
            i = end
        i += 1


def normalise(text: str, folder: str) -> list[str]:
    out = []
    for line in text.replace(folder, PROJECT).splitlines():
        line = re.sub(r"\(\d+\.\d+ s\)", "(T s)", line)
        line = re.sub(r"\b\d\.\de-\d\d\b", lambda m: "<1e-9" if float(m.group()) < 1e-9 else m.group(), line)
        if line.startswith(("| optgen", "### ", "optgen bench: ")):  # benchmark rows and machine: timings vary
            line = re.sub(r"\d+(\.\d+)?", "N", line)
        line = re.sub(r"final loss (\d\.\d\d)\d", r"final loss \1x", line)
        out.append(line.rstrip())
    while out and not out[-1]:
        out.pop()
    return out


def test_steps_are_found():
    """The parser sees the page's files and commands (so the test below cannot pass vacuously)."""
    found = list(steps(TUTORIAL.read_text()))
    files = [s[1] for s in found if s[0] == "file"]
    commands = [s[1] for s in found if s[0] == "run"]
    assert files == ["my_specs/yogi.toml", "train.py"]
    assert commands[0].startswith("python3 -m venv .venv") and "python train.py" in commands
    assert sum(c.startswith("optgen ") for c in commands) >= 6


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="the tutorial's fused=True step compiles a C kernel")
def test_tutorial_runs_as_written(tmp_path):
    folder = tmp_path / "yogi-project"
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{folder / '.venv' / 'bin'}:{env.get('PATH', '')}"
    env["OPTGEN_CACHE_DIR"] = str(tmp_path / "cache")
    for kind, what, content in steps(TUTORIAL.read_text()):
        if kind == "file":
            (folder / what).write_text(content)
            continue
        command = what.replace("/path/to/optgen", str(ROOT)).replace("python3 -m venv", f"{sys.executable} -m venv")
        if command.startswith("source "):  # activation: PATH above does what it does
            continue
        result = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True,
                                timeout=600)
        shown = normalise(result.stdout + result.stderr, str(folder))
        expected = normalise("\n".join(content), str(folder))
        if command.startswith(f"{sys.executable} -m venv"):
            assert result.returncode == 0, result.stdout + result.stderr
            # a regular install: optgen's files are in the venv's site-packages, not this checkout
            python = str(folder / ".venv" / "bin" / "python")
            where = subprocess.run([python, "-c", "import optgen; print(optgen.__file__)"],
                                   capture_output=True, text=True, env=env, cwd=folder)
            assert "site-packages" in where.stdout and str(ROOT) not in where.stdout, where.stdout + where.stderr
            continue
        assert shown == expected, f"$ {what}\n" + "\n".join(shown)
    # the build wrote into the project, and nothing into the installed optgen
    assert (folder / "my_optimizers" / "yogi_c.py").is_file()
