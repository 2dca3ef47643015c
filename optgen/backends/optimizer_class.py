"""The optimizer class module: constructor (signature, validation, defaults) and state layout.

It is the part of a generated optimizer users import (``optgen.Adam``); the update itself lives
in the kernel modules of the other backends, which the class's runtime base dispatches to.
"""
from __future__ import annotations

import ast
import dataclasses
import re

import sympy

from optgen.backends.base import (
    Backend,
    counter_list,
    environment,
    header,
    kernel_signature,
    module_name,
    plural,
    wrap,
)
from optgen.backends.printing import PythonScalarPrinter
from optgen.ir.nodes import elementwise
from optgen.passes import Compiled
from optgen.spec.model import RUNTIME_OPTIONS

#: names the class module imports only where its code uses them
OPTIONAL_IMPORTS = ("torch", "counter_from", "filled_like", "scalar_dtype")


class OptimizerClassBackend(Backend):
    name = "optimizer"

    def __init__(self, kernel_backends: tuple[str, ...], imported_on_first_use: tuple[str, ...] = ()):
        self.kernel_backends = kernel_backends
        self.imported_on_first_use = imported_on_first_use  # named as a string (Backend.lazy)

    def render(self, compiled: Compiled) -> str:
        spec = compiled.spec
        hyper = spec.hyperparameters
        sig = kernel_signature(compiled)

        def default(name: str) -> str:
            return _literal(hyper[name].default if name in hyper else RUNTIME_OPTIONS[name])

        signature = [a if a == "*" else f"{a}={default(a)}" for a in spec.signature]
        group_defaults = [(k, k if k in spec.signature else default(k)) for k in spec.group_keys]
        fixed = [(h.name, _literal(h.default)) for h in hyper.values() if h.fixed]
        # Checkpoints from older versions may lack flags and options; torch fills them in the same way.
        setstate = [(k, default(k)) for k in spec.group_keys
                    if k not in dict(fixed) and (k in RUNTIME_OPTIONS or (k in hyper and hyper[k].is_flag))]

        # Where each scalar of the kernels comes from in a param group.
        sources: dict[str, tuple[str, int | None]] = {}  # scalar → (group key, index in its tuple)
        for h in hyper.values():
            for i, n in enumerate(h.names):
                sources[n] = (h.name, i)
            if not h.names:
                sources[h.name] = (h.name, None)
        # kernel keyword → (group key, index in its tuple), as few lines as fit
        scalars = wrap([f'"{s}": {sources[s]!r}' for s in sig.scalars], "_scalars = {", "    ", "}", width=106)

        group_value = PythonScalarPrinter(lambda n: _group_read(sources, n))
        init_state = []
        for s in spec.state.values():
            if s.init == "first":
                continue  # created by the kernel on its first step
            when = s.when
            line = f'state["{s.key}"] = {_initialiser(s, group_value, spec.complex_params)}'
            if when == sympy.true:
                init_state.append(line)
            else:
                init_state += [f"if {group_value(when)}:", f"    {line}"]

        checks: list[dict] = []
        param_checks: list[dict] = []
        collect_checks: list[dict] = []
        sparse_checks: list[dict] = []
        for c in spec.checks:
            condition = _failure_condition(c.ok, c.when)
            message = f"f{c.message!r}" if "{" in c.message else repr(c.message)
            check: dict[str, str | list[str]] = dict(condition=condition, kind=c.kind, message=message)
            if c.sparse_step:  # reads the group's values: bind the names it uses
                used = set(re.findall(r"[A-Za-z_]\w*", f"{c.ok} {c.when or ''} {c.message}"))
                check["reads"] = [k for k in spec.group_keys if k in used]
            (collect_checks if c.collect else param_checks if c.each_param else
             sparse_checks if c.sparse_step else checks).append(check)
        owner = spec.kernels_from or spec.name  # AdamW runs Adam's kernels (same rule, see load.py)
        backends = () if spec.algorithm else self.kernel_backends  # a hand-written algorithm has no kernels
        names = [module_name(owner, b) for b in backends]
        lazy = self.imported_on_first_use
        kernel_modules = [m for b, m in zip(backends, names, strict=True) if b not in lazy]
        kernels = [(b, f'"{m}"' if b in lazy else m) for b, m in zip(backends, names, strict=True)]
        derived = [(h.name, h.derive) for h in hyper.values() if h.derive]
        context = dict(
            header=header(compiled), name=spec.name, paper=spec.paper, doc=spec.doc, path=spec.path,
            rule=_docstring_safe(spec.rule_text).strip("\n").splitlines(),
            drop_in=(f"a drop-in for torch.optim.{spec.torch_name}" if spec.torch_name
                     else "torch.optim has no such optimizer: this one has its interface"),
            kernel_modules=kernel_modules, kernels=kernels,
            flags=repr(tuple(h.name for h in spec.flags)),
            tensor_state=repr(tuple((plural(s.name), s.key) for s in spec.state.values() if not s.is_scalar)),
            counter_state=repr(tuple((counter_list(s.name), s.key) for s in spec.state.values() if s.is_scalar)),
            lazy_state=repr(tuple(s.key for s in spec.state.values() if s.init == "first")),
            low_precision_state=repr(tuple(s.key for s in spec.state.values() if s.low_precision)),
            nonnegative_state=repr(tuple(s.key for s in spec.state.values() if s.nonnegative)),
            scalars=scalars, complex_as_real=spec.complex_params, elementwise=elementwise(compiled.program),
            signature=signature, checks=checks,
            param_checks=param_checks, collect_checks=collect_checks, sparse_checks=sparse_checks,
            gradients=spec.gradients, algorithm=spec.algorithm,
            derived=derived,
            host_counters=repr(tuple(s.key for s in spec.state.values() if s.host)),
            uses_reduced_shape=any(s.init == "zeros_reduced" for s in spec.state.values()),
            group_defaults=group_defaults, setstate_defaults=setstate, fixed=fixed,
            eager_state=spec.eager_state, init_state=init_state,
            torch_parity=[(f.name, repr(dict(value) if f.name == "capturable_error" else value))
                          for f in dataclasses.fields(spec.torch_parity)
                          if (value := getattr(spec.torch_parity, f.name)) != f.default],
        )
        # Import only what the class uses: rendered once with every import, then with those its
        # code names (an import is no ast.Name, a docstring's "torch.optim" neither).
        template = environment().get_template("optimizer/class.py.j2")
        code = template.render(**context, used=OPTIONAL_IMPORTS)
        named = {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)}
        return template.render(**context, used=named & set(OPTIONAL_IMPORTS))


