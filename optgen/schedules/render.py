"""Schedule specs → generated/lr_scheduler.py, one class per spec, through templates/scheduler/.

Each class is a subclass of the runtime base its spec names (:mod:`optgen.runtime.lr_scheduler_base`)
and has, in torch's shape::

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):   # signature, checks
    def get_lr(self):              # the derived chainable form (or the closed form, chainable = false)
    def _get_closed_form_lr(self): # the spec's formula, used by step(epoch)

This module computes every line of those bodies as text (the printer does the expressions); the
templates only lay them out.
"""
from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass, field

import sympy
from sympy.printing.precedence import PRECEDENCE

from optgen.backends.base import environment
from optgen.errors import SpecError
from optgen.schedules.derive import Branch, Derivation, Interval, Step, derive
from optgen.schedules.model import CURRENT_LR, REQUIRED, ScheduleSpec, T
from optgen.schedules.printing import SchedulePrinter, statements

KEEP = "return self._current_values()"

#: the base of a spec without one: torch's LRScheduler, driving any hyperparameter
#: (Note [Scheduling any hyperparameter] in optgen/runtime/lr_scheduler_base.py)
DEFAULT_BASE = "HyperparameterScheduler"


def spec_hash(spec: ScheduleSpec) -> str:
    return hashlib.sha256(spec.source.encode()).hexdigest()[:16]


@dataclass
class _Uses:
    """What the rendered module needs to import."""

    names: set = field(default_factory=set)


