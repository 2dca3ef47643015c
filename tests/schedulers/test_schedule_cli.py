"""`optgen schedule`: the terminal chart and the PNG."""
from __future__ import annotations

import struct
import zlib

from optgen.cli import main
from optgen.schedules.plot import ascii_chart
from optgen.schedules.show import learning_rates


def test_terminal_chart(capsys):
    assert main(["schedule", "CosineAnnealingLR", "--steps", "50", "T_max=50", "eta_min=0.001"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "CosineAnnealingLR(T_max=50, eta_min=0.001), lr=0.1: 50 steps"
    assert lines[1].strip().startswith("0.1 |*")    # starts at the top …
    assert lines[-3].rstrip().endswith("*")        # … ends at the bottom
    assert "(step)" in lines[-1] and "49" in lines[-1]


def test_arguments_before_and_after_options(capsys):
    assert main(["schedule", "CyclicLR", "--steps", "40", "base_lr=0.01", "max_lr=0.1", "step_size_up=5",
                 "mode=triangular2", "--lr", "0.5"]) == 0
    assert "CyclicLR(base_lr=0.01, max_lr=0.1, step_size_up=5, mode='triangular2')" in capsys.readouterr().out


def test_png(tmp_path, capsys):
    path = tmp_path / "lr.png"
    assert main(["schedule", "OneCycleLR", "max_lr=1.0", "total_steps=100", "--steps", "100", "-o", str(path)]) == 0
    assert "wrote" in capsys.readouterr().out
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (800, 400)
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)
    assert raw.count(bytes([31, 119, 180])) > 200  # the curve is drawn


def test_explain_and_errors(capsys):
    assert main(["schedule", "StepLR", "step_size=10", "--steps", "30", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "lr = base_lr * gamma ** (t // step_size)" in out and "lr(t-1) * gamma" in out
    assert main(["schedule", "NoSuchLR"]) == 1
    assert "no scheduler named 'NoSuchLR'" in capsys.readouterr().err
    assert main(["schedule", "LambdaLR"]) == 1
    assert "takes a Python callable" in capsys.readouterr().err
    assert main(["schedule", "OneCycleLR", "max_lr=1", "total_steps=10", "--steps", "20"]) == 1
    assert "Tried to step 11 times" in capsys.readouterr().err


def test_values_are_the_schedulers():
    values = learning_rates("StepLR", 10, 1.0, {"step_size": 3, "gamma": 0.5})
    assert values == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]
    assert ascii_chart([1.0, 1.0]).count("*") == 2
