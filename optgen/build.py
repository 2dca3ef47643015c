"""`optgen build`: specs through the pipeline and every backend, written through one door.

Two kinds of target:

- **optgen's own package** (``optgen build`` in a source checkout): specs/optimizers/,
  specs/schedulers/ and specs/averaging/ → generated/ (installed as ``optgen.generated``);
- **a user's spec folder** (``optgen build DIR --out PKG_DIR``): every ``DIR/*.toml`` → an
  importable package PKG_DIR (its folder name is the package name) exposing each optimizer class
  at top level, needing only optgen at run time.  ``extends`` finds the folder's own specs first,
  then the built-in ones.

Note [One door to disk]
~~~~~~~~~~~~~~~~~~~~~~~
:class:`FileManager` is the only code that writes generated files.  A build first renders every
output to memory; only when every spec compiled (and, unless ``--no-verify``, every backend agreed
with the reference interpreter, optgen/crosscheck.py) does it touch the disk, writing just the
files whose text changed and deleting generated files no spec produces any more.  A failed build
therefore leaves the output byte-for-byte unchanged, and ``--check`` is the same render compared
against the disk instead of written to it.  Output is deterministic (no timestamps), so a rebuild
is byte-identical.

Note [Incremental builds]
~~~~~~~~~~~~~~~~~~~~~~~~~
Each spec's outputs depend on its own text, the files it ``extends`` and the compiler (optgen's
Python sources and templates).  :func:`input_key` hashes exactly those — reading files, parsing
TOML, never importing sympy or torch — and the manifest (``.optgen-build.json`` beside the
output, not committed) records, per spec, that key and the sha256 of each file it produced.  A
spec whose key and outputs on disk both match is not compiled again; when every spec matches the
build is over in a fraction of a second.  The manifest holds hashes only, never code: a forged
one can at worst make optgen skip rewriting files whose current content it already names.
``--check`` never trusts the manifest: it always renders everything.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

from optgen.errors import SpecError, internal_errors
from optgen.resources import CHECKOUT, PACKAGE, builtin_optimizer_dir, is_checkout, specs_dir, templates_dir

#: kept for callers that build a copy of the project (tests): the checkout's root
ROOT = CHECKOUT
MANIFEST = ".optgen-build.json"


@dataclass(frozen=True)
class Target:
    """What one build compiles and where it writes."""

    spec_files: tuple[Path, ...]
    search_path: tuple[Path, ...]   # where `extends` looks, in order
    out_dir: Path
    builtin: bool                   # optgen's own package: schedulers and weight averaging too

    @property
    def package(self) -> str:
        return "optgen.generated" if self.builtin else self.out_dir.name


def builtin_target(root: Path | None = None) -> Target:
    """optgen's own specs → generated/ (``root``: a checkout or a copy of one)."""
    optimizers = (root / "specs" / "optimizers") if root is not None else builtin_optimizer_dir()
    # installed: the package's own optgen/generated (read by --check only); a checkout: generated/
    out = root / "generated" if root is not None else \
        PACKAGE / "generated" if (PACKAGE / "generated").is_dir() else CHECKOUT / "generated"
    return Target(tuple(sorted(optimizers.glob("*.toml"))), (optimizers,), out, builtin=True)


def user_target(sources: list[Path], out: Path) -> Target:
    """A user's spec files and folders → the package folder ``out``."""
    files: list[Path] = []
    folders: list[Path] = []
    for source in sources:
        if source.is_dir():
            found = sorted(source.glob("*.toml"))
            if not found:
                raise SpecError(None, f"{source}: no *.toml spec files in this folder")
            files += found
            folders.append(source)
        elif source.is_file():
            files.append(source)
            folders.append(source.parent)
        else:
            raise SpecError(None, f"{source}: no such spec file or folder")
    if not out.name.isidentifier():
        raise SpecError(None, f"--out {out}: the folder name '{out.name}' is the package name, so it must be a "
                              "Python identifier (e.g. --out my_optimizers)")
    resolved = out.resolve()
    if resolved == PACKAGE or PACKAGE in resolved.parents or resolved == (CHECKOUT / "generated").resolve():
        raise SpecError(None, f"--out {out} is optgen's own package; choose a folder of your project")
    search = tuple(dict.fromkeys(f.resolve() for f in folders)) + (builtin_optimizer_dir(),)
    unique: dict[Path, Path] = {}
    for f in files:  # a file given twice (a folder and the file in it) is built once
        unique.setdefault(f.resolve(), f)
    return Target(tuple(unique.values()), search, out, builtin=False)


