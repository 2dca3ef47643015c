"""``optgen.step_in_backward(optimizer)``: each parameter stepped inside backward, its gradient freed.

    handle = optgen.step_in_backward(optimizer)
    for batch in data:
        loss_fn(model(batch)).backward()   # steps every parameter; no optimizer.step(), no zero_grad()
        scheduler.step()                   # LR schedulers work as before
    handle.remove()                        # back to loss.backward(); optimizer.step()

Note [The step inside backward]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
In the ordinary loop every gradient is alive at once between ``backward()`` and ``step()``: a model's
worth of memory.  Every optgen spec is per-tensor (a parameter's update reads its own gradient,
state and hyperparameters, and per-tensor reductions of them; none reads another parameter), so a
parameter can be stepped as soon as its gradient is complete, and the gradient freed right away: at
the peak only the gradients autograd is still accumulating are alive.  ``step_in_backward``
registers ``Tensor.register_post_accumulate_grad_hook`` on every parameter that requires grad (as
torch's "optimizer step in backward" tutorial wires by hand), and the hook

- steps the parameter with ``GeneratedOptimizer._step_group`` on a *one-parameter view* of its
  param group: a ``ChainMap({"params": [p]}, group)``, made once per parameter and reused.  Every
  other key reads through to the group itself, so a scheduler's new ``group["lr"]`` (or betas, or
  weight decay) is what the next step reads: nothing is copied, nothing goes stale.  The step is
  the ordinary one, so the implementation is the one optgen would choose for that parameter
  (on CPU by default the fused C kernel over that one tensor), the state is ``optimizer.state[p]``
  (``state_dict`` / ``load_state_dict`` and checkpoints see nothing new), and the view's bound
  launch is kept like a group's (Note [Cached steps] in runtime/step_cache.py);
- then sets ``p.grad = None``, so ``zero_grad()`` has nothing left to do (it stays harmless);
- and, the first time it runs in a backward, queues a callback for the end of that backward
  (``queue_callback``, as FSDP does) that hooks and steps any parameter of the optimizer that
  requires grad but has no hook: one frozen at registration and unfrozen since (fine-tuning's
  backbone).  If no parameter was trainable at registration, no hook runs to queue it: call
  ``step_in_backward`` after unfreezing.

``load_state_dict`` replaces the param group dicts (torch keeps the parameters): a view whose group
is no longer the optimizer's finds its parameter's new group on its next step.  A group added with
``add_param_group`` gets its hooks as it is added: while the mode is on, the optimizer's
``add_param_group`` is an instance attribute that calls torch's and then hooks the new group (the
class keeps torch's method, inherited: tests/runtime/test_optimizer_base.py).

What cannot work, and is refused:

- ``optimizer.step()`` (with or without a closure) raises: the step already ran inside backward.
- ``torch.amp.GradScaler``: its scaled gradients are stepped inside backward before it could unscale
  them or look for inf/NaN.  While the mode is on the optimizer says ``_step_supports_amp_scaling``,
  so ``scaler.step(optimizer)`` calls ``optimizer.step()`` (instead of asserting that it recorded
  no inf checks: it found no gradients) and gets an error that names GradScaler.  The first step
  has already been taken with scaled gradients by then: nothing before ``scaler.step`` tells an
  optimizer that a scaler is in use.
- LBFGS (or any class with its own ``step``): its step re-evaluates the loss through a closure,
  refused at registration.
- ``differentiable=True`` groups, refused at registration (and by ``add_param_group``): the
  differentiable step records the update in autograd's graph with grad enabled, which cannot happen
  inside the backward pass that is running, and an in-place update of a leaf parameter under grad
  is torch's error anyway.

Not detectable, so documented (docs/memory.md): gradient clipping over all parameters
(``clip_grad_norm_`` needs every gradient before any step; they are gone), gradient accumulation
over several backward passes (each backward steps), and the optimizer's step hooks
(``register_step_pre_hook``), which run around ``optimizer.step()`` and so never run.  Sparse
gradients take the ordinary path of their spec (SparseAdam, Adagrad's gathered rows, SGD's
for-loop), one parameter at a time.
"""
from __future__ import annotations

