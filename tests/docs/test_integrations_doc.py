"""docs/integrations.md stays true to the tests it names: every Python snippet compiles, and every
``test_X.py -k WORD`` it cites selects a test of that file (its functions' names and their
parametrize ids, read from the source: nothing is imported or run)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "integrations.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_every_python_snippet_compiles():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 8
    for block in blocks:
        compile(block, str(DOC), "exec")  # a SyntaxError names the line


def selectable_words(path: Path) -> str:
    """The test names and string parametrize values of a test file, as one string to search."""
    words = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            words.append(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) < 30:
            words.append(node.value)  # parametrize ids, such as the distributed cases' names
    return " ".join(words)


def test_every_cited_selection_selects_a_test():
    cited = re.findall(r"(test_\w+\.py) -k (\w+)", DOC.read_text())
    assert len(cited) >= 6
    for name, word in cited:
        path = ROOT / "tests" / "integration" / name
        assert path.exists(), name
        assert word in selectable_words(path), (name, word)
