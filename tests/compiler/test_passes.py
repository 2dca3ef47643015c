"""Unit tests per compiler stage: each pass on small inline specs."""
import textwrap

import pytest
import sympy

from optgen.backends.forloop import describe_ops
from optgen.backends.printing import PythonScalarPrinter
from optgen.ir.functions import symbol
from optgen.ir.lower import lower
from optgen.ir.validate import implies, validate
from optgen.passes import compile_spec
from optgen.passes.cse import cse
from optgen.passes.hoist_scalars import hoist_scalars
from optgen.passes.specialize import specialize
from optgen.spec.load import load_spec
from optgen.spec.toml_locations import locate
from optgen.tools.dump_ir import dump

HEADER = """
[optimizer]
name = "Toy"
signature = "lr, beta, weight_decay, flag, *, foreach"

[hyperparameters]
lr = 1e-3
beta = 0.9
weight_decay = 0
flag = false

[state]
step = "0"
buf = "zeros_like(param)"
"""


def toy(tmp_path, rule: str):
    path = tmp_path / "toy.toml"
    path.write_text(HEADER + '\n[update]\nrule = """\n' + textwrap.dedent(rule).strip() + '\n"""\n')
    return load_spec(path)


def ops_text(spec, **flags):
    compiled = compile_spec(spec)
    return describe_ops(compiled.variant(flags).ops)


def test_locations_cover_keys_inline_tables_arrays_and_multiline_strings():
    text = 'a = 1\n[t]\nx = { default = [1, 2], names = ["p", "q"] }\n[[c]]\ny = "s"\n[u]\nrule = """\nz = 1\n"""\n'
    keys, values = locate(text)
    assert keys[("a",)] == (1, 1)
    assert keys[("t", "x", "names")] == (3, 25)
    assert values[("t", "x", "default", 1)] == (3, 21)
    assert keys[("c", 0, "y")] == (5, 1) and values[("c", 0, "y")] == (5, 6)
    assert values[("u", "rule")] == (8, 1)  # the newline after """ is not part of the string


def test_recognises_torch_fused_ops(tmp_path):
    spec = toy(tmp_path, """
        step = step + 1
        buf = beta * buf + (1 - beta) * grad * grad
        denom = sqrt(buf) + 1e-8
        param = param - lr * grad / denom
    """)
    text = ops_text(spec)
    assert "step_t.add_(1)" in text
    assert "buf.mul_(beta).addcmul_(grad, grad, value=1 - beta)" in text
    assert "denom = buf.sqrt().add_(1e-08)" in text
    assert "param.addcdiv_(grad, denom, value=-lr)" in text


def test_lerp_and_maximum_update_in_place(tmp_path):
    spec = toy(tmp_path, """
        step = step + 1
        buf = lerp(buf, grad, 1 - beta)
        buf = maximum(buf, grad)
        param = param - lr * buf
    """)
    text = ops_text(spec)
    assert "buf.lerp_(grad, 1 - beta)" in text
    assert "torch.maximum(buf, grad, out=buf)" in text


def test_grad_is_never_written_in_place_unless_we_own_it(tmp_path):
    spec = toy(tmp_path, """
        step = step + 1
        if flag:
            grad = -grad
        grad = grad + weight_decay * param
        buf = buf + grad
        param = param - lr * buf
    """)
    assert "grad = grad.add(param, alpha=weight_decay)" in ops_text(spec, flag=False)
    # after `grad = -grad` the buffer is ours: reuse_buffers makes the add in place
    assert "grad.add_(param, alpha=weight_decay)" in ops_text(spec, flag=True)


def test_reuse_does_not_cross_a_runtime_guard(tmp_path):
    spec = toy(tmp_path, """
        step = step + 1
        if weight_decay != 0:
            grad = grad * 2
        grad = grad + param
        buf = buf + grad
        param = param - lr * buf
    """)
    text = ops_text(spec)
    # grad is ours only when the guarded line ran, so the next statement must copy
    assert "grad = grad.add(param)" in text


def test_cse_names_repeated_tensor_subexpressions(tmp_path):
    spec = toy(tmp_path, """
        step = step + 1
        buf = buf + sqrt(grad * grad + 1) * lr
        param = param - sqrt(grad * grad + 1) * buf
    """)
    program = cse(specialize(validate(lower(spec)), (("flag", False),)))
    targets = [a.target for a in program.body]
    assert targets.count("common0") == 1 and targets.index("common0") < targets.index("buf")
    assert symbol("common0") in program.body[-1].value.free_symbols


