"""``optgen show --dump-ir PASS``: a spec's IR after one pass of the pipeline.  It prints op
programs with the for-loop backend's renderer, so it lives above the backends, not among the passes."""
from __future__ import annotations

from optgen.backends.forloop import describe_ops
from optgen.errors import SpecError
from optgen.ir.lower import lower
from optgen.ir.validate import validate
from optgen.passes import PASS_NAMES, PROGRAM_PASSES, compile_spec, merge_variants
from optgen.passes.preserve_values import preserve_values
from optgen.passes.reuse_buffers import reuse_buffers
from optgen.passes.select_ops import select_ops
from optgen.passes.specialize import specialize
from optgen.spec.model import Spec


def dump(spec: Spec, flags, after: str) -> str:
    """The IR of one variant after the pass named ``after`` (for `optgen show --dump-ir`); after
    merge_variants, every variant's, merged."""
    if after not in PASS_NAMES:
        raise SpecError(None, f"unknown pass '{after}'; passes: {', '.join(PASS_NAMES)}")
    if after == "merge_variants":
        return merge_variants.describe(compile_spec(spec))
    program = validate(lower(spec))
    if after == "lower":
        return program.describe()
    p = specialize(program, flags)
    for name, run in (("specialize", lambda x: x), *PROGRAM_PASSES):
        p = run(p)
        if name == after:
            return p.describe()
    ops = select_ops(p)
    if after in ("reuse_buffers", "preserve_values"):
        ops = reuse_buffers(ops)
    if after == "preserve_values":
        ops = preserve_values(ops)
    return describe_ops(ops)