class ClassRenderer:
    """The text of one scheduler class."""

    def __init__(self, spec: ScheduleSpec, uses: _Uses):
        self.spec = spec
        self.uses = uses
        self.derivation: Derivation = derive(spec)  # also for non-chainable specs: the docstring says why
        self.printer = SchedulePrinter(self.rename, spec.choices, self.callee, self.counter,
                                       frozenset(d.name for d in spec.definitions))

    # -- names -------------------------------------------------------------------------------------
    def rename(self, name: str) -> str:
        spec = self.spec
        if name == "lr":
            return 'group["lr"]'
        if name in spec.per_group:
            p = spec.per_group[name]
            return f'group["{p.where}"]' if p.kind == "group" else name
        if name in ("t", "base_lr", "ratio") or name in spec.attributes or name.endswith("_prev") \
                or any(d.name == name for d in spec.definitions):
            return name
        for f in spec.functions.values():
            if any(a.name == name for a in f.args):
                return name
        h = spec.hyperparameters.get(name)
        if h is not None and h.attribute is not None and not spec.base_init:
            return f"self.{h.attribute}"
        raise SpecError(spec.lr.loc, f"'{name}' has no value in the generated class")

    def callee(self, name: str) -> str:
        if name in self.spec.functions:
            return f"self._{name}"
        return self.spec.attributes[name].python

    def counter(self, name: str) -> str:
        return f"self.{self.spec.hyperparameters[name].attribute}"

    def p(self, expr) -> str:
        text = self.printer.print(expr)
        if "math." in text:
            self.uses.names.add("math")
        if "bisect_right(" in text:
            self.uses.names.add("bisect_right")
        return text

    # -- which locals an expression needs ------------------------------------------------------------
    def _definitions(self) -> dict:
        return {d.name: d for d in self.spec.definitions}

    def needed(self, exprs) -> tuple[list[str], list[str], list[str]]:
        """Attributes, definitions at t and definitions at t - 1 the expressions read (in order)."""
        defs = self._definitions()
        want, want_prev = set(), set()
        stack = [sympy.sympify(e) for e in exprs if e is not None]
        seen_prev = []
        while stack:
            e = stack.pop()
            for s in e.free_symbols:
                n = s.name
                if n in defs and n not in want:
                    want.add(n)
                    stack.append(defs[n].expr)
                elif n.endswith("_prev") and n[:-5] in defs and n[:-5] not in want_prev:
                    want_prev.add(n[:-5])
                    seen_prev.append(defs[n[:-5]].expr)
                    stack.append(_prev_of(defs[n[:-5]].expr, defs))
            for f in e.atoms(sympy.core.function.AppliedUndef):
                if f.func.__name__ in self.spec.functions:
                    stack.append(self.spec.functions[f.func.__name__].body)
        attrs = set()
        for e in [*(sympy.sympify(x) for x in exprs if x is not None), *(defs[n].expr for n in want),
                  *(_prev_of(defs[n].expr, defs) for n in want_prev)]:
            attrs |= {s.name for s in e.free_symbols if s.name in self.spec.attributes}
            attrs |= {c[0] for s in e.free_symbols if s.name in self.spec.choices
                      for c in [self.spec.choices[s.name]] if c[0] in self.spec.attributes}
        order = [d.name for d in self.spec.definitions]
        return ([a for a in self.spec.attributes if a in attrs and self.spec.attributes[a].call is None],
                [n for n in order if n in want], [n for n in order if n in want_prev])

    def prelude(self, exprs, with_prev: bool = True) -> tuple[list[str], list[str]]:
        """Lines binding the attributes and definitions the expressions read: (at t, at t - 1)."""
        attrs, now, prev = self.needed(exprs)
        defs = self._definitions()
        lines = [f"{a} = {self.spec.attributes[a].python}" for a in attrs]
        for n in now:
            lines += [f"# {n} = {defs[n].text}"] if len(defs[n].text) < 90 else []
            lines += statements(n, defs[n].expr, self)
        prev_lines = []
        for n in prev if with_prev else []:
            prev_lines += statements(f"{n}_prev", _prev_of(defs[n].expr, defs), self)
        return lines, prev_lines

    # -- per-group loops -----------------------------------------------------------------------------
    def loop(self, element: sympy.Expr | str, free: set[str]) -> str:
        """``[element for <group, base_lr, …> in <…>]`` reading just what ``element`` needs."""
        text = element if isinstance(element, str) else self.p(element)
        return f"[{text} {self.targets(free)}]"

    def targets(self, free: set[str]) -> str:
        spec = self.spec
        group = "lr" in free or any(n in spec.per_group and spec.per_group[n].kind == "group" for n in free)
        lists = [("base_lr", "self.base_lrs")] if "base_lr" in free else []
        lists += [(n, f"self.{p.where}") for n, p in spec.per_group.items() if p.kind == "list" and n in free]
        names = (["group"] if group else []) + [n for n, _ in lists]
        sources = (["self._groups()"] if group else []) + [s for _, s in lists]
        if not names:
            names, sources = ["group"], ["self._groups()"]
        if len(names) == 1:
            return f"for {names[0]} in {sources[0]}"
        return f"for {', '.join(names)} in zip({', '.join(sources)}, strict=True)"

    # -- statements that print a sympy expression (the printer's callback for statements()) ----------
    def print(self, expr) -> str:
        return self.p(expr)

    # -- methods -----------------------------------------------------------------------------------
    def t_line(self) -> str:
        return "t = self._step_count - 1" if self.spec.counter == "step_count" else "t = self.last_epoch"

    def step_checks(self) -> list[str]:
        return [line for c in self.spec.step_checks for line in _check_lines(c)]

    def closed_form_body(self, momentum: bool) -> list[str]:
        spec = self.spec
        cycled = spec.momentum if momentum else None  # the momentum's definition, when this form sets it
        exprs = [spec.lr.expr] + ([cycled.expr] if cycled else [])
        now, _ = self.prelude(exprs, with_prev=False)
        reads_t = any(T in sympy.sympify(e).free_symbols for e in exprs) or any(
            T in d.expr.free_symbols for d in spec.definitions if d.name in self.needed(exprs)[1])
        lines = [self.t_line()] if reads_t or spec.step_checks else []
        lines += [*self.step_checks(), *now]
        free = _free(spec.lr.expr)
        if isinstance(spec.lr.expr, sympy.Piecewise):  # phases: a loop with if/elif per group
            free |= _free(cycled.expr) | {"lr"} if cycled else set()
            lines += ["lrs = []", f"{self.targets(free)}:",
                      *("    " + x for x in statements("lr", spec.lr.expr, self)), "    lrs.append(lr)"]
            if cycled:
                self.uses.names.add("_set_momentum")
                lines += ["    if self.cycle_momentum:",
                          *("        " + x for x in statements("momentum", cycled.expr, self)),
                          "        _set_momentum(self, group, momentum)"]
            return lines + ["return lrs"]
        if not cycled:
            return lines + [f"return {self.loop(spec.lr.expr, free)}"]
        lines.append(f"lrs = {self.loop(spec.lr.expr, free)}")
        mfree = _free(cycled.expr) | {"lr"}
        lines += ["if self.cycle_momentum:",
                  f"    {self.targets(mfree)}:",
                  f"        _set_momentum(self, group, {self.p(cycled.expr)})",
                  "return lrs"]
        self.uses.names.add("_set_momentum")
        return lines

    def recursive_body(self) -> list[str]:
        d = self.derivation
        exprs = _step_exprs(d.initial)
        for b in d.branches:
            exprs += _step_exprs(b.step) + [b.extra]
        now, prev = self.prelude(exprs)
        lines = [self.t_line(), *self.step_checks(), *now]
        initial = self.step_lines(d.initial)
        keep_initial = self.spec.initial_step == "keep"
        if self.spec.epoch_zero == "recursive":  # t = 0 takes the recursion like any step (torch's quirk)
            if keep_initial:
                lines += ["if self._is_initial:  # the constructor's step (also when resuming) keeps the lr",
                          f"    {KEEP}"]
        elif initial == [KEEP] and keep_initial:
            lines += ["if t == 0 or self._is_initial:  # the constructor's step (also when resuming) keeps the lr",
                      f"    {KEEP}"]
        else:
            lines += ["if t == 0:", *("    " + x for x in initial)]
            if keep_initial:
                lines += ["if self._is_initial:  # a resumed scheduler's first step keeps the lr it was given",
                          f"    {KEEP}"]
        lines += prev
        for i, b in enumerate(d.branches):
            body = self.step_lines(b.step)
            if i == len(d.branches) - 1:
                lines += body
            else:
                lines += [f"if {self.branch_condition(b)}:", *("    " + x for x in body)]
        if not any(re.search(r"\bt\b", line.partition("#")[0]) for line in lines[1:]):
            lines = lines[1:]  # no step reads t (ExponentialLR): no unused local
        return lines

    def branch_condition(self, b: Branch) -> str:
        parts = [_interval(b.interval, self.p)] if b.interval.lowers or b.interval.uppers else []
        if b.extra is not sympy.true:
            parts.append(self.p(b.extra))
        return " and ".join(parts)

    def step_lines(self, step: Step) -> list[str]:
        if step.kind == "keep":
            return [KEEP]
        if step.kind in ("set", "additive"):
            element = step.delta if step.kind == "set" else CURRENT_LR + step.delta
            return [f"return {self.loop(element, _free(element) | ({'lr'} if step.kind == 'additive' else set()))}"]
        lines, ratio = [], step.ratio
        assert ratio is not None, step  # every kind but keep, set and additive has a ratio
        if step.guard_delta is not None:
            numerator, denominator = sympy.fraction(sympy.together(ratio))
            additive = CURRENT_LR + step.guard_delta
            lines += [f"denominator = {self.p(denominator)}",
                      "if denominator == 0:  # lr(t - 1) does not depend on base_lr here: step additively",
                      f"    return {self.loop(additive, _free(additive) | {'lr'})}"]
            factor_text = f"{self.printer.paren(numerator, PRECEDENCE['Mul'])} / denominator"
            factor = sympy.Symbol("ratio", real=True)
        elif _per_group(ratio, self.spec) or ratio.is_Symbol or ratio.is_number:
            factor_text, factor = None, ratio
        else:
            factor_text, factor = self.p(ratio), sympy.Symbol("ratio", real=True)
        if factor_text is not None:
            lines.append(f"ratio = {factor_text}")
        lr = CURRENT_LR
        if step.kind == "scale":
            element = lr * factor
            text = f'group["lr"] * {self.printer.paren(factor, PRECEDENCE["Mul"])}'
        elif step.kind == "affine":
            element = step.anchor + (lr - step.anchor) * factor
            a = self.printer.paren(step.anchor, PRECEDENCE["Add"])
            text = f'{a} + (group["lr"] - {self.p(step.anchor)}) * {self.printer.paren(factor, PRECEDENCE["Mul"])}'
        else:  # general
            element = step.c0 + factor * (lr - step.c0_prev)
            text = self.p(element)
        free = (_free(element) | {"lr"}) - {"ratio"}
        return lines + [f"return {self.loop(text, free)}"]

    # -- the constructor ------------------------------------------------------------------------------
    def signature(self) -> list[str]:
        out = []
        for name in self.spec.signature:
            if name == "*":
                out.append("*")
                continue
            if name == "last_epoch":
                out.append("last_epoch: int = -1")
                continue
            h = self.spec.hyperparameters[name]
            text = f"{name}: {h.annotation}"
            if h.default is not REQUIRED:
                text += f" = {h.default!r}"
            out.append(text)
            for word in ("Callable", "Iterable", "Literal"):
                if word in h.annotation:
                    self.uses.names.add(word)
        # torch's signature, plus the hyperparameter driven (Note [Scheduling any hyperparameter])
        return out + ([] if "*" in out else ["*"]) + ['hyperparameter: str = "lr"']

    def init_body(self) -> list[str]:
        spec = self.spec
        lines = ["drive(self, optimizer, hyperparameter)"]
        self.uses.names.add("drive")
        args = [n for n in spec.signature if n != "*"]
        for name, p in spec.per_group.items():  # a per-group hyperparameter: one value per group
            if name in spec.hyperparameters and not spec.base_init:
                values = f'_format_param("{name}", optimizer, {name})'
                self.uses.names.add("_format_param")
                if p.kind == "group":
                    lines += [f"for group, value in zip(self._groups(optimizer), {values}, strict=True):",
                              f'    group["{p.where}"] = value']
                else:
                    lines.append(f"self.{p.where} = {values}")
        for c in spec.checks:
            lines += _check_lines(c)
        if spec.base_init:
            return lines + [f"super().__init__(optimizer, {', '.join(args)})"]
        for h in spec.hyperparameters.values():
            if h.attribute is None or h.name in spec.per_group:
                continue
            value = f"Counter({h.name})" if h.convert == "Counter" else h.name
            if h.convert == "Counter":
                self.uses.names.add("Counter")
            lines.append(f"self.{h.attribute} = {value}")
        lines += [f"self.{name} = {value}" for name, value in spec.state.items()]
        return lines + ["super().__init__(optimizer, last_epoch)"]

    # -- helpers (the spec's [functions]) -----------------------------------------------------------
    def helpers(self) -> list[dict]:
        out = []
        for f in self.spec.functions.values():
            args = ", ".join(a.name for a in f.args)
            attrs = [a for a in self.spec.attributes if any(s.name == a for s in f.body.free_symbols)
                     or any(self.spec.choices.get(s.name, ("",))[0] == a for s in f.body.free_symbols)]
            lines = [f"{a} = {self.spec.attributes[a].python}" for a in attrs]
            lines.append(f"return {self.p(f.body)}")
            out.append(dict(name=f"_{f.name}", args=args, body=lines))
        return out

    # -- the class --------------------------------------------------------------------------------------
    def context(self) -> dict:
        spec, d = self.spec, self.derivation
        base = DEFAULT_BASE if spec.base == "LRScheduler" else spec.base
        self.uses.names.add(base)
        torch_name = spec.torch_name or None
        if torch_name and "." not in torch_name:
            torch_name = f"torch.optim.lr_scheduler.{torch_name}"
        elif torch_name:
            torch_name = f"torch.optim.{torch_name}"
        if spec.chainable:
            if d.why_not:
                raise SpecError(spec.lr.loc, f"{spec.name}: chainable = true, but {d.why_not}; "
                                             "set chainable = false (get_lr is then the closed form)")
            get_lr = self.recursive_body()
            get_lr_doc = "The chainable form, derived from the closed form: steps each group's current lr."
        else:
            get_lr = self.closed_form_body(momentum=True)
            get_lr_doc = "The closed form at the current step (this scheduler is not chainable, as in torch)."
        closed = self.closed_form_body(momentum=False) if spec.closed_form else None
        def one_line(text: str) -> str:  # a multi-line formula, as one line of the docstring
            return " ".join(text.replace("( ", "(").split()).replace("( ", "(")

        formula = [f"{x.name} = {one_line(x.text)}" for x in spec.definitions] + [f"lr = {one_line(spec.lr.text)}"]
        if spec.momentum:
            formula.append(f"momentum = {one_line(spec.momentum.text)}")
        show = SchedulePrinter(lambda n: n, spec.choices, lambda n: n, lambda n: n).print
        explain = d.describe(show)
        if not spec.chainable and not d.why_not:
            explain = ["(exists, but torch's get_lr is the closed form, so this class uses that)", *explain]
        return dict(
            name=spec.name, base=base, doc=spec.doc, paper=spec.paper, path=spec.path,
            hash=spec_hash(spec), torch_name=torch_name, signature=self.signature(), init=self.init_body(),
            get_lr=["_warn_get_lr_called_within_step(self)", *get_lr], get_lr_doc=get_lr_doc,
            closed_form=closed, formula=formula, derivation=explain, helpers=self.helpers(),
            counter="_step_count - 1" if spec.counter == "step_count" else "last_epoch",
        )