def test_cse_respects_reassignment(tmp_path):
    spec = toy(tmp_path, """
        step = step + 1
        buf = buf + sqrt(grad + 1)
        grad = grad * 2
        param = param - sqrt(grad + 1) * buf
    """)
    program = cse(specialize(validate(lower(spec)), (("flag", False),)))
    assert not any(a.target.startswith("common") for a in program.body)


def test_hoisting_moves_step_independent_scalars_out_of_the_loop(tmp_path):
    spec = toy(tmp_path, """
        step = step + 1
        one_minus_beta = 1 - beta
        bias = 1 - beta ** step
        buf = lerp(buf, grad, one_minus_beta)
        param = param - lr / bias * buf
    """)
    program = hoist_scalars(specialize(validate(lower(spec)), (("flag", False),)))
    assert [a.target for a in program.preamble] == ["one_minus_beta"]
    assert program.per_tensor == {"bias"}


def test_specialisation_drops_dead_branches(tmp_path):
    spec = toy(tmp_path, """
        step = step + 1
        if flag:
            buf = buf + grad
        else:
            buf = buf - grad
        param = param - lr * buf
    """)
    on = specialize(validate(lower(spec)), (("flag", True),))
    assert [str(a.value) for a in on.body if a.target == "buf"] == ["buf + grad"]
    assert all(a.guard == sympy.true for a in on.body)


def test_implies_reasons_about_relations():
    wd, m = symbol("weight_decay"), symbol("momentum")
    assert implies(sympy.And(sympy.Ne(wd, 0), sympy.Ne(m, 0)), sympy.Ne(m, 0))
    assert not implies(sympy.Ne(wd, 0), sympy.Ne(m, 0))
    assert not implies(sympy.Eq(m, 0), sympy.Ne(m, 0))


@pytest.mark.parametrize("expr,text", [
    ("1 - lr * weight_decay", "1 - lr * weight_decay"),
    ("lr / (1 + (step - 1) * beta)", "lr / (1 + beta * (step - 1))"),
    ("sqrt(1 - beta ** step)", "math.sqrt(1 - beta ** step)"),
    ("-lr / (1 - beta)", "-lr / (1 - beta)"),
    ("beta ** (step + 1)", "beta ** (1 + step)"),
])
def test_scalar_printer_reads_like_hand_written_python(expr, text):
    from optgen.errors import Location
    from optgen.spec.expressions import parse_math

    names = {n: "hyperparameter" for n in ("lr", "weight_decay", "beta", "step")}
    value = parse_math(expr, Location("x", 1), names, "test")
    printed = PythonScalarPrinter()(value)
    assert printed == text
    env = {"lr": 0.3, "weight_decay": 0.2, "beta": 0.7, "step": 3.0}
    import math

    expected = eval(expr.replace("sqrt", "math.sqrt"), {"math": math}, env)
    assert eval(printed, {"math": math}, env) == pytest.approx(expected)


def test_dump_ir_after_each_pass(tmp_path):
    spec = toy(tmp_path, "step = step + 1\nbuf = buf + grad\nparam = param - lr * buf")
    for name in ("lower", "specialize", "cse", "hoist_scalars", "select_ops", "reuse_buffers"):
        assert "buf" in dump(spec, (("flag", False),), name)


def test_spec_text_cannot_escape_generated_docstrings(tmp_path):
    import ast

    from optgen.backends.optimizer_class import OptimizerClassBackend
    from optgen.errors import SpecError

    path = tmp_path / "toy.toml"
    path.write_text(HEADER + "\n[update]\nrule = '''\nstep = step + 1  # \"\"\" + __import__(\"os\") \\\n"
                    "buf = buf + grad\nparam = param - lr * buf\n'''\n")
    spec = load_spec(path)
    text = OptimizerClassBackend(("forloop",)).render(compile_spec(spec))
    module = ast.parse(text)  # still valid Python, and the comment stayed inside the docstring
    assert '__import__' in (ast.get_docstring(module) or "")
    bad = tmp_path / "bad.toml"
    bad.write_text((tmp_path / "toy.toml").read_text().replace('name = "Toy"', "name = \"Toy\"\ndoc = 'x \"\"\" y'"))
    with pytest.raises(SpecError, match="may not contain"):
        load_spec(bad)