import types
import weakref
from collections import ChainMap

import torch

#: the optimizer attribute holding its handle while the mode is on (read by runtime/optimizer.py)
ATTRIBUTE = "_step_in_backward"


def step_in_backward(optimizer) -> StepInBackward:
    """Steps each parameter of ``optimizer`` as soon as backward has accumulated its gradient, and
    frees the gradient (Note [The step inside backward]).  Returns a handle whose ``remove()``
    restores the ordinary ``loss.backward(); optimizer.step()``."""
    from optgen.runtime.generated import GeneratedOptimizer
    from optgen.runtime.optimizer import Optimizer

    if not isinstance(optimizer, GeneratedOptimizer):
        raise TypeError(f"optgen.step_in_backward takes an optgen optimizer (optgen.Adam, ...), "
                        f"not {type(optimizer).__module__}.{type(optimizer).__qualname__}")
    if ATTRIBUTE in vars(optimizer):
        raise RuntimeError(f"optgen.step_in_backward: this {type(optimizer).__name__} already steps inside backward; "
                           "call remove() on the handle the first call returned before calling it again")
    if _own_step(type(optimizer)) is not Optimizer.step or not optimizer.implementations:
        raise RuntimeError(f"optgen.step_in_backward: {type(optimizer).__name__} cannot step inside backward: its "
                           "step re-evaluates the loss through a closure, over all parameters at once")
    for group in optimizer.param_groups:
        _check_group(optimizer, group)
    return StepInBackward(optimizer)


