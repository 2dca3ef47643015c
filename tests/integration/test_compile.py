"""optgen optimizers under ``torch.compile`` (issue 13): grad mode, compiled equals eager, graph breaks.

Compiling is slow on the CI's two cores, so the models are tiny and the compiled variants few.
Most cases compile with ``backend="aot_eager"``: dynamo traces the step and AOTAutograd
functionalizes it exactly as inductor would see it, but the traced ops then run as torch's eager
kernels, so a compiled step can be compared with eager bit for bit.  One case runs inductor.
"""
from __future__ import annotations

import pytest
import torch

import optgen


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each case compiles from scratch, and leaves no compiled code (or grad mode) behind."""
    torch._dynamo.reset()
    grad_enabled = torch.is_grad_enabled()
    yield
    torch._dynamo.reset()
    torch.set_grad_enabled(grad_enabled)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


# ---------------------------------------------------------------------------------------- grad mode

class _AdamBreakingInStep(optgen.Adam):
    """Adam whose update breaks the graph inside the step's grad-mode block, whatever the kernel."""

    def _step_group(self, group):
        torch._dynamo.graph_break()
        super()._step_group(group)


@pytest.mark.parametrize("implementation", ["forloop", "foreach", "c"])
def test_compiled_step_with_graph_break_leaves_grad_mode_on(implementation):
    """A compiled training step whose optimizer step breaks the graph: dynamo resumes after the break
    and restores the grad mode it recorded; a grad-mode context that switches the mode when it is
    *constructed* (``torch.set_grad_enabled(False)``) made it restore the wrong one, and the next
    iteration's backward failed with 'element 0 of tensors does not require grad'."""
    def run(compiled: bool) -> list[float]:
        model = _model()
        opt = _AdamBreakingInStep(model.parameters(), lr=0.01)
        opt.implementation = implementation
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))

        def train_step():
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        step = torch.compile(train_step, backend="eager") if compiled else train_step
        losses = []
        for _ in range(3):
            losses.append(step().item())
            assert torch.is_grad_enabled()
        return losses

    # it trains as eager does (Note [Compiled steps against eager])
    torch.testing.assert_close(run(compiled=True), run(compiled=False), rtol=0, atol=ATOL)


# ----------------------------------------------------------------------- compiled equals eager

STEPS = 4  # the bias corrections move (Adam's 1 - beta1 ** t: 0.1 → 0.34), SGD's buffer exists from step 2

# Note [Compiled steps against eager]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The fused C kernel runs the same code compiled or not: bit for bit.  The for-loop and foreach
# kernels, traced, compute the step's scalars as float32 tensor ops where eager computes them in
# double on the host (Note [Counters under torch.compile]), exactly as torch's compiled step does;
# the largest difference is 1 - beta2 ** t with beta2 = 0.999 rounded to float32 (relative error
# 1.3e-5 at t = 1), i.e. a relative error of ~7e-6 in Adam's update of about lr per step: with
# lr = 0.01 and STEPS = 4, 3.3e-7 measured, for torch's compiled step and optgen's alike.  ATOL is
# three times that, and torch's own compiled step is held to it too.
ATOL = 1e-6

COMPILED_CASES = [
    ("Adam", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, amsgrad=True)),
    ("SGD", dict(lr=0.05, momentum=0.9)),  # a lazily created state (the momentum buffer)
    ("Adafactor", dict(lr=0.01)),          # reductions (row and column means of grad ** 2), norms
    # Branches on traced scalars (Note [Branches on traced scalars] in optgen/backends/python_base.py):
    ("RAdam", dict(lr=0.01)),              # `if rho_t > 5`: the else branch up to step 5, then the if (STEPS_RADAM)
    ("ASGD", dict(lr=0.05, t0=0)),         # `if mu != 1`: mu = 1 read at steps 1 and 2, then 1/2, 1/3
    ("Lamb", dict(lr=0.01)),               # where(weight_norm > 0, ...) of two norms
]
#: RAdam's rho_t passes 5 at its sixth step (rho_t ~ t for small t, whatever beta2): both branches
STEPS_RADAM = 7
# RAdam's rho_t = rho_inf - 2 t beta2 ** t / (1 - beta2 ** t) is a difference of two numbers near
# rho_inf = 1999: in float32 (ulp 1.2e-4 there) rho_t ~ 6 is off by up to 1e-4, and rect's factor
# rho_t - 4 ~ 2 by 6e-5 relative, where the rectified update is ~lr = 0.01: 3.5e-6 after the two
# rectified steps, measured, for torch's compiled step and optgen's alike (the two compiled steps
# agree bit for bit).  Its tolerance is three times that.
ATOL_BY_NAME = {"RAdam": 1e-5}


