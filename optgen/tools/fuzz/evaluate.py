"""The rule executed as plain Python: a second reference, independent of the compiler.

The spec's TOML is read with ``tomllib`` and its rule walked with ``ast`` statement by
statement, every name bound to a value (a float64 torch tensor or a Python number), every
assignment binding a new value — plain value semantics, which is what the spec language means.
Nothing of optgen's spec loader, IR, passes or interpreter is used, so a bug there cannot hide
by being shared with the reference (the interpreter reads the lowered IR).

Two details follow the runtime rather than the rule's mathematics, as the interpreter does
(optgen/ir/interpret.py, module docstring): counters are stored in a 0-dim tensor of torch's step
dtype, and a ``first`` state's first assignment stores its ``first`` expression.
"""
from __future__ import annotations

import ast
import math
import tomllib
from typing import Any

import torch


def _dtype_round(value: float) -> float:
    """A counter as its 0-dim state tensor (torch's step dtype) holds it."""
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(float(value), dtype=dtype).item()


def _tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)


def _unary(tensor_fn, scalar_fn):
    return lambda x: tensor_fn(x) if isinstance(x, torch.Tensor) else scalar_fn(x)


def _pick(tensor_fn, scalar_fn):
    def f(a, b):
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            return scalar_fn(a, b)
        return tensor_fn(_tensor(a), _tensor(b))
    return f


def _clamp(x, low, high):
    if isinstance(x, torch.Tensor):
        return x.clamp(low, high)
    return min(max(x, low), high)


FUNCTIONS = {
    "sqrt": _unary(torch.sqrt, math.sqrt),
    "exp": _unary(torch.exp, math.exp),
    "log": _unary(torch.log, math.log),
    "abs": _unary(torch.abs, abs),
    "sign": _unary(torch.sign, lambda x: float((x > 0) - (x < 0))),
    "conj": lambda x: x,  # real values only
    "lerp": lambda a, b, w: a + w * (b - a),
    "maximum": _pick(torch.maximum, max),
    "minimum": _pick(torch.minimum, min),
    "clamp": _clamp,
    "clamp_min": lambda x, low: _clamp(x, low, math.inf),
    "clamp_max": lambda x, high: _clamp(x, -math.inf, high),
    "norm": lambda x: torch.linalg.vector_norm(x).item(),
    "numel": lambda x: x.numel(),
    "ndim": lambda x: x.dim(),
    "size": lambda x, d: x.size(int(d)),
    "machine_eps": lambda x: torch.finfo(x.dtype).eps,
    "if_none": lambda h, fallback: fallback if h is None else h,
    "norm_dim": lambda x, d: torch.linalg.vector_norm(x, dim=int(d), keepdim=True),
    "mean_dim": lambda x, d: x.mean(dim=int(d), keepdim=True),
}

_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b,
           ast.Pow: lambda a, b: torch.pow(a, b) if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)
           else a ** b}
_COMPARE = {ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b,
            ast.GtE: lambda a, b: a >= b, ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b}


