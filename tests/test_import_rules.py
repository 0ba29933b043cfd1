"""The import rules of docs/architecture.md, enforced by parsing every module's imports.

Every ``import`` counts: module level, inside functions and under ``TYPE_CHECKING`` — a
layer that needs the composition root "only for typing" still depends on it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "asgi_llm"

FEATURES = ("middleware", "providers", "routing", "nodes", "usage", "cache", "auth", "audit", "observability", "stores")
"""Packages that implement a capability: they get their settings as constructor arguments."""

COMPOSITION = ("asgi_llm.recipe", "asgi_llm.config", "asgi_llm.stack", "asgi_llm.admin")
"""What builds or routes the gateway: no feature module may import these."""

BOTTOM = ("_asgi", "_background", "_bounds", "_ids", "_options", "_redact", "_sse", "_timeout", "errors", "schemas", "targets",
          "context", "request")
"""Core vocabulary: imported by everyone, importing only each other."""

FRONT_ENDS = {"cli.py"}
"""A package's command-line front end sits above everything (it talks to the admin API)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every absolute ``asgi_llm`` import in the file, except the
    lazy compatibility re-exports a module-level ``__getattr__`` performs."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            skip.update(id(n) for n in ast.walk(node))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("asgi_llm"):
                found.append((node.lineno, node.module))
                # "from asgi_llm import admin" names a submodule
                found.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.startswith("asgi_llm"))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _unit(module: str) -> str:
    """The package (``asgi_llm.routing``) or top-level module (``asgi_llm.context``) a module belongs to."""
    return ".".join(module.split(".")[:2])


class TestLayersDoNotImportTheCompositionRoot:
    @pytest.mark.parametrize("feature", FEATURES)
    def test_feature_modules_import_neither_recipe_nor_stack_nor_admin(self, feature: str) -> None:
        """No module under a feature package imports asgi_llm.recipe/config/stack/admin
        (its ``cli.py`` front end excepted)."""
        offending = []
        files = [p for p in (PACKAGE / feature).rglob("*.py") if p.name not in FRONT_ENDS]
        assert files, f"no modules found under asgi_llm/{feature}"
        for path in files:
            for line, target in _imports(path):
                if any(_within(target, c) for c in COMPOSITION):
                    offending.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
        assert offending == []

    def test_bottom_modules_import_only_the_bottom(self) -> None:
        """context, targets, request, errors, schemas and the private helpers import only each other."""
        allowed = {f"asgi_llm.{name}" for name in BOTTOM}
        offending = []
        for name in BOTTOM:
            path = PACKAGE / f"{name}.py"
            assert path.is_file(), path
            for line, target in _imports(path):
                if _unit(target) not in allowed and target != "asgi_llm":
                    offending.append(f"asgi_llm/{name}.py:{line} imports {target}")
        assert offending == []

    def test_providers_do_not_import_routing(self) -> None:
        """A provider adapter speaks Target/Price (asgi_llm.targets), not the router."""
        offending = [f"{p.name}:{line} imports {t}" for p in (PACKAGE / "providers").rglob("*.py")
                     for line, t in _imports(p) if _within(t, "asgi_llm.routing")]
        assert offending == []


class TestNoImportCycles:
    def test_package_graph_is_acyclic(self) -> None:
        """Among asgi_llm's packages and top-level modules, imports form no cycle (front
        ends, the ``asgi_llm.config`` shim and the package root excluded)."""
        graph: dict[str, set[str]] = defaultdict(set)
        for path in _modules():
            if path.name in FRONT_ENDS or path == PACKAGE / "__init__.py" or path == PACKAGE / "config.py":
                continue
            src = _unit(_module_name(path))
            for _line, target in _imports(path):
                dst = _unit(target)
                if dst != src and dst not in ("asgi_llm", "asgi_llm.config") and _is_unit(dst):
                    graph[src].add(dst)
        cycle = _find_cycle(graph)
        assert cycle is None, " -> ".join(cycle or [])

    def test_the_cycle_finder_finds_cycles(self) -> None:
        """The checker itself: a → b → c → a is reported, a DAG is not."""
        assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
        assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def _is_unit(unit: str) -> bool:
    """Whether ``asgi_llm.x`` is a real package or module (not a name imported from the root)."""
    base = PACKAGE.parent / unit.replace(".", "/")
    return base.is_dir() or base.with_suffix(".py").is_file()


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[n, ..., n]``, or ``None`` for a DAG."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour: dict[str, int] = defaultdict(int)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour[nxt] == GREY:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == WHITE:
                found = visit(nxt)
                if found is not None:
                    return found
        stack.pop()
        colour[node] = BLACK
        return None

    for start in sorted(graph):
        if colour[start] == WHITE:
            found = visit(start)
            if found is not None:
                return found
    return None
