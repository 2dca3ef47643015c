"""Shrinking a failing spec: smaller rules that still load and still fail the same way.

Greedy, like C-Reduce's passes but on the rule's syntax tree: drop a statement, replace an
``if`` by one of its branches, drop an ``else``, replace an expression by one of its operands or
by ``grad``; keep a change when the spec still loads and ``still_fails`` says it fails as before.
Declarations (hyperparameters, state) are dropped too when the rule no longer needs them.
"""
from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator

_RULE = re.compile(r'(rule = """\n)(.*?)(""")', re.S)


def rule_of(text: str) -> str:
    m = _RULE.search(text)
    assert m is not None, "a spec text always has a rule"
    return m.group(2)


def with_rule(text: str, rule: str) -> str:
    m = _RULE.search(text)
    assert m is not None, "a spec text always has a rule"
    return text[:m.start(2)] + rule + text[m.end(2):]


def _bodies(node) -> Iterator[list]:
    """Every statement list in a tree (module body, if bodies, else bodies)."""
    yield node.body
    for stmt in node.body:
        if isinstance(stmt, ast.If):
            yield from _bodies(stmt)
            if stmt.orelse:
                yield from _bodies(ast.Module(body=stmt.orelse, type_ignores=[]))
    # (an elif is an If inside orelse: reached above)


def _statement_edits(rule: str) -> Iterator[str]:
    tree = ast.parse(rule)
    count = sum(len(b) for b in _bodies(tree))
    for k in range(count):
        for edit in ("drop", "then", "else", "noelse"):
            t = ast.parse(rule)
            bodies = list(_bodies(t))
            flat = [(b, i) for b in bodies for i in range(len(b))]
            body, i = flat[k]
            stmt = body[i]
            if edit == "drop":
                del body[i]
            elif not isinstance(stmt, ast.If):
                continue
            elif edit == "then":
                body[i:i + 1] = stmt.body
            elif edit == "else":
                if not stmt.orelse:
                    continue
                body[i:i + 1] = stmt.orelse
            elif edit == "noelse":
                if not stmt.orelse:
                    continue
                stmt.orelse = []
            if not t.body:
                continue
            for b in _bodies(t):
                if not b:
                    b.append(ast.Pass())
            yield ast.unparse(t) + "\n"


def _expression_edits(rule: str) -> Iterator[str]:
    tree = ast.parse(rule)
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.expr) and not isinstance(n, (ast.Name, ast.Constant))
             and not isinstance(n, ast.Compare) and not _in_test(tree, n)]
    for k in range(len(nodes)):
        for replacement in range(6):
            t = ast.parse(rule)
            targets = [n for n in ast.walk(t) if isinstance(n, ast.expr) and not isinstance(n, (ast.Name, ast.Constant))
                       and not isinstance(n, ast.Compare) and not _in_test(t, n)]
            node = targets[k]
            children = [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr)
                        and not isinstance(c, (ast.Compare,))
                        and not (isinstance(c, ast.Name) and isinstance(node, ast.Call) and c is node.func)]
            options = children + [ast.Name("grad"), ast.Name("param"), ast.Constant(0.5)]
            if replacement >= len(options):
                break
            new = options[replacement]
            if not _replace(t, node, new):
                continue
            yield ast.unparse(t) + "\n"


def _in_test(tree, node) -> bool:
    """Conditions of ifs are left alone (replacing them rarely helps and often breaks validity)."""
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and any(node is m for m in ast.walk(n.test)):
            return True
    return False


def _replace(tree, old, new) -> bool:
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
                return True
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if item is old:
                        value[i] = new
                        return True
    return False


def _declaration_edits(text: str) -> Iterator[str]:
    """Drop a state declaration."""
    lines = text.splitlines(keepends=True)
    try:
        start = lines.index("[state]\n")
    except ValueError:
        return
    i = start + 1
    while i < len(lines) and lines[i].strip() and not lines[i].startswith("["):
        yield "".join(lines[:i] + lines[i + 1:])
        i += 1


def shrink(text: str, still_fails: Callable[[str], bool], *, loads: Callable[[str], bool],
           budget: int = 400, seconds: float = 60) -> str:
    """The smallest variant of ``text`` found that ``loads`` and ``still_fails`` (at most ``budget``
    tries, about ``seconds``)."""
    import time

    deadline = time.monotonic() + seconds
    tries = 0
    progress = True
    while progress and tries < budget and time.monotonic() < deadline:
        progress = False
        rule = rule_of(text)
        candidates = [with_rule(text, r) for r in _statement_edits(rule)]
        candidates += list(_declaration_edits(text))
        candidates += [with_rule(text, r) for r in _expression_edits(rule)]
        for candidate in candidates:
            if len(candidate) >= len(text) or tries >= budget or time.monotonic() > deadline:
                continue
            tries += 1
            if loads(candidate) and still_fails(candidate):
                text, progress = candidate, True
                break
    return text
