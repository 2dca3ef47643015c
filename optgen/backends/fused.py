"""What the fused backends (C for CPU, Triton for CUDA) share: one kernel per optimizer, built
from the flag variants' specialised :class:`~optgen.ir.nodes.Program` merged into one
(optgen.passes.merge_variants.merged_program: flags become host conditions, like
``weight_decay != 0``), not from the op program the Python backends print; and a sentence
instead of a module for a spec they cannot express as one elementwise pass.
"""
from __future__ import annotations

from optgen.backends.base import Backend, environment, header, kernel_record, kernel_signature, module_name
from optgen.backends.printer import Unsupported
from optgen.passes import Compiled
from optgen.passes.merge_variants import merged_program


class FusedBackend(Backend):
    """generated/<spec>_<name>.py from templates/<name>/kernels.py.j2, one kernel per optimizer.

    A subclass names its ``builder`` (``builder(program, signature).build(name, key, doc)``
    returns what the template prints for the merged program, or raises :class:`Unsupported`) and
    how the kernel is named."""

    builder: type
    #: whether the kernels read Tensor hyperparameters and GradScaler's state on the device
    #: (KernelModule.tensor_scalars / grad_scaler)
    device_scalars = False
    #: the generated module's ``KernelModule.unusable`` (a Python expression), if it has one
    unusable_expression: str | None = None
    #: the Python expression of the module's ``bind`` (KernelModule.bind), if it has one
    bind_expression: str | None = None

    def kernel_name(self, base: str) -> str:
        """The kernel's name for ``<spec>_<variant>``."""
        return base

    def kernel(self, compiled: Compiled, **options):
        """The optimizer's one kernel: every flag variant merged, the flags its host conditions
        (``options``: the builder's keyword arguments)."""
        spec = compiled.spec
        if spec.algorithm:
            raise Unsupported(f"{spec.name}'s step is an intrinsic ({spec.algorithm}), not an elementwise rule")
        if spec.sparse_gradients:
            raise Unsupported("sparse gradients: the update runs on the rows a gradient touches, not on whole tensors")
        try:
            program = merged_program(compiled)
        except ValueError as e:
            raise Unsupported(f"the flag variants cannot share one kernel: {e}") from None
        flags = ", ".join(h.name for h in spec.flags)
        doc = f"{spec.name} step" + (f", every combination of {flags}" if flags else "")
        return self.builder(program, kernel_signature(compiled), **options).build(
            self.kernel_name(module_name(spec.name)), "()", doc)

    def unsupported(self, compiled: Compiled) -> str | None:
        """Why this spec has no fused kernel (None when it has one)."""
        try:
            self.kernel(compiled)
        except Unsupported as e:
            return str(e)
        return None

    def render(self, compiled: Compiled) -> str:
        record = kernel_record(compiled, multi_tensor=True,
                               tensor_scalars=kernel_signature(compiled).scalars if self.device_scalars else (),
                               grad_scaler=self.device_scalars, counters_on_device=self.device_scalars,
                               unusable=self.unusable_expression, bind=self.bind_expression)
        record.update(step="LAUNCH", dispatch=False)  # KERNEL.step is the module's one launcher
        return environment().get_template(f"{self.name}/kernels.py.j2").render(
            header=header(compiled), name=compiled.spec.name, kernel=self.kernel(compiled), record=record,
            flag_list=", ".join(h.name for h in compiled.spec.flags) or "none",
        )
