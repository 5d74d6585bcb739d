"""The package's import graph: every module imports, and no module imports itself back through others."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import metaportrait

PACKAGE_DIR = Path(metaportrait.__file__).parent


def _module_names() -> list[str]:
    """Dotted names of every module of the package (``__init__.py`` as its package's name)."""
    names = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = ("metaportrait", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _path_of(module: str) -> Path:
    relative = Path(*module.split(".")[1:])
    package = PACKAGE_DIR / relative / "__init__.py"
    return package if package.exists() else (PACKAGE_DIR / relative).with_suffix(".py")


def _imports(module: str, modules: set[str]) -> set[str]:
    """The package's modules that ``module`` names in an import statement anywhere in its source, including
    imports inside functions and under ``TYPE_CHECKING`` (a lazy import hides a circle, it does not remove it).
    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``."""
    path = _path_of(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return {name for name in found if name in modules and name != module}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the search path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for following in sorted(graph[node]):
            if state.get(following) == "open":
                return path[path.index(following):] + [following]
            if following not in state and (circle := visit(following)):
                return circle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


@pytest.mark.parametrize("module", _module_names())
def test_every_module_imports(module):
    importlib.import_module(module)


def test_the_package_has_no_import_circle():
    modules = set(_module_names())
    graph = {module: _imports(module, modules) for module in modules}
    assert graph["metaportrait.prior.masks"] >= {"metaportrait.prior.eyelids", "metaportrait.prior.mouth"}  # sanity
    circle = _cycle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
