"""The package's layering, checked on the source (every import, including those inside
functions): no import cycle, and dependencies run one way along the pipeline

    spec → ir → passes → backends → (build, cli, tools)

while the runtime — what generated code imports — imports no compiler layer, and nothing below
the commands imports optgen.tools.  Two shared leaves any layer may import: optgen.ir.functions,
the IR's vocabulary the parser builds expressions of (it imports only sympy), and
optgen.runtime.intrinsics, the hand-written tensor math (newton_schulz) that the kernels and the
reference interpreter both call."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "optgen"
PIPELINE = ("spec", "ir", "passes", "backends")
SHARED_LEAVES = {"optgen.ir.functions", "optgen.runtime.intrinsics"}
COMMANDS = {"cli", "__main__", "tools"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        if "generated" in path.relative_to(ROOT).parts:
            continue
        name = ".".join(("optgen", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        modules[name] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The optgen modules a file imports anywhere in it (``from a import b``: b when it is a
    module, else a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("optgen"):
            for alias in node.names:  # `from optgen.runtime import intrinsics` imports a module
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("optgen")}
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_dependencies_run_one_way():
    wrong = []
    for module, targets in _graph().items():
        here = _layer(module)
        for target in targets - SHARED_LEAVES:
            there = _layer(target)
            if here == there:
                continue
            earlier = PIPELINE[:PIPELINE.index(here)] if here in PIPELINE else None
            if earlier is not None and there not in earlier and there not in ("errors", "resources"):
                wrong.append(f"{module} imports {target}: {here} may import only earlier layers")
            if here == "runtime" and there in (*PIPELINE, "build", "tools", "cli"):
                wrong.append(f"{module} imports {target}: the runtime imports no compiler layer")
            if there == "tools" and here not in COMMANDS:
                wrong.append(f"{module} imports {target}: only the commands use optgen.tools")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_cycle_and_a_backward_import(tmp_path, monkeypatch):
    # The checks can fail: a backend imported by a pass, and a pair importing each other.
    fake = {"optgen.passes.x": {"optgen.backends.y"}, "optgen.backends.y": {"optgen.passes.x"}}
    monkeypatch.setattr(__import__(__name__, fromlist=["_graph"]), "_graph", lambda: fake)
    for check in (test_no_import_cycles, test_dependencies_run_one_way):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed a broken graph")
