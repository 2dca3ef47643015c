"""The reference: a spec's IR evaluated directly, in float64, with no generated code.

Every backend of every spec is tested against this interpreter (tests/backends/).  It reads the
*lowered* program — flags still symbolic, before any pass — so a bug in a pass or a backend
shows up as a difference, and it evaluates each sympy node with the plainest torch arithmetic
(``a + w * (b - a)`` for lerp), not the fused ops the backends pick.

Counters (``step``, ASGD's ``eta``, NAdam's ``mu_product``) are the one exception to float64:
torch stores them in 0-dim tensors of its step dtype (float32 unless the default dtype is float64),
so a counter's value is rounded to that dtype whenever it is stored, here as in the runtime.

It cannot tell whether a spec is *right* — only whether the generated code does what the spec
says; tests/oracle/ compares built-in specs with torch.optim for that.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import sympy
import torch

from optgen.ir.functions import (
    Clamp,
    IfNone,
    Lerp,
    MachineEps,
    Maximum,
    MeanDim,
    Minimum,
    Ndim,
    NewtonSchulz,
    Norm,
    NormDim,
    Numel,
    Size,
    Where,
)
from optgen.ir.guards import evaluation_order, first_assignments
from optgen.ir.nodes import Program, Role
from optgen.runtime import intrinsics


def scalar_dtype() -> torch.dtype:
    """torch's dtype for a `step` counter (float64 only under a float64 default dtype), as the
    runtime's counters hold it."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _evaluate(expr: sympy.Expr, env: dict):
    if expr.is_Symbol:
        if expr.name.startswith('"'):  # a choice's value, e.g. "match_rms_adamw"
            return expr.name.strip('"')
        return env[expr.name]
    if expr.is_Number:
        return float(expr)
    args = [_evaluate(a, env) for a in expr.args]
    if isinstance(expr, sympy.Add):
        total = args[0]
        for a in args[1:]:
            total = total + a
        return total
    if isinstance(expr, sympy.Mul):
        product = args[0]
        for a in args[1:]:
            product = product * a
        return product
    if expr.is_Pow:
        base, exponent = args
        if isinstance(base, torch.Tensor):
            return torch.pow(base, exponent)
        return base ** exponent
    if isinstance(expr, Lerp):
        a, b, w = args
        return a + w * (b - a)
    if isinstance(expr, (Maximum, Minimum)):
        a, b = args
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            return max(a, b) if isinstance(expr, Maximum) else min(a, b)
        pick = torch.maximum if isinstance(expr, Maximum) else torch.minimum
        a, b = (x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64) for x in (a, b))
        return pick(a, b)
    if isinstance(expr, Where):
        cond, a, b = args
        if not isinstance(cond, torch.Tensor):
            return a if cond else b
        as_tensor = [x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64) for x in (a, b)]
        return torch.where(cond, *as_tensor)
    if isinstance(expr, Norm):
        return torch.linalg.vector_norm(args[0]).item()
    if isinstance(expr, Numel):
        return args[0].numel()
    if isinstance(expr, Ndim):
        return args[0].dim()
    if isinstance(expr, Size):
        return args[0].size(int(args[1]))
    if isinstance(expr, MachineEps):
        return torch.finfo(args[0].dtype).eps
    if isinstance(expr, IfNone):
        return args[0] if args[0] is not None else args[1]
    if isinstance(expr, NormDim):
        return torch.linalg.vector_norm(args[0], dim=int(args[1]), keepdim=True)
    if isinstance(expr, MeanDim):
        return args[0].mean(dim=int(args[1]), keepdim=True)
    if isinstance(expr, NewtonSchulz):
        return intrinsics.newton_schulz(*args).to(args[0].dtype)
    if isinstance(expr, Clamp):
        x, low, high = args
        return x.clamp(low, high) if isinstance(x, torch.Tensor) else min(max(x, low), high)
    if isinstance(expr, sympy.core.relational.Relational):
        ops = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
               ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
        return ops[expr.rel_op](*args)
    unary: dict[Any, tuple[Callable, Callable]] = {sympy.exp: (torch.exp, math.exp), sympy.log: (torch.log, math.log),
             sympy.Abs: (torch.abs, abs), sympy.sign: (torch.sign, lambda x: float((x > 0) - (x < 0)))}
    if expr.func in unary:
        tensor_fn, scalar_fn = unary[expr.func]
        return tensor_fn(args[0]) if isinstance(args[0], torch.Tensor) else scalar_fn(args[0])
    if isinstance(expr, sympy.conjugate):
        return args[0]
    raise NotImplementedError(f"the interpreter has no rule for {type(expr).__name__}")


