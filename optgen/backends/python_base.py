"""What the two Python backends share: walking an :class:`OpProgram` into lines of code.

A backend subclass says how to print one op, how to name a variable, and how to print a scalar
that may differ per tensor; everything else — guards as ``if`` blocks, the spec statement as a
comment above its code, fluent chains ``x.mul_(a).add_(b)``, lazily created state — is here.
"""
from __future__ import annotations

import itertools
import re
from typing import cast

import sympy

from optgen.backends.base import (
    Backend,
    counter_list,
    environment,
    header,
    kernel_record,
    kernel_signature,
    plural,
    wrap,
)
from optgen.backends.printing import TensorScalarPrinter, TracedScalarPrinter
from optgen.ir.functions import Norm, Where
from optgen.ir.guards import first_assignments, simplify_guard
from optgen.ir.ops import OpProgram, Step, TensorOp
from optgen.passes import Compiled
from optgen.passes.merge_variants import Block, FlagSpace, MergedBlock, merge, sections
from optgen.passes.reuse_buffers import step_reads


def reads_traced(expr, traced: set[str]) -> bool:
    """Whether ``expr`` is a 0-dim tensor while torch.compile traces the step: it reads one of the
    ``traced`` names or takes a norm (Note [Branches on traced scalars])."""
    expr = sympy.sympify(expr)
    return any(s.name in traced for s in expr.free_symbols) \
        or any(isinstance(e, Norm) for e in sympy.preorder_traversal(expr))


def traced_names(program: OpProgram) -> set[str]:
    """Host scalars that are 0-dim tensors while torch.compile traces the step: counters' values,
    norms, and what is computed from them (Note [Branches on traced scalars])."""
    names: set[str] = set()
    for step in program.steps:
        if step.kind in ("counter", "read"):
            names.add(step.target)
        elif step.kind == "scalar" and step.expr is not None and reads_traced(step.expr, names):
            names.add(step.target)
    return names


def _names_read(step: Step) -> set[str]:
    """The host names a step reads: its guard, its scalar expression, its ops' scalar arguments."""
    exprs = [step.guard, *([step.expr] if step.expr is not None else [])]
    for op in (*step.ops, *(step.first_ops or ())):
        exprs += [a for a in op.args if not isinstance(a, str)] + [v for _, v in op.kwargs]
    return {s.name for e in exprs for s in sympy.sympify(e).free_symbols}


# Note [Branches on traced scalars]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# While torch.compile traces a step, a counter's value is its 0-dim tensor (Note [Counters under
# torch.compile] in optgen/runtime/tensor_scalars.py), and so is a norm read as a scalar
# (``tensor_scalars.norm``).  A Python branch on such a value — RAdam's ``if rho_t > 5:``, ASGD's
# ``if mu != 1:``, Lamb's ``where(weight_norm > 0, ...)`` printed as ``a if c else b`` — asks the
# tensor for its truth value: a data-dependent branch, a graph break.  So the kernel branches once
# more, on ``torch.compiler.is_compiling()`` (a constant to dynamo), and takes there the form torch's
# own ``capturable`` paths take:
#
#   - a statement under a traced condition ``c`` runs whatever ``c`` is, on a clone of each tensor
#     it updates that outlives it, and ``x.copy_(torch.where(c, x_new, x))`` keeps the update only
#     where ``c`` holds; an if/else is two such statements (``c``, then ``~c``), each a no-op
#     where its condition fails, so they compose as the branches did;
#   - a scalar assignment that chooses (``where``) is printed with ``torch.where``, both values
#     computed (a 0/0 in the one not chosen is a NaN nobody reads, not a ZeroDivisionError: the
#     operands are tensors there).
#
# Eagerly the code is the branch as written, bit for bit (the ``else:`` of the ``is_compiling()``
# test); traced, the chosen values are those of the branch, up to the float32 rounding every traced
# scalar has (Note [Compiled steps against eager] in tests/integration/test_compile.py).  A branch
# the where form cannot express — one that rebinds a name read after it (``update = ...`` in both
# arms), creates a lazily created state or updates a counter — keeps the Python branch: a graph
# break while tracing, never a wrong step.


