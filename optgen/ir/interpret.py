"""The reference: a spec's IR evaluated directly, in float64, with no generated code.

Every backend of every spec is tested against this interpreter (tests/backends/).  It reads the
*lowered* program — flags still symbolic, before any pass — so a bug in a pass or a backend
shows up as a difference, and it evaluates each sympy node with the plainest torch arithmetic
(``a + w * (b - a)`` for lerp), not the fused ops the backends pick.

It cannot tell whether a spec is *right* — only whether the generated code does what the spec
says; tests/oracle/ compares built-in specs with torch.optim for that.
"""
from __future__ import annotations

import math

import sympy
import torch

from optgen.ir.nodes import Program
from optgen.spec.expressions import Clamp, Lerp, Maximum, Minimum, Where


def _evaluate(expr: sympy.Expr, env: dict):
    if expr.is_Symbol:
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
    if isinstance(expr, Clamp):
        x, low, high = args
        return x.clamp(low, high) if isinstance(x, torch.Tensor) else min(max(x, low), high)
    if isinstance(expr, sympy.core.relational.Relational):
        ops = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
               ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
        return ops[expr.rel_op](*args)
    unary = {sympy.exp: (torch.exp, math.exp), sympy.log: (torch.log, math.log),
             sympy.Abs: (torch.abs, abs), sympy.sign: (torch.sign, lambda x: float((x > 0) - (x < 0)))}
    if expr.func in unary:
        tensor_fn, scalar_fn = unary[expr.func]
        return tensor_fn(args[0]) if isinstance(args[0], torch.Tensor) else scalar_fn(args[0])
    if isinstance(expr, sympy.conjugate):
        return args[0]
    raise NotImplementedError(f"the interpreter has no rule for {type(expr).__name__}")


def _holds(guard: sympy.Basic, env: dict) -> bool:
    if guard in (sympy.true, sympy.false):
        return bool(guard)
    if isinstance(guard, sympy.core.relational.Relational):
        return bool(_evaluate(guard, env))
    if isinstance(guard, (sympy.And, sympy.Or, sympy.Not)):
        parts = [_holds(a, env) for a in guard.args]
        return all(parts) if isinstance(guard, sympy.And) else any(parts) if isinstance(guard, sympy.Or) \
            else not parts[0]
    values = {s: env[s.name] for s in guard.free_symbols}
    return bool(guard.subs({s: (sympy.true if v is True else sympy.false if v is False else v)
                            for s, v in values.items()}))


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
    for a in program.body:
        if not _holds(a.guard, env):
            continue
        if a.first is not None and env.get(a.target) is None:
            env[a.target] = _evaluate(a.first, env)
            created.add(a.target)
            continue
        env[a.target] = _evaluate(a.value, env)
    new_state = {name: env[name] for name in state}
    for name in created:
        new_state[name] = env[name]
    return env["param"], new_state


def initial_state(program: Program, param: torch.Tensor, hyper: dict) -> dict:
    """A parameter's state before its first step, by rule name (from the spec's [state] table)."""
    state = {}
    for s in program.spec.state.values():
        if not _holds(s.when, hyper):
            continue
        if s.init == "zeros":
            state[s.name] = torch.zeros_like(param)
        elif s.init == "full":
            state[s.name] = torch.full_like(param, float(_evaluate(s.init_value, hyper)))
        elif s.init == "scalar":
            state[s.name] = float(_evaluate(s.init_value, hyper))
        else:
            state[s.name] = None
    return state


def hyperparameter_values(program: Program, group: dict) -> dict:
    """A torch-style param group's values by rule name (``betas`` → ``beta1``, ``beta2``)."""
    values = {}
    for h in program.spec.hyperparameters.values():
        if h.names:
            values.update(zip(h.names, group[h.name]))
        else:
            values[h.name] = group[h.name]
    return values

