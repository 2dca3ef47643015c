"""Warnings said once per process: a step that falls back says why on its first step, not on
every step (the modules that choose an implementation share this, so it imports nothing of theirs)."""
from __future__ import annotations

import warnings

_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=4)