def evaluate(node: ast.AST, env: dict):
    """The value of an expression (or a condition) of the spec language."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](evaluate(node.left, env), evaluate(node.right, env))
    if isinstance(node, ast.UnaryOp):
        value = evaluate(node.operand, env)
        if isinstance(node.op, ast.USub):
            return -value
        if isinstance(node.op, ast.UAdd):
            return value
        return not value
    if isinstance(node, ast.Compare):
        (op,), (right,) = node.ops, node.comparators
        return _COMPARE[type(op)](evaluate(node.left, env), evaluate(right, env))
    if isinstance(node, ast.BoolOp):
        values = (evaluate(v, env) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)  # the spec grammar calls functions by name only
        name = node.func.id
        if name == "where":
            condition, a, b = (evaluate(arg, env) for arg in node.args)
            if not isinstance(condition, torch.Tensor):
                return a if condition else b
            return torch.where(condition, _tensor(a), _tensor(b))
        return FUNCTIONS[name](*(evaluate(arg, env) for arg in node.args))
    raise NotImplementedError(f"the evaluator has no rule for {ast.unparse(node)}")


class Evaluator:
    """One spec's rule, run step by step on a list of parameters."""

    def __init__(self, text: str):
        data = tomllib.loads(text)
        self.hyper = data.get("hyperparameters", {})
        self.state = data.get("state", {})
        self.rule = ast.parse(data["update"]["rule"])

    def values(self, kwargs: dict) -> dict:
        """Rule name → value of every hyperparameter (tuples by item name), defaults overridden."""
        env: dict[str, Any] = {}
        for name, raw in self.hyper.items():
            table: dict[str, Any] = raw if isinstance(raw, dict) else {"default": raw}
            value = kwargs.get(name, table["default"])
            if "names" in table:
                env.update(zip(table["names"], (None if v == "None" else v for v in value), strict=True))
            else:
                env[name] = value
        return env

    def initial_state(self, param: torch.Tensor, hyper: dict) -> dict:
        out: dict[str, Any] = {}
        for name, raw in self.state.items():
            table = raw if isinstance(raw, dict) else {"init": raw}
            if "when" in table and not evaluate(ast.parse(table["when"], mode="eval").body, {**hyper, "param": param}):
                continue
            if "first" in table:
                out[name] = None
                continue
            init = str(table["init"])
            tree = ast.parse(init, mode="eval").body
            called = tree.func.id if isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) else None
            if called == "zeros_like":
                out[name] = torch.zeros_like(param)
            elif isinstance(tree, ast.Call) and called == "full_like":
                out[name] = torch.full_like(param, float(evaluate(tree.args[1], hyper)))
            else:  # a counter
                out[name] = _dtype_round(evaluate(tree, hyper))
        return out

    def step(self, param, grad, state: dict, hyper: dict):
        env = {**hyper, **state, "param": param, "grad": grad}
        self._block(self.rule.body, env)
        return env["param"], {name: env[name] for name in state}

    def _block(self, body, env) -> None:
        for stmt in body:
            if isinstance(stmt, ast.If):
                self._block(stmt.body if evaluate(stmt.test, env) else stmt.orelse, env)
            elif isinstance(stmt, ast.Pass):
                continue
            else:
                # a rule assigns names only: `x = ...` or `x op= ...`
                if isinstance(stmt, ast.Assign):
                    assert isinstance(stmt.targets[0], ast.Name)
                    target, value = stmt.targets[0].id, stmt.value
                else:
                    assert isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name)
                    target = stmt.target.id
                    value = ast.BinOp(ast.Name(target), stmt.op, stmt.value)
                self._assign(target, value, env)

    def _assign(self, target: str, value: ast.AST, env: dict) -> None:
        decl = self.state.get(target)
        table = decl if isinstance(decl, dict) else {}
        if "first" in table and env.get(target) is None:
            env[target] = evaluate(ast.parse(table["first"], mode="eval").body, env)
            return
        result = evaluate(value, env)
        if decl is not None and not isinstance(env[target], torch.Tensor):  # a counter
            if target in {n.id for n in ast.walk(value) if isinstance(n, ast.Name)}:
                dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                result = evaluate(value, {**env, target: torch.tensor(env[target], dtype=dtype)})
                result = float(result)
            else:
                result = _dtype_round(result)
        elif decl is not None and not isinstance(result, torch.Tensor):  # a tensor state set to a number
            result = torch.full_like(env[target], float(result))
        elif target == "param" and not isinstance(result, torch.Tensor):
            result = torch.full_like(env["param"], float(result))
        env[target] = result

    def run(self, params: list[torch.Tensor], gradients, kwargs: dict, steps: int):
        """Params and states (by rule name; counters as floats; uncreated state left out) after
        ``steps`` steps; ``gradients(k, params)`` gives step k's gradients."""
        hyper = self.values(kwargs)
        params = [p.clone() for p in params]
        states = [self.initial_state(p, hyper) for p in params]
        for k in range(steps):
            grads = gradients(k, params)
            for i in range(len(params)):
                params[i], states[i] = self.step(params[i], grads[i], states[i], hyper)
        return params, [{n: v for n, v in s.items() if v is not None} for s in states]
