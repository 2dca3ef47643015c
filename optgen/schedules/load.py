"""Schedule spec files (TOML) → :class:`~optgen.schedules.model.ScheduleSpec`.

Same conventions as the optimizer specs (:mod:`optgen.spec.load`): ``tomllib`` reads the file,
:mod:`optgen.spec.toml_locations` gives every key's line and column, unknown sections and keys
are rejected with the allowed ones listed, and every formula is parsed with :mod:`ast` (never
executed).  The format is documented in docs/schedule-format.md.
"""
from __future__ import annotations

import ast
import re
import string
from pathlib import Path
from typing import Any

import sympy

from optgen.errors import Location, SpecError
from optgen.schedules import expressions
from optgen.schedules.model import (
    BASE_LR,
    REQUIRED,
    RUNTIME_OPTIONS,
    Attribute,
    Check,
    Definition,
    Function,
    Hyperparameter,
    PerGroup,
    ScheduleSpec,
    T,
)
from optgen.spec.expressions import parse_python, strip_located
from optgen.spec.toml_source import Source, expect, read, reject_unknown

CHECK_KEYS = {"assert", "error", "type", "when", "at"}
SECTIONS: dict[str, set[str] | None] = {  # section → its keys (None: free names)
    "scheduler": {"name", "doc", "paper", "torch", "signature", "base", "base_init", "chainable",
                  "closed_form", "initial_step", "epoch_zero", "counter", "assume"},
    "hyperparameters": None,
    "check": CHECK_KEYS,
    "per_group": None,
    "attributes": None,
    "state": None,
    "functions": None,
    "schedule": None,
}
HYPERPARAMETER_KEYS = {"default", "required", "optional", "type", "attribute", "convert", "choices", "positive"}
ATTRIBUTE_KEYS = {"value", "type", "call"}
FUNCTION_KEYS = {"args", "value"}
ERROR_TYPES = {"ValueError", "TypeError", "RuntimeError", "KeyError"}
BASES = {"LRScheduler", "CyclicLRBase", "OneCycleLRBase", "WarmRestartsBase"}
CONVERTERS = {"Counter"}
# names the generated code uses for itself (locals of get_lr, modules, the loop variables)
RESERVED = {"t", "base_lr", "lr", "momentum", "pi", "self", "group", "optimizer", "math", "ratio",
            "denominator", "value", "lrs", "hyperparameter"}  # (every constructor takes hyperparameter=)
# An annotation is printed into the signature: identifiers, brackets, commas, |, dots and quotes only.
_ANNOTATION = re.compile(r"[A-Za-z_][\w\[\], |.]*(\[(\"[\w -]*\"(, )?)+\])?\]*")

def _table(raw: Any, src: Source, path: tuple, what: str) -> dict:
    if not isinstance(raw, dict):
        raise SpecError(src.key_loc(path), f"{what} must be a table")
    return raw


