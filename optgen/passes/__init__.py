"""The compiler pipeline: one function listing the passes in order.

    spec ─lower─▶ Program ─validate─▶ ─specialize(flags)─▶ ─cse─▶ ─name_reduction_arguments─▶ ─hoist_scalars─▶
         ─select_ops─▶ OpProgram ─reuse_buffers─▶ ─preserve_values─▶ ─merge_variants─▶ backends

Every flag combination is compiled on its own, through every pass; merge_variants then lays the
variants over one another so a backend prints one function with ``if amsgrad:`` branches
(optgen/passes/merge_variants.py documents its API).  ``optgen show NAME --dump-ir PASS`` prints
the program after any of these (one variant, ``--flags``; all of them for merge_variants).
"""
from __future__ import annotations

from dataclasses import dataclass

from optgen.errors import internal_errors
from optgen.ir.lower import lower
from optgen.ir.nodes import Program
from optgen.ir.ops import OpProgram
from optgen.ir.validate import validate
from optgen.passes.cse import cse
from optgen.passes.hoist_scalars import hoist_scalars
from optgen.passes.name_reduction_arguments import name_reduction_arguments
from optgen.passes.preserve_values import preserve_values
from optgen.passes.reuse_buffers import reuse_buffers
from optgen.passes.select_ops import select_ops
from optgen.passes.specialize import flag_combinations, specialize
from optgen.spec.model import Spec

#: the passes after flag specialisation, in order (name, Program → Program)
PROGRAM_PASSES = (("cse", cse), ("name_reduction_arguments", name_reduction_arguments),
                  ("hoist_scalars", hoist_scalars))
PASS_NAMES = ("lower", "specialize", *(n for n, _ in PROGRAM_PASSES), "select_ops", "reuse_buffers",
              "preserve_values", "merge_variants")


@dataclass(frozen=True)
class Variant:
    """One flag combination of a spec, through every pass."""

    flags: tuple[tuple[str, bool], ...]
    program: Program       # after the program passes (what the interpreter and Triton/C read)
    ops: OpProgram         # after op selection, buffer reuse and value preservation (what the
                           # Python backends print)


@dataclass(frozen=True)
class Compiled:
    spec: Spec
    program: Program       # lowered and validated, flags still symbolic
    variants: tuple[Variant, ...]

    def variant(self, flags: dict[str, bool]) -> Variant:
        for v in self.variants:
            if all(flags.get(k, False) == val for k, val in v.flags):
                return v
        raise KeyError(flags)


def compile_variant(program: Program, flags) -> Variant:
    p = specialize(program, flags)
    for _, run in PROGRAM_PASSES:
        p = run(p)
    return Variant(tuple(flags), p, preserve_values(reuse_buffers(select_ops(p))))


def compile_spec(spec: Spec) -> Compiled:
    # A bug in a pass is reported with the spec file and the statement being compiled, as an
    # internal compiler error, never as a bare traceback (the pass after validate is named from
    # the traceback: optgen/passes/<pass>.py).
    with internal_errors("lower", spec):
        program = lower(spec)
    with internal_errors("validate", spec):
        program = validate(program)
    with internal_errors(None, spec):
        return Compiled(spec, program, tuple(compile_variant(program, f) for f in flag_combinations(program)))
