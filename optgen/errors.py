"""The one error type users see from the compiler: ``path:line:col: what is wrong — how to fix it``."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """A point in a spec file (1-based line and column, like compilers print)."""

    path: str
    line: int
    col: int = 1

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"

    def shifted(self, lines: int = 0, col: int | None = None) -> Location:
        return Location(self.path, self.line + lines, self.col if col is None else col)


class SpecError(Exception):
    """A mistake in a spec (or in a template's use of it), reported with its location."""

    def __init__(self, loc: Location | None, message: str):
        self.loc = loc
        self.message = message
        super().__init__(f"{loc}: {message}" if loc else message)


class InternalCompilerError(SpecError):
    """A bug in optgen, met while compiling a spec: reported like a spec error, at the statement
    being compiled, with the original exception chained (``raise ... from``)."""


def internal_error(stage: str | None, spec, exc: BaseException) -> InternalCompilerError:
    """The error for an unexpected exception ``exc`` raised in ``stage`` (a pass, a backend; None:
    the innermost optgen/passes/ module in the traceback) while compiling ``spec`` (a Spec).

    The statement is found in the traceback: the innermost frame with an IR assignment in a local
    variable (anything with a ``loc`` and a ``text``, as optgen.ir.nodes.Assign) or a statement of
    the rule's syntax tree (lowering).  Without one the error points at the rule (or the file)."""
    import ast

    rule_loc = getattr(spec, "rule_loc", None) or Location(getattr(spec, "path", "<spec>"), 1, 1)
    loc, what = rule_loc, "the rule"
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        found = None
        for value in frame.f_locals.values():
            if isinstance(getattr(value, "loc", None), Location) and isinstance(getattr(value, "text", None), str):
                found = value.loc, value.text
            elif isinstance(value, (ast.Assign, ast.AugAssign)) and getattr(spec, "rule_loc", None):
                line, col = value.lineno, value.col_offset
                found = (Location(rule_loc.path, rule_loc.line + line - 1,
                                  rule_loc.col + col if line == 1 else col + 1), ast.unparse(value))
            if found:
                break
        if found:
            loc, what = found[0], f"'{found[1]}'"
            break
    if stage is None:  # the innermost pass module in the traceback: optgen/passes/cse.py → "cse"
        stage = "the compiler"
        for frame in reversed(frames):
            file = frame.f_code.co_filename.replace("\\", "/")
            if "/optgen/passes/" in file and not file.endswith("/__init__.py"):
                stage = file.rsplit("/", 1)[1].removesuffix(".py")
                break
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return InternalCompilerError(loc, f"internal compiler error in {stage} while compiling {what}: {detail} "
                                      "— please report this with the spec")


@contextmanager
def internal_errors(stage: str | None, spec):
    """``with internal_errors("the C backend", spec): ...``: a SpecError passes through; any other
    exception becomes an :class:`InternalCompilerError` naming the spec file and the statement."""
    try:
        yield
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001 - every bug is reported with the spec, never as a bare traceback
        raise internal_error(stage, spec, e) from e
