"""One hyperparameter of a param group, by its spec name: the accessor optgen's schedulers drive.

Note [Hyperparameters by name]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A spec names every numeric hyperparameter, the items of a tuple included: Adam's ``betas`` has
``names = ["beta1", "beta2"]`` (specs/optimizers/adam.toml).  A generated optimizer class keeps
that naming in ``_scalars`` (name → group key and tuple index, or None), which is also how its
kernels read the group.  :func:`resolve` turns a name into a :class:`Hyperparameter`, whose
``get`` / ``set`` are the only way a scheduler reads and writes what it drives:

- ``get``: ``group[key]``, or ``group[key][index]`` for a tuple item;
- ``set``: a Tensor value in the group is filled in place (its identity — held by the user, a
  captured graph or a fused kernel — is kept, as torch's schedulers keep a Tensor ``lr``);
  otherwise a plain key is replaced, and a tuple item by a new tuple with that item replaced
  (``group["betas"] = (0.95, 0.999)``): tuples are never mutated.

Which names an optimizer has (:func:`schedulable`): a generated optimizer's ``_scalars`` whose
default is a number or a Tensor (Muon's ``adjust_lr_fn`` is not), and ``lr`` where its groups have
one (Rprop's is not a kernel argument); a ``torch.optim`` optimizer takes the table of the optgen
optimizer of the same name (``torch.optim.Adam`` has ``beta1``); any other optimizer its top-level
numeric defaults.  ``"lr"`` always reads ``group["lr"]`` directly, so torch's behaviour (and its
KeyError on an optimizer without one) is untouched.

A scheduler keeps the starting value as ``group["initial_<name>"]`` (``initial_lr`` for ``lr``,
as torch does; ``initial_weight_decay``, ``initial_beta1``).  :class:`DrivenGroup` shows a group
to the scheduler code written for ``lr`` (torch's, and the generated ``get_lr`` bodies) with the
driven value under ``"lr"`` and every ``"<x>_lr"`` key as ``"<x>_<name>"``.
"""
from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class Hyperparameter:
    """A hyperparameter of a param group: ``group[key]``, or item ``index`` of that tuple."""

    name: str
    key: str
    index: int | None = None

    @property
    def initial_key(self) -> str:
        """Where a scheduler keeps the value it started from (torch's ``initial_lr`` for lr)."""
        return f"initial_{self.name}"

    def get(self, group: dict) -> Any:
        value = group[self.key]
        return value if self.index is None else value[self.index]

    def set(self, group: dict, value: Any) -> None:
        current = self.get(group)
        if isinstance(current, Tensor):  # filled in place: its identity is kept
            current.fill_(value.squeeze() if isinstance(value, Tensor) and value.dim() != 0 else value)
        elif self.index is None:
            group[self.key] = value
        else:
            items = group[self.key]
            group[self.key] = (*items[:self.index], value, *items[self.index + 1:])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, Tensor)) and not isinstance(value, bool)


def _table(optimizer) -> dict[str, tuple[str, int | None]] | None:
    """The spec's name table of this optimizer's class (or of optgen's class of the same name)."""
    table = getattr(type(optimizer), "_scalars", None)
    if table is None and type(optimizer).__module__.startswith("torch.optim"):
        from optgen import _generated

        table = getattr(_generated.load().OPTIMIZERS.get(type(optimizer).__name__), "_scalars", None)
    return table


def _lookup(optimizer, table: dict, name: str) -> Hyperparameter | None:
    """``name`` of the table, if the optimizer's default for it is a number (or a Tensor)."""
    if name not in table:
        return None
    key, index = table[name]
    defaults = optimizer.defaults
    if key not in defaults:
        return None
    value = defaults[key]
    if index is not None:
        if not isinstance(value, (tuple, list)) or index >= len(value):
            return None
        value = value[index]
    return Hyperparameter(name, key, index) if _is_number(value) or value is _required() else None


def _names(optimizer) -> dict[str, tuple[str, int | None]]:
    table = _table(optimizer)
    if table is None:  # not a spec: its top-level numbers
        table = {key: (key, None) for key, value in optimizer.defaults.items() if _is_number(value)}
    return {"lr": ("lr", None), **table}


def schedulable(optimizer) -> dict[str, Hyperparameter]:
    """Every numeric hyperparameter of ``optimizer`` by name (Note [Hyperparameters by name])."""
    table = _names(optimizer)
    found = {name: _lookup(optimizer, table, name) for name in table}
    return {name: h for name, h in found.items() if h is not None}


def _required() -> object:
    from torch.optim.optimizer import required

    return required


def resolve(optimizer, name: str) -> Hyperparameter:
    """The hyperparameter ``name`` of ``optimizer``; a ValueError lists the names it has."""
    if not isinstance(name, str):
        raise TypeError(f"hyperparameter must be a str naming one of the optimizer's hyperparameters, "
                        f"not {type(name).__name__}")
    if name == "lr":
        return Hyperparameter("lr", "lr")
    found = _lookup(optimizer, _names(optimizer), name)
    if found is None:
        raise ValueError(f"{type(optimizer).__name__} has no hyperparameter {name!r} to schedule; "
                         f"its schedulable hyperparameters are: {', '.join(schedulable(optimizer))}")
    return found


class DrivenGroup(MutableMapping):
    """A param group as a scheduler driving ``hyperparameter`` sees it (Note [Hyperparameters by
    name]): ``"lr"`` is the driven value, ``"<x>_lr"`` is ``"<x>_<name>"`` (``initial_lr``,
    OneCycleLR's ``max_lr`` / ``min_lr``, SWALR's ``swa_lr``), any other key the group's own."""

    __slots__ = ("group", "hyperparameter")

    def __init__(self, group: dict, hyperparameter: Hyperparameter):
        self.group = group
        self.hyperparameter = hyperparameter

    def _key(self, key: str) -> str:
        return key[:-2] + self.hyperparameter.name if key.endswith("_lr") else key

    def __getitem__(self, key: str) -> Any:
        if key == "lr":
            return self.hyperparameter.get(self.group)
        return self.group[self._key(key)]

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "lr":
            self.hyperparameter.set(self.group, value)
        else:
            self.group[self._key(key)] = value

    def __delitem__(self, key: str) -> None:
        if key == "lr":
            raise KeyError("the driven hyperparameter cannot be deleted")
        del self.group[self._key(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.group)

    def __len__(self) -> int:
        return len(self.group)


def driven_groups(optimizer, name: str) -> list:
    """The optimizer's param groups as a scheduler driving ``name`` sees them: the groups
    themselves for ``lr`` (torch's code path, unchanged), :class:`DrivenGroup` views otherwise."""
    if name == "lr":
        return optimizer.param_groups
    hyperparameter = resolve(optimizer, name)
    return [DrivenGroup(group, hyperparameter) for group in optimizer.param_groups]
