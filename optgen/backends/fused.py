"""What the fused backends (C for CPU, Triton for CUDA) share: one kernel per flag variant, built
from the specialised :class:`~optgen.ir.nodes.Program` (not the op program the Python backends
print), and a sentence instead of a module for a spec they cannot express as one elementwise pass.
"""
from __future__ import annotations

from optgen.backends.base import Backend, environment, header, kernel_record, kernel_signature, module_name
from optgen.backends.printer import Unsupported
from optgen.passes import Compiled


class FusedBackend(Backend):
    """generated/<spec>_<name>.py from templates/<name>/kernels.py.j2, one kernel per variant.

    A subclass names its ``builder`` (``builder(program, signature).build(name, key, doc)``
    returns what the template prints for one variant, or raises :class:`Unsupported`) and how a
    variant's kernel is named."""

    builder: type
    #: whether the kernels read Tensor hyperparameters and GradScaler's state on the device
    #: (KernelModule.tensor_scalars / grad_scaler)
    device_scalars = False
    #: the generated module's ``KernelModule.unusable`` (a Python expression), if it has one
    unusable_expression: str | None = None

    def kernel_name(self, base: str) -> str:
        """The kernel's name for ``<spec>_<variant>``."""
        return base

    def kernels(self, compiled: Compiled) -> list:
        spec = compiled.spec
        if spec.algorithm:
            raise Unsupported(f"{spec.name}'s step is an intrinsic ({spec.algorithm}), not an elementwise rule")
        if spec.sparse_gradients:
            raise Unsupported("sparse gradients: the update runs on the rows a gradient touches, not on whole tensors")
        sig = kernel_signature(compiled)
        out = []
        for v in compiled.variants:
            flags = ", ".join(f"{k}={val}" for k, val in v.flags) or "no flags"
            name = self.kernel_name(f"{module_name(spec.name)}_{v.program.variant_name}")
            out.append(self.builder(v.program, sig).build(name, repr(tuple(val for _, val in v.flags)),
                                                          f"{spec.name} step with {flags}"))
        return out

    def unsupported(self, compiled: Compiled) -> str | None:
        """Why this spec has no fused kernel (None when it has one)."""
        try:
            self.kernels(compiled)
        except Unsupported as e:
            return str(e)
        return None

    def render(self, compiled: Compiled) -> str:
        return environment().get_template(f"{self.name}/kernels.py.j2").render(
            header=header(compiled), name=compiled.spec.name, kernels=self.kernels(compiled),
            record=kernel_record(compiled, multi_tensor=True,
                                 tensor_scalars=kernel_signature(compiled).scalars if self.device_scalars else (),
                                 grad_scaler=self.device_scalars, counters_on_device=self.device_scalars,
                                 unusable=self.unusable_expression),
            flag_list=", ".join(h.name for h in compiled.spec.flags) or "none",
        )
