"""Guards that read scalar locals, scalar locals and counters that differ per tensor, and norm()
of a lazily created state: each case runs on every kernel backend (for-loop, foreach,
differentiable, C, Triton in its interpreter) against the float64 interpreter and the rule
computed by hand (the helpers of test_value_semantics.py).

Each failed before its fix:

- a nested ``if`` reading a scalar its outer ``if`` assigns: the guard became sympy's sorted
  ``(c > 0.5) & (step > 2)``, so the interpreter (KeyError) and the Python kernels (NameError)
  read ``c`` before testing ``step > 2`` (Note [Guards evaluate in the order they were written]);
- a scalar local assigned at group level, then again under a per-tensor condition: the foreach
  kernel kept one number for the group (``n``), not a list (``ns[i]``);
- a counter assigned from a per-tensor scalar local (NovoGrad's ``v = gn ** 2``): the
  differentiable kernel kept it in float64, the C kernel read back an unrounded value;
- a lazily created state read by a compound argument of norm() in its own first statement.
"""
from __future__ import annotations

import textwrap

import pytest
import torch

from optgen.errors import SpecError
from optgen.passes import compile_spec
from optgen.spec.load import load_spec
from tests.compiler.test_value_semantics import check, spec_text

COUNTER = torch.float32  # the step dtype of the tests (torch's default dtype is float32)


def _counter(x) -> float:
    """A number as a float32 counter state stores it."""
    return torch.tensor(float(x), dtype=COUNTER).item()


# -- 1: a nested guard reads a scalar its outer guard assigns ---------------------------------------

NESTED = """
    step = step + 1
    if step > 2:
        c = beta
        if c > 0.5:
            m = m + grad
    param = param - lr * m
"""


def test_nested_guard_reads_a_scalar_of_the_outer_one(tmp_path):
    def expected(param, grad, s, h):
        s["step"] = s["step"] + 1
        if s["step"] > 2 and 0.9 > 0.5:
            s["m"] = s["m"] + grad
        return param - 0.1 * s["m"], s

    check(tmp_path, spec_text(NESTED, "lr = 0.1\nbeta = 0.9", 'step = "0"\nm = "zeros_like(param)"'),
          expected, [{}], state_names=("step", "m"),
          init=lambda name, p: 0.0 if name == "step" else torch.zeros_like(p))


def test_nested_guard_with_an_else_and_a_third_level(tmp_path):
    """An else of the inner if (``not (c > 0.5)``), and a third if reading a scalar of the second."""
    def expected(param, grad, s, h):
        s["step"] = s["step"] + 1
        if s["step"] > 1:
            c = h.get("beta", 0.9) * s["step"]
            if c > 2:
                d = c - 2
                if d > 0.5:
                    s["m"] = s["m"] + d * grad
            else:
                s["m"] = s["m"] - grad
        return param - 0.1 * s["m"], s

    check(tmp_path, spec_text("""
        step = step + 1
        if step > 1:
            c = beta * step
            if c > 2:
                d = c - 2
                if d > 0.5:
                    m = m + d * grad
            else:
                m = m - grad
        param = param - lr * m
    """, "lr = 0.1\nbeta = 0.9", 'step = "0"\nm = "zeros_like(param)"'),
          expected, [{}, {"beta": 1.5}], state_names=("step", "m"),
          init=lambda name, p: 0.0 if name == "step" else torch.zeros_like(p))


def test_nested_guard_python_code_tests_the_outer_condition_first(tmp_path):
    from optgen.backends.forloop import BACKEND

    path = tmp_path / "case.toml"
    path.write_text(spec_text(NESTED, "lr = 0.1\nbeta = 0.9", 'step = "0"\nm = "zeros_like(param)"'))
    code = BACKEND.render(compile_spec(load_spec(path)))
    assert "if step > 2 and c > 0.5:" in code, code


# -- 2: a group-level scalar local assigned again per tensor ---------------------------------------

def test_group_scalar_reassigned_under_a_per_tensor_condition(tmp_path):
    def expected(param, grad, s, h):
        s["step"] = s["step"] + 1
        u = s["m"] + grad
        n = 1.0
        if s["step"] > 1:
            n = 1 + torch.linalg.vector_norm(u).item()
        s["m"] = 0.9 * s["m"] + grad
        return param - 0.1 * u / n, s

    check(tmp_path, spec_text("""
        step = step + 1
        u = m + grad
        n = 1.0
        if step > 1:
            n = 1 + norm(u)
        m = beta * m + grad
        param = param - lr * u / n
    """, "lr = 0.1\nbeta = 0.9", 'step = "0"\nm = "zeros_like(param)"'),
          expected, [{}], state_names=("step", "m"),
          init=lambda name, p: 0.0 if name == "step" else torch.zeros_like(p))