def _holds(guard: sympy.Basic, env: dict, defined_at: dict[str, int] | None = None) -> bool:
    """Whether ``guard`` holds; And/Or short-circuit, their arguments taken in evaluation order
    (Note [Guards evaluate in the order they were written] in optgen/ir/guards.py): a nested
    condition reads a local only where the outer one holds and assigned it."""
    if guard in (sympy.true, sympy.false):
        return bool(guard)
    if isinstance(guard, sympy.core.relational.Relational):
        return bool(_evaluate(guard, env))
    if isinstance(guard, sympy.Not):
        return not _holds(guard.args[0], env, defined_at)
    if isinstance(guard, (sympy.And, sympy.Or)):
        parts = (_holds(a, env, defined_at) for a in evaluation_order(guard.args, defined_at or {}))
        return all(parts) if isinstance(guard, sympy.And) else any(parts)
    values = {s: env[s.name] for s in guard.free_symbols}
    return bool(guard.subs({s: (sympy.true if v is True else sympy.false if v is False else v)
                            for s, v in values.items()}))


def _as_counter(value) -> float:
    """A value as a counter's 0-dim state tensor holds it (see the module docstring)."""
    return torch.tensor(float(value), dtype=scalar_dtype()).item()


def _counter_update(a, env: dict) -> float:
    """A counter's new value.  An update that reads the counter runs on its 0-dim tensor, in its
    dtype (``mu_product *= mu`` multiplies in float32); any other is computed on the host and
    stored."""
    if a.target not in {s.name for s in a.value.free_symbols}:
        return _as_counter(_evaluate(a.value, env))
    counter = torch.tensor(env[a.target], dtype=scalar_dtype())
    return float(_evaluate(a.value, {**env, a.target: counter}))


def reference_step(program: Program, param: torch.Tensor, grad: torch.Tensor, state: dict,
                   hyper: dict) -> tuple[torch.Tensor, dict]:
    """One step for one parameter, functionally: returns the new parameter and state.

    ``state`` maps rule names to tensors (``None`` for state not created yet) and counters to
    Python numbers; ``hyper`` maps every flag and scalar hyperparameter (by rule name) to its value.
    """
    env = dict(hyper)
    env.update(state)
    env["param"], env["grad"] = param, grad
    created = set()
    defined_at = first_assignments(a.target for a in program.body if program.roles.get(a.target) is Role.SCALAR)
    for a in program.body:
        if not _holds(a.guard, env, defined_at):
            continue
        if a.first is not None and env.get(a.target) is None:
            env[a.target] = _evaluate(a.first, env)
            created.add(a.target)
            continue
        if program.roles.get(a.target) is Role.COUNTER:
            env[a.target] = _counter_update(a, env)
            continue
        value = _evaluate(a.value, env)
        if program.roles.get(a.target) in (Role.PARAM, Role.STATE, Role.TENSOR) and not isinstance(value, torch.Tensor):
            # a tensor assigned a number (``m = 0 * grad``): that number in every element
            current = env.get(a.target)
            like = current if isinstance(current, torch.Tensor) else param
            value = torch.full_like(like, float(value))
        env[a.target] = value
    new_state = {name: env[name] for name in state}
    for name in created:
        new_state[name] = env[name]
    return env["param"], new_state


def initial_state(program: Program, param: torch.Tensor, hyper: dict) -> dict:
    """A parameter's state before its first step, by rule name (from the spec's [state] table)."""
    state: dict[str, Any] = {}
    env = {**hyper, "param": param}
    for s in program.spec.state.values():
        if not _holds(s.when, env):
            continue
        if s.init == "zeros":
            state[s.name] = torch.zeros_like(param)
        elif s.init == "zeros_reduced":
            shape = list(param.shape)
            shape[s.reduced_dim] = 1
            state[s.name] = param.new_zeros(shape)
        elif s.init == "full":
            state[s.name] = torch.full_like(param, float(_evaluate(s.init_value, hyper)))
        elif s.init == "scalar":
            state[s.name] = _as_counter(_evaluate(s.init_value, hyper))
        else:
            state[s.name] = None
    return state


def hyperparameter_values(program: Program, group: dict) -> dict:
    """A torch-style param group's values by rule name (``betas`` → ``beta1``, ``beta2``)."""
    values: dict[str, Any] = {}
    for h in program.spec.hyperparameters.values():
        if h.names:
            values.update(zip(h.names, group[h.name], strict=True))
        else:
            values[h.name] = group[h.name]
    return values

