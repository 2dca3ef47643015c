"""Value semantics: a name in a rule denotes a value, whatever a backend does in place.

Each case is a small spec whose rule keeps a copy of a tensor (a state, ``param``, ``grad``, a
local, a counter) and then updates the original, or assigns a local on every path of an ``if``, or
computes a constant in a tensor statement.  Each is built into a throw-away package (every
kernel backend the spec gets: for-loop, foreach, differentiable, C, Triton in its CPU
interpreter), run for a few steps for every flag combination, and compared with

- the reference interpreter (optgen.ir.interpret, float64), and
- the rule computed by hand in this file with plain torch values (``expected``), so that a bug
  shared by the compiler and the interpreter would show too.

Before the preserve_values pass (Note [Value semantics] in optgen/passes/preserve_values.py) the
for-loop and foreach kernels read the *updated* tensor through the copy: differences of 1e-2,
where a correct kernel differs from the references by rounding only (float64: the backends fuse
and order operations differently from the interpreter, hence 1e-12 relative, not 0).
"""
from __future__ import annotations

import importlib
import itertools
import sys
import textwrap

import pytest
import torch

from optgen.backends.base import module_name
from optgen.backends.optimizer_class import OptimizerClassBackend
from optgen.build import kernel_backends
from optgen.ir.interpret import hyperparameter_values, initial_state, reference_step
from optgen.passes import compile_spec
from optgen.runtime import c_launch
from optgen.spec.load import load_spec

STEPS = 3          # three steps: the first reads zero state, later ones what earlier ones stored
TOLERANCE = 1e-12  # relative, float64: rounding differences of reordered operations only
SHAPES = [(7, 5), (13,)]

_packages = itertools.count()


def spec_text(rule: str, hyper: str, state: str, flags: str = "") -> str:
    names = [line.split("=")[0].strip() for line in (hyper + "\n" + flags).strip().splitlines() if "=" in line]
    return textwrap.dedent(f'''
        [optimizer]
        name = "Case"
        signature = "{", ".join(names)}, *, foreach, differentiable"

        [hyperparameters]
        {hyper.strip()}
        {flags.strip()}

        [state]
        {state.strip()}

        [update]
        rule = """
        ''') + textwrap.dedent(rule).strip() + '\n"""\n'