def spec_paths(root: Path | None = None) -> list[Path]:
    return list(builtin_target(root).spec_files)


# -- compiling ----------------------------------------------------------------------------------
def load(path: Path, target: Target):
    from types import SimpleNamespace

    from optgen.spec.load import load_spec
    from optgen.spec.toml_source import display_path

    with internal_errors("the spec loader", SimpleNamespace(path=display_path(path))):
        return load_spec(path, search_path=target.search_path)


def compile_file(path: Path, target: Target):
    from optgen.passes import compile_spec

    return compile_spec(load(path, target))


def compile_all(root: Path | None = None, target: Target | None = None) -> list:
    """Every spec, compiled; the first error stops the build (SpecError, with file:line:col)."""
    target = target or builtin_target(root)
    return [compile_file(p, target) for p in target.spec_files]


def kernel_backends(compiled) -> tuple:
    """The kernel backends that generate code for a spec: one may decline a spec it cannot express
    (the Triton backend declines reductions and intrinsics; `optgen show` prints why)."""
    from optgen.backends.registry import KERNEL_BACKENDS

    return tuple(b for b in KERNEL_BACKENDS if b.unsupported(compiled) is None)


def check_unique_names(compiled: list) -> None:
    """Two specs may not define one optimizer (module names are lower-case, so two names may not
    differ only in case either)."""
    _check_unique_paths({c.spec.path: c.spec.name for c in compiled})


def own_kernels(compiled: list, package: dict[str, str] | None = None) -> list:
    """A spec that shares its parent's kernels (``extends`` without a new rule, like AdamW) needs
    that very parent — the file its ``extends`` found — in the same package (``package``: every
    optimizer's name → its resolved file); otherwise it gets kernels of its own (a user's spec
    extending a built-in, or extending a built-in whose name one of the user's specs also has)."""
    package = package if package is not None else {c.spec.name: c.spec.file for c in compiled}
    return [c if c.spec.kernels_from is None or package.get(c.spec.kernels_from) == c.spec.kernels_from_file else
            dataclasses.replace(c, spec=dataclasses.replace(c.spec, kernels_from=None)) for c in compiled]


def render_spec(compiled, implementations: tuple[str, ...] | None = None) -> dict[str, str]:
    """One spec's modules: the optimizer class and one module per kernel backend (``implementations``:
    only these backends, as the fuzzer builds them)."""
    from optgen.backends.base import module_name
    from optgen.backends.optimizer_class import OptimizerClassBackend

    spec = compiled.spec
    with internal_errors("choosing the backends", spec):
        backends = tuple(b for b in kernel_backends(compiled) if implementations is None or b.name in implementations)
    class_backend = OptimizerClassBackend(tuple(b.name for b in backends),
                                          imported_on_first_use=tuple(b.name for b in backends if b.lazy))
    with internal_errors("the optimizer class", spec):
        files = {f"{module_name(spec.name)}.py": class_backend.render(compiled)}
    if not (spec.algorithm or spec.kernels_from):  # an intrinsic step, or its parent's kernels
        for backend in backends:
            with internal_errors(f"the {backend.name} backend", spec):
                files[f"{module_name(spec.name, backend.name)}.py"] = backend.render(compiled)
    return files


