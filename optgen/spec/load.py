"""Spec files (TOML) → :class:`~optgen.spec.model.Spec`.

TOML is read by the standard library's ``tomllib``; positions come from
:mod:`optgen.spec.toml_locations`.  This module checks the *shape* of a spec — sections, keys,
types, the signature — and parses every expression (never executing it).  Whether the update
rule makes sense (names declared, state written before read, …) is checked when it is lowered to
IR (:mod:`optgen.ir.lower`).
"""
from __future__ import annotations

import ast
import dataclasses
import keyword
import re
from pathlib import Path
from typing import Any

import sympy

from optgen.errors import Location, SpecError
from optgen.spec import expressions
from optgen.spec.model import RUNTIME_OPTIONS, Check, Hyperparameter, Spec, StateVar, TorchParity
from optgen.spec.reserved import reserved_message, reserved_why
from optgen.spec.search import MAX_EXTENDS, find_parent
from optgen.spec.toml_source import Source, display_path, expect, read, reject_unknown

CHECK_KEYS = {"assert", "error", "type", "when", "each", "collect"}
SECTIONS: dict[str, set[str] | None] = {  # section → its keys (None: free names)
    "optimizer": {"name", "doc", "paper", "extends", "signature", "group_keys", "complex",
                  "state_init", "torch", "gradients", "algorithm"},
    "hyperparameters": None,  # free names
    "check": CHECK_KEYS,
    "state": None,
    "update": {"rule"},
    "torch_parity": {f.name for f in dataclasses.fields(TorchParity)},
}
HYPERPARAMETER_KEYS = {"default", "names", "fixed", "tensor", "choices", "derive"}
#: algorithms whose step is an intrinsic of optgen/runtime/ rather than an update rule
ALGORITHMS = {"lbfgs"}
NONE = "None"  # TOML has no null: the string "None" in a default stands for Python's None
STATE_KEYS = {"init", "first", "when", "key", "host", "low_precision", "nonnegative"}
ERROR_TYPES = {"ValueError", "TypeError", "RuntimeError"}
#: optimizer.gradients (Note [Sparse gradients] in optgen/runtime/generated.py)
GRADIENTS = ("dense", "sparse", "dense_or_sparse", "dense_or_gathered")


class _Merged:
    """A spec's tables after `extends`, each entry remembering the file it came from."""

    def __init__(self):
        self.optimizer: dict[str, tuple[Any, Source]] = {}
        self.hyperparameters: dict[str, tuple[Any, Source]] = {}
        self.state: dict[str, tuple[Any, Source]] = {}
        self.torch_parity: dict[str, tuple[Any, Source]] = {}  # inherited, key by key
        self.checks: list[tuple[dict, Source, int]] = []
        self.rule: tuple[str, Source] | None = None
        # The spec extended, when this file changes nothing its kernels depend on (no rule, no
        # state, no new hyperparameter): its kernels are then the parent's (AdamW's are Adam's).
        self.kernels_from: str | None = None
        self.kernels_from_file = ""