def _check_lines(c) -> list[str]:
    """``if <the check fails>: raise <kind>(<message>)``, without a double negation."""
    tree = ast.parse(c.ok, mode="eval").body
    failed = ast.unparse(tree.operand) if isinstance(tree, ast.UnaryOp) and isinstance(tree.op, ast.Not) \
        else f"not ({c.ok})"
    condition = failed if c.when is None else f"{c.when} and {failed}"
    return [f"if {condition}:", f"    raise {c.kind}({_string(c.message, '{' in c.message)})"]


def _string(text: str, f: bool) -> str:
    """A Python string literal in double quotes (an f-string if ``f``)."""
    body = text if '"' not in text and "\\" not in text and "\n" not in text else None
    literal = f'"{body}"' if body is not None else repr(text)
    return ("f" if f else "") + literal


def _prev_of(expr: sympy.Expr, defs: dict) -> sympy.Expr:
    mapping = {sympy.Symbol(n, real=True): sympy.Symbol(f"{n}_prev", real=True) for n in defs}
    return expr.xreplace(mapping).subs(T, T - 1)


def _free(expr) -> set[str]:
    return {s.name for s in sympy.sympify(expr).free_symbols}


def _per_group(expr, spec: ScheduleSpec) -> bool:
    names = _free(expr)
    return "base_lr" in names or "lr" in names or any(n in spec.per_group for n in names)