class PythonRenderer:
    name: str            # backend name: "forloop" / "foreach"
    indent = "    "
    #: Note [Branches on traced scalars]: a branch on a counter or norm takes torch.where while
    #: torch.compile traces the step (the differentiable kernel branches on its own tensors)
    traced_branches = True

    def __init__(self, program: OpProgram):
        self.program = program
        self.tracing = False  # printing the torch.compile form (Note [Branches on traced scalars])
        self.redirect: dict[str, str] = {}  # tensor → the clone a traced branch updates instead
        self.traced = traced_names(program)
        self.per_tensor = {s.target for s in program.steps if s.per_tensor}
        # Scalar locals → where first assigned (Note [Guards evaluate in the order they were written]).
        self.defined_at = first_assignments(s.target for s in program.steps if s.kind == "scalar")
        # Counter updates whose new value nothing reads: no `.item()` (a device sync on CUDA).
        steps = program.steps
        self.unread_counters = {id(s) for i, s in enumerate(steps) if s.kind == "counter"
                                and not any(s.target in _names_read(later) for later in steps[i + 1:])}

    # -- hooks for subclasses --------------------------------------------------------------------
    def var(self, name: str) -> str:
        raise NotImplementedError

    def op(self, op: TensorOp) -> str:
        raise NotImplementedError

    def scalar_step(self, step: Step) -> list[str]:
        raise NotImplementedError

    def counter_read(self, name: str) -> str:
        raise NotImplementedError

    def lazy_state(self, step: Step) -> list[str]:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------
    def list_name(self, name: str) -> str:
        """The per-tensor list of a name: a counter's tensors (``step_t``) are ``state_steps``."""
        if name.endswith("_t") and name[:-2] in self.program.counters:
            return counter_list(name[:-2])
        return plural(name)

    def scalar(self, expr) -> str:
        printer = TracedScalarPrinter if self.tracing else TensorScalarPrinter
        return printer(self.scalar_name, self.defined_at)(expr)

    def reads_traced(self, expr) -> bool:
        """Whether ``expr`` may be a 0-dim tensor while torch.compile traces the step."""
        return reads_traced(expr, self.traced)

    def scalar_name(self, name: str) -> str:
        """How code reads the scalar ``name`` (a list element in foreach's per-tensor fallback)."""
        return name

    def chain(self, ops: tuple[TensorOp, ...]) -> list[str]:
        """Ops as statements, continuing ``a.f_(...)`` chains where each op mutates the last result."""
        lines: list[str] = []
        previous: TensorOp | None = None
        for op in ops:
            text = self.op(op)
            fluent = self.fluent(op)
            if previous is not None and lines and fluent and op.self_ == previous.out \
                    and self.chainable(previous) and "\n" not in lines[-1]:
                lines[-1] += fluent
            else:
                lines += text.split("\n")
                if op.note:
                    lines[-1] += f"  # {op.note}"
            previous = op
        return lines

    def fluent(self, op: TensorOp, previous: TensorOp | None = None) -> str | None:
        """``.f_(args)`` if this op can continue a chain after ``previous`` (backends that chain
        override it)."""
        return None

    def chainable(self, op: TensorOp) -> bool:
        return False

    def release(self, name: str) -> list[str]:
        """Freeing a temporary early (foreach); a for-loop iteration's temporaries are small."""
        return []

    def step_lines(self, step: Step) -> list[str]:
        if step.kind == "release":
            return self.release(step.target)
        if step.kind == "read":
            return [self.counter_read(step.target)]
        if step.kind == "scalar":
            if self.traced_branches and not self.tracing and any(
                    isinstance(e, Where) and self.reads_traced(e.args[0]) for e in sympy.preorder_traversal(step.expr)):
                # Note [Branches on traced scalars]: a choice on a traced value, by torch.where
                self.tracing = True
                traced = self.scalar_step(step)
                self.tracing = False
                return ["if torch.compiler.is_compiling():", *(self.indent + line for line in traced),
                        "else:", *(self.indent + line for line in self.scalar_step(step))]
            return self.scalar_step(step)
        if step.first_ops is not None:
            return self.lazy_state(step)
        lines = self.chain(step.ops)
        if step.kind == "counter" and id(step) not in self.unread_counters:
            lines.append(self.counter_read(step.target))
        return lines

    def body_items(self) -> list:
        """The per-step code as items (optgen.passes.merge_variants): consecutive statements under
        one guard share an ``if`` block, and each statement is preceded by its spec line as a
        comment."""
        return self.guarded_blocks(self.program.steps, self)

    def body(self) -> list[str]:
        """The per-step code of this variant as lines."""
        return item_lines(self.body_items())

    @staticmethod
    def guarded_blocks(steps, renderer: PythonRenderer) -> list:
        """Statements as items: each statement's lines (its spec line as a comment first) one
        leaf, a run of statements under one guard a Block (``if guard:``) of them.  A run under
        conditions on traced values also has its torch.compile form (Note [Branches on traced
        scalars])."""
        if not renderer.traced_branches or renderer.tracing:
            return PythonRenderer.plain_blocks(steps, renderer)
        items: list = []
        for traced, grouped in itertools.groupby(steps, key=lambda s: renderer.traced_guard(s.guard) is not None):
            run = list(grouped)
            plain = PythonRenderer.plain_blocks(run, renderer)
            where = renderer.where_form(run) if traced else None
            if where is None:
                items += plain
            else:
                items.append(Block("if torch.compiler.is_compiling():", tuple(where), tuple(plain)))
        return items

    def traced_guard(self, guard) -> tuple[sympy.Basic, sympy.Basic] | None:
        """``(static, traced)``: a guard as the conjunction of a condition Python decides and one on
        traced values (None if it reads no traced value, or mixes the two other than by ``and``)."""
        if guard == sympy.true or not self.reads_traced(guard):
            return None
        terms = guard.args if isinstance(guard, sympy.And) else (guard,)
        traced = [t for t in terms if self.reads_traced(t)]
        static = [t for t in terms if not self.reads_traced(t)]
        return sympy.And(*static), sympy.And(*traced)

    def where_form(self, steps: list[Step]) -> list | None:
        """Steps under traced conditions as torch.compile runs them: each run under one condition
        on clones of the tensors it updates, kept by ``torch.where`` (Note [Branches on traced
        scalars]); None where that cannot express them."""
        inside = {id(s) for s in steps}
        outside = {*self.program.tensors, *self.program.counters}
        for s in self.program.steps:
            if id(s) not in inside and s.kind != "release":
                outside |= {s.target, *step_reads(s)}
        items: list = []
        self.tracing = True
        try:
            for guard, grouped in itertools.groupby(steps, key=lambda s: s.guard):
                group = list(grouped)
                written = []
                for s in group:
                    if s.kind not in ("tensor", "scalar") or s.first_ops is not None:
                        return None  # a counter's update, a lazily created state: the Python branch
                    if s.kind == "scalar" and s.target in outside:
                        return None
                    for op in s.ops:
                        if not op.in_place and op.out in outside:
                            return None  # rebinds a name read after it: no tensor to select into
                        if op.in_place and op.self_ in outside and op.self_ not in written:
                            written.append(op.self_)
                clones = {name: f"{name}_new" for name in written}
                if set(clones.values()) & (outside | {s.target for s in group}):
                    return None
                static, condition = cast(tuple, self.traced_guard(guard))
                block: list = [(f"{clone} = {self.var(name)}.clone()",) for name, clone in clones.items()]
                self.redirect = clones
                block += [(f"# {s.text}", *self.step_lines(s)) for s in group]
                self.redirect = {}
                chosen = self.scalar(condition)
                block += [(f"{self.var(name)}.copy_(torch.where({chosen}, {clone}, {self.var(name)}))",)
                          for name, clone in clones.items()]
                items += block if static == sympy.true else [Block(f"if {self.scalar(static)}:", tuple(block))]
        finally:
            self.tracing = False
            self.redirect = {}
        return items

    @staticmethod
    def plain_blocks(steps, renderer: PythonRenderer) -> list:
        """guarded_blocks, each condition a Python ``if``."""
        items: list = []
        previous = None
        for guard, group in itertools.groupby(steps, key=lambda s: s.guard):
            block: list[tuple[str, ...]] = []
            for step in group:
                code = renderer.step_lines(step)
                if code and step.kind == "release":
                    block.append(tuple(code))
                elif code:
                    block.append((f"# {step.text}", *code))
            is_else = False
            if guard == sympy.true:
                items += block
            elif block:
                # The second half of a spec's if/else prints as `else:`, not as a negated `if`.
                is_else = previous is not None and simplify_guard(sympy.Not(previous)) == guard
                is_else = is_else and bool(items) and isinstance(items[-1], Block) and not items[-1].orelse
                if is_else:
                    items[-1] = Block(items[-1].header, items[-1].body, tuple(block))
                else:
                    items.append(Block(f"if {renderer.scalar(guard)}:", tuple(block)))
            # an `else:` closes its if/else: the block after it starts a new `if`
            previous = guard if block and not (guard != sympy.true and is_else) else None
        return items

    def function_items(self) -> list:
        """The whole function body as items, to be merged with the other variants'."""
        return [*((line,) for line in self.preamble()), *self.body_items()]

    def preamble(self) -> list[str]:
        return [f"{s.target} = {self.scalar(s.expr)}" for s in self.program.preamble]



