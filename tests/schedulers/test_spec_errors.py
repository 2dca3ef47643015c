"""Malformed schedule specs: one small spec per mistake and the exact message it must produce
(path:line:col: what is wrong — what is expected).  Specs are data: nothing in them runs."""
from __future__ import annotations

import textwrap

import pytest

from optgen.errors import SpecError
from optgen.schedules.load import load_schedule

HEAD = '''[scheduler]
name = "Demo"
signature = "gamma, last_epoch"

[hyperparameters]
gamma = 0.5
'''

CASES = [
    ("unknown_section", HEAD + "[schdule]\nlr = \"base_lr\"\n",
     "7:1: unknown section [schdule]; allowed sections: scheduler, hyperparameters, check, per_group, "
     "attributes, state, functions, schedule"),
    ("unknown_key",
     HEAD.replace('name = "Demo"', 'name = "Demo"\nchainabel = false') + "[schedule]\nlr = \"base_lr\"\n",
     "3:1: unknown key 'chainabel' in [scheduler]; allowed keys: assume, base, base_init, chainable, closed_form, "
     "counter, doc, epoch_zero, initial_step, name, paper, signature, torch"),
    ("missing_lr", HEAD + "[schedule]\nx = \"t\"\n",
     "7:1: [schedule] needs lr = \"<formula of t and base_lr>\""),
    ("unknown_name", HEAD + "[schedule]\nlr = \"base_lr * gama ** t\"\n",
     "8:17: unknown name 'gama' in schedule.lr; known names: base_lr, gamma, t"),
    ("unknown_function", HEAD + "[schedule]\nlr = \"base_lr * cosine(t)\"\n",
     "8:17: unknown function 'cosine'; available: abs, ceil, cos, count_le, exp, floor, log, max, min, sin, sqrt, "
     "where"),
    ("attribute_access", HEAD + "[schedule]\nlr = \"base_lr * gamma.real\"\n",
     "8:17: 'gamma.real' is not allowed in schedule.lr: use numbers, names, + - * / ** // %, where(condition, a, b) "
     "and functions such as cos, min, floor"),
    ("call_in_formula", HEAD + "[schedule]\nlr = \"__import__('os')\"\n",
     "8:7: unknown function '__import__'; available: abs, ceil, cos, count_le, exp, floor, log, max, min, sin, sqrt, "
     "where"),
    ("where_arity", HEAD + "[schedule]\nlr = \"where(t < 3, base_lr)\"\n",
     "8:7: where() takes 3 arguments: where(condition, value_if_true, value_if_false)"),
    ("bad_condition", HEAD + "[schedule]\nlr = \"where(gamma, base_lr, 0)\"\n",
     "8:13: 'gamma' is not a boolean; a condition is a comparison such as 't < warmup_steps', a boolean name, "
     "or and/or/not of those"),
    ("string_choice", HEAD.replace("gamma = 0.5", 'gamma = 0.5\nmode = { default = "a", choices = ["a", "b"] }')
     .replace('"gamma, last_epoch"', '"gamma, mode, last_epoch"')
     + "[schedule]\nlr = \"where(mode == 'c', base_lr, 0)\"\n",
     "9:21: 'c' is not one of mode's choices: a, b"),
    ("syntax_error", HEAD + "[schedule]\nlr = \"base_lr * (gamma\"\n",
     "8:17: syntax error: '(' was never closed (expected a Python-syntax expression)"),
    ("signature_missing", HEAD.replace('"gamma, last_epoch"', '"last_epoch"') + "[schedule]\nlr = \"base_lr\"\n",
     "3:14: signature leaves out hyperparameter(s) gamma"),
    ("required_after_default", HEAD.replace("gamma = 0.5", 'gamma = 0.5\nsteps = { required = true, type = "int" }')
     .replace('"gamma, last_epoch"', '"gamma, steps, last_epoch"') + "[schedule]\nlr = \"base_lr\"\n",
     "3:14: required argument 'steps' follows an argument with a default"),
    ("check_call", HEAD + "[[check]]\nassert = \"print(gamma)\"\nerror = \"x\"\n[schedule]\nlr = \"base_lr\"\n",
     "8:11: 'print(gamma)': a constructor check may call only isinstance() with 2 argument(s), len() with 1 "
     "argument(s), float() with 1 argument(s), int() with 1 argument(s), callable() with 1 argument(s)"),
    ("check_message_field",
     HEAD + "[[check]]\nassert = \"gamma > 0\"\nerror = \"bad {gamma.real}\"\n[schedule]\nlr = \"base_lr\"\n",
     "9:10: error message refers to '{gamma.real}'; a field must be one of gamma, last_epoch, optionally indexed by "
     "a number, or type(<name>)"),
    ("chainable_without_base_lr", HEAD + "[schedule]\nlr = \"gamma ** t\"\n", None),
]


@pytest.mark.parametrize("name, text, expected", [c for c in CASES if c[2]], ids=[c[0] for c in CASES if c[2]])
def test_malformed_spec_message(tmp_path, name, text, expected):
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(SpecError) as info:
        load_schedule(path)
    assert str(info.value) == f"{path}:{expected}"


def test_chainable_spec_without_a_recursion_fails_at_render(tmp_path):
    from optgen.schedules.render import render_module

    path = tmp_path / "demo.toml"
    path.write_text(HEAD + "[schedule]\nlr = \"gamma ** t\"\n")
    with pytest.raises(SpecError, match="chainable = true, but lr does not depend on base_lr"):
        render_module([load_schedule(path)])


def test_spec_text_is_never_executed(monkeypatch):
    """Formulas, checks and attributes go through ast and an allow-list: no spec text ever reaches
    eval or exec (sympy's own internal uses are let through)."""
    import builtins

    from optgen.schedules.build import load_schedules
    from optgen.schedules.render import render_module

    seen = []
    real_eval, real_exec = builtins.eval, builtins.exec

    def watch(real):
        def wrapper(source, *args, **kwargs):
            seen.append(source if isinstance(source, str) else "")
            return real(source, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "eval", watch(real_eval))
    monkeypatch.setattr(builtins, "exec", watch(real_exec))
    render_module(load_schedules())
    spec_words = ("base_lr", "warmup_steps", "step_size", "T_max", "anneal")
    assert not [s for s in seen if any(w in s for w in spec_words)]
