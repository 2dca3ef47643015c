"""The layout of the merged C kernels (Note [One loop body per walk] in optgen/backends/c.py): each
walk's body is printed once, as a static inline function every version of the loop calls with
its flags and conditions as literal constants inside its `#pragma omp parallel` region (where
the compiler can fold them and vectorise each version as a straight-line loop), and no version
exists for an impossible pair of opposite comparisons."""
import itertools
import platform
import re
import subprocess

import pytest
import torch
from optgen.generated import adam_c, asgd_c, radam_c

from optgen.backends.c import source_version
from optgen.runtime import c_launch


def _parameters(source: str, function: str) -> list[str]:
    found = re.search(rf"void {function}\((.*?)\)\n\{{", source, re.S)
    assert found is not None, f"no function {function} in the source"
    return [p.split()[-1] for p in found.group(1).replace("\n", " ").split(",")]


def _tensor_function(source: str, suffix: str) -> str:
    """The text of a kernel's function for one tensor, with the macros defined for it:
    ``_tensor_split`` (its walks split among the threads) or ``_tensor`` (on one thread: Note
    [Small tensors in parallel])."""
    found = re.search(rf"^(#define OPTGEN_WALK_\w+[^\n]*\n)+static void \w+{suffix}\(.*?^\}}$", source, re.S | re.M)
    assert found is not None, f"no function *{suffix}"
    return found.group(0)


def _calls(source: str, function: str, suffix: str = "_tensor_split") -> list[list[str]]:
    """The arguments of each call of ``function`` in a tensor's function: each version's `case`
    line calls it through a macro that opens the parallel region (OPTGEN_WALK_REGION, defined
    before each of the tensor's functions) and appends the arguments every version passes."""
    source = _tensor_function(source, suffix)
    found = re.search(rf'^#define (\w+)\(\.\.\.\) OPTGEN_WALK_REGION '
                      rf"{function}\(__VA_ARGS__, (.*?)\)\n", source.replace("\\\n", ""), re.S | re.M)
    assert found is not None, f"no macro calling {function} in its parallel region"
    macro, tail = found.group(1), found.group(2)
    calls = re.findall(rf"^\s*(?:case \d+: )+{macro}\((.*?)\); break;$", source, re.M)
    return [[a.strip() for a in f"{call}, {tail}".replace("\n", " ").split(",")] for call in calls]


def check_adam_layout(source: str) -> None:
    assert source.count("exp_avg = lerp_of(exp_avg, grad, c_1_minus_beta1);") == 1  # the body, once
    split, one_thread = _tensor_function(source, "_tensor_split"), _tensor_function(source, "_tensor")
    assert split.count('_Pragma("omp parallel') == 1   # (opened by the macro every version calls)
    for copy in (split, one_thread):
        assert len(re.findall(r"^\s*case \d+: ADAM_STEP_WALK1\(", copy, re.M)) == 16
    assert "omp" not in one_thread  # (a tensor under PARALLEL_MIN elements: Note [Small tensors in parallel])
    parameters = _parameters(source, "adam_step_walk1")
    assert parameters[:4] == ["amsgrad", "maximize", "decoupled_weight_decay", "weight_decay_ne_0"]
    # every version, each with literal constants inside its parallel region, and the same on one thread
    for calls in (_calls(source, "adam_step_walk1"), _calls(source, "adam_step_walk1", "_tensor")):
        versions = [tuple(call[:4]) for call in calls]
        assert sorted(versions) == sorted(itertools.product("01", repeat=4))


def check_opposite_comparisons(source: str, function: str, a: str, b: str, complementary: bool) -> None:
    parameters = _parameters(source, function)
    calls = _calls(source, function)
    assert calls
    pairs = {(call[parameters.index(a)], call[parameters.index(b)]) for call in calls}
    assert ("1", "1") not in pairs, pairs
    assert ("0", "0") not in pairs if complementary else ("0", "0") in pairs, pairs  # (NaN: neither ordered one holds)


def test_each_walk_body_is_printed_once_and_called_with_constants():
    check_adam_layout(source_version(adam_c.SOURCE))


def test_no_version_where_opposite_comparisons_both_hold():
    check_opposite_comparisons(source_version(radam_c.SOURCE), "radam_step_walk1", "rho_t_gt_5", "rho_t_le_5",
                               complementary=False)
    check_opposite_comparisons(source_version(asgd_c.SOURCE), "asgd_step_walk1", "mu_ne_1", "mu_eq_1",
                               complementary=True)


def _gcc() -> list[str] | None:
    """The kernels' compiler when it is GCC on x86-64 (the test reads GCC's names for the
    outlined regions and x86 mnemonics)."""
    cc = c_launch.compiler() if c_launch.available() else None
    if cc is None or platform.machine() not in ("x86_64", "AMD64"):
        return None
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True).stdout
    return cc if "Free Software Foundation" in version else None


@pytest.mark.skipif(_gcc() is None, reason="needs GCC for x86-64 (the check reads its assembly)")
def test_every_version_of_adams_loop_is_vectorised(tmp_path):
    """Each of the 16 outlined parallel regions holds packed float arithmetic: the constants
    reached the loop before the vectoriser did."""
    source = tmp_path / "adam.c"
    source.write_text(c_launch.prelude() + adam_c.SOURCE)
    flags = [f for f in c_launch.FLAGS if f != "-shared"]
    gcc = _gcc()
    assert gcc is not None  # (skipped otherwise)
    subprocess.run([*gcc, *flags, *c_launch.C_TYPES[torch.float32][1], "-S", "-o", str(tmp_path / "adam.s"),
                    str(source)], check=True)
    assembly = (tmp_path / "adam.s").read_text()
    regions = re.findall(r"^adam_step_tensor_split\._omp_fn\.\d+:\n(.*?)\.cfi_endproc", assembly, re.S | re.M)
    assert len(regions) == 16
    for region in regions:
        assert re.search(r"\bv?(add|mul|sub|div|sqrt|max|min)ps\s", region), "a version's loop is not vectorised"
    # a tensor under PARALLEL_MIN elements runs a copy without parallel regions (Note [Small
    # tensors in parallel]), still vectorised
    one_thread = re.search(r"^adam_step_tensor:\n(.*?)\.cfi_endproc", assembly, re.S | re.M)
    assert one_thread is not None, "no one-thread function"
    assert not re.search(r"\b(GOMP_|omp_)", one_thread.group(1)), "the one-thread copy calls OpenMP"
    assert len(re.findall(r"\bv?(add|mul|sub|div|sqrt|max|min)ps\s", one_thread.group(1))) >= 16
