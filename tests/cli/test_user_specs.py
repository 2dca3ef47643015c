"""A user's own spec folder: `optgen new --dir`, `optgen build DIR --out PKG`, the package it writes,
incremental builds, the build's cross-check, and `optgen list/show/verify/bench` on spec files.

The commands run as a user runs them (a subprocess, `python -m optgen`), in a temporary project
folder that is not the repository."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optgen.build import MANIFEST, build, user_target
from optgen.errors import SpecError

ROOT = Path(__file__).resolve().parents[2]

YOGI = '''# Yogi: Adam whose second moment moves additively (Zaheer et al., 2018).
[optimizer]
name = "Yogi"
signature = "lr, betas, eps, *, maximize, foreach, differentiable, fused"

[hyperparameters]
lr = 1e-2
betas = { default = [0.9, 0.999], names = ["beta1", "beta2"] }
eps = 1e-3
maximize = false

[state]
step = "0"
exp_avg = "zeros_like(param)"
exp_avg_sq = "zeros_like(param)"

[update]
rule = """
if maximize:
    grad = -grad
step = step + 1
exp_avg = lerp(exp_avg, grad, 1 - beta1)
grad_sq = grad * grad
exp_avg_sq = exp_avg_sq - (1 - beta2) * sign(exp_avg_sq - grad_sq) * grad_sq
denom = sqrt(exp_avg_sq) / sqrt(1 - beta2 ** step) + eps
param = param - lr / (1 - beta1 ** step) * exp_avg / denom
"""
'''


def optgen(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "optgen", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture
def project(tmp_path):
    specs = tmp_path / "my_specs"
    specs.mkdir()
    (specs / "yogi.toml").write_text(YOGI)
    return tmp_path


def test_new_writes_into_the_folder_given_never_into_optgen(tmp_path):
    before = sorted((ROOT / "specs" / "optimizers").iterdir())
    (tmp_path / "specs").mkdir()
    result = optgen("new", "Toy", "--dir", "specs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "specs" / "toy.toml").is_file()
    assert sorted((ROOT / "specs" / "optimizers").iterdir()) == before
    again = optgen("new", "Toy", "--dir", "specs", cwd=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_build_a_spec_folder_into_a_package_and_use_it(project):
    (project / "my_specs" / "adamw_wide.toml").write_text(
        '[optimizer]\nname = "AdamWWide"\nextends = "AdamW"\n\n[hyperparameters]\nlr = 0.01\n')
    result = optgen("build", "my_specs", "--out", "my_optimizers", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "2 spec(s) compiled, 2 cross-checked" in result.stdout
    package = project / "my_optimizers"
    assert {"__init__.py", "yogi.py", "yogi_forloop.py", "yogi_c.py", "adamwwide.py",
            "adamwwide_forloop.py"} <= {p.name for p in package.iterdir()}
    # Only optgen (and the folder holding the package) is needed to use it.
    code = ("import torch, my_optimizers as m; p = torch.nn.Parameter(torch.ones(3)); "
            "opt = m.Yogi([p]); p.grad = torch.ones(3); opt.step(); "
            "q = torch.nn.Parameter(torch.ones(3)); w = m.AdamWWide([q]); q.grad = torch.ones(3); w.step(); "
            "print(sorted(m.OPTIMIZERS), sorted(opt.state[p]), w.defaults['lr'], p.detach().tolist())")
    run = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert "['AdamWWide', 'Yogi']" in run.stdout and "['exp_avg', 'exp_avg_sq', 'step']" in run.stdout
    assert " 0.01 " in run.stdout
    # Yogi's first step from zero state: exp_avg_sq = (1 - beta2) g², so the step is
    # lr · g / (|g| + eps) (bias-corrected): 1 - 0.01 / (1 + 1e-3)
    values = [float(v) for v in run.stdout.rsplit("[", 1)[1].strip().rstrip("]").split(",")]
    assert values == pytest.approx([1 - 0.01 / (1 + 1e-3)] * 3, rel=1e-6, abs=0)


def test_python_dash_m_optgen_runs_the_cli(tmp_path):
    result = optgen("--help", cwd=tmp_path)
    assert result.returncode == 0 and "build" in result.stdout


def test_second_build_with_nothing_to_do_compiles_nothing(project):
    target = user_target([project / "my_specs"], project / "pkg")
    first = build(target=target)
    assert first.compiled == ["Yogi"] and first.verified == ["Yogi"]
    second = build(target=target)
    assert second.compiled == [] and second.written == []
    # A changed spec is compiled again; so is one whose output was edited or deleted.
    spec = project / "my_specs" / "yogi.toml"
    spec.write_text(YOGI.replace("eps = 1e-3", "eps = 1e-4"))
    third = build(target=target)
    assert third.compiled == ["Yogi"] and "yogi.py" in third.written
    (project / "pkg" / "yogi_foreach.py").unlink()
    assert build(target=target).written == ["yogi_foreach.py"]
    edited = project / "pkg" / "yogi_forloop.py"
    edited.write_text(edited.read_text() + "# edited by hand\n")
    assert build(target=target).written == ["yogi_forloop.py"]
    # A manifest that is garbage is ignored, not trusted.
    (project / "pkg" / MANIFEST).write_text("{not json")
    assert build(target=target).compiled == ["Yogi"]


def test_cross_check_refuses_a_build_whose_backend_computes_something_else(project, monkeypatch):
    """A code-generation bug (simulated: the for-loop kernel's lerp weight printed wrong) never
    reaches the disk; the error names the spec, the backend and the statement."""
    import optgen.build

    real = optgen.build.render_spec

    def broken(compiled):
        files = real(compiled)
        name = "yogi_forloop.py"
        assert "exp_avg.lerp_(grad, 1 - beta1)" in files[name]
        files[name] = files[name].replace("exp_avg.lerp_(grad, 1 - beta1)", "exp_avg.lerp_(grad, 1 - beta2)")
        return files

    monkeypatch.setattr(optgen.build, "render_spec", broken)
    target = user_target([project / "my_specs"], project / "pkg")
    with pytest.raises(SpecError) as info:
        build(target=target)
    message = str(info.value)
    assert "yogi.toml:" in message and "build refused: the forloop implementation of Yogi" in message
    assert "the first statement whose value differs is 'exp_avg = lerp(exp_avg, grad, 1 - beta1)'" in message
    assert not (project / "pkg").exists()
    # --no-verify writes it anyway (the user asked for it), and the next verifying build checks it
    assert build(target=target, verify=False).compiled == ["Yogi"]
    with pytest.raises(SpecError, match="build refused"):
        build(target=target)
    monkeypatch.setattr(optgen.build, "render_spec", real)
    assert build(target=target).verified == ["Yogi"]
    assert build(target=target).compiled == []


@pytest.mark.parametrize("edit,expected", [
    (lambda text: text.replace("torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)", "raise RuntimeError('kernel bug')"),
     "build refused: the foreach implementation of Yogi (maximize=False, lr=0.01) raised RuntimeError: kernel bug"),
    (lambda text: text + "\ndef (:\n",
     "build refused: the generated module yogi_foreach.py of Yogi does not import: SyntaxError"),
])
def test_generated_code_that_fails_is_a_refused_build_not_a_traceback(project, monkeypatch, edit, expected):
    import optgen.build

    real = optgen.build.render_spec

    def broken(compiled):
        files = real(compiled)
        files["yogi_foreach.py"] = edit(files["yogi_foreach.py"])
        return files

    monkeypatch.setattr(optgen.build, "render_spec", broken)
    with pytest.raises(SpecError) as info:
        build(target=user_target([project / "my_specs"], project / "pkg"))
    assert expected in str(info.value) and "my_specs/yogi.toml:" in str(info.value)
    assert "please report it" in str(info.value)
    assert not (project / "pkg").exists()


@pytest.mark.parametrize("extends,expected", [
    ("../../elsewhere/x", "cannot extend '../../elsewhere/x': extends names an optimizer"),
    ("/etc/passwd", "cannot extend '/etc/passwd': extends names an optimizer"),
    ("NoSuchThing", "cannot extend 'NoSuchThing': no spec file nosuchthing.toml in"),
])
def test_extends_finds_only_specs_in_the_search_path(project, extends, expected):
    (project / "my_specs" / "bad.toml").write_text(f'[optimizer]\nname = "Bad"\nextends = "{extends}"\n')
    result = optgen("build", "my_specs", "--out", "pkg", cwd=project)
    assert result.returncode == 1
    assert f"my_specs/bad.toml:3:12: {expected}" in result.stderr  # the string value starts at col 12
    assert "Traceback" not in result.stderr


def test_two_specs_with_one_name_name_both_files(project):
    (project / "my_specs" / "other.toml").write_text(YOGI)
    result = optgen("build", "my_specs", "--out", "pkg", cwd=project)
    assert result.returncode == 1
    assert "my_specs/yogi.toml: optimizer name 'Yogi' is already defined by my_specs/other.toml" in result.stderr


@pytest.mark.parametrize("args,message", [
    (("build", "my_specs"), "building spec files needs --out PKG_DIR"),
    (("build", "my_specs", "--out", "my-optimizers"), "'my-optimizers' is the package name, so it must be"),
    (("build", "nowhere", "--out", "pkg"), "nowhere: no such spec file or folder"),
    (("show", "nowhere.toml"), "nowhere.toml: no such spec file"),
    (("bench", "--only", "Yogi"), "bench has no workload for Yogi"),
])
def test_user_mistakes_are_one_line_errors(project, args, message):
    result = optgen(*args, cwd=project)
    assert result.returncode == 1, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr


def test_list_show_verify_and_bench_take_spec_files(project):
    listed = optgen("list", "my_specs", cwd=project)
    assert listed.returncode == 0 and "Yogi" in listed.stdout and "my_specs/yogi.toml" in listed.stdout
    shown = optgen("show", "my_specs/yogi.toml", "--backend", "forloop", cwd=project)
    assert shown.returncode == 0, shown.stderr
    assert "exp_avg.lerp_(grad, 1 - beta1)" in shown.stdout
    verified = optgen("verify", "my_specs/yogi.toml", "--steps", "3", cwd=project)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "Yogi" in verified.stdout and "all backends match the reference" in verified.stdout
    bench = optgen("bench", "my_specs/yogi.toml", "--params", "2e4", "--tensors", "4", "--repeats", "1", cwd=project)
    assert bench.returncode == 0, bench.stderr
    assert "### Yogi(defaults)" in bench.stdout and "| optgen forloop |" in bench.stdout
    assert "| optgen foreach |" in bench.stdout and "| optgen default (" in bench.stdout
    assert "speed-up vs optgen forloop" in bench.stdout and "How to read these tables" in bench.stdout


def test_bench_takes_a_built_package_and_names_each_optimizer_or_spec(project):
    """`optgen bench PKG` (a package `optgen build DIR --out PKG` wrote) times its optimizers with
    their defaults, next to a built-in one named in the same command; a spec that names torch's
    class (`torch = "AdamW"`) is timed against it, the others against their own for-loop."""
    (project / "my_specs" / "adamw_wide.toml").write_text(
        '[optimizer]\nname = "AdamWWide"\nextends = "AdamW"\ntorch = "AdamW"\n\n[hyperparameters]\nlr = 0.01\n')
    built = optgen("build", "my_specs", "--out", "my_optimizers", cwd=project)
    assert built.returncode == 0, built.stderr
    bench = optgen("bench", "my_optimizers", "SGD", "--cases", "5x16", "--repeats", "2", cwd=project)
    assert bench.returncode == 0, bench.stderr
    headings = [line for line in bench.stdout.splitlines() if line.startswith("### ")]
    assert [h.split(" — ")[0] for h in headings] == ["### AdamWWide(defaults)", "### Yogi(defaults)",
                                                     "### SGD(lr=0.001, momentum=0.9)", "### Summary: ms / step "
                                                     "(speed-up vs the baseline, the first column each row has)"]
    tables = bench.stdout.split("### ")[1:]
    assert "speed-up vs torch forloop" in tables[0] and "| torch fused |" in tables[0]
    assert "speed-up vs optgen forloop" in tables[1] and "| torch" not in tables[1]
    assert all("| optgen default (" in t for t in tables[:3])


def test_a_bug_in_the_spec_loader_is_an_internal_compiler_error_naming_the_file(project, monkeypatch):
    import optgen.spec.load
    from optgen.errors import InternalCompilerError

    def boom(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(optgen.spec.load, "_hyperparameters", boom)
    with pytest.raises(InternalCompilerError) as info:
        build(target=user_target([project / "my_specs"], project / "pkg"))
    assert "my_specs/yogi.toml:1:1: internal compiler error in the spec loader" in str(info.value)
    assert "KeyError: 'boom'" in str(info.value) and isinstance(info.value.__cause__, KeyError)


def test_a_build_never_overwrites_or_deletes_files_it_did_not_write(project):
    package = project / "src"
    package.mkdir()
    (package / "model.py").write_text("MODEL = 1\n")
    build(target=user_target([project / "my_specs"], package))
    assert (package / "model.py").read_text() == "MODEL = 1\n"  # not an orphan of ours: kept
    (package / "yogi_forloop.py").write_text("# my own code\n")
    with pytest.raises(SpecError, match="yogi_forloop.py exists and was not written by optgen"):
        build(target=user_target([project / "my_specs"], package))
    assert (package / "yogi_forloop.py").read_text() == "# my own code\n"


def test_verify_reports_a_failing_kernel_in_its_table(project, monkeypatch, capsys):
    """`optgen verify` on generated code that raises: an ERROR cell and the exception, exit 1."""
    import optgen.build
    from optgen.tools.verify import verify_all

    real = optgen.build.render_spec

    def broken(compiled, implementations=None):
        files = real(compiled, implementations)
        files["yogi_foreach.py"] = files["yogi_foreach.py"].replace(
            "torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)", "raise RuntimeError('kernel bug')")
        return files

    monkeypatch.setattr(optgen.build, "render_spec", broken)
    assert verify_all(steps=2, sources=[project / "my_specs"]) is False
    out = capsys.readouterr().out
    assert "ERROR" in out and "foreach: RuntimeError: kernel bug" in out and "MISMATCH" in out


NOVOGRAD = '''[optimizer]
name = "NovoGrad"
signature = "lr, betas, eps, weight_decay, *, foreach, differentiable, fused"

[hyperparameters]
lr = 0.01
betas = { default = [0.95, 0.98], names = ["beta1", "beta2"] }
eps = 1e-8
weight_decay = 0.001

[state]
v = "0"
m = "zeros_like(param)"
step = "0"

[update]
rule = """
step = step + 1
gn = norm(grad)
if step == 1:
    v = gn ** 2
else:
    v = beta2 * v + (1 - beta2) * gn ** 2
g = grad / (sqrt(v) + eps) + weight_decay * param
m = beta1 * m + g
param = param - lr * m
"""
'''


def test_a_counter_updated_from_a_norm_verifies_on_every_backend(tmp_path, capsys):
    """NovoGrad's per-tensor second moment is a counter fed by norm(grad): the C kernel sums the
    norm in another order than torch, 1e-16 apart, which a float32 counter could round to a
    neighbouring float32 (6e-8 after 10 steps: `optgen build` refused a correct kernel).  The
    checks run float64 counters (optgen.verify.float64_counters)."""
    from optgen.tools.verify import verify_all

    (tmp_path / "novograd.toml").write_text(NOVOGRAD)
    assert verify_all(steps=10, sources=[tmp_path / "novograd.toml"]), capsys.readouterr().out
    assert build(target=user_target([tmp_path / "novograd.toml"], tmp_path / "pkg")).verified == ["NovoGrad"]


# -- found by review: the incremental build and --out --------------------------------------------
def test_a_deleted_spec_leaves_the_package(project):
    (project / "my_specs" / "other.toml").write_text(YOGI.replace('name = "Yogi"', 'name = "Other"'))
    target = user_target([project / "my_specs"], project / "pkg")
    build(target=target)
    (project / "my_specs" / "other.toml").unlink()
    result = build(target=user_target([project / "my_specs"], project / "pkg"))
    assert "other.py" in result.removed and not (project / "pkg" / "other_forloop.py").exists()
    assert "Other" not in (project / "pkg" / "__init__.py").read_text()


def test_kernels_are_shared_only_with_the_spec_extends_found(project):
    """`extends = "SGD"` looks for sgd.toml: with the user's optimizer named SGD in mysgd.toml, it
    finds the built-in SGD, so the child may not share the user's SGD's kernels (it shared them by
    name and ran the wrong rule); with the user's in sgd.toml, it extends and shares that one."""
    mine = YOGI.replace('name = "Yogi"', 'name = "SGD"')
    (project / "my_specs" / "yogi.toml").unlink()
    (project / "my_specs" / "mysgd.toml").write_text(mine)
    (project / "my_specs" / "child.toml").write_text('[optimizer]\nname = "Child"\nextends = "SGD"\n')
    result = build(target=user_target([project / "my_specs"], project / "pkg"))
    assert sorted(result.verified) == ["Child", "SGD"]
    child = (project / "pkg" / "child.py").read_text()
    assert "child_forloop" in child and "sgd_forloop" not in child

    (project / "my_specs" / "mysgd.toml").rename(project / "my_specs" / "sgd.toml")
    build(target=user_target([project / "my_specs"], project / "pkg"))
    child = (project / "pkg" / "child.py").read_text()
    assert "sgd_forloop" in child and not (project / "pkg" / "child_forloop.py").exists()


def test_a_damaged_manifest_is_ignored_not_a_traceback(project):
    target = user_target([project / "my_specs"], project / "pkg")
    build(target=target)
    for forged in ('{"package": "pkg", "specs": [1]}', '{"package": "pkg", "specs": {"x": 1}}', "[]", "{"):
        (project / "pkg" / MANIFEST).write_text(forged)
        assert build(target=target).compiled == ["Yogi"]


def test_the_header_follows_the_working_directory_and_so_does_the_cache(project, monkeypatch):
    """Generated headers name the spec relative to where optgen runs; a build from another folder
    must rewrite them, or `--check` from there would disagree with what the build left."""
    target = user_target([project / "my_specs"], project / "pkg")
    monkeypatch.chdir(project)
    build(target=target)
    monkeypatch.chdir(project / "my_specs")
    assert build(target=target).compiled == ["Yogi"]
    assert build(target=target, check=True) == []


def test_out_may_not_be_optgens_own_package(project):
    with pytest.raises(SpecError, match="is optgen's own package"):
        user_target([project / "my_specs"], ROOT / "generated")


def test_built_files_are_readable_as_the_umask_says(project):
    old = os.umask(0o022)
    try:
        build(target=user_target([project / "my_specs"], project / "pkg"))
    finally:
        os.umask(old)
    assert (project / "pkg" / "yogi.py").stat().st_mode & 0o777 == 0o644


def test_a_file_given_twice_is_built_once(project):
    target = user_target([project / "my_specs", (project / "my_specs" / "yogi.toml").resolve()], project / "pkg")
    assert len(target.spec_files) == 1