def render_init(names: list[str], target: Target) -> str:
    from optgen.backends.base import environment, module_name

    return environment().get_template("package/__init__.py.j2").render(
        count=len(names), optimizers=[(module_name(n), n) for n in names], builtin=target.builtin,
        package=target.package)


def render_all(compiled: list, target: Target | None = None) -> dict[str, str]:
    """Relative path in the output folder → file text."""
    target = target or builtin_target()
    compiled = own_kernels(compiled)
    check_unique_names(compiled)
    files: dict[str, str] = {}
    for c in compiled:
        files.update(render_spec(c))
    files["__init__.py"] = render_init([c.spec.name for c in compiled], target)
    if target.builtin:  # schedulers (specs/schedulers/) and the weight-averaging kernels (specs/averaging/)
        from optgen.schedules.build import render_schedules

        files.update(render_schedules())
    return files


# -- incremental builds (Note [Incremental builds]) --------------------------------------------
def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def compiler_digest() -> str:
    """A hash of everything that turns specs into code: optgen's Python sources and templates."""
    h = hashlib.sha256()
    for root, pattern in ((PACKAGE, "*.py"), (templates_dir(), "*.j2")):
        for path in sorted(root.rglob(pattern)):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def extends_chain(path: Path, search_path: tuple[Path, ...]) -> list[Path]:
    """The spec file and the files it extends, found as load_spec finds them (cheaply: TOML only).
    A file that does not parse ends the chain; compiling it reports the error."""
    from optgen.spec.search import MAX_EXTENDS, find_parent

    chain = [path]
    while len(chain) <= MAX_EXTENDS + 1:  # the loader refuses longer chains
        try:
            parent = tomllib.loads(chain[-1].read_text(encoding="utf-8")).get("optimizer", {}).get("extends")
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
            break
        found = find_parent(parent, search_path) if isinstance(parent, str) else None
        if found is None or found in chain:
            break
        chain.append(found)
    return chain


def input_key(path: Path, target: Target, digest: str) -> str:
    from optgen.spec.toml_source import display_path

    # The generated headers name the spec as display_path shows it (relative to the working
    # directory for a user's spec), so that is an input too.
    h = hashlib.sha256(digest.encode() + b"\0" + display_path(path).encode())
    for f in extends_chain(path, target.search_path):
        try:
            h.update(str(f).encode() + b"\0" + f.read_bytes() + b"\0")
        except OSError:
            h.update(b"unreadable\0")
    return h.hexdigest()


