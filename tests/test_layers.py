"""The package's imports go one way: no cycle between its modules (counting imports inside
functions), the methods import no engine, Flower stays in ``engines/flower``, and the runner sits
below the engines while the API, ``compare`` and the CLI sit above them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "pf2lora"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every module of the package and what it imports (absolute names, wherever the statement is)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative: resolve against this module's package
                    package = name.split(".")[: -node.level] if not path.name == "__init__.py" else name.split(".")
                    base = ".".join([*package, node.module])
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = found
    return graph


GRAPH = _imports()


def _internal(name: str) -> set[str]:
    """The package's modules ``name`` imports (``from a import b`` counts b where b is a module)."""
    return {m for m in GRAPH[name] if m in GRAPH and m != name}


def _under(prefix: str) -> list[str]:
    return [m for m in GRAPH if m == prefix or m.startswith(prefix + ".")]


def test_the_module_graph_was_read():
    assert {"pf2lora.runner", "pf2lora.methods", "pf2lora.engines.local", "pf2lora.api"} <= set(GRAPH)
    assert "pf2lora.methods" in _internal("pf2lora.runner")


def _cycle() -> list[str] | None:
    """A cycle of package-internal imports, as a list of modules, or None.
    A package's ``__init__`` importing its own submodules is not an edge back up."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(_internal(m)):
            if n.startswith(m + "."):
                continue  # a package's __init__ importing its own submodule
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_there_is_no_import_cycle():
    assert _cycle() is None, " -> ".join(_cycle() or [])


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("pf2lora.algorithms", "pf2lora.engines"),
        ("pf2lora.algorithms", "pf2lora.runner"),
        ("pf2lora.algorithms", "pf2lora.methods"),
        ("pf2lora.adapters", "pf2lora.algorithms"),
        ("pf2lora.tasks", "pf2lora.algorithms"),
        ("pf2lora.methods", "pf2lora.families"),
        ("pf2lora.families", "pf2lora.runner"),
        ("pf2lora.runner", "pf2lora.engines"),
        ("pf2lora.engines", "pf2lora.api"),
        ("pf2lora.engines", "pf2lora.compare"),
        ("pf2lora.engines", "pf2lora.cli"),
        ("pf2lora.api", "pf2lora.compare"),
        ("pf2lora.api", "pf2lora.cli"),
    ],
)
def test_lower_layers_do_not_import_upper_ones(lower, upper):
    bad = {m: sorted(n for n in _internal(m) if n == upper or n.startswith(upper + ".")) for m in _under(lower)}
    assert not {m: n for m, n in bad.items() if n}, f"{lower} must not import {upper}"


def test_flower_is_imported_only_in_engines_flower():
    outside = {
        m: sorted(n for n in names if n == "flwr" or n.startswith("flwr."))
        for m, names in GRAPH.items()
        if not m.startswith("pf2lora.engines.flower")
    }
    assert not {m: n for m, n in outside.items() if n}
