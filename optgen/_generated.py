"""Finding the generated package.

generated/ sits at the repository root (it is build output, not hand-written source), and is
installed as ``optgen.generated`` (pyproject's package-dir).  In a checkout or an editable install
the root folder is used directly, so `optgen build` output is live without reinstalling.

Note [Loading the generated package from several threads]
The first use of ``optgen.Adam`` may come from several threads at once (data loaders, a thread
per model).  The package is therefore imported by the import system itself — a finder on
``sys.meta_path`` that names the in-tree folder — rather than by executing a module we put in
sys.modules ourselves: ``importlib.import_module`` holds the module's import lock while it runs,
and a second thread asking for it waits for the whole module instead of getting the half-run one
(``module 'optgen.generated' has no attribute 'OPTIMIZERS'``).  The import system also detects
the deadlocks a lock of our own around the import could cause.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

NAME = "optgen.generated"
IN_TREE = Path(__file__).resolve().parent.parent / "generated" / "__init__.py"


class _InTreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``optgen.generated`` in the checkout's generated/ folder (submodules are then found
    through the package's ``__path__`` as usual)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != NAME or not IN_TREE.is_file():
            return None
        return importlib.util.spec_from_file_location(NAME, IN_TREE, submodule_search_locations=[str(IN_TREE.parent)])


_FINDER = _InTreeFinder()
_INSTALL = threading.Lock()


def install() -> None:
    """Puts the finder first on ``sys.meta_path`` (``import optgen`` does), so that ``import
    optgen.generated`` finds this checkout's generated/ even where another install of optgen
    maps the name elsewhere (a git worktree run with the checkout's venv: its editable-install
    finder names the other checkout's folder)."""
    if IN_TREE.is_file() and _FINDER not in sys.meta_path:
        with _INSTALL:
            if _FINDER not in sys.meta_path:
                sys.meta_path.insert(0, _FINDER)


def load() -> ModuleType:
    module = sys.modules.get(NAME)
    if module is not None and not getattr(module.__spec__, "_initializing", False):
        return module  # the fast path: fully imported
    install()
    # waits for a thread that is importing it (Note [Loading the generated package from several threads])
    return importlib.import_module(NAME)