def load_schedule(path: str | Path) -> ScheduleSpec:
    """Reads and validates one schedule spec; raises SpecError with file:line:col."""
    data, src = read(Path(path))
    for section, value in data.items():
        if section not in SECTIONS:
            raise SpecError(src.key_loc((section,)),
                            f"unknown section [{section}]; allowed sections: {', '.join(SECTIONS)}")
        if section == "check":
            if not isinstance(value, list):
                raise SpecError(src.key_loc((section,)), "checks are written as [[check]] tables")
        elif not isinstance(value, dict):
            raise SpecError(src.key_loc((section,)), f"'{section}' must be a table: [{section}]")
        elif (allowed := SECTIONS[section]) is not None:
            reject_unknown(value, allowed, src, (section,), f"[{section}]")
    if "scheduler" not in data:
        raise SpecError(Location(src.path, 1, 1), "missing [scheduler] section (with at least name = \"...\")")
    head = data["scheduler"]

    def option(key, types, default=None, required=False, choices=None):
        if key not in head:
            if required:
                raise SpecError(src.key_loc(("scheduler",)), f"[scheduler] needs '{key}'")
            return default
        value = expect(head[key], types, src, ("scheduler", key), f"scheduler.{key}")
        if choices is not None and value not in choices:
            raise SpecError(src.value_loc(("scheduler", key)),
                            f"scheduler.{key} must be one of {', '.join(map(repr, sorted(choices)))}")
        return value

    name = option("name", str, required=True)
    if not name.isidentifier():
        raise SpecError(src.value_loc(("scheduler", "name")), f"scheduler name '{name}' is not a Python identifier")
    base = option("base", str, "LRScheduler", choices=BASES)
    base_init = option("base_init", bool, False)
    if base_init and base == "LRScheduler":
        raise SpecError(src.key_loc(("scheduler", "base_init")),
                        "base_init = true needs a base with its own constructor (base = \"...\")")
    hyper = _hyperparameters(data.get("hyperparameters", {}), src)
    signature = _signature(option("signature", str, required=True), hyper, src)
    checks, step_checks = _checks(data.get("check", []), src, hyper, signature)
    state = _state(data.get("state", {}), src, set(signature))

    # Names formulas may use, by role; symbols carry assumptions (integer step counts, …).
    names: dict[str, str] = {"t": "t", "base_lr": "base_lr"}
    symbols: dict[str, sympy.Symbol] = {"t": T, "base_lr": BASE_LR}
    choice_values: dict[str, tuple[str, ...]] = {}
    counters: set[str] = set()
    methods: dict[str, int] = {}
    if not base_init:
        for h in hyper.values():
            if h.attribute is None or h.name == "base_lr":
                continue
            role, symbol = _hyper_role(h)
            names[h.name], symbols[h.name] = role, symbol
            if h.choices:
                choice_values[h.name] = h.choices
            if h.convert == "Counter":
                counters.add(h.name)
    per_group = _per_group(data.get("per_group", {}), src, names)
    for p in per_group.values():
        names[p.name], symbols[p.name] = "per_group", sympy.Symbol(p.name, real=True)
    attributes = _attributes(data.get("attributes", {}), src, names, symbols, methods)
    for attr in state:
        if attr in names:
            raise SpecError(src.key_loc(("state", attr)), f"state '{attr}' is already a name: rename it")
        names[attr], symbols[attr] = "attribute", sympy.Symbol(attr, real=True)
        attributes[attr] = Attribute(attr, f"self.{attr}", None, src.key_loc(("state", attr)))
    choices: dict[str, tuple[str, str]] = {}
    builder = dict(names=names, symbols=symbols, functions={}, methods=methods, choices=choices,
                   choice_values=choice_values, counters=counters)
    functions = _functions(data.get("functions", {}), src, builder)
    definitions, lr, momentum = _schedule(data.get("schedule"), src, builder)
    assumptions = _assume(head.get("assume", []), src, builder)
    chainable = option("chainable", bool, True)
    closed_form = option("closed_form", bool, chainable)
    if closed_form and not chainable:
        raise SpecError(src.key_loc(("scheduler", "closed_form")),
                        "closed_form = true needs chainable = true (otherwise get_lr is the closed form already)")
    return ScheduleSpec(
        name=name, path=src.path, source=src.text, doc=option("doc", str, ""), paper=option("paper", str, ""),
        torch_name=option("torch", str), signature=signature, hyperparameters=hyper, checks=checks,
        step_checks=step_checks, base=base, base_init=base_init, chainable=chainable, closed_form=closed_form,
        initial_step=option("initial_step", str, "keep", choices={"keep", "recursive"}),
        epoch_zero=option("epoch_zero", str, "closed", choices={"closed", "recursive"}),
        counter=option("counter", str, "last_epoch", choices={"last_epoch", "step_count"}),
        per_group=per_group, attributes=attributes, state=state, functions=functions,
        definitions=definitions, lr=lr, momentum=momentum, choices=choices, assumptions=assumptions,
    )