# -- patterns of the rest of torch.optim (Adadelta ... Rprop) ------------------------------------

def foreach_text(spec, **flags):
    from optgen.backends.foreach import ForeachRenderer

    compiled = compile_spec(spec)
    return "\n".join(ForeachRenderer(compiled.variant(flags).ops).body())


def test_cse_leaves_products_that_fused_ops_absorb(tmp_path):
    # NAdam's two addcdiv_ share lr / denom: a temporary for it would cost a buffer and round
    # differently from torch's param.addcdiv_(grad, denom, value=...)
    spec = toy(tmp_path, """
        step = step + 1
        buf = beta * buf + grad
        denom = sqrt(buf) + 1e-8
        param = param - lr * (1 - beta) * grad / denom
        param = param - lr * beta * buf / denom
    """)
    text = ops_text(spec)
    assert "common" not in text
    assert "param.addcdiv_(grad, denom, value=-lr * (1 - beta))" in text
    assert "param.addcdiv_(buf, denom, value=-beta * lr)" in text


def test_update_reading_its_old_value_in_another_term(tmp_path):
    # ASGD's averaging: torch's ax.add_(param.sub(ax).mul_(mu)), the temporary written in place
    spec = toy(tmp_path, """
        step = step + 1
        buf = buf + (param - buf) * beta
        param = param - lr * buf
    """)
    assert "buf.add_(param.sub(buf).mul_(beta))" in ops_text(spec)


def test_where_with_a_number_is_a_masked_fill(tmp_path):
    # Rprop's sign[sign.gt(0)] = etaplus, and prev = grad with zeros where the sign flipped
    spec = toy(tmp_path, """
        step = step + 1
        s = sign(grad * buf)
        s = where(s > 0, beta, s)
        buf = where(s < 0, 0, grad)
        param = param - sign(buf) * lr
    """)
    text = ops_text(spec)
    assert "s = grad.mul(buf).sign_()" in text
    assert "s.masked_fill_(s.gt(0), beta)" in text
    assert "buf.copy_(grad)\nbuf.masked_fill_(s.lt(0), 0)" in text
    assert "param.add_(buf.sign(), alpha=-lr)" in text or "param.addcmul_(buf.sign()" in text
    # foreach: the statements of several ops without a multi-tensor kernel run tensor by tensor,
    # so each mask lives for one tensor
    text = foreach_text(spec)
    assert ("for i in range(len(params)):\n    # s = where(s > 0, beta, s)\n"
            "    ss[i].masked_fill_(ss[i].gt(0), beta)") in text


def test_last_reader_of_an_owned_buffer_works_in_it(tmp_path):
    # Adamax: after weight decay (grad is our copy) |grad| + eps is computed in grad's buffer,
    # torch's _foreach_abs_(grouped_grads); without it grad is the user's and is not written
    spec = toy(tmp_path, """
        step = step + 1
        if weight_decay != 0:
            grad = grad + weight_decay * param
        buf = maximum(beta * buf, abs(grad) + 1e-8)
        param = param - lr * buf
    """)
    text = ops_text(spec)
    assert "    grad = grad.add(param, alpha=weight_decay)\n    # buf = maximum" in text
    assert "grad.abs_().add_(1e-08)\n    torch.maximum(buf, grad, out=buf)\nelse:" in text
    assert "    buf.mul_(beta)\n    torch.maximum(buf, grad.abs().add_(1e-08), out=buf)" in text
    assert "torch._foreach_abs_(grads)" in foreach_text(spec)


def test_counter_value_is_read_back_only_when_used(tmp_path):
    spec = toy(tmp_path, """
        step = step + 1
        buf = beta * buf + grad
        param = param - lr * buf
    """)
    # a counter is read with counter_value (`.item()` eagerly: Note [Counters under torch.compile])
    assert "counter_value(" not in ops_text(spec)
    assert "counter_value(" not in foreach_text(spec)


def test_foreach_clamp_is_clamp_min_then_clamp_max(tmp_path):
    spec = toy(tmp_path, """
        step = step + 1
        buf = clamp(buf * grad, lr, beta)
        param = param - buf
    """)
    assert "buf.mul_(grad).clamp_(min=lr, max=beta)" in ops_text(spec)
    text = foreach_text(spec)
    assert "torch._foreach_clamp_min_(bufs, lr)\ntorch._foreach_clamp_max_(bufs, beta)" in text


