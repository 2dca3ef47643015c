"""`optgen build`: every spec through the pipeline and every backend, written through one door.

Note [One door to disk]
~~~~~~~~~~~~~~~~~~~~~~~
:class:`FileManager` is the only code that writes generated files.  A build first renders every
output to memory; only when every spec compiled does it touch the disk, writing just the files
whose text changed and deleting generated files no spec produces any more.  A failed build
therefore leaves generated/ byte-for-byte unchanged, and ``--check`` is the same render compared
against the disk instead of written to it.  Output is deterministic (no timestamps), so a rebuild
is byte-identical.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from optgen.backends.base import environment, module_name
from optgen.backends.c import BACKEND as C
from optgen.backends.differentiable import BACKEND as DIFFERENTIABLE
from optgen.backends.foreach import BACKEND as FOREACH
from optgen.backends.forloop import BACKEND as FORLOOP
from optgen.backends.optimizer_class import OptimizerClassBackend
from optgen.backends.triton import BACKEND as TRITON
from optgen.errors import SpecError
from optgen.passes import Compiled, compile_spec
from optgen.schedules.build import render_schedules
from optgen.spec.load import load_spec

ROOT = Path(__file__).resolve().parent.parent
KERNEL_BACKENDS = (FORLOOP, FOREACH, DIFFERENTIABLE, TRITON, C)


def spec_paths(root: Path = ROOT) -> list[Path]:
    return sorted((root / "specs" / "optimizers").glob("*.toml"))


def compile_all(root: Path = ROOT) -> list[Compiled]:
    """Every spec, compiled; the first error stops the build (SpecError, with file:line:col)."""
    return [compile_spec(load_spec(p)) for p in spec_paths(root)]


def kernel_backends(compiled: Compiled) -> tuple:
    """The kernel backends that generate code for a spec: one may decline a spec it cannot express
    (the Triton backend declines reductions and intrinsics; `optgen show` prints why)."""
    return tuple(b for b in KERNEL_BACKENDS if getattr(b, "unsupported", lambda c: None)(compiled) is None)


def render_all(compiled: list[Compiled]) -> dict[str, str]:
    """Relative path under generated/ → file text."""
    files: dict[str, str] = {}
    for c in compiled:
        backends = kernel_backends(c)
        class_backend = OptimizerClassBackend(tuple(b.name for b in backends),
                                              lazy=tuple(b.name for b in backends if getattr(b, "lazy", False)))
        files[f"{module_name(c.spec.name)}.py"] = class_backend.render(c)
        if c.spec.algorithm or c.spec.kernels_from:  # an intrinsic step, or its parent's kernels
            continue
        for backend in backends:
            files[f"{module_name(c.spec.name, backend.name)}.py"] = backend.render(c)
    names = [c.spec.name for c in compiled]
    if len(set(n.lower() for n in names)) != len(names):
        raise SpecError(None, f"two specs define the same optimizer name: {sorted(names)}")
    files["__init__.py"] = environment().get_template("package/__init__.py.j2").render(
        count=len(compiled), optimizers=[(module_name(c.spec.name), c.spec.name) for c in compiled])
    # Schedulers (specs/schedulers/) and the weight-averaging kernels (specs/averaging/).
    files.update(render_schedules())
    return files


@dataclass
class BuildResult:
    written: list[str]
    removed: list[str]
    unchanged: list[str]


class FileManager:
    """The one writer of generated/ (see Note [One door to disk])."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def existing(self) -> set[str]:
        if not self.out_dir.is_dir():
            return set()
        return {p.name for p in self.out_dir.glob("*.py")}

    def stale(self, files: dict[str, str]) -> list[str]:
        """Files that differ from what a build would write (missing, changed or orphaned)."""
        out = [name for name, text in files.items()
               if not (self.out_dir / name).is_file() or (self.out_dir / name).read_text() != text]
        return sorted(out + [name for name in self.existing() - set(files)])

    def write(self, files: dict[str, str]) -> BuildResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        result = BuildResult([], [], [])
        for name, text in sorted(files.items()):
            path = self.out_dir / name
            if path.is_file() and path.read_text() == text:
                result.unchanged.append(name)
                continue
            # Write-then-rename: a reader never sees half a file.
            fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
            result.written.append(name)
        for name in sorted(self.existing() - set(files)):
            (self.out_dir / name).unlink()
            result.removed.append(name)
        return result


def build(root: Path = ROOT, check: bool = False) -> BuildResult | list[str]:
    """Compile and render everything in memory, then write (or, with check, list stale files)."""
    files = render_all(compile_all(root))
    manager = FileManager(root / "generated")
    return manager.stale(files) if check else manager.write(files)