def _hyper_role(h: Hyperparameter) -> tuple[str, sympy.Symbol]:
    if h.choices or isinstance(h.default, str):
        return "choice", sympy.Symbol(h.name)
    if isinstance(h.default, bool) or h.annotation == "bool":
        return "flag", sympy.Symbol(h.name)
    if h.convert == "Counter":
        return "counter", sympy.Symbol(h.name)
    integer = h.annotation == "int" or (isinstance(h.default, int) and not isinstance(h.default, bool))
    assumptions = {"integer": True} if integer else {"real": True}
    if h.positive:
        assumptions["positive"] = True
    return "hyper", sympy.Symbol(h.name, **assumptions)


def _hyperparameters(table: dict, src: Source) -> dict[str, Hyperparameter]:
    out: dict[str, Hyperparameter] = {}
    for name, raw in table.items():
        path = ("hyperparameters", name)
        loc = src.key_loc(path)
        # base_lr may be a constructor argument (CyclicLR's); formulas then read it per group.
        if not name.isidentifier() or name in RESERVED - {"base_lr"} or name in RUNTIME_OPTIONS:
            raise SpecError(loc, f"'{name}' cannot be a hyperparameter name (not an identifier, or reserved: "
                                 f"{', '.join(sorted(RESERVED | set(RUNTIME_OPTIONS)))})")
        entry = raw if isinstance(raw, dict) else {"default": raw}
        if isinstance(raw, dict):
            reject_unknown(raw, HYPERPARAMETER_KEYS, src, path, f"hyperparameter '{name}'")
        given = [k for k in ("default", "required", "optional") if k in entry]
        if len(given) != 1:
            raise SpecError(loc, f"hyperparameter '{name}' needs exactly one of default = <value>, "
                                 "required = true (no default) or optional = true (default None)")
        if "required" in entry or "optional" in entry:
            key = given[0]
            if expect(entry[key], bool, src, path + (key,), key) is not True:
                raise SpecError(src.value_loc(path + (key,)), f"write {key} = true, or leave it out")
            default = REQUIRED if key == "required" else None
        else:
            default = entry["default"]
            dpath = path + ("default",) if isinstance(raw, dict) else path
            if not isinstance(default, (bool, int, float, str)):
                raise SpecError(src.value_loc(dpath), f"default of '{name}' must be a number, a bool or a string, "
                                                      f"not {type(default).__name__}")
        choices = tuple(expect(entry.get("choices", []), list, src, path + ("choices",), "choices"))
        if any(not isinstance(c, str) for c in choices):
            raise SpecError(src.value_loc(path + ("choices",)), "choices must be a list of strings")
        annotation = entry.get("type")
        if annotation is None:
            if default is REQUIRED or default is None:
                raise SpecError(loc, f"hyperparameter '{name}' has no default to infer its type from: "
                                     "give type = \"...\" (e.g. \"int\", \"float | list[float]\")")
            annotation = ("Literal[" + ", ".join(f'"{c}"' for c in choices) + "]" if choices
                          else type(default).__name__)
        expect(annotation, str, src, path + ("type",), "type")
        if not _ANNOTATION.fullmatch(annotation):
            raise SpecError(src.value_loc(path + ("type",)), f"type '{annotation}' is not a type annotation")
        attribute = entry.get("attribute", name)
        if attribute is False:
            attribute = None
        elif not isinstance(attribute, str) or not attribute.isidentifier():
            raise SpecError(src.value_loc(path + ("attribute",)),
                            "attribute must be an identifier (or false: not stored)")
        convert = entry.get("convert")
        if convert is not None and convert not in CONVERTERS:
            raise SpecError(src.value_loc(path + ("convert",)), f"convert must be one of {', '.join(CONVERTERS)}")
        positive = expect(entry.get("positive", False), bool, src, path + ("positive",), "positive")
        out[name] = Hyperparameter(name, default, annotation, attribute, convert, choices, positive, loc)
    return out