def build(tmp_path, text: str):
    """The spec compiled and rendered into a fresh package under tmp_path: (compiled, class)."""
    spec_path = tmp_path / "case.toml"
    spec_path.write_text(text)
    compiled = compile_spec(load_spec(spec_path))
    package = f"value_semantics_case{next(_packages)}"
    folder = tmp_path / package
    folder.mkdir()
    backends = kernel_backends(compiled)
    class_backend = OptimizerClassBackend(tuple(b.name for b in backends),
                                          imported_on_first_use=tuple(b.name for b in backends if b.lazy))
    (folder / f"{module_name(compiled.spec.name)}.py").write_text(class_backend.render(compiled))
    for backend in backends:
        (folder / f"{module_name(compiled.spec.name, backend.name)}.py").write_text(backend.render(compiled))
    (folder / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(f"{package}.{module_name(compiled.spec.name)}")
    finally:
        sys.path.remove(str(tmp_path))
    return compiled, getattr(module, compiled.spec.name)


def gradients(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def initial_params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def run_generated(cls, implementation: str, kwargs: dict, state_names):
    params = [p.clone().requires_grad_() for p in initial_params()]
    opt = cls(params, **kwargs)
    opt.implementation = implementation
    for k in range(STEPS):
        for p, g in zip(params, gradients(k), strict=True):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, gradients(k), strict=True):
            assert p.grad is not None and torch.equal(p.grad, g), f"{implementation} wrote into the user's gradient"
    return [p.detach() for p in params], [{n: opt.state[p][n] for n in state_names} for p in params]


def run_reference(compiled, cls, kwargs: dict, state_names):
    group = cls([torch.zeros(2, requires_grad=True)], **kwargs).param_groups[0]
    hyper = hyperparameter_values(compiled.program, group)
    params = initial_params()
    states = [initial_state(compiled.program, p, hyper) for p in params]
    for k in range(STEPS):
        for i, g in enumerate(gradients(k)):
            params[i], states[i] = reference_step(compiled.program, params[i], g, states[i], hyper)
    return params, [{n: s[n] for n in state_names} for s in states]


def run_by_hand(expected, kwargs: dict, state_names, init):
    params = initial_params()
    states = [{n: init(n, p) for n in state_names} for p in params]
    for k in range(STEPS):
        for i, g in enumerate(gradients(k)):
            params[i], states[i] = expected(params[i], g, dict(states[i]), kwargs)
    return params, states


def difference(a, b) -> float:
    """Largest difference, relative above magnitude 1; a NaN on one side only is infinitely far
    (``max(worst, nan)`` would keep ``worst`` and let a NaN result pass).  The states compared
    are ``a``'s (the harness collects those of ``state_names``), each of which ``b`` must have."""
    (pa, sa), (pb, sb) = a, b
    assert len(pa) == len(pb) and all(set(x) <= set(y) for x, y in zip(sa, sb, strict=True)), (sa, sb)
    pairs = list(zip(pa, pb, strict=True)) + [(x[n], y[n]) for x, y in zip(sa, sb, strict=True) for n in x]
    worst = 0.0
    for x, y in pairs:
        x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
        assert x.shape == y.shape or x.numel() == 1 and y.numel() == 1, (x.shape, y.shape)
        d = ((x - y).abs() / (1e-300 + y.abs().clamp_min(1.0))).masked_fill(x.isnan() & y.isnan(), 0.0)
        worst = max(worst, d.nan_to_num(nan=float("inf")).max().item())
    return worst


def implementations(cls) -> list[str]:
    return [i for i in cls._kernels if i != "c" or c_launch.available()]


def check(tmp_path, text, expected, configs, init=None, state_names=("m",), skip=()):
    """Every implementation × config against the interpreter and against ``expected``."""
    compiled, cls = build(tmp_path, text)
    init = init or (lambda name, p: torch.zeros_like(p))
    impls = [i for i in implementations(cls) if i not in skip]
    assert {"forloop", "foreach", "differentiable"} <= set(impls)
    failures = []
    for kwargs in configs:
        reference = run_reference(compiled, cls, kwargs, state_names)
        by_hand = run_by_hand(expected, kwargs, state_names, init)
        assert difference(reference, by_hand) <= TOLERANCE, f"interpreter vs by hand, {kwargs}"
        for impl in impls:
            result = run_generated(cls, impl, kwargs, state_names)
            d = max(difference(result, reference), difference(result, by_hand))
            if d > TOLERANCE:
                failures.append(f"{impl} {kwargs}: {d:.3g}")
    assert not failures, failures
    return compiled, impls


HYPER = "lr = 0.1\nbeta = 0.9\nweight_decay = 0.0"
ON_OFF = [{"weight_decay": 0.0}, {"weight_decay": 0.25}]


# -- bug 1: copies of a value that is then updated in place ----------------------------------------

def test_copy_of_a_state_keeps_its_old_value(tmp_path):
    def expected(param, grad, s, h):
        m_old = s["m"]
        s["m"] = 0.9 * s["m"] + (1 - 0.9) * grad
        return param - 0.1 * m_old, s

    check(tmp_path, spec_text("""
        m_old = m
        m = beta * m + (1 - beta) * grad
        param = param - lr * m_old
    """, HYPER, 'm = "zeros_like(param)"'), expected, [{}])


def test_copy_read_inside_the_statement_that_updates_the_original(tmp_path):
    def expected(param, grad, s, h):
        m_old = s["m"]
        s["m"] = 0.9 * s["m"] + m_old * grad + grad
        return param - 0.1 * s["m"], s

    check(tmp_path, spec_text("""
        m_old = m
        m = beta * m + m_old * grad + grad
        param = param - lr * m
    """, HYPER, 'm = "zeros_like(param)"'), expected, [{}])


def test_copy_of_param_keeps_its_old_value(tmp_path):
    def expected(param, grad, s, h):
        p_old = param
        param = param - 0.1 * grad
        param = param + 0.5 * (p_old - param)
        s["m"] = s["m"] + p_old
        return param, s

    check(tmp_path, spec_text("""
        p_old = param
        param = param - lr * grad
        param = param + 0.5 * (p_old - param)
        m = m + p_old
    """, HYPER, 'm = "zeros_like(param)"'), expected, [{}])


def test_copy_of_grad_and_of_a_local(tmp_path):
    def expected(param, grad, s, h):
        if h.get("maximize"):
            grad = -grad
        g = grad
        grad = grad * 2 + param
        a = grad * 3
        b = a
        a = a + g
        s["m"] = 0.9 * s["m"] + a
        return param - 0.1 * (grad + g + b), s

    check(tmp_path, spec_text("""
        if maximize:
            grad = -grad
        g = grad
        grad = grad * 2 + param
        a = grad * 3
        b = a
        a = a + g
        m = beta * m + a
        param = param - lr * (grad + g + b)
    """, HYPER, 'm = "zeros_like(param)"', "maximize = false"), expected, [{"maximize": False}, {"maximize": True}])


def test_copy_taken_in_one_branch(tmp_path):
    def expected(param, grad, s, h):
        m_old = s["m"] if h["weight_decay"] != 0 else grad
        s["m"] = 0.9 * s["m"] + (1 - 0.9) * grad
        return param - 0.1 * m_old, s

    check(tmp_path, spec_text("""
        if weight_decay != 0:
            m_old = m
        else:
            m_old = grad
        m = beta * m + (1 - beta) * grad
        param = param - lr * m_old
    """, HYPER, 'm = "zeros_like(param)"'), expected, ON_OFF)


def test_chain_of_copies(tmp_path):
    def expected(param, grad, s, h):
        b = s["m"]
        s["m"] = 0.9 * s["m"] + grad
        s["v"] = s["v"] + b * b
        return param - 0.1 * b, s

    check(tmp_path, spec_text("""
        a = m
        b = a
        m = beta * m + grad
        v = v + b * b
        param = param - lr * b
    """, HYPER, 'm = "zeros_like(param)"\nv = "zeros_like(param)"'), expected, [{}], state_names=("m", "v"))


def test_copy_stored_into_another_state(tmp_path):
    def expected(param, grad, s, h):
        u = s["m"]
        s["m"] = s["m"] * 0.9 + grad
        s["v"] = s["v"] + u
        return param - 0.1 * s["m"], s

    check(tmp_path, spec_text("""
        u = m
        m = m * beta + grad
        v = v + u
        param = param - lr * m
    """, HYPER, 'm = "zeros_like(param)"\nv = "zeros_like(param)"'), expected, [{}], state_names=("m", "v"))


def test_copy_of_a_counter(tmp_path):
    def expected(param, grad, s, h):
        old = s["step"]
        s["step"] = s["step"] + 1
        return param - 0.1 * (old + 1) / s["step"] * grad, s

    check(tmp_path, spec_text("""
        s = step
        step = step + 1
        param = param - lr * (s + 1) / step * grad
    """, HYPER, 'step = "0"'), expected, [{}], state_names=("step",),
          init=lambda name, p: 0.0)


def test_copy_read_by_a_reduction_after_the_update(tmp_path):
    def expected(param, grad, s, h):
        m_old = s["m"]
        s["m"] = 0.9 * s["m"] + grad
        return param - 0.1 * grad / (torch.linalg.vector_norm(m_old).item() + 1), s

    check(tmp_path, spec_text("""
        m_old = m
        m = beta * m + grad
        param = param - lr * grad / (norm(m_old) + 1)
    """, HYPER, 'm = "zeros_like(param)"'), expected, [{}])


def test_copy_of_a_lazily_created_state(tmp_path):
    def expected(param, grad, s, h):
        if s["m"] is None:
            s["m"] = grad.clone()
        else:
            s["m"] = 0.9 * s["m"] + grad
        u = s["m"]
        s["v"] = s["v"] + u
        s["m"] = s["m"] * 0.5
        return param - 0.1 * u, s

    def init(name, p):
        return None if name == "m" else torch.zeros_like(p)

    check(tmp_path, spec_text("""
        m = beta * m + grad
        u = m
        v = v + u
        m = m * 0.5
        param = param - lr * u
    """, HYPER, 'm = { first = "grad" }\nv = "zeros_like(param)"'), expected, [{}],
          init=init, state_names=("m", "v"))


# -- bug 2: a local assigned on every path of an `if` exists on every path ---------------------------

def test_local_assigned_in_both_branches(tmp_path):
    def expected(param, grad, s, h):
        if h["weight_decay"] != 0:
            u = s["s0"]
        else:
            u = torch.where(s["s1"] > param, s["s1"], grad)
        s["s0"] = s["s0"] + grad
        s["s1"] = s["s1"] * 0.5 + grad
        return param - 0.1 * u, s

    check(tmp_path, spec_text("""
        if weight_decay != 0:
            u = s0
        else:
            u = where(s1 > param, s1, grad)
        s0 = s0 + grad
        s1 = s1 * 0.5 + grad
        param = param - lr * u
    """, HYPER, 's0 = "zeros_like(param)"\ns1 = "zeros_like(param)"'), expected, ON_OFF,
          state_names=("s0", "s1"))


def test_local_assigned_in_both_branches_per_tensor_first(tmp_path):
    def expected(param, grad, s, h):
        if h["weight_decay"] != 0:
            u = torch.where(s["m"] > param, s["m"], grad)
        else:
            u = grad * 2
        s["m"] = s["m"] * 0.5 + grad
        return param - 0.1 * u, s

    check(tmp_path, spec_text("""
        if weight_decay != 0:
            u = where(m > param, m, grad)
        else:
            u = grad * 2
        m = m * 0.5 + grad
        param = param - lr * u
    """, HYPER, 'm = "zeros_like(param)"'), expected, ON_OFF)


# -- bug 3: constants in tensor statements ------------------------------------------------------------

@pytest.mark.parametrize("rule, by_hand", [
    ("x = grad - grad\nm = m + x + grad\nparam = param - lr * m",
     lambda p, g, m: (m + g, p - 0.1 * (m + g))),
    ("m = minimum(m, m) - m\nparam = param - lr * (m + grad)",
     lambda p, g, m: (torch.zeros_like(m), p - 0.1 * g)),
    ("m = 0 * grad + 2\nparam = param - lr * m * grad",
     lambda p, g, m: (torch.full_like(m, 2.0), p - 0.1 * 2 * g)),
    ("m = beta + 0 * m\nparam = param - lr * grad * m",
     lambda p, g, m: (torch.full_like(m, 0.9), p - 0.1 * g * 0.9)),
    ("m = m + maximum(grad, 0)\nparam = param - lr * minimum(0.5, m)",
     lambda p, g, m: (m + g.clamp_min(0), p - 0.1 * (m + g.clamp_min(0)).clamp_max(0.5))),
    ("m = where(grad > 0, 1, -1)\nparam = param - lr * m",
     lambda p, g, m: (torch.where(g > 0, 1.0, -1.0).double(), p - 0.1 * torch.where(g > 0, 1.0, -1.0).double())),
    ("m = where(grad > 0, m + 1, 0)\nparam = param - lr * maximum(m, 1)",
     lambda p, g, m: (torch.where(g > 0, m + 1, 0.0), p - 0.1 * torch.where(g > 0, m + 1, 0.0).clamp_min(1))),
    ("m = m + sqrt(abs(exp(clamp(grad, -3, 3))) + beta)\nparam = param - lr * m",
     lambda p, g, m: (m + (g.clamp(-3, 3).exp().abs() + 0.9).sqrt(),
                      p - 0.1 * (m + (g.clamp(-3, 3).exp().abs() + 0.9).sqrt()))),
    ("y = grad * 0 + lr\nm = m + y\nparam = param - y * grad",
     lambda p, g, m: (m + 0.1, p - 0.1 * g)),
    ("param = 0 * param + lr\nm = m + grad",
     lambda p, g, m: (m + g, torch.full_like(p, 0.1))),
], ids=["local_zero", "state_zero", "state_constant", "state_hyper", "maximum_constant", "where_constants",
        "where_constant_branch", "clamp_is_real", "local_scalar_value", "param_constant"])
def test_constant_in_a_tensor_statement(tmp_path, rule, by_hand):
    def expected(param, grad, s, h):
        s["m"], param = by_hand(param, grad, s["m"])
        return param, s

    check(tmp_path, spec_text(rule, HYPER, 'm = "zeros_like(param)"'), expected, [{}])


# -- copies only where needed, and visible -----------------------------------------------------------

def forloop_code(tmp_path, rule: str, state: str = 'm = "zeros_like(param)"') -> str:
    from optgen.backends.forloop import BACKEND

    path = tmp_path / "case.toml"
    path.write_text(spec_text(rule, HYPER, state))
    return BACKEND.render(compile_spec(load_spec(path)))


def test_a_copy_is_a_clone_with_its_reason(tmp_path):
    code = forloop_code(tmp_path, """
        m_old = m
        m = beta * m + (1 - beta) * grad
        param = param - lr * m_old
    """)
    assert "m_old = m.clone()  # a copy, not an alias: m is updated in place below while m_old is still read" in code


def test_no_copy_where_the_old_value_is_not_read_after_the_update(tmp_path):
    # read before the update: an alias is enough
    code = forloop_code(tmp_path, """
        m_old = m
        param = param - lr * m_old
        m = beta * m + (1 - beta) * grad
    """)
    assert "m_old = m\n" in code and "clone" not in code
    # bound to m in one branch, written in place only in the other (Adafactor's var_estimate)
    code = forloop_code(tmp_path, """
        if weight_decay != 0:
            u = grad * 2
        else:
            u = m
        if weight_decay != 0:
            u = sqrt(clamp_min(u, 1e-3))
        else:
            u = u + 1
        param = param - lr * u
        m = m + grad
    """)
    assert "u = m\n" in code and "clone" not in code, code


def test_every_implementation_ran(tmp_path):
    """The cases above ran C and the Triton interpreter too, not only the Python kernels."""
    _, impls = check(tmp_path, spec_text("""
        m_old = m
        m = beta * m + (1 - beta) * grad
        param = param - lr * m_old
    """, HYPER, 'm = "zeros_like(param)"'), lambda p, g, s, h: (p - 0.1 * s["m"], {"m": 0.9 * s["m"] + 0.1 * g}),
        [{}])
    assert set(impls) >= {"forloop", "foreach", "differentiable", "triton"} | ({"c"} if c_launch.available() else set())


def test_copy_under_a_per_tensor_condition(tmp_path):
    """A branch on a counter runs tensor by tensor in the foreach kernel (a loop of its own)."""
    def expected(param, grad, s, h):
        s["step"] = s["step"] + 1
        u = s["m"] if s["step"] > 1 else grad
        s["m"] = 0.9 * s["m"] + grad
        return param - 0.1 * u, s

    check(tmp_path, spec_text("""
        step = step + 1
        if step > 1:
            u = m
        else:
            u = grad
        m = beta * m + grad
        param = param - lr * u
    """, HYPER, 'step = "0"\nm = "zeros_like(param)"'), expected, [{}], state_names=("step", "m"),
          init=lambda name, p: 0.0 if name == "step" else torch.zeros_like(p))
