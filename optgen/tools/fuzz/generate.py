"""Random valid specs from a seed.

Note [Random specs stay valid and finite]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A generated spec must load (a spec the loader rejects is a bug of this generator, or of the
loader) and its run must stay finite for a few steps, so that every difference between two
implementations is a compiler bug rather than noise.  The generator therefore

- tracks which names are defined on every path (a scope per block; after an ``if``/``else``
  only the names both branches assign survive), so no read is of an undefined name;
- only touches a ``when`` state inside ``if <its when>:`` and only reads a ``first`` state after
  its first assignment;
- keeps every function in its domain: ``sqrt(abs(x) + c)``, ``log(1 + abs(x))``,
  ``x / (abs(y) + c)``, ``exp(clamp(x, -3, 3))``, with literal ``c > 0`` (a hyperparameter may
  be switched to 0 by a configuration);
- bounds what feeds back from one step into the next: every new state or parameter value is a
  ``clamp``, ``sign``, or a ``lerp``/convex mix of a clamped value, so nothing grows over the steps.

Discontinuous functions (``sign``, ``where``) may still flip where two implementations round a
value near the boundary differently; that is rare with random float64 data and shows as a
difference of a whole step size, which the report makes easy to recognise.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: constructs the generator can leave out while a compiler bug in them is unfixed: name → the bug.
#: run.py and the CI seeds pass ``avoid=KNOWN_BUGS``; ``optgen fuzz --all-constructs`` generates them anyway.
KNOWN_BUGS: dict[str, str] = {
    # Each key is a construct (or a pattern the generator can steer around) and names the bug.
    # Empty: every bug found so far is fixed (tests/fuzz/regressions/ keeps each one's spec).
}

#: every construct counted in :attr:`RandomSpec.constructs` (tests/fuzz checks the CI seeds cover all)
CONSTRUCTS = (
    # functions of the spec language
    "sqrt", "exp", "log", "abs", "sign", "conj", "lerp", "maximum", "minimum", "clamp", "clamp_min",
    "clamp_max", "where", "pow", "div", "neg", "norm", "numel", "ndim", "size", "machine_eps", "if_none",
    "norm_dim", "mean_dim", "scalar_maximum", "scalar_minimum", "scalar_clamp", "scalar_sqrt",
    "scalar_exp", "scalar_log", "scalar_abs", "scalar_sign",
    # hyperparameters and state
    "hyper_scalar", "hyper_zero_default", "hyper_tuple", "hyper_none", "flag",
    "state_zeros", "state_full", "state_counter", "state_first", "state_first_when", "state_when_flag",
    "state_when_compare",
    # statements
    "tensor_local", "scalar_local", "copy_state", "copy_param", "copy_grad", "read_copy_after_update",
    "augmented_add", "augmented_sub", "augmented_mul", "grad_reassign", "param_update",
    "counter_increment", "counter_pow",
    "if_flag", "if_not_flag", "if_compare_hyper", "if_counter", "if_scalar_local", "if_boolop",
    "else", "elif", "both_branches_local", "nested_if",
)


@dataclass
class RandomSpec:
    """One generated spec: its TOML text and what it exercises."""

    seed: int
    name: str
    text: str
    flags: tuple[str, ...]
    #: hyperparameter settings (constructor kwargs besides the flags) that runs should try
    configs: list[dict]
    constructs: Counter = field(default_factory=Counter)
    uses_reductions: bool = False

    @property
    def file_name(self) -> str:
        return f"{self.name.lower()}.toml"


class _Scope:
    """The names readable at a point of the rule: tensors and scalars."""

    def __init__(self, tensors=(), scalars=()):
        self.tensors = list(tensors)
        self.scalars = list(scalars)

    def copy(self) -> _Scope:
        return _Scope(self.tensors, self.scalars)

    def add(self, name: str, tensor: bool) -> None:
        target = self.tensors if tensor else self.scalars
        if name not in target:
            target.append(name)


class _Generator:
    def __init__(self, seed: int, name: str, avoid: frozenset[str], size: int):
        self.r = random.Random(seed)
        self.seed, self.name, self.avoid, self.size = seed, name, avoid, size
        self.used: Counter[str] = Counter()
        self.counter = 0  # fresh local names
        self.reductions = False
        self.tensor_scalars = 0

    # -- helpers ---------------------------------------------------------------------------
    def ok(self, construct: str) -> bool:
        return construct not in self.avoid

    def mark(self, construct: str) -> None:
        self.used[construct] += 1

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def pick(self, options):
        """A random choice among (construct, weight) pairs, leaving out avoided constructs."""
        options = [(c, w) for c, w in options if self.ok(c)]
        return self.r.choices([c for c, _ in options], [w for _, w in options])[0]

    def weight(self) -> str:
        """A scalar in (0, 1): an interpolation weight or a decay."""
        options = ["(1 - beta1)", "beta2", "(1 - beta2)", "beta1", *self.unit_hypers]
        return self.r.choice(options)

    # -- expressions -----------------------------------------------------------------------
    def literal(self) -> str:
        return self.r.choice(["0.5", "2", "0.25", "1.5", "3", "0.1"])

    def scalar_atom(self, scope: _Scope) -> str:
        options = list(scope.scalars) + ["lr", "beta1", "beta2"]
        return self.r.choice(options + [self.literal()])

    def scalar(self, scope: _Scope, depth: int, tensors: _Scope | None = None) -> str:
        """A host scalar (hyperparameters, counters, scalar locals, per-tensor scalars)."""
        r = self.r
        if depth <= 0 or r.random() < 0.3:
            return self.scalar_atom(scope)
        kind = self.pick([("add", 2), ("mul", 2), ("div", 1), ("scalar_sqrt", 1), ("scalar_exp", 1),
                          ("scalar_log", 1), ("scalar_abs", 1), ("scalar_sign", 0.5), ("scalar_maximum", 1),
                          ("scalar_minimum", 1), ("scalar_clamp", 1),
                          ("counter_pow", 2 if self.counter_ready(scope) else 0),
                          *((c, w if self.tensor_scalar_ok() else 0) for c, w in
                            (("norm", 1), ("numel", 1), ("ndim", 0.5), ("size", 0.5), ("machine_eps", 0.5))),
                          ("if_none", 1 if self.none_hyper else 0)])
        a = lambda: self.scalar(scope, depth - 1)  # noqa: E731
        tensor = lambda: self.r.choice(scope.tensors)  # noqa: E731
        if kind == "add":
            return f"({a()} {r.choice('+-')} {a()})"
        if kind == "mul":
            return f"({a()} * {a()})"
        self.mark(kind)
        if kind in ("norm", "numel", "ndim", "size", "machine_eps"):
            self.tensor_scalars += 1
        if kind == "div":
            return f"({a()} / ({self.abs(a(), '0.5')} + 1))"
        if kind == "scalar_sqrt":
            return f"sqrt({self.abs(a(), '0.5')} + 0.01)"
        if kind == "scalar_exp":
            return f"exp(clamp({a()}, -3, 3))" if self.ok("clamp") else f"exp(-abs({a()}))"
        if kind == "scalar_log":
            return f"log(1 + {self.abs(a(), '0.5')})"
        if kind == "scalar_abs":
            return self.abs(a(), "0.5")
        if kind == "scalar_sign":
            return f"sign({a()} - 0.375)"
        if kind == "scalar_maximum":
            return f"maximum({a()}, {self.literal()})"
        if kind == "scalar_minimum":
            return f"minimum({a()}, {self.literal()})"
        if kind == "scalar_clamp":
            return f"clamp({a()}, 0.1, 2)"
        if kind == "counter_pow":
            return f"(1 - {r.choice(['beta1', 'beta2'])} ** {self.counter_name})"
        if kind == "norm":
            return f"(norm({tensor()}) / sqrt(numel(param)))"
        if kind == "numel":
            return f"(1 / sqrt(numel({tensor()})))"
        if kind == "ndim":
            return "(ndim(param) * 0.5)"
        if kind == "size":
            return "(size(param, -1) * 0.25)"
        if kind == "machine_eps":
            return "(machine_eps(param) * 1000000)"
        return f"if_none({self.none_hyper}1, 0.001)"

    def tensor_scalar_ok(self) -> bool:
        return self.ok("repeated_tensor_scalar") or self.tensor_scalars == 0

    def abs(self, inner: str, other: str = "param") -> str:
        """``abs(inner)``, steering around the abs-of-exp bug when it is avoided (KNOWN_BUGS)."""
        if "exp(" in inner and not self.ok("abs_of_exp"):
            inner = f"({inner} + {other})"
        return f"abs({inner})"

    def counter_ready(self, scope: _Scope) -> bool:
        return self.counter_name is not None and self.counter_name in scope.scalars

    def tensor(self, scope: _Scope, depth: int) -> str:
        """A tensor expression over the tensors in scope (at least one tensor atom)."""
        r = self.r
        if depth <= 0 or r.random() < 0.2:
            return r.choice(scope.tensors)
        kind = self.pick([("add", 2), ("sub", 2), ("mul", 2), ("div", 1.5), ("neg", 0.5), ("sqrt", 1),
                          ("log", 1), ("exp", 1), ("abs", 1), ("sign", 0.7), ("conj", 0.3), ("pow", 0.7),
                          ("lerp", 1.5), ("maximum", 1), ("minimum", 1), ("clamp", 1), ("clamp_min", 0.5),
                          ("clamp_max", 0.5), ("where", 1.5), ("scale", 2),
                          ("norm_dim", 0.15 if self.allow_reductions else 0),
                          ("mean_dim", 0.15 if self.allow_reductions else 0)])
        t = lambda: self.tensor(scope, depth - 1)  # noqa: E731
        either = lambda: t() if r.random() < 0.6 else self.scalar(scope, 1)  # noqa: E731
        if kind in ("add", "sub", "mul"):
            op = {"add": "+", "sub": "-", "mul": "*"}[kind]
            left, right = t(), either()
            if left == right and not self.ok("constant_tensor_expr"):
                right = self.literal()
            if r.random() < 0.5:
                left, right = right, left
            return f"({left} {op} {right})"
        self.mark(kind)
        if kind == "div":
            return f"({either()} / ({self.abs(t())} + {r.choice(['0.5', '1', '0.25'])}))"
        if kind == "neg":
            return f"(-{t()})"
        if kind == "sqrt":
            return f"sqrt({self.abs(t())} + {r.choice(['0.01', '0.001', '1'])})"
        if kind == "log":
            return f"log(1 + {self.abs(t())})"
        if kind == "exp":
            return f"exp(clamp({t()}, -3, 3))" if self.ok("clamp") else f"exp(-abs({t()}))"
        if kind == "abs":
            return self.abs(t())
        if kind == "sign":
            return f"sign({t()})"
        if kind == "conj":
            return f"conj({t()})"
        if kind == "pow":
            return f"({t()}) ** {r.choice(['2', '2', '3'])}"
        if kind == "lerp":
            return f"lerp({t()}, {either()}, {self.weight()})"
        if kind in ("maximum", "minimum"):
            return f"{kind}({t()}, {either()})"
        if kind == "clamp":
            bound = r.choice(["1", "2", "0.5"])
            return f"clamp({t()}, -{bound}, {bound})"
        if kind == "clamp_min":
            return f"clamp_min({t()}, -1)"
        if kind == "clamp_max":
            return f"clamp_max({t()}, 1)"
        if kind == "where":
            op = r.choice([">", "<", ">=", "<="])
            left, right = t(), either()
            if not self.ok("where_same_operands"):
                right = self.scalar(scope, 1)  # a tensor compared with a host scalar is never x < x
            return f"where({left} {op} {right}, {t()}, {either()})"
        if kind == "scale":
            return f"({self.scalar(scope, 1)} * {t()})"
        self.reductions = True
        # A reduction of a tensor's name (never of an expression sympy may fold to a number), added
        # to a full-shape tensor: a reduced value broadcasts, and is never stored whole into a
        # full-size state (a SpecError, as it should be).
        return f"({kind}({r.choice(scope.tensors)}, -1) + {t()})"

    def bounded(self, scope: _Scope, depth: int = 2) -> str:
        """A tensor value safe to feed into the next step (see the Note)."""
        e = self.tensor(scope, depth)
        if self.ok("sign") and self.r.random() < 0.15:
            self.mark("sign")
            return f"sign({e})"
        if self.ok("clamp"):
            self.mark("clamp")
            bound = self.r.choice(["1", "2", "4"])
            return f"clamp({e}, -{bound}, {bound})"
        self.mark("sign")
        return f"sign({e})"

    # -- statements ------------------------------------------------------------------------
    def emit(self, out: list[str], indent: int, text: str) -> None:
        out.append("    " * indent + text)

    def state_update(self, out, indent, scope: _Scope, state: str) -> None:
        """A new value of a tensor state that stays bounded over the steps."""
        form = self.pick([("lerp", 3), ("mix", 2), ("clamp", 2), ("augmented_add", 1.5), ("augmented_sub", 1),
                          ("augmented_mul", 1), ("maximum", 1), ("minimum", 1)])
        if form == "lerp":
            self.mark("lerp")
            self.emit(out, indent, f"{state} = lerp({state}, {self.bounded(scope)}, {self.weight()})")
        elif form == "mix":
            w = self.weight()
            self.emit(out, indent, f"{state} = {w} * {state} + (1 - {w}) * {self.bounded(scope)}")
        elif form == "clamp":
            self.emit(out, indent, f"{state} = {self.bounded(scope, 3)}")
        elif form in ("augmented_add", "augmented_sub"):
            self.mark(form)
            # s += w * (clamped - s) and s -= w * (s - clamped) keep s within the clamp
            b, w = self.bounded(scope), self.weight()
            self.emit(out, indent, f"{state} += {w} * ({b} - {state})" if form == "augmented_add"
                      else f"{state} -= {w} * ({state} - {b})")
        elif form == "augmented_mul":
            self.mark(form)
            self.emit(out, indent, f"{state} *= {self.weight()}")
        else:
            self.mark(form)
            self.emit(out, indent, f"{state} = {form}({state}, {self.bounded(scope)})")

    def param_update(self, out, indent, scope: _Scope) -> None:
        self.mark("param_update")
        form = self.pick([("plain", 3), ("augmented_sub", 1), ("augmented_mul", 0.7), ("decay", 0.7)])
        if form == "plain":
            self.emit(out, indent, f"param = param - lr * {self.bounded(scope)}")
        elif form == "augmented_sub":
            self.mark(form)
            self.emit(out, indent, f"param -= lr * {self.bounded(scope)}")
        elif form == "augmented_mul":
            self.mark(form)
            self.emit(out, indent, "param *= 1 - lr * wd")
        else:
            self.emit(out, indent, f"param = param * (1 - lr * {self.r.choice(['wd', *self.unit_hypers])})")

    def grad_update(self, out, indent, scope: _Scope) -> None:
        self.mark("grad_reassign")
        form = self.r.choice(["wd", "clamp", "mul"])
        if form == "wd":
            self.emit(out, indent, "grad = grad + wd * param")
        elif form == "clamp" and self.ok("clamp"):
            self.mark("clamp")
            self.emit(out, indent, "grad = clamp(grad, -2, 2)")
        elif self.ok("augmented_mul"):
            self.mark("augmented_mul")
            self.emit(out, indent, f"grad *= {self.weight()}")
        else:
            self.emit(out, indent, "grad = grad + wd * param")

    def condition(self, scope: _Scope) -> str:
        options = [("if_compare_hyper", 3), ("if_flag", 3 if self.flags else 0),
                   ("if_not_flag", 1 if self.flags else 0),
                   ("if_counter", 2 if self.counter_ready(scope) else 0),
                   ("if_scalar_local", 1.5 if self.scalar_locals(scope) else 0), ("if_boolop", 1)]
        kind = self.pick(options)
        self.mark(kind)
        if kind == "if_flag":
            return self.r.choice(self.flags)
        if kind == "if_not_flag":
            return f"not {self.r.choice(self.flags)}"
        if kind == "if_counter":
            return f"{self.counter_name} {self.r.choice(['>', '>=', '<'])} {self.r.choice(['2', '3'])}"
        if kind == "if_scalar_local":
            return f"{self.r.choice(self.scalar_locals(scope))} > {self.r.choice(['0.5', '0.1', '1'])}"
        if kind == "if_boolop":
            a = self.hyper_comparison()
            b = self.r.choice(self.flags) if self.flags else self.hyper_comparison()
            return f"{a} {self.r.choice(['and', 'or'])} {b}"
        return self.hyper_comparison()

    def hyper_comparison(self) -> str:
        if self.r.random() < 0.4:
            return f"wd {self.r.choice(['!=', '=='])} 0"
        return f"{self.r.choice(self.unit_hypers)} {self.r.choice(['>', '<', '>=', '<='])} 0.5"

    def scalar_locals(self, scope: _Scope) -> list[str]:
        return [s for s in scope.scalars if s.startswith("c")]

    def statement(self, out, indent, scope: _Scope, depth: int) -> None:
        """One random statement (or an if block) at this point."""
        scalar_local = 2 if depth == 0 or self.ok("scalar_local_in_if") else 0
        kind = self.pick([("tensor_local", 4), ("scalar_local", scalar_local), ("state", 3), ("copy_state", 1.5),
                          ("param_update", 1), ("grad_reassign", 0.7),
                          ("if", 2.5 if depth < 2 else 0)])
        if kind == "tensor_local":
            self.mark(kind)
            name = self.fresh("t")
            self.emit(out, indent, f"{name} = {self.tensor(scope, self.r.choice([1, 2, 3]))}")
            scope.add(name, True)
        elif kind == "scalar_local":
            self.mark(kind)
            name = self.fresh("c")
            self.emit(out, indent, f"{name} = {self.scalar(scope, 2)}")
            scope.add(name, False)
        elif kind == "state":
            states = [s for s in self.plain_states if s in scope.tensors]
            if states:
                self.state_update(out, indent, scope, self.r.choice(states))
        elif kind == "copy_state":
            states = [s for s in self.plain_states if s in scope.tensors]
            if states:
                self.copy_then_update(out, indent, scope, self.r.choice(states))
        elif kind == "param_update":
            self.param_update(out, indent, scope)
        elif kind == "grad_reassign":
            self.grad_update(out, indent, scope)
        else:
            self.if_block(out, indent, scope, depth)

    def copy_then_update(self, out, indent, scope: _Scope, state: str) -> None:
        """``s_old = s``; ``s = ...``; a read of ``s_old`` (Note [Random specs stay valid and finite])."""
        self.mark("copy_state")
        old = self.fresh(f"{state}_old")
        self.emit(out, indent, f"{old} = {state}")
        scope.add(old, True)
        self.state_update(out, indent, scope, state)
        self.read_copy(out, indent, scope, old)

    def read_copy(self, out, indent, scope: _Scope, old: str) -> None:
        self.mark("read_copy_after_update")
        name = self.fresh("t")
        self.emit(out, indent, f"{name} = {old} {self.r.choice(['-', '+', '*'])} {self.tensor(scope, 1)}")
        scope.add(name, True)

    def block(self, out, indent, scope: _Scope, depth: int, count: int) -> None:
        for _ in range(count):
            self.statement(out, indent, scope, depth)

    def if_block(self, out, indent, scope: _Scope, depth: int) -> None:
        if depth > 0:
            self.mark("nested_if")
        self.emit(out, indent, f"if {self.condition(scope)}:")
        then = scope.copy()
        self.block(out, indent + 1, then, depth + 1, self.r.randint(1, 3))
        both = self.r.random() < 0.5 and self.ok("both_branches_local")
        name = self.fresh("u") if both else None
        tensor = self.r.random() < 0.75 or not self.ok("both_branches_scalar_local")
        if both:
            self.emit(out, indent + 1, f"{name} = {self.tensor(then, 2) if tensor else self.scalar(then, 2)}")
        branches = [then]
        if both or self.r.random() < 0.5:
            self.mark("else")
            if self.r.random() < 0.25 and self.ok("elif"):
                self.mark("elif")
                self.emit(out, indent, f"elif {self.condition(scope)}:")
                branch = scope.copy()
                self.block(out, indent + 1, branch, depth + 1, self.r.randint(1, 2))
                if both:
                    value = self.tensor(branch, 2) if tensor else self.scalar(branch, 2)
                    self.emit(out, indent + 1, f"{name} = {value}")
                branches.append(branch)
            self.emit(out, indent, "else:")
            other = scope.copy()
            self.block(out, indent + 1, other, depth + 1, self.r.randint(0 if both else 1, 2))
            if both:
                self.emit(out, indent + 1, f"{name} = {self.tensor(other, 2) if tensor else self.scalar(other, 2)}")
            branches.append(other)
        else:
            branches.append(scope)
        # Only what every path assigned is defined after the if.
        for tensor_kind in (True, False):
            lists = [b.tensors if tensor_kind else b.scalars for b in branches]
            for n in lists[0]:
                if all(n in other for other in lists[1:]):
                    scope.add(n, tensor_kind)
        if both:
            self.mark("both_branches_local")
            user = self.fresh("t")
            if tensor:
                self.emit(out, indent, f"{user} = {name} {self.r.choice(['+', '*', '-'])} {self.tensor(scope, 1)}")
            else:
                self.emit(out, indent, f"{user} = {name} * {self.tensor(scope, 1)}")
            scope.add(user, True)

    # -- the spec --------------------------------------------------------------------------
    def spec(self) -> RandomSpec:
        r = self.r
        self.allow_reductions = r.random() < 0.25 and self.ok("norm_dim") and self.ok("mean_dim")
        hyper = {"lr": r.choice([0.01, 0.05, 0.1])}
        self.mark("hyper_tuple")
        betas = [round(r.uniform(0.5, 0.95), 2), round(r.uniform(0.5, 0.99), 2)]
        self.mark("hyper_zero_default")
        self.unit_hypers = [f"h{i}" for i in range(r.randint(1, 3))]
        for _ in self.unit_hypers:
            self.mark("hyper_scalar")
        defaults = {h: round(r.uniform(0.15, 0.85), 2) for h in self.unit_hypers}
        self.none_hyper = "epsn" if r.random() < 0.3 and self.ok("hyper_none") else None
        if self.none_hyper:
            self.mark("hyper_none")
        self.flags = [f"f{i}" for i in range(r.choice([0, 1, 1, 2, 2]))]
        for _ in self.flags:
            self.mark("flag")
        flag_defaults = {f: r.random() < 0.5 for f in self.flags}

        # State.
        state_lines = []
        self.counter_name = None
        if r.random() < 0.75:
            self.counter_name = "step"
            self.mark("state_counter")
            state_lines.append('step = "0"')
        self.plain_states = [f"s{i}" for i in range(r.randint(1, 3))]
        for s in self.plain_states:
            if r.random() < 0.3 and self.ok("state_full"):
                self.mark("state_full")
                state_lines.append(f'{s} = {{ init = "full_like(param, {r.choice(self.unit_hypers)})" }}')
            else:
                self.mark("state_zeros")
                state_lines.append(f'{s} = "zeros_like(param)"')
        firsts = []  # (name, when or None)
        if r.random() < 0.5 and self.ok("state_first"):
            when = "wd != 0" if r.random() < 0.4 and self.ok("state_first_when") else None
            self.mark("state_first_when" if when else "state_first")
            first = r.choice(["grad", "param * 0.5", "grad * grad", "clamp(grad, -1, 1)"])
            line = f'b0 = {{ first = "{first}"' + (f', when = "{when}"' if when else "") + " }"
            state_lines.append(line)
            firsts.append(("b0", when))
        whens = []
        if r.random() < 0.5:
            if self.flags and r.random() < 0.6 and self.ok("state_when_flag"):
                when = r.choice(self.flags)
                self.mark("state_when_flag")
            elif self.ok("state_when_compare"):
                when = f"{r.choice(self.unit_hypers)} > 0.5"
                self.mark("state_when_compare")
            else:
                when = None
            if when:
                state_lines.append(f'w0 = {{ init = "zeros_like(param)", when = "{when}" }}')
                whens.append(("w0", when))

        # Rule.
        out: list[str] = []
        scope = _Scope(["param", "grad", *self.plain_states],
                       [*self.unit_hypers, "wd", *([f"{self.none_hyper}2"] if self.none_hyper else [])])
        if self.flags and r.random() < 0.5:
            self.mark("grad_reassign")
            self.mark("if_flag")
            self.emit(out, 0, f"if {self.flags[0]}:")
            self.emit(out, 1, "grad = -grad")
        if self.counter_name:
            self.mark("counter_increment")
            self.emit(out, 0, f"{self.counter_name} = {self.counter_name} + 1")
            scope.add(self.counter_name, False)
        copies = []
        if r.random() < 0.4 and self.ok("copy_param"):
            self.mark("copy_param")
            self.emit(out, 0, "p_old = param")
            scope.add("p_old", True)
            copies.append("p_old")
        if r.random() < 0.3 and self.ok("copy_grad"):
            self.mark("copy_grad")
            self.emit(out, 0, "g_old = grad")
            scope.add("g_old", True)
            copies.append("g_old")
            self.grad_update(out, 0, scope)
            self.read_copy(out, 0, scope, "g_old")

        plan: list[tuple[str, Any]] = [("state", s) for s in self.plain_states] + [("first", f) for f in firsts] + \
               [("when", w) for w in whens] + [("random", None)] * self.r.randint(self.size // 2, self.size)
        r.shuffle(plan)
        for kind, what in plan:
            if kind == "state":
                self.state_update(out, 0, scope, what)
            elif kind == "random":
                self.statement(out, 0, scope, 0)
            elif kind == "first":
                name, when = what
                indent = 0
                inner = scope
                if when:
                    self.emit(out, 0, f"if {when}:")
                    self.mark("if_compare_hyper")
                    indent, inner = 1, scope.copy()
                self.emit(out, indent, f"{name} = clamp({self.weight()} * {name} + {self.tensor(inner, 1)}, -3, 3)")
                self.mark("clamp")
                inner.add(name, True)
                self.emit(out, indent, f"{self.fresh('t')} = {name} * {self.tensor(inner, 1)}")
                if not when:
                    scope.add(name, True)
            else:
                name, when = what
                self.emit(out, 0, f"if {when}:")
                self.mark("if_flag" if when in self.flags else "if_compare_hyper")
                inner = scope.copy()
                inner.add(name, True)
                self.state_update(out, 1, inner, name)
                self.emit(out, 1, f"param = param - lr * clamp({name}, -1, 1)")
                self.mark("clamp")
        self.param_update(out, 0, scope)
        if "p_old" in copies:
            self.mark("read_copy_after_update")
            state = r.choice(self.plain_states)
            self.emit(out, 0, f"{state} = lerp({state}, clamp((param - p_old) / lr, -2, 2), {self.weight()})")
            self.mark("lerp")

        signature = ["lr", "betas", "wd", *self.unit_hypers]
        lines = ["# Random spec generated by optgen.tools.fuzz.generate", "[optimizer]", f'name = "{self.name}"',
                 f'doc = "Random spec, seed {self.seed}."']
        hyper_lines = [f"lr = {hyper['lr']}",
                       f'betas = {{ default = [{betas[0]}, {betas[1]}], names = ["beta1", "beta2"] }}',
                       "wd = 0"]
        hyper_lines += [f"{h} = {defaults[h]}" for h in self.unit_hypers]
        if self.none_hyper:
            hyper_lines.append(f'{self.none_hyper} = {{ default = ["None", 0.001], names = ["{self.none_hyper}1", '
                               f'"{self.none_hyper}2"] }}')
            signature.append(self.none_hyper)
        hyper_lines += [f"{f} = {'true' if flag_defaults[f] else 'false'}" for f in self.flags]
        signature += self.flags
        signature += ["*", "foreach", "differentiable"]
        lines.append(f'signature = "{", ".join(signature)}"')
        lines += ["", "[hyperparameters]", *hyper_lines, "", "[state]", *state_lines, "", "[update]", 'rule = """',
                  *out, '"""', ""]
        alt: dict[str, Any] = {"wd": 0.05, **{h: round(1 - defaults[h], 2) for h in self.unit_hypers}}
        if self.none_hyper:
            alt[self.none_hyper] = (0.002, 0.003)
        configs = [{}, alt]
        return RandomSpec(self.seed, self.name, "\n".join(lines), tuple(self.flags), configs, self.used,
                          self.reductions)


def generate(seed: int, *, avoid=None, size: int = 8, name: str | None = None) -> RandomSpec:
    """The random spec of ``seed`` (deterministic).  ``avoid``: constructs to leave out (by default
    :data:`KNOWN_BUGS`); ``size``: about how many top-level statements the rule gets."""
    avoid = frozenset(KNOWN_BUGS if avoid is None else avoid)
    return _Generator(seed, name or f"Fuzz{seed}", avoid, size).spec()