def _merge_file(path: Path, search_path: tuple[Path, ...], seen: tuple[str, ...] = ()) -> tuple[_Merged, Source]:
    data, src = read(path)
    for section, value in data.items():
        if section not in SECTIONS:
            raise SpecError(src.key_loc((section,)),
                            f"unknown section [{section}]; allowed sections: {', '.join(SECTIONS)}")
        if section == "check":
            if not isinstance(value, list):
                raise SpecError(src.key_loc((section,)), "checks are written as [[check]] tables")
        elif not isinstance(value, dict):
            raise SpecError(src.key_loc((section,)), f"'{section}' must be a table: [{section}]")
        allowed = SECTIONS[section]
        if allowed is not None and section != "check":
            reject_unknown(value, allowed, src, (section,), f"[{section}]")

    optimizer = data.get("optimizer")
    if optimizer is None:
        raise SpecError(Location(src.path, 1, 1), "missing [optimizer] section (with at least name = \"...\")")
    merged = _Merged()
    base_name = optimizer.get("extends")
    if base_name is not None:
        expect(base_name, str, src, ("optimizer", "extends"), "extends")
        if not base_name.isidentifier():
            raise SpecError(src.value_loc(("optimizer", "extends")),
                            f"cannot extend '{base_name}': extends names an optimizer (e.g. \"Adam\"), not a path")
        base_path = find_parent(base_name, search_path)
        if len(seen) > MAX_EXTENDS:
            raise SpecError(src.value_loc(("optimizer", "extends")),
                            f"cannot extend '{base_name}': a chain of extends may be at most {MAX_EXTENDS} specs long")
        if base_name.lower() in seen or base_path is None:
            where = ", ".join(display_path(d) for d in search_path)
            why = "extends itself in a cycle" if base_name.lower() in seen else \
                f"no spec file {base_name.lower()}.toml in {where}"
            raise SpecError(src.value_loc(("optimizer", "extends")), f"cannot extend '{base_name}': {why}")
        merged, _ = _merge_file(base_path, search_path, seen + (base_name.lower(),))
        merged.optimizer.pop("torch", None)  # the oracle is per spec, never inherited
        merged.optimizer.pop("doc", None)
        same_kernels = "update" not in data and "state" not in data \
            and set(data.get("hyperparameters", {})) <= set(merged.hyperparameters)
        merged.kernels_from = (merged.kernels_from or merged.optimizer["name"][0]) if same_kernels else None
        merged.kernels_from_file = (merged.kernels_from_file or str(base_path)) if same_kernels else ""
    for key, value in optimizer.items():
        merged.optimizer[key] = (value, src)
    for key, value in data.get("hyperparameters", {}).items():
        merged.hyperparameters[key] = (value, src)
    for key, value in data.get("state", {}).items():
        merged.state[key] = (value, src)
    for key, value in data.get("torch_parity", {}).items():
        merged.torch_parity[key] = (value, src)
    if "check" in data:
        merged.checks = [(c, src, i) for i, c in enumerate(data["check"])]
    if "update" in data:
        if "rule" not in data["update"]:
            raise SpecError(src.key_loc(("update",)), "[update] needs rule = \"\"\"...\"\"\"")
        merged.rule = (data["update"]["rule"], src)
    return merged, src