def schedules_key(digest: str) -> str:
    h = hashlib.sha256(digest.encode())
    for folder in ("schedulers", "averaging"):
        for f in sorted((specs_dir() / folder).glob("*.toml")):
            h.update(str(f.name).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def read_manifest(out_dir: Path) -> dict:
    try:
        data = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _outputs_intact(out_dir: Path, outputs) -> bool:
    if not isinstance(outputs, dict) or not outputs:
        return False
    for name, sha in outputs.items():
        path = out_dir / str(name)
        if path.parent != out_dir or not path.is_file() or _sha(path.read_bytes()) != sha:
            return False
    return True


# -- the build ----------------------------------------------------------------------------------
@dataclass
class BuildResult:
    written: list[str]
    removed: list[str]
    unchanged: list[str]
    compiled: list[str] = dataclasses.field(default_factory=list)   # specs compiled (not reused)
    verified: list[str] = dataclasses.field(default_factory=list)   # specs cross-checked
    names: list[str] = dataclasses.field(default_factory=list)      # every optimizer of the package


GENERATED_MARK = "# @generated by optgen"


def is_generated(path: Path) -> bool:
    """Whether a file is optgen's output (its first line says so): the only files a build may
    overwrite or delete, so `--out` pointing at a folder of the user's own code loses nothing."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(GENERATED_MARK)
    except OSError:
        return False


class FileManager:
    """The one writer of a build's output folder (see Note [One door to disk])."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def existing(self) -> set[str]:
        """The generated modules in the folder (files without optgen's header are not ours)."""
        if not self.out_dir.is_dir():
            return set()
        return {p.name for p in self.out_dir.glob("*.py") if is_generated(p)}

    def foreign(self, files: dict[str, str]) -> list[str]:
        """Files a build would overwrite that optgen did not write."""
        return sorted(name for name in files
                      if (self.out_dir / name).exists() and not is_generated(self.out_dir / name))

    def stale(self, files: dict[str, str]) -> list[str]:
        """Files that differ from what a build would write (missing, changed or orphaned)."""
        out = [name for name, text in files.items()
               if not (self.out_dir / name).is_file() or (self.out_dir / name).read_text() != text]
        return sorted(out + [name for name in self.existing() - set(files)])

    def write(self, files: dict[str, str], manifest: dict | None = None) -> BuildResult:
        foreign = self.foreign(files)
        if foreign:
            raise SpecError(None, f"{self.out_dir}/{foreign[0]} exists and was not written by optgen; the build "
                                  "would overwrite it: choose another --out folder "
                                  "(optgen writes a package of its own)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        result = BuildResult([], [], [])
        for name, text in sorted(files.items()):
            path = self.out_dir / name
            if path.is_file() and path.read_text() == text:
                result.unchanged.append(name)
                continue
            self._replace(name, text)
            result.written.append(name)
        for name in sorted(self.existing() - set(files)):
            (self.out_dir / name).unlink()
            result.removed.append(name)
        if manifest is not None:
            self._replace(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        return result

    def _replace(self, name: str, text: str) -> None:
        # Write-then-rename: a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide a shared package from its users
            os.replace(tmp, self.out_dir / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@overload
def build(root: Path | None = None, check: Literal[False] = False, target: Target | None = None,
          verify: bool = True, incremental: bool = True) -> BuildResult: ...
@overload
def build(root: Path | None = None, *, check: Literal[True], target: Target | None = None,
          verify: bool = True, incremental: bool = True) -> list[str]: ...
@overload
def build(root: Path | None = None, check: bool = False, target: Target | None = None,
          verify: bool = True, incremental: bool = True) -> BuildResult | list[str]: ...
def build(root: Path | None = None, check: bool = False, target: Target | None = None,
          verify: bool = True, incremental: bool = True) -> BuildResult | list[str]:
    """Compile and render in memory, cross-check, then write (or, with check, list stale files)."""
    target = target or builtin_target(root)
    manager = FileManager(target.out_dir)
    if check:
        return manager.stale(render_all(compile_all(target=target), target))
    digest = compiler_digest()
    old = read_manifest(target.out_dir) if incremental else {}
    old_specs = old.get("specs") if old.get("package") == target.package else {}
    old_specs = old_specs if isinstance(old_specs, dict) else {}  # a forged or damaged manifest: ignored
    keys = {str(p): input_key(p, target, digest) for p in target.spec_files}
    reused = {p: entry for p, entry in ((p, old_specs.get(p)) for p in keys)
              if isinstance(entry, dict) and entry.get("key") == keys[p] and isinstance(entry.get("name"), str)
              and (entry.get("verified") is True or not verify)  # a --no-verify build's output is checked now
              and _outputs_intact(target.out_dir, entry.get("outputs"))}
    sched_key = schedules_key(digest) if target.builtin else None
    old_sched = old["schedules"] if isinstance(old.get("schedules"), dict) else {}
    sched_reused = target.builtin and old_sched.get("key") == sched_key \
        and _outputs_intact(target.out_dir, old_sched.get("outputs"))
    if len(reused) == len(keys) and set(old_specs) == set(keys) and (sched_reused or not target.builtin) \
            and _outputs_intact(target.out_dir, old.get("init")) and manager.existing() == _all_outputs(old):
        return BuildResult([], [], sorted(manager.existing()))  # nothing to do

    fresh = {p: compile_file(Path(p), target) for p in keys if p not in reused}
    names = {p: reused[p]["name"] if p in reused else fresh[p].spec.name for p in keys}
    # Duplicate names and shared kernels are decided over every spec, compiled now or reused.
    _check_unique_paths(names)
    owners = own_kernels(list(fresh.values()), {names[p]: str(Path(p).resolve()) for p in keys})
    fresh = dict(zip(fresh, owners, strict=True))
    files: dict[str, str] = {}
    outputs: dict[str, dict[str, str]] = {}
    for p in keys:
        if p in reused:
            outputs[p] = reused[p]["outputs"]
            files.update({name: (target.out_dir / name).read_text() for name in outputs[p]})
        else:
            rendered = render_spec(fresh[p])
            files.update(rendered)
            outputs[p] = {n: _sha(t) for n, t in rendered.items()}
    files["__init__.py"] = render_init(list(names.values()), target)
    sched_outputs = {}
    if target.builtin:
        if sched_reused:
            sched_outputs = old_sched["outputs"]
            files.update({n: (target.out_dir / n).read_text() for n in sched_outputs})
        else:
            from optgen.schedules.build import render_schedules

            rendered = render_schedules()
            files.update(rendered)
            sched_outputs = {n: _sha(t) for n, t in rendered.items()}
    verified: list[str] = []
    if verify and fresh:
        from optgen.crosscheck import crosscheck

        verified = crosscheck(list(fresh.values()), files, target)
    manifest = {
        "package": target.package,
        "specs": {p: {"key": keys[p], "name": names[p], "outputs": outputs[p],
                      "verified": reused[p].get("verified") is True if p in reused else
                      names[p] in verified or bool(fresh[p].spec.algorithm)}  # an intrinsic: nothing generated
                  for p in keys},
        "init": {"__init__.py": _sha(files["__init__.py"])},
    }
    if target.builtin:
        manifest["schedules"] = {"key": sched_key, "outputs": sched_outputs}
    result = manager.write(files, manifest)
    result.compiled = [c.spec.name for c in fresh.values()]
    result.verified = verified
    result.names = list(names.values())
    return result


def _all_outputs(manifest: dict) -> set[str]:
    names: set[str] = set()
    specs = manifest.get("specs")
    for entry in (specs.values() if isinstance(specs, dict) else ()):
        if isinstance(entry, dict) and isinstance(entry.get("outputs"), dict):
            names |= set(entry["outputs"])
    for key in ("init",):
        if isinstance(manifest.get(key), dict):
            names |= set(manifest[key])
    if isinstance(manifest.get("schedules"), dict) and isinstance(manifest["schedules"].get("outputs"), dict):
        names |= set(manifest["schedules"]["outputs"])
    return names


def _check_unique_paths(names: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    for path, name in names.items():
        other = seen.setdefault(name.lower(), path)
        if other != path:
            raise SpecError(None, f"{_shown(path)}: optimizer name '{name}' is already defined by {_shown(other)}; "
                                  "rename one of them")


def _shown(path: str) -> str:
    from optgen.spec.toml_source import display_path

    return display_path(Path(path))


def refuse_installed_builtin_build() -> None:
    """The built-in optimizers ship prebuilt; rebuilding them would write into site-packages."""
    if not is_checkout():
        raise SpecError(None, "this optgen is installed as a package: its own optimizers are prebuilt, and "
                              "`optgen build` never writes into site-packages. Build your own specs with "
                              "`optgen build DIR --out PKG_DIR`")


def build_temporary(sources: list[Path]):
    """Spec files or folders → (their Compiled specs, the imported package): what `optgen verify`
    and `optgen bench` run on a user's specs."""
    import tempfile

    from optgen.crosscheck import import_failure
    from optgen.packages import import_rendered

    target = user_target(sources, Path(tempfile.gettempdir()) / "optgen_user_specs")
    compiled = compile_all(target=target)
    try:
        return compiled, import_rendered(render_all(compiled, target), "user")
    except Exception as e:  # noqa: BLE001 - generated code that does not import is optgen's bug: one line
        raise import_failure(e, compiled) from e
