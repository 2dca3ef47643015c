"""The `optgen` command as a user runs it (a subprocess, so exit codes and streams are real)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def optgen(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "optgen.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_generated_package_is_up_to_date():
    result = optgen("build", "--check")
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_show_prints_spec_ir_and_readable_code():
    result = optgen("show", "Adam")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for section in ("==== spec", "==== IR after passes", "==== forloop code", "==== foreach code",
                    "==== optimizer code"):
        assert section in out
    assert "exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)" in out
    assert "foreach_addcdiv_(params, exp_avgs, denoms, [-step_size for step_size in step_sizes])" in out
    assert "# exp_avg = lerp(exp_avg, grad, 1 - beta1)" in out  # the spec line above its code


def test_show_dump_ir_and_flags():
    result = optgen("show", "Adam", "--flags", "amsgrad=true", "--dump-ir", "hoist_scalars")
    assert result.returncode == 0, result.stderr
    assert "Maximum(max_exp_avg_sq, exp_avg_sq)" in result.stdout


def test_list_names_every_spec():
    result = optgen("list")
    assert result.returncode == 0
    for name in ("SGD", "Adam", "AdamW", "Adagrad"):
        assert name in result.stdout


@pytest.mark.parametrize("args,message", [
    (("show", "NoSuchOptimizer"), "no spec named 'NoSuchOptimizer'"),
    (("show", "Adam", "--flags", "bogus=1"), "Adam has no flag 'bogus'"),
    (("show", "Adam", "--dump-ir", "nopass"), "unknown pass 'nopass'"),
])
def test_user_mistakes_are_one_line_errors_without_traceback(args, message):
    result = optgen(*args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_build_is_byte_identical_when_rerun(tmp_path):
    from optgen.build import compile_all, render_all

    assert render_all(compile_all()) == render_all(compile_all())


def test_new_scaffold_compiles(tmp_path, monkeypatch):
    from optgen import cli
    from optgen.build import build, user_target

    monkeypatch.chdir(tmp_path)
    assert cli.main(["new", "Toy"]) == 0  # into the current folder
    result = build(target=user_target([tmp_path / "toy.toml"], tmp_path / "toys"))
    assert "toy.py" in result.written and "toy_forloop.py" in result.written
    assert result.verified == ["Toy"]


def test_import_optgen_is_light():
    """`import optgen` loads no compiler, Triton or C toolchain, and using an optimizer loads no
    compiler (constructing any torch optimizer imports torch._dynamo, hence sympy and triton,
    so those are only checked at import)."""
    code = ("import sys, torch, optgen; a = sorted(m for m in ('triton', 'sympy', 'jinja2', 'optgen.spec', "
            "'optgen.passes', 'optgen.generated') if m in sys.modules); "
            "p = torch.zeros(2, requires_grad=True); p.grad = torch.ones(2); optgen.Adam([p]).step(); "
            "b = sorted(m for m in ('jinja2', 'optgen.spec', 'optgen.passes', 'optgen.backends') if m in sys.modules); "
            "print(a, b)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []"


def test_bench_vs_compiled_prints_a_row_per_implementation_and_every_column():
    """`optgen bench --vs-compiled` (optgen/tools/bench_compile.py) on tiny tensors; backend "eager"
    traces each step with dynamo (graphs are counted) without inductor's minutes of code generation."""
    result = optgen("bench", "--vs-compiled", "--only", "SGD,NAdam", "--cases", "3x8,2x5", "--repeats", "3",
                    "--compile-backend", "eager")
    assert result.returncode == 0, result.stderr
    tables = [block for block in result.stdout.split("### ")[1:]]
    assert [t.split("(")[0] for t in tables] == ["SGD", "NAdam", "SGD", "NAdam"]
    assert "3 × 8 fp32 parameters" in tables[0] and "2 × 5 fp32 parameters" in tables[2]
    for table in tables:
        rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()
                if line.startswith("| ") and not line.startswith("| implementation")}
        expected = ["torch forloop", "torch foreach", "torch compiled", "optgen forloop compiled",
                    "optgen foreach compiled", "optgen c", "optgen c compiled"]
        if table.startswith("SGD"):  # torch has a fused CPU kernel for SGD, not for NAdam
            expected.insert(2, "torch fused")
        assert list(rows) == expected
        assert all(len(cells) == 6 for cells in rows.values())  # the label and six numbers
        assert rows["torch forloop"][2] == "1.00×"  # the baseline against itself
        for label, cells in rows.items():
            graphs = int(cells[5].rstrip(" |"))
            # eager steps trace nothing; each compiled one at least one graph (0 breaks, Note
            # [Timing compilation]: a second one when the first step created the state)
            assert (graphs > 0) == label.endswith("compiled"), (label, graphs)


@pytest.mark.parametrize(("args", "message"), [
    (("--cases", "50by100"), "--cases: '50by100' is not COUNTxSIZE"),
    (("--only", "Lion"), "bench --vs-compiled has no workload for Lion"),
])
def test_bench_vs_compiled_rejects_bad_arguments(args, message):
    result = optgen("bench", "--vs-compiled", *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