class StepInBackward:
    """The handle of an optimizer stepping inside backward: ``remove()`` ends the mode."""

    def __init__(self, optimizer):
        self._optimizer = weakref.ref(optimizer)  # hooks must not keep a dropped optimizer alive
        self._hooks: list = []
        self._views: list[ChainMap] = []
        self._hooked: set[int] = set()  # id() of the parameters with a hook
        self._sweep_queued = False  # the end-of-backward sweep, queued by this backward's first hook
        self._amp = vars(optimizer).get("_step_supports_amp_scaling")  # an instance's own (fused=True), else None
        optimizer.__dict__[ATTRIBUTE] = self
        optimizer._step_supports_amp_scaling = True  # so GradScaler reaches refuse_step (the Note)
        optimizer.add_param_group = types.MethodType(_add_param_group_hooked, optimizer)
        try:
            for group in optimizer.param_groups:
                self.hook_group(group)
        except BaseException:
            self.remove()
            raise

    def hook_group(self, group: dict) -> None:
        """Registers the step hook on every parameter of ``group`` that requires grad (one that
        does not yet, frozen, is hooked by the end-of-backward sweep once it does)."""
        optimizer = self._optimizer()
        _check_group(optimizer, group)
        for p in group["params"]:
            if p.requires_grad:
                self._hook(p, group)

    def _hook(self, p: torch.Tensor, group: dict):
        """The step hook of ``p`` in ``group``, registered; returns it."""
        view: ChainMap = ChainMap({"params": [p]}, group)
        self._views.append(view)
        step = self._hook_for(view)
        self._hooks.append(p.register_post_accumulate_grad_hook(step))
        self._hooked.add(id(p))
        return step

    def _sweep(self) -> None:
        """At the end of a backward: a parameter unfrozen since it was registered (fine-tuning's
        frozen backbone, unfrozen later) has a gradient and no hook.  It is hooked now, for the
        next backwards, and stepped with this gradient, as the ordinary loop would step it."""
        optimizer = self._optimizer()
        try:
            if optimizer is None or not self._hooks:  # (removed meanwhile)
                return
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) not in self._hooked and p.requires_grad:
                        step = self._hook(p, group)
                        if p.grad is not None:
                            step(p)
        finally:
            self._sweep_queued = False

    def _hook_for(self, view: ChainMap):
        optimizer_ref = self._optimizer

        def step_and_free(param: torch.Tensor) -> None:
            optimizer = optimizer_ref()
            if optimizer is None:
                return
            if not self._sweep_queued and torch._C._current_graph_task_id() != -1:  # (inside a backward)
                self._sweep_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._sweep)
            groups = optimizer.param_groups
            if not any(g is view.maps[1] for g in groups):  # load_state_dict replaced the group dicts
                view.maps[1] = _group_of(optimizer, param)
            with torch.no_grad():  # (differentiable groups are refused)
                optimizer._step_group(view)
            param.grad = None
            optimizer._opt_called = True  # what torch's LR schedulers check ran before their step()

        return step_and_free

    def refuse_step(self, optimizer) -> None:
        """``optimizer.step()`` while the mode is on: the error that says why."""
        name = type(optimizer).__name__
        if "grad_scale" in vars(optimizer) or "found_inf" in vars(optimizer):
            vars(optimizer).pop("grad_scale", None)  # as GradScaler would after the step
            vars(optimizer).pop("found_inf", None)
            raise RuntimeError(
                f"torch.amp.GradScaler cannot drive optgen.{name} while it steps inside backward "
                "(optgen.step_in_backward): the parameters were already stepped with the scaled gradients, "
                "before GradScaler could unscale them or check them for inf/NaN. Use either one, not both.")
        raise RuntimeError(
            f"optgen.{name}.step() was called while it steps inside backward (optgen.step_in_backward): each "
            "parameter was already stepped, and its gradient freed, as backward reached it, so there is nothing "
            "left to step. Drop the call to step() (and closures), or call remove() on the handle to step with "
            "optimizer.step() again.")

    def remove(self) -> None:
        """Ends the mode: removes the hooks; ``optimizer.step()`` steps again.  A second call does nothing."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        optimizer = self._optimizer()
        if optimizer is not None and vars(optimizer).get(ATTRIBUTE) is self:
            del optimizer.__dict__[ATTRIBUTE]
            vars(optimizer).pop("add_param_group", None)
            if self._amp is None:
                vars(optimizer).pop("_step_supports_amp_scaling", None)
            else:
                optimizer._step_supports_amp_scaling = self._amp
            cached = vars(optimizer).get("_cached_steps", {})
            for view in self._views:  # their bound launches (Note [Cached steps])
                cached.pop(id(view), None)
        self._views.clear()
        self._hooked.clear()


def _add_param_group_hooked(optimizer, param_group: dict) -> None:
    """torch's ``add_param_group``, then the step hooks on the new group (the Note); a group that
    cannot step inside backward is refused before it is added."""
    _check_group(optimizer, {**optimizer.defaults, **param_group})
    type(optimizer).add_param_group(optimizer, param_group)
    vars(optimizer)[ATTRIBUTE].hook_group(optimizer.param_groups[-1])


def _check_group(optimizer, group: dict) -> None:
    if group.get("differentiable"):
        raise RuntimeError(f"optgen.step_in_backward: optgen.{type(optimizer).__name__}(differentiable=True) cannot "
                           "step inside backward: a differentiable step is recorded by autograd with grad enabled, "
                           "outside the backward pass that is running")


def _group_of(optimizer, param: torch.Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise RuntimeError("optgen.step_in_backward: a hooked parameter is no longer in any of the optimizer's "
                       "param groups; call remove() on the handle before changing them")


def _own_step(cls):
    """``cls.step`` without the wrapper torch's Optimizer.__init__ puts around it (hooks, profiling)."""
    step = cls.step
    while hasattr(step, "__wrapped__"):
        step = step.__wrapped__
    return step