def _annotation(spec, name: str) -> str:
    """The Python type of a kernel's scalar argument, from its hyperparameter's default."""
    for h in spec.hyperparameters.values():
        if h.choices and h.name == name:
            return "str | None"
        values = dict(zip(h.names, h.default, strict=True)) if h.names else {h.name: h.default}
        if name in values:
            value = values[name]
            if value is None:
                return "float | None"
            # torch writes float defaults such as weight_decay=0 as ints; a counting argument is
            # an int with a non-zero default (ns_steps=5, max_iter=20).
            return "int" if type(value) is int and value != 0 else "float"
    return "float"


#: runtime functions a kernel may call (optgen.runtime.intrinsics)
INTRINSICS = ("newton_schulz",)
#: functions whose scalar may be a number or a 0-dim tensor (optgen.runtime.tensor_scalars;
#: differentiable kernels)
TENSOR_SCALAR_FUNCTIONS = ("add", "addcdiv", "addcmul", "clamp", "counter_value", "exp", "foreach_addcdiv_",
                           "foreach_addcmul_", "log", "norm", "sqrt")


def python_condition(expr: sympy.Basic, flags: tuple[str, ...]) -> str:
    """A flag condition (optgen.passes.merge_variants.condition) as Python: ``amsgrad``,
    ``maximize and not amsgrad``; flags in the spec's order."""
    def order(arg) -> int:
        names = sorted(flags.index(s.name) for s in arg.free_symbols)
        return names[0] if names else -1

    if expr.is_Symbol:
        return expr.name
    if isinstance(expr, sympy.Not):
        return f"not {python_condition(expr.args[0], flags)}"
    if isinstance(expr, sympy.And):
        return " and ".join(python_condition(a, flags) for a in sorted(expr.args, key=order))
    if isinstance(expr, sympy.Or):
        parts = [python_condition(a, flags) for a in sorted(expr.args, key=order)]
        return " or ".join(f"({p})" if " and " in p else p for p in parts)
    raise TypeError(f"not a flag condition: {expr}")


