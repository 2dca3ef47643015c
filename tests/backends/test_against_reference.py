"""Every backend of every spec against the reference interpreter, for every flag combination.

Parametrised from specs/optimizers/ itself: a new spec file is tested here without a line of
test code.  The hyperparameter configurations come from the spec (optgen.verify.configurations).
"""
import pytest
import torch

from optgen.build import compile_all
from optgen.runtime import c_launch
from optgen.verify import configurations, max_difference, run_backend, run_reference

COMPILED = compile_all()
STEPS = 12  # several steps so state feeds back into the update; float64, so rounding stays ~1e-14
# Specs whose step is an intrinsic algorithm (LBFGS) generate no kernels: tests/oracle covers them.
CASES = [(c, v) for c in COMPILED if not c.spec.algorithm for v in c.variants]


def _id(case):
    compiled, variant = case
    on = [k for k, v in variant.flags if v]
    return compiled.spec.name + ("[" + ",".join(on) + "]" if on else "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_backends_match_interpreter(case):
    compiled, variant = case
    configs = configurations(compiled, dict(variant.flags))
    assert configs, "no valid hyperparameter configuration: the spec's own checks reject all of them"
    import optgen

    for kwargs in configs:
        reference = run_reference(compiled, kwargs, STEPS)
        for implementation in optgen.OPTIMIZERS[compiled.spec.name]._kernels:
            if implementation == "c" and not c_launch.available():
                continue  # no C compiler on this machine (tests/c/ is skipped too)
            result = run_backend(compiled, implementation, kwargs, STEPS)
            assert max_difference(result, reference) < 1e-10, (implementation, kwargs)


def test_reference_comparison_can_fail():
    """The comparison used above notices a wrong update: perturb one state entry."""
    compiled = next(c for c in COMPILED if c.spec.name == "Adam")
    kwargs = {"lr": 0.01}
    params, states = run_backend(compiled, "forloop", kwargs, 3)
    reference = run_reference(compiled, kwargs, 3)
    assert max_difference((params, states), reference) < 1e-10
    states[0]["exp_avg"] = states[0]["exp_avg"] * (1 + 1e-6)
    assert max_difference((params, states), reference) > 1e-10
    nan = states[0]["exp_avg"].clone()
    nan.view(-1)[0] = float("nan")  # a NaN result is not close to anything (max() would skip it)
    assert max_difference((params, [{**states[0], "exp_avg": nan}, *states[1:]]), reference) == float("inf")
    states[0].pop("exp_avg")
    assert max_difference((params, states), reference) == float("inf")


def test_foreach_handles_mixed_dtypes_in_one_group():
    import optgen

    p64 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    p32 = torch.randn(3, dtype=torch.float32, requires_grad=True)
    ours = optgen.SGD([p64, p32], lr=0.1, momentum=0.9, foreach=True)
    ref = [p64.detach().clone().requires_grad_(), p32.detach().clone().requires_grad_()]
    theirs = torch.optim.SGD(ref, lr=0.1, momentum=0.9, foreach=True)
    for _ in range(3):
        for p, q in zip((p64, p32), ref, strict=True):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
        ours.step()
        theirs.step()
    torch.testing.assert_close([p64, p32], ref, rtol=0, atol=0)
    assert ours.state[p32]["momentum_buffer"].dtype == torch.float32
