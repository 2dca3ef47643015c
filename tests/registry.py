"""The one table that drives the numeric tests against torch.optim.

Each entry is (optimizer name, constructor kwargs); every entry runs for every implementation and
dtype below.  STEPS = 25: enough for bias corrections to move far from their first-step values
(beta2 ** 25 is still 0.975, but beta1 ** 25 = 0.07) and for momentum and amsgrad's running max to
matter, while keeping the whole table under a few seconds.
"""
import inspect
from typing import Any

import torch

STEPS = 25

CASES: list[tuple[str, dict[str, Any]]] = [
    ("SGD", {}),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.05, maximize=True)),
    ("Adam", {}),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("Adam", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, maximize=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True)),
    ("AdamW", {}),
    ("AdamW", dict(lr=0.01, weight_decay=0.3, amsgrad=True, maximize=True)),
    ("Adagrad", {}),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1, eps=1e-8)),
    ("Adagrad", dict(maximize=True)),
    ("Adadelta", {}),
    ("Adadelta", dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.1)),
    ("Adadelta", dict(weight_decay=0.05, maximize=True)),
    ("Adamax", {}),
    ("Adamax", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)),
    ("Adamax", dict(lr=0.01, eps=1e-6, maximize=True)),
    # t0=5 and t0=10: averaging (mu < 1) starts within the 25 steps; by default it never does
    ("ASGD", {}),
    ("ASGD", dict(lr=0.05, lambd=1e-3, alpha=0.6, t0=5, weight_decay=0.1)),
    ("ASGD", dict(lr=0.02, t0=10, maximize=True)),
    ("NAdam", {}),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, momentum_decay=0.01)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ("NAdam", dict(betas=(0.8, 0.99), eps=1e-6, maximize=True)),
    # RAdam takes the unrectified branch for its first steps (5 with the default betas)
    ("RAdam", {}),
    ("RAdam", dict(lr=0.01, weight_decay=0.1)),
    ("RAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ("RAdam", dict(betas=(0.8, 0.99), eps=1e-6)),
    ("RMSprop", {}),
    ("RMSprop", dict(momentum=0.9, weight_decay=0.1)),
    ("RMSprop", dict(alpha=0.9, centered=True, maximize=True)),
    ("RMSprop", dict(momentum=0.5, centered=True, eps=1e-6)),
    ("Rprop", {}),
    ("Rprop", dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-4, 0.1))),
    ("Rprop", dict(maximize=True)),
]

IMPLEMENTATIONS = ("forloop", "foreach")

# Declared once: float64 must agree to rounding; float32 to a few ulps of accumulated rounding.
TOLERANCES: dict[torch.dtype, dict[str, Any]] = {torch.float64: dict(rtol=1e-12, atol=1e-14),
                                                 torch.float32: dict(rtol=2e-6, atol=1e-7)}


def case_id(case):
    name, kwargs = case
    return name + ("-" + "-".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else "")


#: constructor keywords optgen adds to torch's signatures (Note [Low-precision state] in optgen/spec/load.py)
OPTGEN_ONLY_KEYWORDS = ("state_dtype", "step_in_backward")


def assert_signature_is_torchs(ours: type, theirs: type) -> None:
    """``ours.__init__`` takes torch's parameters, in torch's order, kinds and defaults, and then
    optgen's own options: last, keyword-only, defaulting to torch's behaviour."""
    mine = [(p.name, p.kind, p.default) for p in inspect.signature(ours).parameters.values()]
    own = [x for x in mine if x[0] in OPTGEN_ONLY_KEYWORDS]
    assert own == [("state_dtype", inspect.Parameter.KEYWORD_ONLY, None),
                   ("step_in_backward", inspect.Parameter.KEYWORD_ONLY, False)]
    torchs = inspect.signature(theirs).parameters.values()
    assert mine[:-len(own)] == [(p.name, p.kind, p.default) for p in torchs]
