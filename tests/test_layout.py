"""The package's shape (issue 13): imports run one way, the top level is only the package's face,
and developer tooling stays out of `worker/`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "worker"
# The package's face and entry points; every other module belongs to a subpackage.
TOP_LEVEL = {"__init__.py", "__main__.py", "app.py", "cli.py", "errors.py"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every `worker.*` module this file imports, at any depth (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("worker"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("worker"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # `from worker.x import y` where y is a module counts as importing worker.x.y as well.
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle_inside_the_package() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_cycle_detection_finds_a_cycle() -> None:
    # The check above must be able to fail.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_top_level_holds_only_the_packages_face() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in TOP_LEVEL)
    assert loose == []


@pytest.mark.parametrize("needle", ["fake_tiktok", "sample_events", "devkit", "sys.path.insert"])
def test_package_holds_no_developer_tooling(needle: str) -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in PACKAGE.rglob("*.py")
        if needle in p.name or needle in p.read_text()
    ]
    assert offenders == []


def test_no_sys_path_manipulation_anywhere() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for top in ("worker", "devkit", "tests", "bench", "scripts")
        for p in (ROOT / top).rglob("*.py")
        if "sys.path.insert" in p.read_text() and p.name != "test_layout.py"
    ]
    assert offenders == []
