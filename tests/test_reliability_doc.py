"""docs/reliability.md names the tests that check each promise: every one it names must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELIABILITY_DOC = ROOT / "docs" / "reliability.md"
TEST_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_test_the_reliability_doc_names_exists():
    references = TEST_REFERENCE.findall(RELIABILITY_DOC.read_text(encoding="utf-8"))
    assert len(references) > 50
    missing = [
        f"{file}::{name}"
        for file, name in references
        if not (ROOT / file).exists() or name not in functions_in(ROOT / file)
    ]
    assert missing == []
