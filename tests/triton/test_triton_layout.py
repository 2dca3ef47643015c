"""The layout of the generated Triton kernels (Note [Triton kernel layout]): the block body is
printed once, unrolled over whole blocks and the partial last block, and guards are printed
over one constexpr per flag or hyperparameter comparison."""
import inspect

import pytest

pytest.importorskip("triton", reason="the Triton backend's tests need triton (pip install triton)")


def check_adam_kernel(source: str, guards) -> None:
    assert source.count("tl.load(param_ptr + offsets") == 1  # the body, once
    assert "for MASKED in tl.static_range(2):" in source
    assert set(guards) == {"AMSGRAD", "MAXIMIZE", "DECOUPLED_WEIGHT_DECAY", "WEIGHT_DECAY_NE_0"}
    assert "if not DECOUPLED_WEIGHT_DECAY and WEIGHT_DECAY_NE_0:" in source


def test_adam_kernel_body_once_and_guards_over_atoms():
    from optgen.generated import adam_triton

    check_adam_kernel(inspect.getsource(adam_triton), adam_triton.LAUNCH.guards)