def merged_lines(merged, within: frozenset[int], space: FlagSpace, indent: str = "    ") -> list[str]:
    """The merged items of one body as Python lines: flag conditions as if/elif/else."""
    lines: list[str] = []
    for section in sections(merged, within, space):
        for n, arm in enumerate(section.arms):
            pad = ""
            if arm.condition is None:
                lines.append("else:")
            elif arm.condition is not sympy.true:
                lines.append(f"{'elif' if n else 'if'} {python_condition(arm.condition, space.flags)}:")
            if arm.condition is not sympy.true:
                pad = indent
            for m in arm.items:
                on = m.on & within
                # (the Python backends' items are tuples of lines, their block headers lines)
                if isinstance(m.item, MergedBlock):
                    code = [cast(str, m.item.header),
                            *(indent + line for line in merged_lines(m.item.body, on, space, indent))]
                    if m.item.orelse:
                        code += ["else:", *(indent + line for line in merged_lines(m.item.orelse, on, space, indent))]
                else:
                    code = list(cast(tuple[str, ...], m.item))
                lines += [pad + line for line in code]
    return lines


def item_lines(items, indent: str = "    ") -> list[str]:
    """One variant's items as Python lines, unmerged (what its own function would be)."""
    lines: list[str] = []
    for item in items:
        if isinstance(item, Block):
            lines += [cast(str, item.header), *(indent + line for line in item_lines(item.body, indent))]
            if item.orelse:
                lines += ["else:", *(indent + line for line in item_lines(item.orelse, indent))]
        else:
            lines += list(item)
    return lines


