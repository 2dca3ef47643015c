"""Where optgen's own inputs live: the built-in specs and the Jinja templates.

In a source checkout (or an editable install) they are the repository's ``specs/`` and
``templates/`` folders.  A regular ``pip install`` ships them as package data inside the
package (``optgen/specs``, ``optgen/templates``; pyproject's package-dir maps them), so the
compiler works from site-packages without the repository — and never writes there: building the
built-in optimizers needs a checkout, a user's specs are built into a folder of their choosing
(``optgen build DIR --out PKG``).
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent


def _first_dir(name: str) -> Path:
    # The installed copy first: in site-packages, CHECKOUT is site-packages itself, whose
    # `templates/` (if any) belongs to some other distribution.
    for candidate in (PACKAGE / name, CHECKOUT / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"optgen's {name}/ folder is missing from {PACKAGE} and {CHECKOUT}: "
                            "reinstall optgen")


def templates_dir() -> Path:
    return _first_dir("templates")


def specs_dir() -> Path:
    """The built-in specs: optimizers/, schedulers/, averaging/."""
    return _first_dir("specs")


def builtin_optimizer_dir() -> Path:
    return specs_dir() / "optimizers"


def is_checkout() -> bool:
    """Whether optgen runs from a source checkout, whose generated/ `optgen build` may rewrite."""
    return (CHECKOUT / "specs").is_dir() and (CHECKOUT / "generated").is_dir() \
        and (CHECKOUT / "pyproject.toml").is_file() and not (PACKAGE / "specs").is_dir()
