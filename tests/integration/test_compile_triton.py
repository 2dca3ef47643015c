"""The fused Triton kernels under ``torch.compile`` and FakeTensor tracing (issue 13): the launch is
the one custom op ``optgen::triton_step`` in the graph (Note [Triton kernels as custom ops] in
optgen/runtime/triton_launch.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (as tests/triton run them), so
a compiled step on the CPU runs the same op and the same kernel as a GPU's; the CUDA case is traced
on FakeTensors (no GPU needed), and the real-CUDA tests at the end run where there is one.
"""
from __future__ import annotations

import importlib
from typing import Any

import pytest

pytest.importorskip("triton", reason="the Triton backend's tests need triton (pip install triton)")

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental import proxy_tensor
from torch.fx.experimental.proxy_tensor import make_fx

import optgen
from optgen.runtime import triton_launch  # noqa: F401 - registers optgen::triton_step for opcheck


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each case compiles from scratch, and leaves no compiled code (or grad mode) behind."""
    torch._dynamo.reset()
    grad_enabled = torch.is_grad_enabled()
    yield
    torch._dynamo.reset()
    torch.set_grad_enabled(grad_enabled)


def _model(seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(device)


def _triton_step_ops(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    op = torch.ops.optgen.triton_step
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (op, op.default)]


def _assert_equal(opt, eager) -> None:
    """Params and every state tensor of two optimizers over equal models, bit for bit."""
    for p, q in zip(opt.param_groups[0]["params"], eager.param_groups[0]["params"], strict=True):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == eager.state[q].keys()
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], eager.state[q][key]), key


# Cases: a list the flags leave unused (Adam without amsgrad: absent in the op), every list used
# (AdamW with amsgrad), a lazily created state (SGD's momentum buffer, allocated before the op, which
# is told it is new).  (A Tensor lr passes to the op as a tensor — test_triton_step_op_passes_torch_opcheck
# — but no implementation's step compiles with one yet: the state check reads the lr's value.)
CASES = [
    ("Adam", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
]
IDS = ["Adam", "AdamW-amsgrad", "SGD-momentum"]


def _stepped(name: str, kwargs: dict, device: str = "cpu"):
    """An optimizer (the Triton implementation) over a tiny model, gradients set, no state yet."""
    model = _model(device=device)
    opt = getattr(optgen, name)(model.parameters(), **{k: v.clone() if isinstance(v, torch.Tensor) else v
                                                         for k, v in kwargs.items()})
    opt.implementation = "triton"
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(device)
    return opt


# ------------------------------------------------------------------ compiled, on the interpreter

@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_triton_kernel_is_one_custom_op_in_the_graph(name, kwargs):
    """``torch.compile(opt.step)`` from a fresh optimizer (its state, SGD's lazily created buffer
    included, made in the traced step) is one graph (fullgraph=True: no break) in which the kernel
    is the single node ``optgen.triton_step``; three compiled steps equal three eager ones bit for
    bit (the op runs the eager launcher: the same kernel, the same tables)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    opt, eager = _stepped(name, kwargs), _stepped(name, kwargs)
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    for _ in range(3):
        step()
        eager.step()
    assert len(graphs) >= 1
    assert [len(_triton_step_ops(gm)) for gm in graphs] == [1] * len(graphs)
    _assert_equal(opt, eager)


def test_triton_step_has_no_graph_break():
    """``torch._dynamo.explain`` counts one graph and no break for a fused Adam step."""
    opt = _stepped("Adam", {})
    opt.step()
    explained = torch._dynamo.explain(opt.step)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_compiled_training_step_equals_eager(name, kwargs):
    """Forward, backward, ``opt.step()``, ``zero_grad()`` compiled with aot_eager (AOTAutograd
    functionalizes the op as inductor would see it) equal eager bit for bit, and leave grad mode on."""
    def train(compiled: bool):
        torch._dynamo.reset()
        model = _model()
        opt = getattr(optgen, name)(model.parameters(), **kwargs)
        opt.implementation = "triton"
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))

        def train_step():
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

        step = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        for _ in range(3):
            step()
            assert torch.is_grad_enabled()
        return opt

    _assert_equal(train(compiled=True), train(compiled=False))


# ------------------------------------------------------------------------------------- the op