def load_spec(path: str | Path, search_path: tuple[Path, ...] | None = None) -> Spec:
    """Reads, merges (`extends`) and validates one spec file; raises SpecError with file:line:col.
    ``extends`` is looked up in ``search_path`` (default: the spec's own folder, then the built-in
    optimizer specs)."""
    path = Path(path)
    if search_path is None:
        from optgen.resources import builtin_optimizer_dir

        search_path = tuple(dict.fromkeys((path.parent.resolve(), builtin_optimizer_dir())))
    merged, src = _merge_file(path, search_path, (_own_name(path),))
    opt = merged.optimizer

    def opt_value(key, types, default=None, required=False):
        if key not in opt:
            if required:
                raise SpecError(src.key_loc(("optimizer",)), f"[optimizer] needs '{key}'")
            return default
        value, vsrc = opt[key]
        return expect(value, types, vsrc, ("optimizer", key), f"optimizer.{key}")

    for key in ("doc", "paper"):  # they go into docstrings: no way out of the quotes
        if key in opt and isinstance(opt[key][0], str) and ('"""' in opt[key][0] or "\\" in opt[key][0]):
            raise SpecError(opt[key][1].value_loc(("optimizer", key)),
                            f'optimizer.{key} may not contain \"\"\" or backslashes (it becomes a docstring)')
    torch_name = opt_value("torch", str)
    if torch_name is not None and not torch_name.isidentifier():
        raise SpecError(src.value_loc(("optimizer", "torch")), f"optimizer.torch '{torch_name}' is not a class name")
    name = opt_value("name", str, required=True)
    if not name.isidentifier():
        raise SpecError(src.value_loc(("optimizer", "name")), f"optimizer name '{name}' is not a Python identifier")
    # The class is defined in, and imported from, the module `name.lower()` of the package
    # (`from .elif import Elif` does not parse; a class `torch` hides the module it uses).
    why = reserved_why(name) or (f"its module name '{name.lower()}' is a Python keyword"
                                 if keyword.iskeyword(name.lower()) else None)
    if why is not None:
        raise SpecError(src.value_loc(("optimizer", "name")),
                        f"optimizer name '{name}' cannot be used: {why} — choose another name")
    hyper = _hyperparameters(merged)
    checks = _checks(merged, hyper)
    signature, group_keys = _signature(merged, hyper, opt_value)
    names = {"param": "tensor", "grad": "tensor"}
    for h in hyper.values():
        names.update({n: "hyperparameter" for n in h.names} if h.names else
                     {h.name: "flag" if h.is_flag else "hyperparameter"})
    state = _state(merged, names)
    algorithm = opt_value("algorithm", str)
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise SpecError(src.value_loc(("optimizer", "algorithm")),
                        f"unknown algorithm '{algorithm}'; available: {', '.join(sorted(ALGORITHMS))}")
    if merged.rule is None and algorithm is None:
        raise SpecError(src.key_loc(("optimizer",)), "missing [update] section with rule = \"\"\"...\"\"\"")
    rule_text, rule_src = merged.rule or ("", src)
    if not isinstance(rule_text, str):
        raise SpecError(rule_src.value_loc(("update", "rule")), "rule must be a string of statements")
    rule_loc = rule_src.value_loc(("update", "rule"))
    rule = expressions.parse_rule(rule_text, rule_loc)
    complex_mode = opt_value("complex", str)
    if complex_mode not in (None, "view_as_real"):
        raise SpecError(src.value_loc(("optimizer", "complex")), "complex must be \"view_as_real\" (or left out)")
    gradients = opt_value("gradients", str, "dense")
    if gradients not in GRADIENTS:
        raise SpecError(src.value_loc(("optimizer", "gradients")),
                        "gradients must be one of " + ", ".join(f'"{g}"' for g in GRADIENTS))
    if not gradients.startswith("dense_or_"):
        for c in checks:
            if c.sparse_step:
                raise SpecError(c.loc, 'each = "sparse_step" needs gradients = "dense_or_sparse" '
                                       'or "dense_or_gathered"')
    state_init = opt_value("state_init", str, "lazy")
    if state_init not in ("lazy", "eager"):
        raise SpecError(src.value_loc(("optimizer", "state_init")), "state_init must be \"lazy\" or \"eager\"")
    return Spec(
        name=name, path=src.path, source=_combined_source(merged, src), doc=opt_value("doc", str, ""),
        paper=opt_value("paper", str, ""), signature=signature, group_keys=group_keys,
        hyperparameters=hyper, checks=checks, state=state, rule=rule, rule_text=rule_text, rule_loc=rule_loc,
        complex_params=complex_mode == "view_as_real", eager_state=state_init == "eager",
        torch_name=opt_value("torch", str), extends=opt_value("extends", str), kernels_from=merged.kernels_from,
        kernels_from_file=merged.kernels_from_file, file=str(path.resolve()),
        gradients=gradients, algorithm=algorithm, torch_parity=_torch_parity(merged),
    )


#: the implementations whose capturable check torch words per optimizer
CAPTURABLE_IMPLEMENTATIONS = ("forloop", "foreach")


def _torch_parity(merged: _Merged) -> TorchParity:
    """The ``[torch_parity]`` table: wordings (strings, default None) and quirks (bools, default
    False), as TorchParity declares them, and ``capturable_error`` as
    ``{forloop = { lists = "...", xla = true }, ...}``."""
    defaults = {f.name: f.default for f in dataclasses.fields(TorchParity)}
    values: dict[str, Any] = {}
    for key, (value, src) in merged.torch_parity.items():
        path = ("torch_parity", key)
        if key == "capturable_error":
            expect(value, dict, src, path, f"torch_parity.{key}")
            reject_unknown(value, set(CAPTURABLE_IMPLEMENTATIONS), src, path, f"torch_parity.{key}")
            wordings = []
            for implementation, wording in value.items():
                where = path + (implementation,)
                expect(wording, dict, src, where, f"torch_parity.{key}.{implementation}")
                reject_unknown(wording, {"lists", "xla"}, src, where, f"torch_parity.{key}.{implementation}")
                lists = expect(wording.get("lists", "params and state_steps"), str, src, where + ("lists",), "lists")
                xla = expect(wording.get("xla", implementation != "foreach"), bool, src, where + ("xla",), "xla")
                wordings.append((implementation, (lists, xla)))
            values[key] = tuple(wordings)
        else:
            kind = bool if isinstance(defaults[key], bool) else str
            values[key] = expect(value, kind, src, path, f"torch_parity.{key}")
    return TorchParity(**values)