def _failure_condition(ok: str, when: str | None) -> str:
    """``when and not (ok)`` as Python, with ``not (not x)`` printed as ``x``: a check asserting
    ``not (foreach and not capturable)`` fails on ``foreach and not capturable``."""
    test = ast.parse(ok, mode="eval").body
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        failed = _operand_of_and(test.operand)
    else:
        failed = f"not ({ast.unparse(test)})"
    return failed if when is None else f"{_operand_of_and(ast.parse(when, mode='eval').body)} and {failed}"


def _operand_of_and(node: ast.expr) -> str:
    """``node`` printed as an operand of ``and``: in parentheses where it binds more loosely."""
    text = ast.unparse(node)
    loose = isinstance(node, (ast.IfExp, ast.Lambda, ast.NamedExpr)) or (
        isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or))
    return f"({text})" if loose else text


def _docstring_safe(text: str) -> str:
    """Spec text (comments included) inside a generated docstring cannot close it."""
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def _group_read(sources: dict, name: str) -> str:
    if name == "param":  # a state's condition may test the parameter itself (its shape)
        return "param"
    key, index = sources.get(name, (name, None))
    return f'group["{key}"]' + (f"[{index}]" if index is not None else "")


def _initialiser(state, group_value, complex_params: bool) -> str:
    if state.init == "zeros":
        return "torch.zeros_like(param, memory_format=torch.preserve_format)"
    if state.init == "zeros_reduced":
        return f"param.new_zeros(reduced_shape(param.shape, {state.reduced_dim}))"
    if state.init == "scalar" and state.host:
        return repr(int(state.init_value) if state.init_value.is_Integer else float(state.init_value))
    if state.init == "scalar" and state.init_value.is_Number:
        return f"torch.tensor({float(state.init_value)!r}, dtype=scalar_dtype())"
    if state.init == "scalar":  # from a hyperparameter (ASGD's eta = lr), which may be a Tensor
        return f"counter_from({group_value(state.init_value)})"
    value = group_value(state.init_value)
    return f"filled_like(param, {value}{', complex_pair=True' if complex_params else ''})"


def _literal(value) -> str:
    """A default as Python source: ``repr`` but for an infinite float, whose repr ``inf`` is no name
    in the generated module (a TOML default ``inf``)."""
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return 'float("inf")' if value > 0 else '-float("inf")'
    if isinstance(value, tuple):
        return "(" + ", ".join(_literal(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)
