"""Where `extends = "Name"` finds its parent spec — kept free of sympy, so `optgen build` can
hash a spec's whole extends chain (Note [Incremental builds]) without importing the compiler."""
from __future__ import annotations

from pathlib import Path

#: how many specs one chain of `extends` may pass through (optgen/build.py hashes the whole chain)
MAX_EXTENDS = 16


def find_parent(name: str, search_path: tuple[Path, ...]) -> Path | None:
    """The spec file an ``extends = "name"`` means: ``<name lower-cased>.toml`` in the first folder
    of the search path that has one (the folders being built, then the built-in specs).  Only a
    plain name is looked up, never a path, so a spec cannot make optgen read files elsewhere."""
    if not name.isidentifier():
        return None
    for folder in search_path:
        candidate = folder / f"{name.lower()}.toml"
        if candidate.is_file():
            return candidate.resolve()
    return None