def _own_name(path: Path) -> str:
    """The spec's own name, lower-cased, so `extends` of itself is a cycle (best effort: the loader
    reports a file that does not parse)."""
    try:
        import tomllib

        name = tomllib.loads(path.read_text(encoding="utf-8")).get("optimizer", {}).get("name")
    except Exception:  # noqa: BLE001 - read() below reports it with its location
        return ""
    return name.lower() if isinstance(name, str) else ""


def _combined_source(merged: _Merged, src: Source) -> str:
    """The text a spec's hash covers: its own file and every file it extends."""
    files = {s.path: s.text for _, s in merged.optimizer.values()}
    files.update({s.path: s.text for _, s in merged.hyperparameters.values()})
    files[src.path] = src.text
    return "".join(files[p] for p in sorted(files))


def _hyperparameters(merged: _Merged) -> dict[str, Hyperparameter]:
    out: dict[str, Hyperparameter] = {}
    for name, (raw, src) in merged.hyperparameters.items():
        path = ("hyperparameters", name)
        loc = src.key_loc(path)
        if not name.isidentifier():
            raise SpecError(loc, f"hyperparameter name '{name}' is not a Python identifier")
        if name in RUNTIME_OPTIONS:
            raise SpecError(loc, f"'{name}' is a runtime option every optimizer has; list it in "
                                 "optimizer.signature instead of declaring it")
        if message := reserved_message(name, "hyperparameter"):
            raise SpecError(loc, message)
        table = raw if isinstance(raw, dict) else {"default": raw}
        if isinstance(raw, dict):
            reject_unknown(raw, HYPERPARAMETER_KEYS, src, path, f"hyperparameter '{name}'")
            if "default" not in raw:
                raise SpecError(loc, f"hyperparameter '{name}' needs a default")
        default = table["default"]
        dpath = path + ("default",) if isinstance(raw, dict) else path
        names: tuple[str, ...] = ()
        choices: tuple[str, ...] = ()
        if "choices" in table:
            choices = tuple(expect(table["choices"], list, src, path + ("choices",), f"{name}.choices"))
            if not choices or not all(isinstance(c, str) and c.isidentifier() for c in choices):
                raise SpecError(src.value_loc(path + ("choices",)), "choices must be a list of identifiers")
            if default != NONE and default not in choices:
                raise SpecError(src.value_loc(dpath), f"default of '{name}' must be \"None\" or one of the choices")
            out[name] = Hyperparameter(name, None if default == NONE else default, loc, choices=choices)
            continue
        if "derive" in table:  # a None default computed from others, e.g. LBFGS's max_eval
            if default != NONE:
                raise SpecError(src.key_loc(path + ("derive",)), 'derive = "..." needs default = "None"')
            text = expect(table["derive"], str, src, path + ("derive",), "derive")
            known = set(merged.hyperparameters)
            derive = expressions.parse_check(text, src.value_loc(path + ("derive",)), known)
            out[name] = Hyperparameter(name, None, loc, derive=derive)
            continue
        if isinstance(default, list):
            for i, item in enumerate(default):
                if item != NONE:
                    expect(item, (int, float), src, dpath + (i,), f"{name}[{i}]")
                    _reject_nan(item, src.value_loc(dpath + (i,)), f"{name}[{i}]")
            default = [None if item == NONE else item for item in default]
            names = tuple(expect(table.get("names"), list, src, path + ("names",), f"{name}.names")
                          if "names" in table else ())
            if len(names) != len(default):
                raise SpecError(src.key_loc(path), f"tuple hyperparameter '{name}' needs names = [...] "
                                                   f"with one name per item ({len(default)})")
            for i, n in enumerate(names):
                if not isinstance(n, str) or not n.isidentifier():
                    raise SpecError(src.value_loc(path + ("names", i)), f"'{n}' is not a valid name")
                if message := reserved_message(n, "tuple item"):
                    raise SpecError(src.value_loc(path + ("names", i)), message)
                # the rule reads an item by its name: a clash would silently read the other value
                if (n in merged.hyperparameters and n != name) or n in names[:i]:
                    raise SpecError(src.value_loc(path + ("names", i)),
                                    f"tuple item '{n}' of '{name}' is already the name of "
                                    f"{'another item' if n in names[:i] else 'a hyperparameter'}; choose another name")
            default = tuple(default)
        elif not isinstance(default, (bool, int, float)):
            raise SpecError(src.value_loc(dpath), f"default of '{name}' must be a number, a bool or a list "
                                                  f"of numbers (\"None\" for None), not {type(default).__name__}")
        elif "names" in table:
            raise SpecError(src.key_loc(path + ("names",)), "names = [...] is only for tuple hyperparameters")
        else:
            _reject_nan(default, src.value_loc(dpath), name)
        fixed = expect(table.get("fixed", False), bool, src, path + ("fixed",), "fixed")
        tensor = expect(table.get("tensor", False), bool, src, path + ("tensor",), "tensor")
        out[name] = Hyperparameter(name, default, loc, names, fixed, tensor)
    return out