def test_group_scalar_reassigned_per_tensor_then_read_at_group_level(tmp_path):
    """Read by a scalar statement of its own (``k = lr / n``) and under a hyperparameter if."""
    def expected(param, grad, s, h):
        s["step"] = s["step"] + 1
        n = 2.0
        if s["step"] > 2:
            n = n + torch.linalg.vector_norm(grad).item()
        k = 0.1 / n
        if h.get("weight_decay", 0.0) != 0:
            param = param * (1 - k * h["weight_decay"])
        return param - k * grad, s

    check(tmp_path, spec_text("""
        step = step + 1
        n = 2.0
        if step > 2:
            n = n + norm(grad)
        k = lr / n
        if weight_decay != 0:
            param = param * (1 - k * weight_decay)
        param = param - k * grad
    """, "lr = 0.1\nweight_decay = 0.0", 'step = "0"'),
          expected, [{}, {"weight_decay": 0.25}], state_names=("step",),
          init=lambda name, p: 0.0)


# -- 3: a counter assigned from a per-tensor scalar local (NovoGrad) -------------------------------

def test_counter_assigned_from_a_per_tensor_norm_local(tmp_path):
    def expected(param, grad, s, h):
        s["step"] = _counter(s["step"] + 1)
        gn = torch.linalg.vector_norm(grad).item()
        if s["step"] == 1:
            s["v"] = _counter(gn ** 2)
        else:  # an update reading the counter runs on its 0-dim tensor, in its dtype
            s["v"] = (0.98 * torch.tensor(s["v"], dtype=COUNTER) + (1 - 0.98) * gn ** 2).item()
        g = grad / (s["v"] ** 0.5 + 1e-8) + 0.001 * param
        s["m"] = 0.95 * s["m"] + g
        return param - 0.01 * s["m"], s

    check(tmp_path, spec_text("""
        step = step + 1
        gn = norm(grad)
        if step == 1:
            v = gn ** 2
        else:
            v = beta2 * v + (1 - beta2) * gn ** 2
        g = grad / (sqrt(v) + eps) + weight_decay * param
        m = beta1 * m + g
        param = param - lr * m
    """, "lr = 0.01\nbeta1 = 0.95\nbeta2 = 0.98\neps = 1e-8\nweight_decay = 0.001",
        'v = "0"\nm = "zeros_like(param)"\nstep = "0"'),
          expected, [{}], state_names=("step", "v", "m"),
          init=lambda name, p: torch.zeros_like(p) if name == "m" else 0.0)


# -- 4: norm() of a compound argument reading the lazily created state of its statement ------------

LAZY_NORM = """
    m = m + grad / (1 + norm(grad - m))
    param = param - lr * m
"""


def test_norm_of_an_expression_of_the_lazy_state_it_creates_is_a_spec_error(tmp_path):
    """It printed ``grad - m.norm()`` (forloop/foreach/differentiable off by 3.56): the compound
    argument cannot be computed before the statement that creates the state it reads."""
    path = tmp_path / "case.toml"
    path.write_text(spec_text(LAZY_NORM, "lr = 0.1", 'm = { first = "grad" }'))
    with pytest.raises(SpecError) as error:
        compile_spec(load_spec(path))
    message = str(error.value)
    assert message.startswith(f"{path}:15:1: norm() of an expression that reads 'm' cannot be in the statement "
                              "that creates 'm'"), message
    assert "'m = m'" in message


def test_the_rewrite_the_spec_error_suggests(tmp_path):
    """``m = m`` creates the state (stores its first value), then the update runs on every step."""
    def expected(param, grad, s, h):
        if s["m"] is None:
            s["m"] = grad.clone()
        s["m"] = s["m"] + grad / (1 + torch.linalg.vector_norm(grad - s["m"]).item())
        return param - 0.1 * s["m"], s

    spec = spec_text("m = m\n" + textwrap.dedent(LAZY_NORM).strip(), "lr = 0.1", 'm = { first = "grad" }')
    check(tmp_path, spec, expected, [{}], init=lambda name, p: None)