def _adam_launch_arguments(grad_scaler: bool) -> tuple:
    """``optgen::triton_step``'s arguments for an Adam launch over two CPU tensors (interpreted),
    amsgrad off (its list absent), lr a tensor; with GradScaler's tensors when ``grad_scaler``."""
    params = [torch.randn(3, 2), torch.randn(4)]
    grads = [torch.randn_like(p) for p in params]
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    tensors = [*params, *grads, *exp_avgs, *exp_avg_sqs, torch.empty(0), torch.empty(0)]
    counters = [torch.tensor(0.0), torch.tensor(0.0)]
    return ("optgen.generated.adam_triton", tensors, [True, True, True, True, False], [8, 9], counters, 2, [],
            [float("nan"), 0.9, 0.999, 1e-8, 0.0], [torch.tensor(1e-3)], [0],
            [False, False, False, False],
            torch.tensor(1024.0) if grad_scaler else None, torch.tensor(0.0) if grad_scaler else None)


@pytest.mark.parametrize("grad_scaler", [False, True], ids=["plain", "grad-scaler"])
def test_triton_step_op_passes_torch_opcheck(grad_scaler):
    """The op's schema (which arguments it mutates: GradScaler's unscale writes the gradients), its
    fake implementation (FakeTensor tracing) and its AOTAutograd handling, as torch.library.opcheck
    checks them."""
    torch.library.opcheck(torch.ops.optgen.triton_step.default, _adam_launch_arguments(grad_scaler))


# ------------------------------------------------------------- CUDA, traced on FakeTensors

@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_fused_step_traces_on_fake_cuda_tensors(name, kwargs, monkeypatch):
    """A first step of ``optgen.<name>(fused=True)`` over CUDA FakeTensors (no GPU needed) traces with
    make_fx to a graph in which the launch is one ``optgen.triton_step`` on CUDA tensors, its states
    made in the traced step before it (a lazily created one flagged new); nothing reads a value or
    an address (a FakeTensor has neither)."""
    # make_fx evaluates small constants for real: `torch.tensor(0.).to("cuda")` (a new `step`
    # counter, kept next to the parameter as fused=True keeps it) would need a GPU.
    monkeypatch.setattr(proxy_tensor, "CONSTANT_NUMEL_LIMIT", 0)
    with FakeTensorMode():
        # (nn.Module.to("cuda") asks for a CUDA build; creating fake CUDA tensors does not)
        params = [torch.nn.Parameter(torch.randn(shape, device="cuda")) for shape in ((3, 4), (3,), (2, 3), (2,))]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = getattr(optgen, name)(params, fused=True, **kwargs)

    def step(*tensors):
        opt.step()
        return list(params)

    gm = make_fx(step, tracing_mode="fake")(*params)  # in the params' FakeTensorMode
    ops = _triton_step_ops(gm)
    assert len(ops) == 1, gm.code
    args: tuple[Any, ...] = ops[0].args
    module, tensors, used, absent, counters, n, first = args[:7]
    assert importlib.import_module(module).LAUNCH is opt._kernel("triton").step and n == len(params)
    assert all(t.meta["val"].device.type == "cuda" for t in [*tensors, *counters])
    states = [t for k, t in enumerate(tensors) if k >= 2 * n and k not in absent]
    assert len(states) == sum(used[2:]) * n > 0
    made = (torch.ops.aten.zeros_like.default, torch.ops.aten.empty_like.default)
    assert all(t.op == "call_function" and t.target in made for t in states), gm.code
    assert first == ([1] * n if name == "SGD" else [])  # the momentum buffers are new


# --------------------------------------------------------------------------------- real CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_cuda_compiled_fused_step_is_one_op_and_equals_eager(name, kwargs):
    """On a GPU: ``torch.compile(opt.step, fullgraph=True)`` of ``fused=True`` is one graph with one
    ``optgen.triton_step`` node, no graph break (explain), and three compiled steps (inductor)
    equal three eager ones bit for bit."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    def fused(name, kwargs):
        return _stepped(name, {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
                        device="cuda")

    opt = fused(name, kwargs)
    torch.compile(opt.step, backend=backend, fullgraph=True)()
    assert len(graphs) == 1 and len(_triton_step_ops(graphs[0])) == 1
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fused(name, kwargs).step)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons

    torch._dynamo.reset()
    opt, eager = fused(name, kwargs), fused(name, kwargs)
    step = torch.compile(opt.step, fullgraph=True)  # inductor
    for _ in range(3):
        step()
        eager.step()
    torch.cuda.synchronize()
    _assert_equal(opt, eager)


@cuda
def test_cuda_compiled_training_step_equals_eager():
    """On a GPU: a compiled training step (aot_eager: forward and backward run torch's kernels, so
    the gradients are eager's) of ``Adam(fused=True)`` equals eager bit for bit."""
    def train(compiled: bool):
        torch._dynamo.reset()
        model = _model(device="cuda")
        opt = optgen.Adam(model.parameters(), lr=0.01, fused=True)
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)).cuda()

        def train_step():
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

        step = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        for _ in range(3):
            step()
            assert torch.is_grad_enabled()
        return opt

    _assert_equal(train(compiled=True), train(compiled=False))