def _reject_nan(value: Any, loc: Location, what: str) -> None:
    """A NaN default cannot be validated (every comparison with it is false) nor compared with a
    user's value; ``inf`` and ``-inf`` are fine (the constructor prints them as float("inf"))."""
    if isinstance(value, float) and value != value:
        raise SpecError(loc, f"default of '{what}' is nan; a default must be a number (inf is allowed) "
                             "or \"None\" with derive = \"...\" or choices")


def _checks(merged: _Merged, hyper: dict[str, Hyperparameter]) -> tuple[Check, ...]:
    names = set(hyper) | set(RUNTIME_OPTIONS)
    out = []
    for raw, src, i in merged.checks:
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
        each = raw.get("each")
        if each not in (None, "param", "sparse_step"):
            raise SpecError(src.value_loc(path + ("each",)), 'each must be "param" (a check run on every parameter) '
                                                              'or "sparse_step" (run at a step with a sparse gradient)')
        collect = expect(raw.get("collect", False), bool, src, path + ("collect",), "check.collect")
        if collect and each != "param":
            raise SpecError(src.key_loc(path + ("collect",)), 'collect = true needs each = "param"')
        scope = names | {"param"} if each == "param" else names
        ok = expressions.parse_check(raw["assert"], src.value_loc(path + ("assert",)), scope)
        when = None
        if "when" in raw:
            when = expressions.parse_check(expect(raw["when"], str, src, path + ("when",), "check.when"),
                                           src.value_loc(path + ("when",)), scope)
        _check_message(raw["error"], src.value_loc(path + ("error",)), names,
                       extra=("indices",) if collect else PARAM_FIELDS if each == "param" else ())
        out.append(Check(ok, raw["error"], kind, when, src.key_loc(path), each_param=each == "param",
                         collect=collect, sparse_step=each == "sparse_step"))
    return tuple(out)


#: what a per-parameter check's message may show of the parameter
PARAM_FIELDS = ("param.size()", "param.dim()", "param.dtype")


def _check_message(message: str, loc: Location, names: set[str], extra: tuple[str, ...] = ()) -> None:
    """Error messages are f-string bodies; every {field} must be a checked value."""
    import string

    try:
        fields = [(f, spec) for _, f, spec, _ in string.Formatter().parse(message) if f is not None]
    except ValueError as e:
        raise SpecError(loc, f"bad error message template: {e}") from None
    for f, spec in fields:
        # The message is emitted as an f-string: a field must be a plain name or name[<int>], and
        # a format spec must not nest another field, or spec text would run in the generated code.
        if f in extra and not spec:
            continue
        match = re.fullmatch(r"([A-Za-z_]\w*)(\[[0-9]+\])?", f)
        if match is None or match.group(1) not in names or "{" in (spec or ""):
            shown = f"{f}:{spec}" if spec else f
            raise SpecError(loc, f"error message refers to '{{{shown}}}'; a field must be a hyperparameter, "
                                 "optionally indexed by a number, e.g. {lr} or {betas[0]}")


