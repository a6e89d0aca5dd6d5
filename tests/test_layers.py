"""Dependencies point one way, finetune -> pretrain -> data_tools (DESIGN.md 2): no module of a
lower package imports a higher one, statically or by name through importlib/__import__.

Checked on the source (AST), not by importing: an import hidden in a function or a table of module
names would not show at import time. Any string in code (docstrings aside) that names a higher
package as a module counts, since that is what a dynamic import is handed."""
from __future__ import annotations

import ast
import re

import pytest

from tests.conftest import REPO

HIGHER = {"data_tools": ("pretrain", "finetune"), "pretrain": ("finetune",)}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def upward_references(package: str) -> list[str]:
    names = re.compile(rf"^({'|'.join(HIGHER[package])})(\.|$)")
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            modules: list[str] = []
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                modules = [node.value]
            found += [f"{path.relative_to(REPO)}:{node.lineno}: {m}" for m in modules if names.match(m)]
    return found


@pytest.mark.parametrize("package", sorted(HIGHER))
def test_no_package_reaches_up(package):
    assert upward_references(package) == []


def test_the_check_finds_a_dynamic_import(tmp_path, monkeypatch):
    """The checker itself: a table of module names fed to importlib is found."""
    import tests.test_layers as layers

    (tmp_path / "data_tools").mkdir()
    (tmp_path / "data_tools" / "x.py").write_text(
        '"""pretrain is named in a docstring: fine."""\nimport importlib\n'
        'TABLE = {"p": "pretrain"}\nimportlib.import_module(TABLE["p"] + ".__main__")\nfrom finetune import y\n'
    )
    monkeypatch.setattr(layers, "REPO", tmp_path)
    assert sorted(layers.upward_references("data_tools")) == ["data_tools/x.py:3: pretrain", "data_tools/x.py:5: finetune"]
