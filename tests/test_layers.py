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
    assert sorted(layers.upward_references("data_tools")) == [
        "data_tools/x.py:3: pretrain",
        "data_tools/x.py:5: finetune",
    ]


PACKAGES = ("data_tools", "pretrain", "finetune")


def _module_name(path, root) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Imports under `if TYPE_CHECKING:`: never executed, so never part of a cycle."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids |= {id(inner) for stmt in node.body for inner in ast.walk(stmt)}
    return ids


def import_graph(root=None) -> dict[str, set[str]]:
    """{module: in-package modules it imports}, module-level and function-level imports alike (a
    function-level import runs too, just later). `from package import name` counts as an import of
    `package.name` where that is a module, else of `package`; relative imports are resolved."""
    root = root or REPO
    files = {_module_name(p, root): p for package in PACKAGES for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skip = _type_checking_only(tree)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != module}
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_import_cycle_in_the_packages():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    """The checker itself: a package importing itself from a submodule, inside a function, is a cycle."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "pretrain" / "__init__.py").write_text("from .base import x\n")
    (tmp_path / "pretrain" / "base.py").write_text("def x():\n    from pretrain import other\n")
    (tmp_path / "pretrain" / "other.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pretrain.base import x\n"
    )
    graph = import_graph(tmp_path)
    assert graph["pretrain.base"] == {"pretrain.other"} and graph["pretrain.other"] == set()
    (tmp_path / "pretrain" / "base.py").write_text("def x():\n    from pretrain import y\n")
    assert find_cycle(import_graph(tmp_path)) == ["pretrain", "pretrain.base", "pretrain"]