def _signature(merged: _Merged, hyper, opt_value) -> tuple[tuple[str, ...], tuple[str, ...]]:
    text = opt_value("signature", str, required=True)
    value, vsrc = merged.optimizer["signature"]
    loc = vsrc.value_loc(("optimizer", "signature"))
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    params = [s for s in items if s != "*"]
    if items.count("*") > 1:
        raise SpecError(loc, "signature has more than one '*'")
    for s in params:
        if s not in RUNTIME_OPTIONS and (s not in hyper or hyper[s].fixed):
            raise SpecError(loc, f"signature names '{s}', which is neither a (non-fixed) hyperparameter "
                                 f"nor a runtime option ({', '.join(RUNTIME_OPTIONS)})")
    if len(set(params)) != len(params):
        raise SpecError(loc, "signature names an argument twice")
    missing = [h.name for h in hyper.values() if not h.fixed and h.name not in params]
    if missing:
        raise SpecError(loc, f"signature leaves out hyperparameter(s) {', '.join(missing)}")
    keys = params + [h.name for h in hyper.values() if h.fixed]
    group_text = opt_value("group_keys", str)
    if group_text is None:
        return items, tuple(keys)
    group = tuple(s.strip() for s in group_text.split(",") if s.strip())
    if sorted(group) != sorted(keys):
        gvalue, gsrc = merged.optimizer["group_keys"]
        raise SpecError(gsrc.value_loc(("optimizer", "group_keys")),
                        f"group_keys must list exactly the signature's arguments and fixed "
                        f"hyperparameters: {', '.join(sorted(keys))}")
    return items, group


def _state(merged: _Merged, names: dict[str, str]) -> dict[str, StateVar]:
    out: dict[str, StateVar] = {}
    for name, (raw, src) in merged.state.items():
        path = ("state", name)
        loc = src.key_loc(path)
        if not name.isidentifier() or name in names:
            raise SpecError(loc, f"state name '{name}' is not a Python identifier or is already used "
                                 "by a hyperparameter / param / grad")
        if message := reserved_message(name, "state"):
            raise SpecError(loc, message)
        table = raw if isinstance(raw, dict) else {"init": raw}
        if isinstance(raw, dict):
            reject_unknown(raw, STATE_KEYS, src, path, f"state '{name}'")
        if ("init" in table) == ("first" in table):
            raise SpecError(loc, f"state '{name}' needs exactly one of init = \"zeros_like(param)\" / "
                                 "\"full_like(param, x)\" / \"0\", or first = \"<expression>\"")
        when = sympy.true
        if "when" in table:
            text = expect(table["when"], str, src, path + ("when",), "when")
            when = expressions.parse_condition(text, src.value_loc(path + ("when",)), names,
                                               "a state condition")
        key = expect(table.get("key", name), str, src, path + ("key",), "key")
        if not key.isidentifier():  # it is printed into generated code as state["<key>"]
            raise SpecError(src.value_loc(path + ("key",)), f"state key '{key}' must be a Python identifier, "
                                                            "like torch's 'exp_avg' or 'sum'")
        if "first" in table:
            text = expect(table["first"], str, src, path + ("first",), "first")
            value = expressions.parse_math(text, src.value_loc(path + ("first",)),
                                           names, "a state's first value")
            low = _low_precision(table, "first", src, path)
            out[name] = StateVar(name, key, "first", value, when, loc, low_precision=low,
                                 nonnegative=_nonnegative(table, low, src, path))
            continue
        raw_init = table["init"]
        ipath = path + ("init",) if isinstance(raw, dict) else path
        if isinstance(raw_init, (int, float)) and not isinstance(raw_init, bool):
            raw_init = repr(raw_init)
        text = expect(raw_init, str, src, ipath, "init")
        kind, value = _parse_init(text, src.value_loc(ipath), names)
        host = expect(table.get("host", False), bool, src, path + ("host",), "host")
        if host and kind != "scalar":
            raise SpecError(src.key_loc(path + ("host",)), "host = true is only for counters (init = a number)")
        low = _low_precision(table, kind, src, path)
        out[name] = StateVar(name, key, kind, value, when, loc, host=host, low_precision=low,
                             nonnegative=_nonnegative(table, low, src, path))
    return out


