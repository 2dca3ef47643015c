"""`optgen bench` (optgen/tools/bench.py) and `optgen bench --device cuda --ready`
(optgen/tools/cuda_ready.py): what is timed, which workloads, the printed explanation, and the CUDA
defaults chosen from a measurement (made up here: no GPU where these tests were written).

Timings are never asserted: the commands run on tiny tensors with 2 repeats, and only the
tables' shape and labels are checked."""
import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optgen
from optgen.errors import SpecError
from optgen.runtime import c_launch, cuda_defaults, dispatch
from optgen.tools import bench, bench_cuda, cuda_ready

ROOT = Path(__file__).resolve().parents[2]


def optgen_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "optgen.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def rows(table: str) -> dict[str, list[str]]:
    """A Markdown table's rows: first cell → the other cells."""
    return {line.split(" | ")[0].strip("| "): [c.strip(" |") for c in line.split(" | ")[1:]]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| implementation")}


def test_bench_times_the_default_next_to_every_implementation_and_explains_the_table(tmp_path):
    output = tmp_path / "bench.md"
    result = optgen_cli("bench", "Adam", "--cases", "20x10,model", "--params", "4e3", "--tensors", "4",
                        "--repeats", "2", "--output", str(output))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    tables = out.split("### ")[1:]
    assert tables[0].startswith("Adam(lr=0.001) — 20 tensors × 10 (0.0002M params), stream bandwidth")
    assert tables[1].startswith("Adam(lr=0.001) — ") and " in 4 tensors, stream bandwidth" in tables[1]
    assert tables[2].startswith("Summary")
    ps = [torch.zeros(10, requires_grad=True)]
    ps[0].grad = torch.zeros(10)
    plain = optgen.Adam(ps, lr=1e-3)
    picked = dispatch.choose(plain, plain.param_groups[0], ps)  # what a plain optgen.Adam runs
    expected = ["torch forloop", "torch foreach", "torch fused", "optgen forloop", "optgen foreach"] \
        + (["optgen c"] if c_launch.available() else []) + [f"optgen default ({picked})"]
    for table in tables[:2]:
        assert list(rows(table)) == expected
        assert rows(table)["torch forloop"][1] == "1.00×"  # the baseline against itself
        assert "| speed-up vs torch forloop |" in table
    summary = [line.split(" | ") for line in tables[2].splitlines() if line.startswith("| ")]
    assert summary[0] == ["| optimizer", "workload", *expected[:-1], "optgen default", "roofline (ms) |"]
    # one row per workload, each cell "ms (speed-up)", the default's "ms (what it picked, speed-up)"
    assert [row[:2] for row in summary[1:]] == [["| Adam(lr=0.001)", "20 tensors × 10 (0.0002M params)"],
                                                ["| Adam(lr=0.001)", tables[1].split(" — ")[1].split(",")[0]]]
    for row in summary[1:]:
        assert row[2].endswith(" (1.00×)") and f" ({picked}, " in row[-2], row
    # the explanation is printed with the tables (not only written to --output), after them
    explanation = out[out.index("How to read these tables"):]
    for phrase in ("interleaved", "median over repeats", "The baseline is torch.optim's for-loop",
                   "optgen default (X)", "% of roofline", "shared"):
        assert phrase in explanation, phrase
    written = output.read_text()
    assert "How to read these tables" in written and written.count("### Adam(lr=0.001)") == 2


def test_the_default_row_names_what_dispatch_picked(monkeypatch):
    """The label follows dispatch (here made to pick foreach), it is not a constant."""
    monkeypatch.setattr(dispatch, "choose", lambda optimizer, group, params: "foreach")
    target = bench.resolve(["Lion"], None)[0]
    result = bench.bench_one(target, bench.parse_cases("3x4", 0, 0)[0], repeats=1)
    assert [r.label for r in result.rows][-1] == "optgen default (foreach)"
    assert result.baseline == "optgen forloop"  # torch.optim has no Lion


def test_default_workloads_add_the_tiny_tensor_cases_for_adam():
    targets = bench.resolve(["Adam", "Lion"], None)
    planned = [(t.name, c.name) for t, c in bench.plan(targets, None, 1000, 4)]
    assert planned == [("Adam", "model"), ("Adam", "1000x100"), ("Adam", "200x1000"), ("Adam", "50x20000"),
                       ("Lion", "model")]
    chosen = [(t.name, c.name) for t, c in bench.plan(targets, "50x20000", 1000, 4)]
    assert chosen == [("Adam", "50x20000"), ("Lion", "50x20000")]
    case = bench.parse_cases("1000x100", 0, 0)[0]
    assert case.shapes == ((100,),) * 1000 and case.title == "1000 tensors × 100 (0.1M params)"
    default = [t.name for t in bench.resolve([], None)]
    assert default == list(bench.WORKLOADS) and "Muon" not in default


@pytest.mark.parametrize(("args", "message"), [
    (("--cases", "50by100"), "--cases: '50by100' is neither `model` nor COUNTxSIZE"),
    (("--cases", "0x100"), "--cases: '0x100' is neither `model` nor COUNTxSIZE"),
    (("Yogi",), "bench: 'Yogi' is no spec file, spec folder, package built by `optgen build DIR --out PKG`"),
    (("Muon",), "bench does not time Muon: its parameters must be 2-D"),
    (("--only", "Yogi"), "bench has no workload for Yogi"),
    (("--ready",), "--ready measures the CUDA defaults: use it with --device cuda"),
])
def test_bench_rejects_bad_arguments_in_one_line(args, message, capsys):
    from optgen.cli import main

    assert main(["bench", *args]) == 1  # in process: an exception other than SpecError would escape
    err = capsys.readouterr().err
    assert err.startswith("optgen: error: ") and message in err and err.count("\n") == 1


def test_hyperparameters_default_to_the_specs_and_a_required_one_to_1e_3():
    class Handwritten(torch.optim.Optimizer):
        def __init__(self, params, lr, eps=1e-8, *, maximize=False):
            super().__init__(params, dict(lr=lr, eps=eps, maximize=maximize))

    assert bench.default_kwargs(Handwritten) == {"lr": 1e-3}
    assert bench.default_kwargs(optgen.AdaBelief) == {}  # every spec hyperparameter has a default
    assert bench.torch_counterpart(optgen.AdamW) is torch.optim.AdamW
    assert bench.torch_counterpart(optgen.Lion) is None


# -- CUDA ----------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
@pytest.mark.parametrize("ready", [False, True])
def test_cuda_bench_fails_clearly_without_a_gpu(ready):
    before = (ROOT / "BENCHMARKS.md").read_text(), Path(cuda_defaults.__file__).read_text()
    result = optgen_cli("bench", "--device", "cuda", *(["--ready"] if ready else []))
    assert result.returncode == 1
    assert "optgen: error: --device cuda needs a CUDA GPU: torch.cuda.is_available() is False" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert ((ROOT / "BENCHMARKS.md").read_text(), Path(cuda_defaults.__file__).read_text()) == before


def test_fastest_picks_the_best_geometric_mean_and_keeps_foreach_within_the_margin():
    measured = {
        # triton 2× and 4× faster than foreach: geometric mean 2.83×
        "Adam": {10**6: {"triton": 1.0, "foreach": 2.0, "forloop": 9.0}, 10**8: {"triton": 10.0, "foreach": 40.0}},
        # triton 1.03× faster: within the margin, foreach stays
        "SGD": {10**6: {"triton": 1.0, "foreach": 1.03, "forloop": 5.0}},
        # forloop wins (no triton kernel measured): it is chosen
        "Lamb": {10**6: {"foreach": 3.0, "forloop": 2.0}},
        # faster at one size, slower at the other: geometric mean 0.71×, foreach stays
        "NAdam": {10**6: {"triton": 1.0, "foreach": 2.0}, 10**8: {"triton": 8.0, "foreach": 2.0}},
        # foreach was not measured (it failed): no default is recorded
        "Odd": {10**6: {"triton": 1.0}},
    }
    assert cuda_ready.fastest(measured) == {"Adam": "triton", "SGD": "foreach", "Lamb": "forloop",
                                            "NAdam": "foreach"}


def _load(path: Path):
    spec = importlib.util.spec_from_file_location("fake_cuda_defaults", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_defaults_module_is_written_only_when_changed_and_reads_back(tmp_path):
    path = tmp_path / "cuda_defaults.py"
    text = cuda_ready.render_defaults({"SGD": "foreach", "Adam": "triton"}, "Fake GPU, torch 2.13, 2026-01-01")
    assert cuda_ready.write_if_changed(path, text) and not cuda_ready.write_if_changed(path, text)
    module = _load(path)
    assert module.FASTEST_ON_CUDA == {"Adam": "triton", "SGD": "foreach"}
    assert module.MEASURED_ON == "Fake GPU, torch 2.13, 2026-01-01"
    # the module shipped (never measured yet) is what the command writes for no measurement, and
    # it is the table dispatch reads
    assert Path(cuda_defaults.__file__).read_text() == cuda_ready.render_defaults({}, None)
    assert dispatch.FASTEST_ON_CUDA is cuda_defaults.FASTEST_ON_CUDA


def test_replace_section_rewrites_only_between_the_markers():
    begin, end = cuda_ready.BEGIN, cuda_ready.END
    text = f"# Benchmarks\n\nintro\n\n## CUDA\n\n{begin}\nold table\n{end}\n\n## CPU\nkept\n"
    new = cuda_ready.replace_section(text, "new table\n")
    assert new == f"# Benchmarks\n\nintro\n\n## CUDA\n\n{begin}\nnew table\n{end}\n\n## CPU\nkept\n"
    appended = cuda_ready.replace_section("# Benchmarks\n", "t")
    assert appended == f"# Benchmarks\n\n## CUDA\n\n{cuda_ready.BEGIN}\nt\n{cuda_ready.END}\n"
    shipped = (ROOT / "BENCHMARKS.md").read_text()
    assert shipped.count(cuda_ready.BEGIN) == 1 and shipped.count(cuda_ready.END) == 1


def _fake_gpu(monkeypatch, tmp_path, tests_pass: bool):
    """cuda_ready.main on a made-up GPU: its tests' outcome and measurements given, its files in tmp_path."""
    import optgen.resources

    (tmp_path / "BENCHMARKS.md").write_text(f"# Benchmarks\n\n{cuda_ready.BEGIN}\nnot measured\n{cuda_ready.END}\n")
    (tmp_path / "cuda_defaults.py").write_text(cuda_ready.render_defaults({}, None))
    monkeypatch.setattr(optgen.resources, "CHECKOUT", tmp_path)
    monkeypatch.setattr(optgen.resources, "is_checkout", lambda: True)
    monkeypatch.setattr(cuda_ready, "defaults_path", lambda: tmp_path / "cuda_defaults.py")
    monkeypatch.setattr(bench_cuda, "require_cuda", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(cuda_ready, "run_cuda_tests", lambda root: tests_pass)
    adam = bench.resolve(["Adam"], None)[0]

    def run(args):
        return [bench_cuda.Measured(adam, 10**6, [], 1000.0, None, {"triton": 1.0, "foreach": 3.0, "forloop": 9.0})], \
            ["### Adam(lr=0.001) — 1M params, copy bandwidth 1000 GB/s", "", "| a table |"]
    monkeypatch.setattr(bench_cuda, "run", run)
    return argparse.Namespace(only=None, specs=[], sizes=None, tensors=200, repeats=2, output=None)


def test_ready_writes_the_cuda_table_and_the_measured_defaults(monkeypatch, tmp_path):
    assert cuda_ready.main(_fake_gpu(monkeypatch, tmp_path, tests_pass=True)) == 0
    written = (tmp_path / "BENCHMARKS.md").read_text()
    assert "not measured" not in written and "| a table |" in written
    assert "Measured on Fake GPU, torch " in written and "the defaults it set: Adam → triton." in written
    assert _load(tmp_path / "cuda_defaults.py").FASTEST_ON_CUDA == {"Adam": "triton"}


def test_ready_writes_nothing_when_a_cuda_test_fails(monkeypatch, tmp_path):
    args = _fake_gpu(monkeypatch, tmp_path, tests_pass=False)
    before = (tmp_path / "BENCHMARKS.md").read_text(), (tmp_path / "cuda_defaults.py").read_text()
    assert cuda_ready.main(args) == 1
    assert ((tmp_path / "BENCHMARKS.md").read_text(), (tmp_path / "cuda_defaults.py").read_text()) == before


def test_ready_refuses_an_installed_optgen(monkeypatch, tmp_path):
    import optgen.resources

    monkeypatch.setattr(bench_cuda, "require_cuda", lambda: None)
    monkeypatch.setattr(optgen.resources, "is_checkout", lambda: False)
    with pytest.raises(SpecError, match="--ready writes BENCHMARKS.md and optgen/runtime/cuda_defaults.py"):
        cuda_ready.main(argparse.Namespace())
