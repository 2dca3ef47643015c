"""The contract between generated kernel modules and the runtime (optgen/runtime/kernels.py):
every kernel module ends with one KernelModule record, consistent with its optimizer class."""
import importlib

import pytest

import optgen
from optgen.runtime.generated import GeneratedOptimizer
from optgen.runtime.kernels import KernelModule

#: what each backend's modules say about themselves, written from what each backend is (not read
#: from the code): (multi_tensor, grad_scaler, counters_on_device)
EXPECTED = {"forloop": (False, False, False), "differentiable": (False, False, False),
            "foreach": (True, False, False), "c": (True, False, False), "triton": (True, True, True)}

CLASSES = {name: cls for name, cls in optgen.OPTIMIZERS.items() if issubclass(cls, GeneratedOptimizer)}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_kernel_module_ends_with_a_record_matching_its_class(name):
    cls = CLASSES[name]
    package = cls.__module__.rpartition(".")[0]
    for implementation, module in cls._kernels.items():
        if isinstance(module, str):  # imported on first use (triton)
            pytest.importorskip("triton")
            module = importlib.import_module(f"{package}.{module}")
        record = module.KERNEL
        assert isinstance(record, KernelModule), (name, implementation)
        assert record.flags == cls._flags, (name, implementation)
        assert (record.multi_tensor, record.grad_scaler, record.counters_on_device) == EXPECTED[implementation]
        assert record.tensor_scalars <= set(cls._scalars), (name, implementation)
        assert (record.unusable is not None) == (implementation == "c"), (name, implementation)