def test_counter_set_from_a_host_value_goes_through_the_default_dtype(tmp_path):
    # ASGD's eta: torch stores eta.copy_(torch.as_tensor(value)) — see Note [Counters set from host values]
    spec = toy(tmp_path, """
        step = step + 1
        buf = buf + grad
        param = param - lr * buf
        step = lr / (1 + beta * lr) ** weight_decay
    """)
    assert "step_t.copy_(torch.as_tensor(lr / (1 + beta * lr) ** weight_decay))" in ops_text(spec)


def test_else_after_else_starts_a_new_if(tmp_path):
    spec = toy(tmp_path, """
        step = step + 1
        if step > 2:
            buf = buf + grad
        else:
            buf = buf - grad
        if step > 2:
            param = param - lr * buf
        else:
            param = param + lr * buf
    """)
    # (the branches as written are the else of `if torch.compiler.is_compiling():`, Note [Branches
    # on traced scalars] in optgen/backends/python_base.py)
    traced, _, text = ops_text(spec).partition("\nelse:\n")
    assert "if torch.compiler.is_compiling():" in traced
    assert text.count("else:") == 2 and text.count("if step > 2:") == 2


def test_interpreter_stores_counters_in_their_dtype(tmp_path):
    # NAdam's mu_product *= mu multiplies in the counter's float32, as torch does
    import torch

    from optgen.ir.interpret import reference_step

    spec = toy(tmp_path, """
        step = step * (1 + beta)
        buf = buf + grad
        param = param - lr * buf
    """)
    program = validate(lower(spec))
    hyper = {"lr": 0.1, "beta": 0.1, "weight_decay": 0, "flag": False}
    z = torch.zeros(2, dtype=torch.float64)
    _, state = reference_step(program, z, z, {"step": 1.0, "buf": z}, hyper)
    assert state["step"] == (torch.tensor(1.0) * (1 + 0.1)).item() != 1.1


def test_foreach_loop_rebinding_an_alias_copies_the_list(tmp_path):
    # `upd = buf` binds the state's list; a tensor-by-tensor statement that rebinds upd[i] must not
    # write into the list of buf (the runtime reads state back from it)
    spec = toy(tmp_path, """
        step = step + 1
        buf = beta * buf + grad
        upd = buf
        upd = where(upd > 0, lr, upd) * 2
        param = param - upd
    """)
    text = foreach_text(spec)
    assert "upds = bufs\nupds = list(upds)\nfor i in range(len(params)):" in text
    assert "    upds[i] = upds[i].masked_fill(upds[i].gt(0), lr).mul_(2)" in text


def test_a_spec_extending_another_without_changing_its_kernels_shares_them(tmp_path):
    """AdamW (extends Adam: other defaults, decoupling fixed on) runs Adam's generated kernels;
    a child that brings its own rule gets kernels of its own."""
    import optgen
    from optgen.build import ROOT

    adamw = load_spec(ROOT / "specs" / "optimizers" / "adamw.toml")
    assert adamw.kernels_from == "Adam"
    assert optgen.AdamW._kernels["forloop"] is optgen.OPTIMIZERS["Adam"]._kernels["forloop"]
    parent = tmp_path / "toy.toml"
    parent.write_text(HEADER + '\n[update]\nrule = """\nstep = step + 1\nbuf = buf + grad\n'
                               'param = param - lr * buf\n"""\n')
    child = tmp_path / "child.toml"
    child.write_text('[optimizer]\nname = "Child"\nextends = "Toy"\n[update]\nrule = """\n'
                     'step = step + 1\nbuf = buf - grad\nparam = param - lr * buf\n"""\n')
    assert load_spec(child).kernels_from is None
    child.write_text('[optimizer]\nname = "Child"\nextends = "Toy"\n[hyperparameters]\nlr = 0.5\n')
    assert load_spec(child).kernels_from == "Toy"


def test_foreach_scalar_under_a_group_condition_is_one_number(tmp_path):
    # hoist_scalars keeps `c` in the body (it is under an if), yet it is one value per group:
    # foreach read it as a per-tensor list `cs` that nothing defined (NameError)
    spec = toy(tmp_path, """
        step = step + 1
        if beta > 0.5:
            c = lr * 2
        else:
            c = lr * 3
        buf = buf + sqrt(c) * grad
        param = param - buf
    """)
    text = foreach_text(spec)
    assert "c = 2 * lr" in text and "alpha=sqrt(c)" in text and "cs" not in text


