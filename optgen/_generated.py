"""Finding the generated package.

generated/ sits at the repository root (it is build output, not hand-written source), and is
installed as ``optgen.generated`` (pyproject's package-dir).  In a checkout or an editable install
the root folder is used directly, so `optgen build` output is live without reinstalling.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

NAME = "optgen.generated"


def load() -> ModuleType:
    if NAME in sys.modules:
        return sys.modules[NAME]
    in_tree = Path(__file__).resolve().parent.parent / "generated" / "__init__.py"
    if in_tree.is_file():
        spec = importlib.util.spec_from_file_location(NAME, in_tree, submodule_search_locations=[str(in_tree.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[NAME] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[NAME]
            raise
        return module
    return importlib.import_module(NAME)