def _train(cls, implementation: str | None, kwargs: dict, compiled: bool, steps: int = STEPS):
    """``steps`` training steps (forward, backward, opt.step(), zero_grad) of a tiny model; the params
    and the optimizer.  Compiled, optgen's step may not break the graph (the backward does)."""
    torch._dynamo.reset()
    model = _model()
    opt = cls(model.parameters(), **kwargs)
    if implementation is not None:
        opt.implementation = implementation
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))

    def train_step():
        model(x).square().mean().backward()
        # torch's step breaks the graph on purpose (its grad-mode wrapper calls graph_break())
        with torch._dynamo.error_on_graph_break(implementation is not None):
            opt.step()
        opt.zero_grad()

    step = torch.compile(train_step, backend="aot_eager") if compiled else train_step
    for _ in range(steps):
        step()
        assert torch.is_grad_enabled()  # as it found it
    return list(model.parameters()), opt


def _state(opt) -> list[torch.Tensor]:
    """Every state tensor of every parameter, in a fixed order."""
    return [value for p in opt.param_groups[0]["params"] for _, value in sorted(opt.state[p].items())]


#: the fused C kernel compiles as one custom op whatever its update (Note [C kernels as custom ops]):
#: the cases with branches on traced scalars are for the for-loop and foreach kernels
C_COMPILED = ("Adam", "AdamW", "SGD", "Adafactor")


@pytest.mark.parametrize("name,kwargs,implementation", [
    pytest.param(name, kwargs, implementation, id=f"{name}-{implementation}")
    for name, kwargs in COMPILED_CASES for implementation in ("forloop", "foreach", "c")
    if implementation != "c" or name in C_COMPILED])
def test_compiled_training_step_equals_eager(name, kwargs, implementation):
    """Note [Compiled steps against eager]: params and every state tensor after STEPS compiled
    training steps, against the same steps run eagerly."""
    cls = getattr(optgen, name)
    steps = STEPS_RADAM if name == "RAdam" else STEPS
    params, opt = _train(cls, implementation, kwargs, compiled=True, steps=steps)
    eager_params, eager_opt = _train(cls, implementation, kwargs, compiled=False, steps=steps)
    state, eager_state = _state(opt), _state(eager_opt)
    assert len(state) == len(eager_state) > 0
    if implementation == "c":
        for got, want in zip([*params, *state], [*eager_params, *eager_state], strict=True):
            assert torch.equal(got, want)
        return
    atol = ATOL_BY_NAME.get(name, ATOL)
    torch.testing.assert_close(params, eager_params, rtol=0, atol=atol)
    torch.testing.assert_close(state, eager_state, rtol=0, atol=atol)
    if name in ("Adam", "Adafactor", "RAdam", "ASGD"):  # torch's compiled step, held to the same tolerance
        torch_cls = getattr(torch.optim, name)
        foreach = implementation == "foreach"
        torch_params, _ = _train(torch_cls, None, dict(kwargs, foreach=foreach), compiled=True, steps=steps)
        torch_eager_params, _ = _train(torch_cls, None, dict(kwargs, foreach=foreach), compiled=False, steps=steps)
        torch.testing.assert_close(torch_params, torch_eager_params, rtol=0, atol=atol)
        torch.testing.assert_close(params, torch_params, rtol=0, atol=atol)


# ------------------------------------------------------------------------------ graph breaks

def _stepped(cls, implementation: str | None, **kwargs):
    """An optimizer over a tiny model that has taken one eager step (its state exists: the
    compiled step below is a training loop's second one, as torch's compiled step is tested)."""
    model = _model()
    opt = cls(model.parameters(), **kwargs)
    if implementation is not None:
        opt.implementation = implementation
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


NO_BREAK_CASES = [("Adam", {}), ("AdamW", dict(amsgrad=True)), ("SGD", dict(lr=0.1, momentum=0.9)),
                  ("NAdam", {}), ("Adagrad", {}), ("RMSprop", dict(momentum=0.9, centered=True)),
                  ("RAdam", {}), ("ASGD", dict(t0=0)), ("Lamb", {}), ("Adafactor", {})]
#: where torch has no compiled step without breaks to hold next to optgen's
NO_TORCH_REFERENCE = {
    "Lamb": "torch.optim has no Lamb",
    "Adafactor": "torch's Adafactor reads step_t.item() (explain under-reports it as -1 breaks)",
}


@pytest.mark.parametrize("implementation", ["forloop", "foreach"])
@pytest.mark.parametrize("name,kwargs", NO_BREAK_CASES, ids=[n for n, _ in NO_BREAK_CASES])
def test_compiled_step_has_no_graph_break(name, kwargs, implementation):
    """``torch.compile(opt.step)`` is one graph, as torch's compiled step is: the kernels read their
    counters without a host sync while dynamo traces (Note [Counters under torch.compile])."""
    opt = _stepped(getattr(optgen, name), implementation, **kwargs)
    explained = torch._dynamo.explain(opt.step)()
    # explain does not count a frame dynamo gave up on (a graph break inside the kernel's loop over
    # tensors leaves the whole kernel to eager, with no break reported): fullgraph=True refuses both.
    torch._dynamo.reset()
    torch.compile(opt.step, backend="eager", fullgraph=True)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    if name in NO_TORCH_REFERENCE:
        return
    torch._dynamo.reset()
    torch_opt = _stepped(getattr(torch.optim, name), None, foreach=implementation == "foreach", **kwargs)
    torch_explained = torch._dynamo.explain(torch_opt.step)()
    assert (torch_explained.graph_count, torch_explained.graph_break_count) == (1, 0)


