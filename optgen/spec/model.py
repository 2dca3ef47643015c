"""What a spec file says, validated and located: immutable records, no behaviour.

Each record carries the :class:`Location` of the text it came from, so every later stage can
point back at the spec when something is wrong.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

import sympy

from optgen.errors import Location

#: constructor arguments every optimizer may take that steer the runtime, not the math
RUNTIME_OPTIONS: dict[str, Any] = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}


@dataclass(frozen=True)
class Hyperparameter:
    """A constructor argument of the math: a scalar, a flag (bool) or a tuple of scalars."""

    name: str
    default: Any                 # the Python default, exactly as torch has it (0 stays int)
    loc: Location
    names: tuple[str, ...] = ()  # for tuples: the scalar names its items go by in the rule
    fixed: bool = False          # not a constructor argument; always `default` (AdamW's decoupling)
    tensor: bool = False         # may be given as a 1-element Tensor (converted to a number per step)
    choices: tuple[str, ...] = ()  # a string option (default may be None); rules compare it: x == "a"
    derive: str | None = None    # Python text computing the value when None is given (max_iter * 5 // 4)

    @property
    def is_flag(self) -> bool:
        return isinstance(self.default, bool) and not self.choices


@dataclass(frozen=True)
class Check:
    """A constructor validation: ``if when and not (ok): raise kind(message)``."""

    ok: str                      # Python text (allow-listed), e.g. "0.0 <= lr"
    message: str                 # f-string body, e.g. "Invalid learning rate: {lr}"
    kind: str                    # exception class name, e.g. "ValueError"
    when: str | None
    loc: Location
    each_param: bool = False     # run on every parameter after the param groups exist (Muon's 2-D check)
    collect: bool = False        # each_param: one error listing every failing [group, index] ({indices})
    sparse_step: bool = False    # run at a step, on a group with a sparse gradient (Adagrad's weight_decay)


@dataclass(frozen=True)
class StateVar:
    """A per-parameter state entry."""

    name: str                    # the name in the update rule
    key: str                     # the key in optimizer.state[p] / state_dict (torch's name)
    init: str                    # "zeros" | "zeros_reduced" | "full" | "scalar" | "first"
    init_value: sympy.Expr | None  # fill value for "full" / "scalar"; the value for "first"
    when: sympy.Basic            # condition (flags, hyperparameters) under which it exists
    loc: Location
    host: bool = False           # a counter kept as a Python number in the state (SparseAdam's step)
    #: may be stored in a lower precision than the parameter (``state_dtype=torch.bfloat16``):
    #: Note [Low-precision state] in optgen/spec/load.py says which states may, by default
    low_precision: bool = False
    #: never negative (second moments): ``state_dtype="int8"`` keeps it with the unsigned code map,
    #: twice the codes over [0, 1] (Note [Blockwise 8-bit state] in optgen/runtime/quantized_state.py)
    nonnegative: bool = False

    @property
    def is_scalar(self) -> bool:
        return self.init == "scalar"

    @property
    def reduced_dim(self) -> int:
        """The dimension a ``zeros_reduced`` state has of size 1 (Adafactor's row and column moments)."""
        if self.init != "zeros_reduced" or self.init_value is None:
            raise ValueError(f"state '{self.name}' is {self.init}, not zeros_reduced")
        return int(self.init_value)


@dataclass(frozen=True)
class TorchParity:
    """torch 2.13's wordings and quirks a spec reproduces where they are not the usual ones (its
    ``[torch_parity]`` table; rendered into the class as ``_torch_parity``)."""

    sparse_gradient_error: str | None = None   # a sparse gradient where dense ones are the rule
    dense_gradient_error: str | None = None    # a dense gradient where sparse ones are (SparseAdam)
    sparse_fused_error: str | None = None      # fused=True with a sparse gradient
    #: implementation → (the lists torch's capturable AssertionError names, whether its device
    #: list ends with "xla"); others: ("params and state_steps", implementation != "foreach")
    capturable_error: tuple[tuple[str, tuple[str, bool]], ...] = ()
    step_requires_grad_error: bool = False     # differentiable: a `step` that requires grad is an error
    foreach_differentiable: bool = False       # torch's foreach path runs under differentiable=True


@dataclass(frozen=True)
class Spec:
    """One optimizer spec file, parsed and checked for shape (not yet lowered)."""

    name: str
    path: str
    source: str                  # the file's text (its hash goes into generated headers)
    doc: str
    paper: str
    signature: tuple[str, ...]   # constructor arguments after `params`, '*' marking keyword-only
    group_keys: tuple[str, ...]  # order of keys in each param group (torch's defaults order)
    hyperparameters: dict[str, Hyperparameter]
    checks: tuple[Check, ...]
    state: dict[str, StateVar]
    rule: ast.Module             # the update rule, parsed, never executed
    rule_text: str               # ... and as written (for docstrings)
    rule_loc: Location           # where the rule's first line is in the file
    complex_params: bool         # complex parameters handled as real views
    eager_state: bool            # state created in the constructor (Adagrad) instead of lazily
    torch_name: str | None       # the torch.optim class this spec reproduces (test oracle)
    extends: str | None = None
    kernels_from: str | None = None  # a spec whose kernels this one shares (it extends it, same rule)
    kernels_from_file: str = ""      # ... that spec's file, resolved (a package shares only that one's)
    file: str = ""                   # this spec's own file, resolved
    #: "dense" | "sparse" | "dense_or_sparse" | "dense_or_gathered" (Note [Sparse gradients])
    gradients: str = "dense"
    algorithm: str | None = None    # an intrinsic step (optgen/runtime/<algorithm>.py) instead of a rule
    torch_parity: TorchParity = field(default_factory=TorchParity)
    locs: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def sparse_gradients(self) -> bool:
        """Gradients must be sparse (SparseAdam): no whole-tensor kernel applies."""
        return self.gradients == "sparse"

    @property
    def flags(self) -> list[Hyperparameter]:
        return [h for h in self.hyperparameters.values() if h.is_flag]

    def scalar_names(self) -> dict[str, str]:
        """Every name the update rule may read, with its role."""
        names: dict[str, str] = {"param": "tensor", "grad": "tensor"}
        for h in self.hyperparameters.values():
            if h.is_flag:
                names[h.name] = "flag"
            elif h.names:
                names.update({n: "hyperparameter" for n in h.names})
            else:
                names[h.name] = "hyperparameter"
        for s in self.state.values():
            names[s.name] = "state"
        return names
