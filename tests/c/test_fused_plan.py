"""The fused-kernel plan (optgen/backends/fused_plan.py) that the C and Triton backends print, and
the launch-plan cache both launchers keep (optgen/runtime/native.py)."""
import sympy

from optgen.backends.base import kernel_signature
from optgen.backends.fused_plan import Names, plan_kernel
from optgen.passes import compile_spec
from optgen.resources import specs_dir
from optgen.runtime.native import LaunchPlan, PlanCache
from optgen.spec.load import load_spec


def _plans(name):
    compiled = compile_spec(load_spec(specs_dir() / "optimizers" / f"{name}.toml"))
    sig = kernel_signature(compiled)
    return {v.flags: plan_kernel(v.program, sig) for v in compiled.variants}


def test_sgd_plan_momentum_buffer_is_lazy_and_guarded():
    plan = next(iter(_plans("sgd").values()))
    assert plan.states == ["momentum_buffer"]
    assert plan.tensors == ["param", "grad", "momentum_buffer"]
    (lazy,) = plan.lazy
    assert lazy.name == "momentum_buffer" and lazy.when == 'a["momentum"] != 0' and str(lazy.first) == "grad"
    # touched only where momentum != 0 (a host guard), so the list need not be passed otherwise
    assert str(plan.presence["momentum_buffer"]) == "Ne(momentum, 0)"
    assert plan.presence["param"] == sympy.true and "momentum_buffer" in plan.read
    # C reads every hyperparameter (it tests guards per tensor), Triton those outside host guards
    assert plan.hyperparameters == ["lr", "momentum", "dampening", "weight_decay"]
    assert set(plan.kernel_hyperparameters) <= set(plan.hyperparameters)


def test_adam_plan_counters_round_once():
    for plan in _plans("adam").values():
        assert plan.counters == ["step"] and plan.written_counters == ["step"]
        (step,) = [s for s in plan.statements if s.target == "step"]
        assert step.rounding == "in_dtype"  # step + 1 reads step: one op on the 0-dim tensor
        assert all(s.rounding is None for s in plan.statements if s.target != "step")


def test_names_rename_reserved_and_number_versions():
    names = Names(frozenset({"numel"}))
    names.taken |= {"lr"}
    assert names.of("numel") == "numel_" and names.of("lr") == "lr"
    assert [names.fresh("lr"), names.fresh("lr"), names.fresh("numel"), names.fresh("1_minus_b")] == \
        ["lr_1", "lr_2", "numel_", "one_minus_b"]


def test_plan_cache_drops_least_recently_used():
    cache = PlanCache(limit=2)
    a, b, c = LaunchPlan(), LaunchPlan(), LaunchPlan()
    cache.put(("a",), a)
    cache.put(("b",), b)
    assert cache.get(("a",)) is a  # now the most recently used
    cache.put(("c",), c)
    assert cache.get(("b",)) is None and cache.get(("a",)) is a and cache.get(("c",)) is c
    assert len(cache) == 2 and a.grad_key is None
