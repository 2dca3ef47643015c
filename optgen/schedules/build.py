"""The scheduler and weight-averaging outputs of `optgen build` (called from optgen/build.py).

- specs/schedulers/*.toml → generated/lr_scheduler.py (one class per spec, optgen.schedules.render);
- specs/averaging/*.toml  → generated/<name>_forloop.py, _foreach.py, _triton.py and _c.py: the
  averaging update of optgen.swa_utils, compiled by the optimizer pipeline and rendered by its
  kernel backends.

Everything is rendered to memory; optgen/build.py's FileManager writes it with the rest.
"""
from __future__ import annotations

from pathlib import Path

from optgen.backends.base import module_name
from optgen.backends.c import BACKEND as C
from optgen.backends.foreach import BACKEND as FOREACH
from optgen.backends.forloop import BACKEND as FORLOOP
from optgen.backends.triton import BACKEND as TRITON
from optgen.errors import SpecError
from optgen.passes import compile_spec
from optgen.resources import specs_dir
from optgen.schedules.load import load_schedule
from optgen.schedules.model import ScheduleSpec
from optgen.schedules.render import render_module
from optgen.spec.load import load_spec

AVERAGING_BACKENDS = (FORLOOP, FOREACH, TRITON, C)


def schedule_paths(root: Path | None = None) -> list[Path]:
    return sorted((root or specs_dir()).joinpath("schedulers").glob("*.toml"))


def averaging_paths(root: Path | None = None) -> list[Path]:
    return sorted((root or specs_dir()).joinpath("averaging").glob("*.toml"))


def load_schedules(root: Path | None = None) -> list[ScheduleSpec]:
    specs = [load_schedule(p) for p in schedule_paths(root)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SpecError(None, f"two schedule specs define the same scheduler name: {sorted(names)}")
    return specs


def render_schedules(root: Path | None = None) -> dict[str, str]:
    """Relative path under generated/ → file text, for every schedule and averaging spec."""
    files = {}
    specs = load_schedules(root)
    if specs:
        files["lr_scheduler.py"] = render_module(specs)
    for path in averaging_paths(root):
        compiled = compile_spec(load_spec(path))
        for backend in AVERAGING_BACKENDS:
            files[f"{module_name(compiled.spec.name, backend.name)}.py"] = backend.render(compiled)
    return files
