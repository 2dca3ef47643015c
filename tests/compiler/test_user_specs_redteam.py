"""Specs a user would write, found to break the compiler by red-teaming it with the docs only.

Each case is the smallest spec that showed the bug, run on every backend against the reference
interpreter and against the rule computed by hand (helpers of test_value_semantics.py), or, for an
invalid spec, checked for its one ``path:line:col`` error.
"""
from __future__ import annotations

import textwrap

import pytest
import torch

from optgen.errors import SpecError
from optgen.spec.load import load_spec
from tests.compiler.test_value_semantics import HYPER, check, spec_text


def counter_init(name, p):
    return torch.tensor(0.0, dtype=torch.float64)


def stored(x):
    """A value stored into a counter: torch's `step` dtype, float32 (float64 by default dtype only)."""
    return torch.as_tensor(x, dtype=torch.float32).double()


# -- a counter assigned under a per-tensor condition ---------------------------------------------
# The for-loop kernel read `v` where only the `if` had bound it (UnboundLocalError); the foreach
# kernel filled `vs[i]` in a loop before any list `vs` existed (NameError).  NovoGrad's first step
# (`if step == 1: v = norm(grad) ** 2 else: v = beta2 * v + ...`) is the natural way to write it.

def test_counter_assigned_in_both_branches_of_a_per_tensor_if(tmp_path):
    def expected(param, grad, s, h):
        s["step"] = s["step"] + 1
        if s["step"] == 1:
            s["v"] = stored(grad.norm() ** 2)
        else:
            s["v"] = stored(0.5 * s["v"] + grad.norm() ** 2)
        return param - 0.1 * grad / (s["v"].sqrt() + 1), s

    check(tmp_path, spec_text("""
        step = step + 1
        if step == 1:
            v = norm(grad) ** 2
        else:
            v = 0.5 * v + norm(grad) ** 2
        param = param - lr * grad / (sqrt(v) + 1)
    """, HYPER, 'v = "0"\nstep = "0"'), expected, [{}], init=counter_init, state_names=("v", "step"))


def test_counter_assigned_under_one_branch_then_read(tmp_path):
    def expected(param, grad, s, h):
        s["step"] = s["step"] + 1
        if s["step"] == 2:
            s["v"] = stored(grad.norm())
        return param - 0.1 * s["v"] * grad, s

    check(tmp_path, spec_text("""
        step = step + 1
        if step == 2:
            v = norm(grad)
        param = param - lr * v * grad
    """, HYPER, 'v = "0"\nstep = "0"'), expected, [{}], init=counter_init, state_names=("v", "step"))


def test_counter_assigned_under_a_hyperparameter_condition_then_read(tmp_path):
    def expected(param, grad, s, h):
        if h["weight_decay"] != 0:
            s["v"] = stored(h["weight_decay"] * grad.norm())
        return param - 0.1 * (s["v"] + 1) * grad, s

    check(tmp_path, spec_text("""
        if weight_decay != 0:
            v = weight_decay * norm(grad)
        param = param - lr * (v + 1) * grad
    """, HYPER, 'v = "0"'), expected, [{"weight_decay": 0.0}, {"weight_decay": 0.25}],
          init=counter_init, state_names=("v",))


# -- a `first` state whose later steps keep it as it is --------------------------------------------
# `anchor = anchor` (the rule must assign every state) rendered `else:` with an empty block in the
# for-loop kernel: an IndentationError at import.  L2-SP regularises towards the initial weights.

def test_first_state_kept_unchanged(tmp_path):
    def expected(param, grad, s, h):
        if "anchor" not in s:
            s["anchor"] = param.clone()
        return param - 0.1 * (grad + 0.5 * (param - s["anchor"])), s

    check(tmp_path, spec_text("""
        anchor = anchor
        param = param - lr * (grad + 0.5 * (param - anchor))
    """, HYPER, 'anchor = { first = "param" }'), expected, [{}], state_names=())


# -- optimizer names that make the generated package unimportable ----------------------------------

@pytest.mark.parametrize("name, why", [
    ("Elif", "its module name 'elif' is a Python keyword"),
    ("Lambda", "its module name 'lambda' is a Python keyword"),
    ("None", "a Python keyword"),
    ("torch", "a name the generated modules use"),
])
def test_optimizer_name_that_cannot_be_a_module_or_class(tmp_path, name, why):
    path = tmp_path / "case.toml"
    path.write_text(textwrap.dedent(f'''\
        [optimizer]
        name = "{name}"
        signature = "lr"

        [hyperparameters]
        lr = 0.1

        [update]
        rule = """
        param = param - lr * grad
        """
        '''))
    with pytest.raises(SpecError) as error:
        load_spec(path)
    message = str(error.value)
    assert message.startswith(f"{path}:2:9: optimizer name '{name}'"), message
    assert why in message, message


# -- a tuple item named like another hyperparameter --------------------------------------------------
# `betas = { ..., names = ["beta1", "lr"] }` next to `lr` built, and the rule's `lr` silently read
# betas[1]: the user's lr was ignored.

@pytest.mark.parametrize("names, column", [('["beta1", "lr"]', 53), ('["beta", "beta"]', 52)])
def test_tuple_item_named_like_another_hyperparameter(tmp_path, names, column):
    path = tmp_path / "case.toml"
    path.write_text(textwrap.dedent(f'''\
        [optimizer]
        name = "Case"
        signature = "lr, betas"

        [hyperparameters]
        lr = 0.1
        betas = {{ default = [0.9, 0.99], names = {names} }}

        [update]
        rule = """
        param = param - lr * grad
        """
        '''))
    with pytest.raises(SpecError) as error:
        load_spec(path)
    message = str(error.value)
    assert message.startswith(f"{path}:7:{column}: tuple item "), message
    assert "already" in message, message


# -- a local whose first value folds to a number, and is a tensor on another path ---------------
# `t1 = grad - grad` is a tensor of zeros; sympy folds it to 0, so `u = abs(t1) + 1` was typed a
# scalar local and the `else: u = grad` branch was rejected ("'u' is a scalar but this value is a
# tensor"; fuzz seed 61059).  A local is a tensor when its expression reads a tensor as written.

def test_local_folded_to_a_number_is_still_a_tensor(tmp_path):
    def expected(param, grad, s, h):
        u = torch.ones_like(grad) if h["weight_decay"] > 0.1 else grad
        t = torch.zeros_like(grad) + 0.5
        return param - 0.1 * (u + t), s

    check(tmp_path, spec_text("""
        t1 = grad - grad
        if weight_decay > 0.1:
            u = abs(t1) + 1
        else:
            u = grad
        half = (param - param) + 0.5
        param = param - lr * (u + half)
    """, HYPER, ""), expected, [{"weight_decay": 0.0}, {"weight_decay": 0.25}], state_names=())