def _signature(text: str, hyper: dict[str, Hyperparameter], src: Source) -> tuple[str, ...]:
    loc = src.value_loc(("scheduler", "signature"))
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    params = [s for s in items if s != "*"]
    for s in params:
        if s not in hyper and s not in RUNTIME_OPTIONS:
            raise SpecError(loc, f"signature names '{s}', which is neither a hyperparameter nor a runtime option "
                                 f"({', '.join(RUNTIME_OPTIONS)})")
    if len(set(params)) != len(params) or items.count("*") > 1:
        raise SpecError(loc, "signature names an argument twice or has more than one '*'")
    missing = [h for h in hyper if h not in params]
    if missing:
        raise SpecError(loc, f"signature leaves out hyperparameter(s) {', '.join(missing)}")
    seen_default = False
    for s in params:  # Python's rule: no required argument after one with a default
        required = s in hyper and hyper[s].required
        if required and seen_default and "*" not in items[: items.index(s)]:
            raise SpecError(loc, f"required argument '{s}' follows an argument with a default")
        seen_default = seen_default or not required
    return items


def _message(message: str, loc: Location, names: set[str], rename=None) -> str:
    """Validates an f-string body (fields: a known name, optionally [int]); returns it renamed."""
    try:
        parts = list(string.Formatter().parse(message))
    except ValueError as e:
        raise SpecError(loc, f"bad error message template: {e}") from None
    out = []
    for literal, field, spec, conversion in parts:
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        # a field is a name, name[<int>] or type(name) (torch's CosineAnnealingWarmRestarts message)
        match = re.fullmatch(r"(type\()?([A-Za-z_]\w*)(\))?(\[[0-9]+\])?", field)
        if (match is None or match.group(2) not in names or "{" in (spec or "")
                or bool(match.group(1)) != bool(match.group(3)) or (match.group(1) and match.group(4))):
            raise SpecError(loc, f"error message refers to '{{{field}}}'; a field must be one of "
                                 f"{', '.join(sorted(names))}, optionally indexed by a number, or type(<name>)")
        head = rename(match.group(2)) if rename else match.group(2)
        head = f"type({head})" if match.group(1) else head + (match.group(4) or "")
        out.append("{" + head + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
    return "".join(out)


def _checks(raw_checks: list, src: Source, hyper: dict[str, Hyperparameter],
            signature: tuple[str, ...]) -> tuple[tuple[Check, ...], tuple[Check, ...]]:
    init_names = {s for s in signature if s != "*"}
    step_names = {"t"} | {h.name for h in hyper.values() if h.attribute}

    def step_rename(n: str) -> str:
        return "t" if n == "t" else f"self.{hyper[n].attribute}"

    init: list[Check] = []
    step: list[Check] = []
    for i, raw in enumerate(raw_checks):
        path = ("check", i)
        reject_unknown(raw, CHECK_KEYS, src, path, "[[check]]")
        for key in ("assert", "error"):
            if key not in raw:
                raise SpecError(src.key_loc(path), f"[[check]] needs '{key}'")
            expect(raw[key], str, src, path + (key,), f"check.{key}")
        kind = raw.get("type", "ValueError")
        if kind not in ERROR_TYPES:
            raise SpecError(src.value_loc(path + ("type",)),
                            f"unknown error type '{kind}'; use one of {', '.join(sorted(ERROR_TYPES))}")
        at = raw.get("at", "init")
        if at not in ("init", "step"):
            raise SpecError(src.value_loc(path + ("at",)), "at must be \"init\" (the constructor) or \"step\"")
        names, rename = (init_names, None) if at == "init" else (step_names, step_rename)
        what = "a constructor check" if at == "init" else "a step check"
        ok = expressions.parse_python_check(raw["assert"], src.value_loc(path + ("assert",)), names, what, rename)
        when = None
        if "when" in raw:
            when = expressions.parse_python_check(expect(raw["when"], str, src, path + ("when",), "check.when"),
                                                  src.value_loc(path + ("when",)), names, what, rename)
        message = _message(raw["error"], src.value_loc(path + ("error",)), names, rename)
        (init if at == "init" else step).append(Check(ok, message, kind, when, src.key_loc(path)))
    return tuple(init), tuple(step)


def _state(table: dict, src: Source, args: set[str]) -> dict[str, str]:
    out = {}
    for name, raw in table.items():
        path = ("state", name)
        if not name.isidentifier() or name in RESERVED:
            raise SpecError(src.key_loc(path), f"state name '{name}' is not a valid attribute name")
        text = expect(raw, str, src, path, f"state.{name}")
        out[name] = expressions.parse_python_check(text, src.value_loc(path), args - {"*"}, "a state initialiser")
    return out


def _per_group(table: dict, src: Source, names: dict[str, str]) -> dict:
    out = {}
    for name, raw in table.items():
        path = ("per_group", name)
        entry = _table(raw, src, path, f"per_group.{name}")
        if not name.isidentifier() or name in RESERVED:
            raise SpecError(src.key_loc(path), f"'{name}' cannot be a per-group name")
        reject_unknown(entry, {"group", "list"}, src, path, f"per_group.{name}")
        if len(entry) != 1:
            raise SpecError(src.key_loc(path), f"per_group.{name} needs one of group = \"<param group key>\" "
                                               "or list = \"<scheduler list attribute>\"")
        (kind, where), = entry.items()
        expect(where, str, src, path + (kind,), f"per_group.{name}.{kind}")
        if not where.isidentifier():
            raise SpecError(src.value_loc(path + (kind,)), f"'{where}' is not an identifier")
        out[name] = PerGroup(name, kind, where, src.key_loc(path))
    return out


def _attributes(table: dict, src: Source, names: dict, symbols: dict, methods: dict) -> dict[str, Attribute]:
    out = {}
    for name, raw in table.items():
        path = ("attributes", name)
        loc = src.key_loc(path)
        if not name.isidentifier() or name in RESERVED:
            raise SpecError(loc, f"'{name}' cannot be an attribute name")
        if name in names and names[name] in ("per_group",):
            raise SpecError(loc, f"'{name}' is already a per-group name")
        entry = raw if isinstance(raw, dict) else {"value": raw}
        if isinstance(raw, dict):
            reject_unknown(raw, ATTRIBUTE_KEYS, src, path, f"attribute '{name}'")
        vpath = path + ("value",) if isinstance(raw, dict) else path
        text = expect(entry.get("value", name), str, src, vpath, f"attributes.{name}")
        python = _attribute_python(text, src.value_loc(vpath))
        kind = entry.get("type", "number")
        if kind not in ("number", "bool", "str"):
            raise SpecError(src.value_loc(path + ("type",)), "type must be \"number\", \"bool\" or \"str\"")
        call = entry.get("call")
        if call is not None:
            methods[name] = expect(call, int, src, path + ("call",), "call")
            names.pop(name, None)
        else:
            names[name] = {"number": "attribute", "bool": "flag", "str": "choice"}[kind]
            symbols[name] = sympy.Symbol(name, real=True) if kind == "number" else sympy.Symbol(name)
        out[name] = Attribute(name, python, call, loc)
    return out


def _attribute_python(text: str, loc: Location) -> str:
    """Python over the scheduler's attributes; every name becomes ``self.<name>``."""
    loc_, stripped = strip_located(text, loc)
    tree = parse_python(stripped, loc_)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - set(expressions.CHECK_CALLS)
    for n in names:
        if not n.isidentifier():
            raise SpecError(loc, f"'{n}' is not an attribute name")
    return expressions.parse_python_check(text, loc, names, "an attribute", lambda n: f"self.{n}")


def _assume(raw: Any, src: Source, builder: dict) -> tuple:
    """[scheduler] assume = ["total_steps > warmup_steps", …]: relations between integer
    hyperparameters that the checks guarantee; the derivation uses them to drop impossible phases."""
    path = ("scheduler", "assume")
    out = []
    for i, text in enumerate(expect(raw, list, src, path, "scheduler.assume")):
        loc = src.value_loc(path + (i,))
        text = expect(text, str, src, path + (i,), "an assumption")
        loc_, stripped = strip_located(text, loc)
        tree = parse_python(stripped, loc_).body
        rel = expressions.FormulaBuilder(loc_, what="an assumption", **builder).condition(tree)
        ok = isinstance(rel, (sympy.StrictGreaterThan, sympy.GreaterThan, sympy.StrictLessThan, sympy.LessThan))
        if not ok or not all(s.is_Symbol and s.is_integer for s in (rel.lhs, rel.rhs)):
            raise SpecError(loc, "an assumption compares two integer hyperparameters: \"a > b\" or \"a >= b\"")
        out.append(rel)
    return tuple(out)


def _functions(table: dict, src: Source, builder: dict) -> dict[str, Function]:
    out = {}
    for name, raw in table.items():
        path = ("functions", name)
        entry = _table(raw, src, path, f"functions.{name}")
        reject_unknown(entry, FUNCTION_KEYS, src, path, f"function '{name}'")
        if not name.isidentifier() or name in RESERVED or name in builder["names"] or name in expressions.FUNCTIONS:
            raise SpecError(src.key_loc(path), f"'{name}' cannot be a function name (taken or reserved)")
        for key in FUNCTION_KEYS:
            if key not in entry:
                raise SpecError(src.key_loc(path), f"function '{name}' needs args = \"a, b\" and value = \"...\"")
        args = [a.strip() for a in expect(entry["args"], str, src, path + ("args",), "args").split(",") if a.strip()]
        if not args or any(not a.isidentifier() or a in RESERVED for a in args) or len(set(args)) != len(args):
            raise SpecError(src.value_loc(path + ("args",)),
                            "args must be distinct identifiers, e.g. \"start, end, pct\"")
        local = dict(builder)
        local["names"] = {**builder["names"], **{a: "argument" for a in args}}
        local["symbols"] = {**builder["symbols"], **{a: sympy.Symbol(a, real=True) for a in args}}
        body = expressions.parse_formula(expect(entry["value"], str, src, path + ("value",), "value"),
                                         src.value_loc(path + ("value",)), local, f"function {name}")
        symbols_used = {s.name for s in body.free_symbols}
        if "t" in symbols_used or "base_lr" in symbols_used:
            raise SpecError(src.value_loc(path + ("value",)), f"function {name} must not read t or base_lr: "
                                                               "pass them as arguments")
        out[name] = Function(name, tuple(local["symbols"][a] for a in args), body, src.key_loc(path))
        builder["functions"][name] = len(args)
    return out


def _schedule(table: dict | None, src: Source, builder: dict):
    if table is None:
        raise SpecError(Location(src.path, 1, 1), "missing [schedule] section with lr = \"<formula of t and base_lr>\"")
    definitions, lr, momentum = [], None, None
    for name, raw in table.items():
        path = ("schedule", name)
        loc = src.key_loc(path)
        text = expect(raw, str, src, path, f"schedule.{name}")
        if name not in ("lr", "momentum") and (not name.isidentifier() or name in RESERVED
                                               or name in builder["names"] or name in builder["functions"]):
            raise SpecError(loc, f"'{name}' cannot be defined here: it is reserved or already a name")
        if lr is not None and name != "momentum":
            raise SpecError(loc, "lr must come last in [schedule] (momentum may follow it)")
        expr = expressions.parse_formula(text, src.value_loc(path), builder, f"schedule.{name}")
        definition = Definition(name, expr, text.strip(), loc)
        if name == "lr":
            lr = definition
        elif name == "momentum":
            momentum = definition
        else:
            definitions.append(definition)
            builder["names"][name] = "definition"
            builder["symbols"][name] = sympy.Symbol(name, real=True)
    if lr is None:
        raise SpecError(src.key_loc(("schedule",)), "[schedule] needs lr = \"<formula of t and base_lr>\"")
    return tuple(definitions), lr, momentum