def _step_exprs(step: Step) -> list:
    return [step.ratio, step.anchor, step.c0, step.c0_prev, step.delta, step.guard_delta]


def _interval(iv: Interval, p) -> str:
    lowers, uppers = sorted(iv.lowers, key=sympy.default_sort_key), sorted(iv.uppers, key=sympy.default_sort_key)
    if len(lowers) == 1 and len(uppers) == 1 and sympy.simplify(lowers[0] - uppers[0]) == 0:
        return f"t == {p(lowers[0])}"
    if len(lowers) == 1 and len(uppers) == 1:
        return f"{p(lowers[0])} <= t <= {p(uppers[0])}"
    return " and ".join([f"t >= {p(lo)}" for lo in lowers] + [f"t <= {p(hi)}" for hi in uppers])


def render_module(specs: list[ScheduleSpec]) -> str:
    """generated/lr_scheduler.py: every scheduler class, in spec order."""
    uses = _Uses()
    classes = [ClassRenderer(s, uses).context() for s in specs]
    runtime = sorted(n for n in uses.names if n.endswith("Base") or n in ("drive", DEFAULT_BASE) or n.startswith("_"))
    runtime = sorted(set(runtime) | {"_warn_get_lr_called_within_step"})
    return environment().get_template("scheduler/module.py.j2").render(
        classes=classes, count=len(specs), uses=uses.names, runtime=runtime,
        names=[s.name for s in specs])