# ------------------------------------------------------------------------- C kernels as custom ops

C_CASES = [("Adam", {}), ("SGD", dict(lr=0.1, momentum=0.9)), ("Adafactor", {})]


@pytest.mark.parametrize("name,kwargs", C_CASES, ids=[n for n, _ in C_CASES])
def test_c_kernel_is_one_custom_op_in_the_graph(name, kwargs):
    """Note [C kernels as custom ops]: the fused C step compiles to one graph (fullgraph=True: no
    break) in which the kernel is the single node ``optgen.c_step``, from a fresh optimizer (its
    state, SGD's lazily created buffer included, made in the traced step), equal to eager bit for bit."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    opt = _stepped(getattr(optgen, name), "c", **kwargs)
    opt.state.clear()  # a first step, traced
    eager = _stepped(getattr(optgen, name), "c", **kwargs)
    eager.state.clear()
    torch.compile(opt.step, backend=backend, fullgraph=True)()
    eager.step()
    assert len(graphs) == 1
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum(op in (torch.ops.optgen.c_step, torch.ops.optgen.c_step.default) for op in ops) == 1, ops
    for p, q in zip(opt.param_groups[0]["params"], eager.param_groups[0]["params"], strict=True):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == eager.state[q].keys()
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], eager.state[q][key])


def test_c_step_op_passes_torch_opcheck():
    """The op's schema (which arguments it mutates), its fake implementation (FakeTensor tracing)
    and its AOTAutograd handling, as torch.library.opcheck checks them, on an Adam launch."""
    params = [torch.randn(3, 2), torch.randn(4)]
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    tensors = [*params, *exp_avgs, *exp_avg_sqs, torch.empty(0), torch.empty(0)]  # max_exp_avg_sqs: absent
    grads = [torch.randn_like(p) for p in params]
    counters = [torch.tensor(1.0), torch.tensor(1.0)]
    args: tuple = ("optgen.generated.adam_c", tensors, [6, 7], grads, counters, 2, [], [1e-3, 0.9, 0.999, 1e-8, 0.0], 0)
    torch.library.opcheck(torch.ops.optgen.c_step.default, args)


def test_kernel_module_import_is_marked_as_torch_marks_constants():
    # runtime/generated.py marks _import_kernel_module as torch.compiler.assume_constant_result
    # would, without importing dynamo at import time: the mark must still be the one torch sets.
    from optgen.runtime import generated

    def f():
        return True

    marked = torch.compiler.assume_constant_result(f)
    torch_marks = {k: v for k, v in vars(marked).items()}
    assert torch_marks and all(getattr(generated._import_kernel_module, k, None) == v for k, v in torch_marks.items())


@pytest.mark.parametrize("implementation", ["forloop", "foreach", "c"])
def test_a_fresh_optimizers_compiled_step_compiles_once(implementation):
    # Note [State made before tracing] (runtime/generated.py): the state is made on the real tensors
    # before dynamo traces the first step, so the second step meets the guards the first one took
    # (before: a second compilation, as long as the first, on `not self.state` and on the cache of
    # expected state keys).
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(3)]
    opt = optgen.Adam(params, lr=0.01)
    opt.implementation = implementation
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(opt.step, backend=backend)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        step()
    assert len(graphs) == 1
    assert sorted(opt.state[params[0]]) == ["exp_avg", "exp_avg_sq", "step"]
    assert opt.state[params[0]]["step"].item() == 4


@pytest.mark.parametrize("fused", [None, True])
def test_a_compiled_step_with_int8_state_traces_the_reference(fused):
    """The int8 C launch is not a custom op (Note [C kernels as custom ops] covers the plain one):
    a traced step runs the foreach reference, and equals the eager reference to float32 rounding
    (inductor fuses its ops: a code one apart in a rare element).  It stopped with an error: the
    plain op was handed the codes."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(96, 64))
    q = torch.nn.Parameter(p.detach().clone())
    opt = optgen.Adam([p], lr=1e-2, state_dtype="int8", fused=fused)
    ref = optgen.Adam([q], lr=1e-2, state_dtype="int8", foreach=True)
    step = torch.compile(opt.step)
    for _ in range(2):
        g = torch.randn(96, 64)
        p.grad, q.grad = g.clone(), g.clone()
        step()
        ref.step()
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    apart = (opt.state[p]["exp_avg"].int() - ref.state[q]["exp_avg"].int()).abs()
    assert apart.max() <= 1 and (apart > 0).float().mean() <= 1e-3
