"""`optgen verify`: every backend of every spec against the reference interpreter.

The same functions drive tests/backends/, so a new spec is cross-checked the moment it is added:
its hyperparameter configurations come from its own declarations (:func:`configurations`), its
flag combinations from its variants.
"""
from __future__ import annotations

import contextlib

import torch

from optgen.ir.interpret import hyperparameter_values, initial_state, reference_step
from optgen.passes import Compiled

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,), (4, 9)]


def shapes_for(cls, shapes=None) -> list[tuple[int, ...]]:
    """The ``shapes`` (default SHAPES) an optimizer accepts (Muon takes only matrices)."""
    key = (cls, tuple(shapes or SHAPES))
    if key not in _ACCEPTED:  # constructing an optimizer costs about a millisecond: once per class
        out = []
        for shape in key[1]:
            try:
                cls([torch.zeros(shape, requires_grad=True)])
            except ValueError:
                continue
            out.append(shape)
        _ACCEPTED[key] = out
    return list(_ACCEPTED[key])


_ACCEPTED: dict = {}


def configurations(compiled: Compiled, flags: dict[str, bool], *, cls=None) -> list[dict]:
    """Constructor kwargs that exercise a variant: the defaults; every zero-default scalar switched
    on alone, all of them, and all but one; every scalar an ``if`` tests switched to 0; the
    configurations the constructor rejects are dropped."""
    spec = compiled.spec
    scalars = [h for h in spec.hyperparameters.values() if not h.is_flag and not h.fixed and not h.names]
    zero = [h.name for h in scalars if h.default == 0]
    tested = {s.name for a in compiled.program.body for s in a.guard.free_symbols}
    kwargs_flags = {k: v for k, v in flags.items() if not spec.hyperparameters[k].fixed}
    base = {**kwargs_flags, "lr": 0.01} if "lr" in spec.hyperparameters else dict(kwargs_flags)
    all_on = {**base, **{n: 0.1 for n in zero}}
    candidates = [base, all_on]
    candidates += [{**base, name: 0.1} for name in zero]
    candidates += [{**all_on, name: 0} for name in zero]
    candidates += [{**base, h.name: 0} for h in scalars if h.default != 0 and h.name in tested]
    cls = cls or _optimizer_class(spec.name)
    valid = []
    for kwargs in candidates:
        try:
            cls([torch.zeros(3, 2, requires_grad=True)], **kwargs)
        except ValueError:
            continue
        if kwargs not in valid:
            valid.append(kwargs)
    return valid


def _optimizer_class(name: str):
    """The built-in optimizer class of that name (a spec built elsewhere passes its own ``cls``)."""
    import optgen

    return optgen.OPTIMIZERS[name]


def gradients(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Deterministic gradients that depend on the parameters (as real ones do)."""
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) + 0.5 * p.detach()
            for p in params]


def initial_params(cls, dtype=torch.float64, *, shapes=None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes_for(cls, shapes)]


def run_backend(compiled: Compiled, implementation: str, kwargs: dict, steps: int, dtype=torch.float64, *,
                cls=None, shapes=None):
    """Params and state (by rule name) after ``steps`` steps of the generated optimizer (``cls``: the
    class generated from ``compiled``; by default the built-in one of that name)."""
    cls = cls or _optimizer_class(compiled.spec.name)
    params = [p.clone().requires_grad_() for p in initial_params(cls, dtype, shapes=shapes)]
    opt = cls(params, **kwargs)
    opt.implementation = implementation
    for k in range(steps):
        for p, g in zip(params, gradients(k, params), strict=True):
            # A sparse-gradient spec gets every element as a sparse gradient: same update as dense.
            p.grad = g.to_sparse() if opt._gradients == "sparse" else g
        opt.step()
    keys = {s.key: s.name for s in compiled.spec.state.values()}
    states = [{keys[k]: (float(v) if keys[k] in _counters(compiled) else v)
               for k, v in opt.state[p].items()} for p in params]
    return [p.detach() for p in params], states


def _counters(compiled: Compiled) -> set[str]:
    return {s.name for s in compiled.spec.state.values() if s.is_scalar}


def run_reference(compiled: Compiled, kwargs: dict, steps: int, *, cls=None, shapes=None):
    """The same run through the interpreter, in float64."""
    cls = cls or _optimizer_class(compiled.spec.name)
    group = cls([torch.zeros(3, 2, requires_grad=True)], **kwargs).param_groups[0]
    hyper = hyperparameter_values(compiled.program, group)
    params = initial_params(cls, shapes=shapes)
    states = [initial_state(compiled.program, p, hyper) for p in params]
    for k in range(steps):
        grads = gradients(k, params)
        for i in range(len(params)):
            params[i], states[i] = reference_step(compiled.program, params[i], grads[i], states[i], hyper)
    states = [{n: v for n, v in s.items() if v is not None} for s in states]
    return params, states


def differences(a, b) -> dict[str, float]:
    """The largest relative difference per name ("param" or a state) over ``a``'s and ``b``'s
    (params, states) pairs: a shape that differs, a state one side lacks, or a NaN (on either
    side: ``max(worst, nan)`` would keep ``worst`` and let a NaN result pass) is infinitely far."""
    (pa, sa), (pb, sb) = a, b
    worst: dict[str, float] = {}

    def note(name, x, y):
        x = torch.as_tensor(x, dtype=torch.float64)
        y = torch.as_tensor(y, dtype=torch.float64)
        if x.shape != y.shape:
            diff = float("inf")
        elif not x.numel():
            diff = 0.0
        else:
            diff = ((x - y).abs() / (1e-12 + y.abs())).nan_to_num(nan=float("inf")).max().item()
        worst[name] = max(worst.get(name, 0.0), diff)

    for x, y in zip(pa, pb, strict=True):
        note("param", x, y)
    for s1, s2 in zip(sa, sb, strict=True):
        for name in set(s1) | set(s2):
            if name in s1 and name in s2:
                note(name, s1[name], s2[name])
            else:
                worst[name] = float("inf")
    return worst


def max_difference(a, b) -> float:
    """Largest relative difference over params and every state entry (:func:`differences`)."""
    return max(differences(a, b).values(), default=0.0)


@contextlib.contextmanager
def float64_counters():
    """Runs under torch's float64 default dtype, so 0-dim counters (torch's ``step`` dtype follows
    the default) are float64 like everything else a check runs.  With float32 counters, a counter
    updated from a reduction (NovoGrad's ``v = beta2 * v + (1 - beta2) * norm(grad) ** 2``) can
    round to a neighbouring float32 when two correct implementations sum the norm in different
    orders (1e-16 apart), and the check would see a 6e-8 difference that is no bug.  float32
    counters are compared with torch itself in tests/oracle/."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def runnable(implementation: str) -> bool:
    """Whether an implementation can run on this machine's CPU: C needs a C compiler, Triton the
    triton package (its kernels run in Triton's interpreter on CPU tensors)."""
    if implementation == "c":
        from optgen.runtime import c_launch

        return c_launch.available()
    if implementation == "triton":
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    return True