def test_cse_keeps_a_repeated_per_tensor_scalar_a_scalar(tmp_path):
    """Note [Per-tensor scalars stay scalars]: numel(param) twice is written twice (it was a
    tensor temporary, torch.full_like, that math.sqrt refused); norm(param) twice is computed once,
    into a per-tensor scalar."""
    spec = toy(tmp_path, """
        step = step + 1
        a = 1 / sqrt(numel(param)) + lr
        b = numel(param)
        buf = buf + a * grad + b * param
        param = param - buf
    """)
    program = cse(specialize(validate(lower(spec)), (("flag", False),)))
    assert not any(a.target.startswith("common") for a in program.body)
    spec = toy(tmp_path, """
        step = step + 1
        a = 1 / (norm(param) + lr)
        b = norm(param) * beta
        buf = buf + a * grad + b * param
        param = param - buf
    """)
    program = hoist_scalars(cse(specialize(validate(lower(spec)), (("flag", False),))))
    commons = [a.target for a in program.body if a.target.startswith("common")]
    assert commons == ["common0"] and program.roles["common0"].name == "SCALAR"
    assert "common0" in program.per_tensor
    assert "common0s = [" in foreach_text(spec)


def test_cse_does_not_take_a_scalar_local_for_a_tensor(tmp_path):
    # `bias` is a per-tensor scalar (it reads the counter); sqrt(bias) + 1 repeated is a scalar too
    spec = toy(tmp_path, """
        step = step + 1
        bias = 1 - beta ** step
        buf = buf + (sqrt(bias) + 1) * grad
        param = param - (sqrt(bias) + 1) * lr * buf
    """)
    program = cse(specialize(validate(lower(spec)), (("flag", False),)))
    assert not any(a.target.startswith("common") for a in program.body)


def test_a_temporary_read_by_a_scalar_argument_is_freed_after_it(tmp_path):
    # maximum(param, numel(grad)) reads grad through its scalar bound: `del grads` came before it
    spec = toy(tmp_path, """
        step = step + 1
        grad = grad * beta
        buf = buf * lr
        m = maximum(param, numel(grad))
        param = param - lr * m / (sqrt(buf) + 1)
    """)
    text = foreach_text(spec)
    assert "ms = torch._foreach_clamp_min(params, [grad.numel() for grad in grads])\ndel grads" in text


def test_branch_on_a_counter_also_has_its_where_form(tmp_path):
    # Note [Branches on traced scalars]: each arm runs on a clone of the tensor it updates, and
    # torch.where keeps it only where its condition holds; the arms as written are the eager path.
    spec = toy(tmp_path, """
        step = step + 1
        if step > 2:
            buf = buf + grad
        param = param - lr * buf
    """)
    traced, _, eager = ops_text(spec).partition("\nelse:\n")
    assert "buf_new = buf.clone()\n    # buf = buf + grad\n    buf_new.add_(grad)\n" \
           "    buf.copy_(torch.where(step > 2, buf_new, buf))" in traced
    assert "if step > 2:\n        # buf = buf + grad\n        buf.add_(grad)" in eager


def test_branch_that_rebinds_a_name_read_after_it_keeps_only_the_python_branch(tmp_path):
    # `u` exists only after the if/else: there is no tensor to select into (a graph break under
    # torch.compile, never a wrong step)
    spec = toy(tmp_path, """
        step = step + 1
        if step > 2:
            u = grad * 2
        else:
            u = grad
        buf = buf + u
        param = param - lr * buf
    """)
    text = ops_text(spec)
    assert "is_compiling" not in text and "if step > 2:" in text


def test_choice_on_a_norm_is_a_torch_where_while_tracing(tmp_path):
    spec = toy(tmp_path, """
        step = step + 1
        buf = buf + grad
        n = norm(buf)
        r = where(n > 0, lr / n, lr)
        param = param - r * buf
    """)
    text = ops_text(spec)
    assert "n = norm(buf)" in text
    assert "if torch.compiler.is_compiling():\n    r = torch.where(n > 0, lr / n, lr)\n" \
           "else:\n    r = (lr / n if n > 0 else lr)" in text
