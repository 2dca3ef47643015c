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

    # it trains as eager does (backend="eager" runs the traced ops as they are: the same bits)
    assert run(compiled=True) == run(compiled=False)


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
                  ("NAdam", {}), ("Adagrad", {}), ("RMSprop", dict(momentum=0.9, centered=True))]


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
    torch._dynamo.reset()
    torch_opt = _stepped(getattr(torch.optim, name), None, foreach=implementation == "foreach", **kwargs)
    torch_explained = torch._dynamo.explain(torch_opt.step)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert (torch_explained.graph_count, torch_explained.graph_break_count) == (1, 0)
