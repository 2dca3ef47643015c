"""The cache of what optgen compiles (the C kernels' libraries, the native step guard): a private
directory whose entries are loaded only when their bytes are the ones optgen published
(Note [Kernel cache]).  Loading a shared library runs its code, so this is what keeps a library
another user planted from ever running as this one."""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("OPTGEN_CACHE_DIR") or Path.home() / ".cache" / "optgen") / "c"


class CacheError(RuntimeError):
    """The kernel cache directory cannot be trusted (Note [Kernel cache])."""


# Note [Kernel cache]
# ~~~~~~~~~~~~~~~~~~~
# Loading a shared library runs its constructors, so a library another local user can put (or
# swap, or truncate) in the cache is code run as this user, and a damaged one a SIGBUS.  Hence:
# - the cache directory is made 0700 (chmod after mkdir: the umask only removes bits) and is
#   refused, like a missing compiler (a warning, then the for-loop), when it or its parent is
#   owned by someone else, or writable by group or others (a parent with the sticky bit, /tmp,
#   is fine: others cannot rename our entries there).  The fallback in the temporary directory,
#   optgen-<uid>/c, is checked the same way (lstat: a planted symlink is refused too);
# - each library is published (written, fsynced, renamed: a reader sees a whole file or none)
#   with <name>.sha256 beside it, holding its digest and name; a library is loaded only when its
#   bytes hash to that digest, else rebuilt: a damaged, empty, swapped or foreign entry is never
#   loaded.  Only this user can write either file (0700 directory);
# - the name keys on everything that shapes the binary: source, compiler command and its
#   `--version`, flags, defines, and the CPU (-march=native): /proc/cpuinfo's model and flags.

def _trusted(directory: Path, *, follow: bool = True) -> str | None:
    """Why ``directory`` (an existing one) cannot hold the kernel cache; None when it can."""
    try:
        st = os.stat(directory) if follow else os.lstat(directory)
        parent = os.stat(directory.parent)
    except OSError as e:
        return f"the kernel cache {directory} cannot be read ({e.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return f"the kernel cache {directory} is not a directory"
    if st.st_uid != os.getuid():
        return f"the kernel cache {directory} belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return (f"the kernel cache {directory} is writable by group or others (mode {st.st_mode & 0o777:o}; "
                "chmod 700 it, or set OPTGEN_CACHE_DIR)")
    if parent.st_uid not in (os.getuid(), 0) or (parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX):
        return (f"the kernel cache {directory} is inside {directory.parent}, which others can write "
                "(set OPTGEN_CACHE_DIR to a private directory)")
    return None


def _make_private(directory: Path) -> None:
    """Creates ``directory`` and its missing parents with mode 0700, whatever the umask."""
    missing = []
    for path in (directory, *directory.parents):
        if os.path.lexists(path):
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # a concurrent process made it: checked by _trusted like any other
            continue
        os.chmod(path, 0o700)


def writable(directory: Path) -> Path:
    """``directory``, created 0700 and checked (Note [Kernel cache]); where it cannot be created or
    written, ``optgen-<uid>/c`` in the temporary directory, checked alike.  Raises CacheError when
    the directory to use is not private to this user."""
    try:
        _make_private(directory)
        usable = os.access(directory, os.W_OK | os.X_OK)
    except OSError:
        usable = False
    if usable:
        reason = _trusted(directory)
        if reason is not None:
            raise CacheError(reason)
        return directory
    top = Path(tempfile.gettempdir()) / f"optgen-{os.getuid()}"
    fallback = top / "c"
    try:
        _make_private(fallback)
    except OSError as e:
        raise CacheError(f"no writable kernel cache ({directory}, {fallback}: {e.strerror})") from None
    reason = _trusted(top, follow=False) or _trusted(fallback, follow=False)
    if reason is not None:
        raise CacheError(reason)
    return fallback


_IDENTITY: dict[tuple, str] = {}


def compiler_identity(cc: list[str]) -> str:
    """``cc --version``'s output (once per process and command): a new compiler, a new key."""
    key = tuple(cc)
    if key not in _IDENTITY:
        try:
            result = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
            _IDENTITY[key] = f"{result.returncode}\n{result.stdout}"
        except (OSError, subprocess.SubprocessError) as e:
            _IDENTITY[key] = f"unavailable: {e}"
    return _IDENTITY[key]


def cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line.strip() for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verified(target: Path) -> bool:
    """Whether ``target`` is the library optgen published under this name: its bytes hash to the
    digest recorded beside it (a library's constructors run when it is loaded)."""
    try:
        recorded = target.with_name(target.name + ".sha256").read_text().split()
        return recorded == [_digest(target), target.name]
    except (OSError, UnicodeDecodeError):
        return False


def publish(tmp: Path, source: Path, target: Path) -> None:
    """Moves ``source`` to ``target``, with its digest file, each written whole and fsynced."""
    digest = Path(tmp) / "digest"
    digest.write_text(f"{_digest(source)} {target.name}\n")
    for path in (source, digest):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(source, target)  # atomic: a concurrent process sees a whole file or none
    os.replace(digest, target.with_name(target.name + ".sha256"))
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: a build directory older than this was left by a killed compile
_STALE_SECONDS = 3600


def remove_stale(directory: Path) -> None:
    now = time.time()
    for entry in directory.glob("build-*"):
        try:
            if now - entry.lstat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def command(variable: str, default: str) -> list[str] | None:
    """A compiler's command line: ``$variable`` (which may carry arguments: ``CC='ccache gcc'``) or
    ``default``, its program resolved on the PATH; None when there is none."""
    try:
        words = shlex.split(os.environ.get(variable) or default)
    except ValueError:  # unbalanced quotes: no usable compiler
        return None
    program = shutil.which(words[0]) if words else None
    return None if program is None else [program, *words[1:]]


def built(target: Path, build: Callable[[Path], Path]) -> bool:
    """Makes ``target`` (in a checked cache directory: :func:`writable`) the verified file it names,
    unless it already is: ``build(folder)`` writes it into a new private folder beside it and
    returns its path, which is then published (Note [Kernel cache]).  True when it was built."""
    if verified(target):
        return False
    remove_stale(target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="build-") as tmp:
        publish(Path(tmp), build(Path(tmp)), target)
    return True
