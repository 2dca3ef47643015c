"""The one error type users see from the compiler: ``path:line:col: what is wrong — how to fix it``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """A point in a spec file (1-based line and column, like compilers print)."""

    path: str
    line: int
    col: int = 1

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"

    def shifted(self, lines: int = 0, col: int | None = None) -> "Location":
        return Location(self.path, self.line + lines, self.col if col is None else col)


class SpecError(Exception):
    """A mistake in a spec (or in a template's use of it), reported with its location."""

    def __init__(self, loc: Location | None, message: str):
        self.loc = loc
        self.message = message
        super().__init__(f"{loc}: {message}" if loc else message)