class PythonKernelBackend(Backend):
    """A backend whose output is a module with one Python kernel function per spec: the flags are
    keyword arguments, and the code of every flag variant is merged into it
    (optgen.passes.merge_variants)."""

    renderer: type[PythonRenderer]
    list_annotation = "list[Tensor]"
    template: str | None = None  # the template folder, if not the backend's name
    multi_tensor = False         # KernelModule.multi_tensor of the modules it prints
    summary: str                 # the generated module's docstring, after "<Name>, "

    def renderer_for(self, compiled: Compiled, program: OpProgram) -> PythonRenderer:
        return self.renderer(program)

    def tensor_scalars(self, compiled: Compiled) -> tuple[str, ...]:
        """Scalars the kernels take as given, Tensor or number (others arrive as numbers)."""
        return ()

    def variant_items(self, compiled: Compiled) -> tuple[FlagSpace, list[list]]:
        """Each variant's function body as items (Block and leaves of lines), in variant order."""
        space = FlagSpace.of([v.flags for v in compiled.variants])
        return space, [self.renderer_for(compiled, v.ops).function_items() for v in compiled.variants]

    def render(self, compiled: Compiled) -> str:
        sig = kernel_signature(compiled)
        flags = [h.name for h in compiled.spec.flags]
        # the lists, the flags and the scalars, each group on as few lines as it fits
        groups = [[*(f"{plural(t)}: {self.list_annotation if t not in sig.lazy else 'list[Tensor | None]'}"
                     for t in sig.tensors), *(f"{counter_list(c)}: list[Tensor]" for c in sig.counters)],
                  ["*", *(f"{f}: bool" for f in flags)],
                  [f"{s}: {_annotation(compiled.spec, s)}" for s in sig.scalars]]
        signature = [line for items in groups if items for line in wrap(items, "", "", ",", width=96)]
        space, variants = self.variant_items(compiled)
        body = merged_lines(merge(space, variants), space.everything, space)
        code_lines = [line for line in body if not line.lstrip().startswith("#")]
        record = kernel_record(compiled, self.multi_tensor, self.tensor_scalars(compiled))
        record["dispatch"] = False  # KERNEL.step is the function itself (no VARIANTS)
        fixed = [h.name for h in compiled.spec.flags if h.fixed]
        return environment().get_template(f"{self.template or self.name}/kernels.py.j2").render(
            header=header(compiled), name=compiled.spec.name, summary=self.summary, body=body,
            function=record["step"], signature=signature, record=record, flags=flags, fixed=fixed,
            uses_math=any("math." in line for line in body),
            uses_torch=any(re.search(r"(?<![\w.])torch\.", line) for line in code_lines),
            intrinsics=sorted(name for name in INTRINSICS if any(f"{name}(" in line for line in body)),
            scalar_functions=sorted(name for name in TENSOR_SCALAR_FUNCTIONS
                                    if any(re.search(rf"(?<![\w.]){name}\(", line) for line in code_lines)),
        )