# Note [Low-precision state]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~
# ``state_dtype=torch.bfloat16`` stores some of a parameter's states in bfloat16 (the kernels load
# them into float32, update, and store them back rounded stochastically: optgen/runtime/low_precision.py).
# Which may be, is the spec's word: a state's ``low_precision`` key.  By default a state shaped like
# its parameter (``zeros_like`` / ``full_like`` / ``first``: moments, momentum buffers) may, being
# where the memory goes; a counter (``init`` a number: ``step``) may not (its value must count
# exactly), and neither may a reduced-shape state (``zeros_reduced``: Adafactor's row and column
# factors, a few numbers per row, whose precision matters more than their size).  A spec may say
# ``low_precision = false`` for a full-size state that must keep the parameter's precision; it
# cannot say true for the two others.
#: the initialisers whose states may be stored in low precision (Note [Low-precision state])
LOW_PRECISION_KINDS = ("zeros", "full", "first")


def _low_precision(table: dict, kind: str, src: Source, path: tuple) -> bool:
    """The state's ``low_precision`` key, or its default (Note [Low-precision state])."""
    if "low_precision" not in table:
        return kind in LOW_PRECISION_KINDS
    value = expect(table["low_precision"], bool, src, path + ("low_precision",), "low_precision")
    if value and kind not in LOW_PRECISION_KINDS:
        raise SpecError(src.value_loc(path + ("low_precision",)),
                        "low_precision = true is only for states shaped like the parameter (zeros_like(param), "
                        "full_like(param, x) or first = ...), not counters or reduced-shape states")
    return value


def _nonnegative(table: dict, low_precision: bool, src: Source, path: tuple) -> bool:
    """The state's ``nonnegative`` key (default false): a promise that the state is never negative,
    which lets ``state_dtype="int8"`` spend all its codes on [0, 1] (Note [Blockwise 8-bit state] in
    optgen/runtime/quantized_state.py; a block holding a negative value anyway falls back to the
    signed map there)."""
    if "nonnegative" not in table:
        return False
    value = expect(table["nonnegative"], bool, src, path + ("nonnegative",), "nonnegative")
    if value and not low_precision:
        raise SpecError(src.value_loc(path + ("nonnegative",)),
                        "nonnegative = true is only for states kept in low precision (it picks int8 state's code "
                        "map); this state is not (low_precision = false, a counter or a reduced-shape state)")
    return value


def _parse_init(text: str, loc: Location, names: dict[str, str]) -> tuple[str, sympy.Expr | None]:
    """``zeros_like(param)`` | ``full_like(param, <scalar>)`` | ``<number>`` (a 0-dim counter)."""
    loc, text = expressions.strip_located(text, loc)
    tree = expressions.parse_python(text, loc).body
    builder = expressions.MathBuilder(loc, {k: v for k, v in names.items() if v == "hyperparameter"},
                                      "a state initialiser")
    if isinstance(tree, ast.Constant) and type(tree.value) in (int, float) or isinstance(tree, (ast.Name, ast.BinOp)):
        return "scalar", sympy.sympify(builder.math(tree))  # a 0-dim counter: a number or e.g. `lr`
    if isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and not tree.keywords:
        args = tree.args
        is_param = bool(args) and isinstance(args[0], ast.Name) and args[0].id == "param"
        if tree.func.id == "zeros_like" and len(args) == 1 and is_param:
            return "zeros", None
        if (tree.func.id == "zeros_reduced" and len(args) == 2 and is_param
                and isinstance(args[1], ast.UnaryOp | ast.Constant)):
            return "zeros_reduced", builder.math(args[1])  # zeros of param's shape with dim d of size 1
        if tree.func.id == "full_like" and len(args) == 2 and is_param:
            return "full", builder.math(args[1])
    raise SpecError(loc, f"bad initialiser '{text.strip()}': expected zeros_like(param), zeros_reduced(param, dim), "
                         "full_like(param, <hyperparameter expression>), or a number or hyperparameter "
                         "expression (a 0-dim counter)")
