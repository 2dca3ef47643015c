"""``torch.amp.GradScaler`` with optgen optimizers, against the same run with torch.optim: an inf
gradient injected at one step skips that step (parameters and state untouched) and halves the
scale, for each CPU implementation.  With the for-loop and foreach the scaler unscales the gradients
and skips ``step()`` itself; an optimizer made with ``fused=True`` says ``_step_supports_amp_scaling``,
as torch's fused ones do, so the scaler hands it ``grad_scale`` / ``found_inf`` and calls ``step()``
every time: optgen's runtime unscales or skips before the C kernel (runtime/generated.py,
``_unscale_or_skip``)."""
from __future__ import annotations

import pytest
import torch

import optgen
from optgen.runtime import c_launch
from tests.registry import TOLERANCES

STEPS = 5
INF_STEP = 2  # the step whose gradient gets an inf
INIT_SCALE = 2.0 ** 12
GROWTH_INTERVAL = 2  # the scale also doubles within the run, after two clean steps

# torch's flags for each implementation of optgen's (the same flags pick the same one in optgen)
FLAGS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "c": dict(fused=True)}
# Optimizers with a fused CPU kernel in torch (so every implementation has a torch counterpart)
OPTIMIZERS = {"Adam": dict(lr=0.01, weight_decay=0.1, amsgrad=True), "AdamW": dict(lr=0.01),
              "SGD": dict(lr=0.05, momentum=0.9, nesterov=True), "Adagrad": dict(lr=0.1)}


def train(make):
    """STEPS steps under autocast and a GradScaler with the optimizer ``make(params)``, an inf in
    one gradient at INF_STEP; the parameters after each step, the scale after each update, and the
    optimizer."""
    torch.manual_seed(0)
    first = torch.nn.Linear(6, 8)
    model = torch.nn.Sequential(first, torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = make(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)
    data = torch.randn(STEPS, 4, 6, generator=torch.Generator().manual_seed(1))
    params, scales = [], []
    for step, x in enumerate(data):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        if step == INF_STEP:
            assert first.weight.grad is not None
            first.weight.grad[1, 2] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        params.append([p.detach().clone() for p in model.parameters()])
        scales.append(scaler.get_scale())
    return params, scales, opt


@pytest.mark.parametrize("implementation", FLAGS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_grad_scaler_skips_the_inf_step_as_torch_does(name, implementation):
    if implementation == "c" and not c_launch.available():
        pytest.skip("no C compiler")
    kwargs = {**FLAGS[implementation], **OPTIMIZERS[name]}
    params, scales, opt = train(lambda ps: getattr(optgen, name)(ps, **kwargs))
    their_params, their_scales, their_opt = train(lambda ps: getattr(torch.optim, name)(ps, **kwargs))
    # torch's for-loop and foreach compute what optgen's do, bit for bit; its fused kernel rounds
    # differently from optgen's C in the last place.
    tolerance = TOLERANCES[torch.float32] if implementation == "c" else dict(rtol=0, atol=0)

    # What GradScaler does, independently of torch's optimizers: the scale doubles after each
    # GROWTH_INTERVAL clean steps and halves at the inf; the inf step changes no parameter.
    assert scales == their_scales == [INIT_SCALE, INIT_SCALE * 2, INIT_SCALE, INIT_SCALE, INIT_SCALE * 2]
    for before, after in zip(params[INF_STEP - 1], params[INF_STEP], strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    # ... and the same trajectory and state as torch.optim
    for step, (mine, theirs) in enumerate(zip(params, their_params, strict=True)):
        for p, q in zip(mine, theirs, strict=True):
            torch.testing.assert_close(p, q, **tolerance, msg=lambda m: f"step {step}: {m}")
    state, their_state = opt.state_dict(), their_opt.state_dict()
    assert state["param_groups"] == their_state["param_groups"]
    for index, values in state["state"].items():
        assert values.keys() == their_state["state"][index].keys()
        for key, value in values.items():
            torch.testing.assert_close(value, their_state["state"][index][key], **tolerance,
                                       msg=lambda m: f"state[{index}][{key!r}]: {m}")
        if "step" in values:  # the skipped step is not counted
            assert float(values["step"]) == STEPS - 1
    # GradScaler hands grad_scale / found_inf to the fused kernels only (torch's others lack the attribute)
    fused = implementation == "c"
    assert opt._step_supports_amp_scaling == fused == getattr(their_opt, "_step_supports_amp_scaling", False)


@pytest.mark.parametrize("name, kwargs", [("RMSprop", dict(lr=0.01, momentum=0.5)), ("NAdam", dict(lr=0.01))])
def test_grad_scaler_with_the_c_kernel_where_torch_has_no_fused_one(name, kwargs):
    """Chosen by name (``opt.implementation = "c"``; these have no ``fused=``), the C kernel is not
    handed grad_scale / found_inf: GradScaler unscales and skips for it, as for torch's for-loop."""
    if not c_launch.available():
        pytest.skip("no C compiler")

    def forced_c(params):
        opt = getattr(optgen, name)(params, **kwargs)
        opt.implementation = "c"
        return opt

    params, scales, opt = train(forced_c)
    their_params, their_scales, _ = train(lambda ps: getattr(torch.optim, name)(ps, foreach=False, **kwargs))
    assert not opt._step_supports_amp_scaling
    assert scales == their_scales == [INIT_SCALE, INIT_SCALE * 2, INIT_SCALE, INIT_SCALE, INIT_SCALE * 2]
    for before, after in zip(params[INF_STEP - 1], params[INF_STEP], strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    for step, (mine, theirs) in enumerate(zip(params, their_params, strict=True)):
        for p, q in zip(mine, theirs, strict=True):
            torch.testing.assert_close(p, q, **TOLERANCES[torch.float32], msg=lambda m: f"step {step}: {m}")
