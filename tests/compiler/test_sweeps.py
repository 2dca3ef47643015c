"""Scheduling rules that reduce tensors into walks for the fused C backend (Note [Sweeps])."""
import pytest

from optgen.backends.printer import Unsupported
from optgen.backends.sweeps import COLS, FULL, ROWS, Reduction, schedule
from optgen.passes import compile_spec
from optgen.spec.load import load_spec
from tests.compiler.test_passes import toy


def plan(spec):
    return schedule(compile_spec(spec).variants[0].program)


def test_each_norm_of_a_value_that_needs_a_norm_is_one_more_walk(tmp_path):
    spec = toy(tmp_path, """
        step = step + 1
        a = norm(grad)
        u = grad / (a + 1)
        b = norm(u)
        buf = lerp(buf, u, beta)
        param = param - lr * buf / (b + 1)
    """)
    p = plan(spec)
    levels = {i.node.name: i.level for i in p.items if isinstance(i.node, Reduction)}
    assert levels == {"norm_grad": 1, "norm_u": 2}
    assert p.walks == 2
    assert p.extents["u"] == FULL


def test_adafactor_needs_three_walks_and_keeps_its_factored_states_small():
    p = plan(load_spec("specs/optimizers/adafactor.toml"))
    assert p.walks == 2  # two walks that sum, then the one that stores
    assert p.extents["row_var"] == ROWS and p.extents["col_var"] == COLS
    assert p.extents["var_estimate"] == FULL


@pytest.mark.parametrize("rule,message", [
    ("x = norm_dim(grad, 0)\nparam = param - lr * x", "over dimension 0"),
    ("x = norm(beta * lr)\nparam = param - lr * x * grad", "a reduction of a per-tensor scalar"),
])
def test_what_the_walks_cannot_express_is_declined_with_the_reason(tmp_path, rule, message):
    with pytest.raises(Unsupported, match=message):
        plan(toy(tmp_path, "step = step + 1\nbuf = lerp(buf, grad, beta)\n" + rule))


def test_a_small_state_read_before_a_later_write_is_declined(tmp_path):
    path = tmp_path / "rows.toml"
    path.write_text("""
[optimizer]
name = "Rows"
signature = "lr, *, foreach"

[hyperparameters]
lr = 1e-3

[state]
rv = "zeros_reduced(param, -1)"

[update]
rule = '''
u = grad / (1 + rv)
rv = norm_dim(grad, -1)
param = param - lr * u
'''
""")
    with pytest.raises(Unsupported, match="state 'rv' is read before it is written again"):
        plan(load_spec(path))
