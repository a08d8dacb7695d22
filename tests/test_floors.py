"""The packages are floors: ``trainers`` <- ``evaluators`` <- ``harness`` <- ``app``. A module may
import its own floor or a lower one, never a higher one, and no set of modules imports itself
round in a circle. Every ``import`` statement counts, also those inside functions (a lazy import
still ties the two modules together); only ``if TYPE_CHECKING:`` blocks are left out of the
circle check, as they never run (they still may not reach up a floor)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("trainers", "evaluators", "harness", "app")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for floor in FLOORS for p in sorted((ROOT / floor).rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The project module an import of ``name`` loads last (itself or its closest parent)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """``(imported project module, line, only under TYPE_CHECKING)`` for every import."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.body:
                    visit_stmt(stmt, True)
                for stmt in child.orelse:
                    visit_stmt(stmt, typing_only)
                continue
            visit_stmt(child, typing_only)

    def visit_stmt(node: ast.AST, typing_only: bool) -> None:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule when there is one.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                out.append((target, node.lineno, typing_only))
        visit(node, typing_only)

    visit(tree, False)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _floor(module: str) -> int:
    return FLOORS.index(module.split(".")[0])


def test_the_scan_sees_the_packages() -> None:
    assert {"trainers.train", "evaluators.ratings", "harness.cli", "app.main"} <= set(MODULES)
    assert any(t == "trainers.registry" for t, _, _ in GRAPH["harness.spec"])


def test_no_module_imports_a_higher_floor() -> None:
    upward = sorted(
        {
            f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
            for m, edges in GRAPH.items()
            for target, line, _ in edges
            if _floor(target) > _floor(m)
        }
    )
    assert not upward, "imports that run up a floor:\n" + "\n".join(upward)


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), run-time edges only."""
    edges = {m: sorted({t for t, _, typing_only in e if not typing_only}) for m, e in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_no_import_circle() -> None:
    assert not _cycles(), "modules that import each other round a circle: " + repr(_cycles())


def test_the_checks_catch_a_violation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A circle and an upward import planted in the graph are reported."""
    monkeypatch.setitem(
        GRAPH, "trainers.config", [*GRAPH["trainers.config"], ("app.main", 1, False)]
    )
    monkeypatch.setitem(GRAPH, "app.main", [*GRAPH["app.main"], ("trainers.config", 1, False)])
    with pytest.raises(AssertionError, match=r"trainers/config\.py:1 imports app\.main"):
        test_no_module_imports_a_higher_floor()
    assert any({"trainers.config", "app.main"} <= set(c) for c in _cycles())


def test_code_and_docs_cite_only_files_that_ship() -> None:
    """Notes kept outside the repository are not cited: users do not have them."""
    outside = ("FIELD" + "-NOTES", "DESIGN" + ".md", "STYLE" + ".md", "../" + "shared")
    shipped = [ROOT / "README.md", ROOT / "pyproject.toml", *(ROOT / ".ci").iterdir()]
    for top in (*FLOORS, "tests", "bench", "studies"):
        shipped += [
            p for p in (ROOT / top).rglob("*") if p.suffix in (".py", ".md", ".yaml", ".sh")
        ]
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in shipped
        for name in outside
        if path.is_file() and name in path.read_text(errors="replace")
    ]
    assert not found, found


def test_the_app_floor_holds_only_streamlit_code() -> None:
    """Logic with no Streamlit in it belongs a floor down (in harness), where the CLI and the
    tests reach it without the app."""
    no_streamlit = [
        m
        for m, path in MODULES.items()
        if m.startswith("app.")
        and "streamlit" not in {n.split(".")[0] for n in _import_names(path)}
    ]
    assert not no_streamlit, no_streamlit


def _import_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names
