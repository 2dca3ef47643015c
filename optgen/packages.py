"""Importing code optgen has just rendered, without installing it anywhere.

The build's cross-check (optgen/crosscheck.py), `optgen verify FILE`, `optgen bench FILE` and the
random-spec tests all need to run a spec's generated modules before (or without) writing them to
a package of the user's.  :func:`import_rendered` writes the rendered files into a fresh private
temporary folder and imports them as a package of a unique name, so two specs named alike (or a
user's spec named like a built-in) never meet in ``sys.modules``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
import sys
import tempfile
from pathlib import Path
from types import ModuleType

_counter = itertools.count()
#: keeps the temporary folders alive as long as the process (their modules may import lazily)
_FOLDERS: list[tempfile.TemporaryDirectory] = []


def import_rendered(files: dict[str, str], hint: str = "pkg", parent: Path | None = None) -> ModuleType:
    """The package made of ``files`` (module file name → text), imported under a fresh name, in a
    private temporary folder kept for the process — or under ``parent``, a private folder whose
    lifetime the caller owns (the fuzzer's batches, which would otherwise pile up until exit)."""
    digest = hashlib.sha256("".join(f"{k}\0{v}" for k, v in sorted(files.items())).encode()).hexdigest()[:12]
    name = f"_optgen_check_{hint.lower()}_{digest}_{next(_counter)}"
    if parent is None:
        folder = tempfile.TemporaryDirectory(prefix="optgen-check-")  # mode 0700: only this user reads it
        _FOLDERS.append(folder)
        parent = Path(folder.name)
    root = parent / name
    root.mkdir(parents=True)
    for file, text in files.items():
        (root / file).write_text(text)
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    if spec is None or spec.loader is None:  # only for a file Python has no loader for; __init__.py has one
        raise ImportError(f"cannot import {root / '__init__.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        raise
    return module
