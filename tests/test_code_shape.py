"""The package stays readable in pieces: no function longer than 50 lines, no class longer than
150 (the config listing `base()` may stay one listing)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cifar_jax"
LISTINGS = {("config.py", "base")}  # a listing of every key, read top to bottom


def _too_long():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            limit = {ast.FunctionDef: 50, ast.AsyncFunctionDef: 50, ast.ClassDef: 150}.get(type(node))
            length = limit and node.end_lineno - node.lineno + 1
            if limit and length > limit and (path.name, node.name) not in LISTINGS:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_function_over_50_lines_and_no_class_over_150():
    assert _too_long() == []
