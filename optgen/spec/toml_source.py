"""Reading a TOML spec file with positions: what every spec loader (optimizers, schedules) shares.

``tomllib`` parses; :mod:`optgen.spec.toml_locations` remembers where each key and value starts;
:class:`Source` turns a key path into a :class:`~optgen.errors.Location` for error messages.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optgen.errors import Location, SpecError
from optgen.spec.toml_locations import locate

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Source:
    """One file's text and the positions of its keys."""

    path: str
    text: str
    positions: dict
    value_positions: dict

    def key_loc(self, path: tuple) -> Location:
        for n in range(len(path), 0, -1):
            if path[:n] in self.positions:
                return Location(self.path, *self.positions[path[:n]])
        return Location(self.path, 1, 1)

    def value_loc(self, path: tuple) -> Location:
        if path in self.value_positions:
            return Location(self.path, *self.value_positions[path])
        return self.key_loc(path)


def display_path(path: Path) -> str:
    """Paths in messages and generated headers: relative to the project (so a build's output does
    not depend on the directory it ran from), else to the working directory.  The built-in specs
    read as specs/... whether they come from a checkout or from an installed package's data."""
    from optgen.resources import specs_dir

    try:
        return str(Path("specs") / path.resolve().relative_to(specs_dir()))
    except (ValueError, FileNotFoundError):
        pass
    for base in (PROJECT_ROOT, Path.cwd().resolve()):
        try:
            return str(path.resolve().relative_to(base))
        except ValueError:
            continue
    return str(path)


def read(path: Path) -> tuple[dict, Source]:
    """The file's TOML data and its Source; syntax errors as SpecError at tomllib's position."""
    shown = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(None, f"{shown}: cannot read spec: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib says "... (at line L, column C)"; move the position to the front.
        message, line, col = str(e), 1, 1
        if "(at line " in message:
            message, _, where = message.rpartition(" (at line ")
            line_s, _, col_s = where.rstrip(")").partition(", column ")
            line, col = int(line_s), int(col_s or 1)
        elif "(at end of document)" in message:
            message = message.replace(" (at end of document)", "")
            line = text.count("\n") + 1
        raise SpecError(Location(shown, line, col), f"TOML syntax error: {message}") from None
    positions, value_positions = locate(text)
    return data, Source(shown, text, positions, value_positions)


def reject_unknown(table: dict, allowed: set[str], src: Source, path: tuple, what: str) -> None:
    for key in table:
        if key not in allowed:
            raise SpecError(src.key_loc(path + (key,)),
                            f"unknown key '{key}' in {what}; allowed keys: {', '.join(sorted(allowed))}")


def expect(value: Any, types: type | tuple, src: Source, path: tuple, what: str) -> Any:
    """``value`` if it has one of ``types`` (a bool is not a number unless bool is listed)."""
    listed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (bool not in listed and isinstance(value, bool)):
        names = " or ".join(t.__name__ for t in listed)
        raise SpecError(src.value_loc(path), f"{what} must be a {names}, not {type(value).__name__}")
    return value
