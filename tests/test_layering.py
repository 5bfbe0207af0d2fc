"""The package's imports follow the layers docs/DESIGN.md draws, and form no cycle.

DESIGN.md's "Layers" table names each folder of shmstore/ and its rank; a module may
import from its own folder and from folders of a lower rank, never from a higher one,
at module level or inside a function.  The exceptions DESIGN.md lists under "Upward
imports" (each with its reason) are the only ones allowed.  The modules at the top of
the package (``__init__``, ``__main__`` and the old import paths kept for users) sit
above every layer.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "shmstore"
DESIGN = ROOT / "docs" / "DESIGN.md"
LAYER_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`(\w+)/`\s*\|")
UPWARD_ROW = re.compile(r"^- `(shmstore(?:\.\w+)+)` → `(shmstore(?:\.\w+)+)`")


def section(title: str) -> list[str]:
    lines = DESIGN.read_text().splitlines()
    start = lines.index(f"## {title}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def layers() -> dict[str, int]:
    found = {m.group(2): int(m.group(1)) for line in section("Layers")
             if (m := LAYER_ROW.match(line))}
    assert found, "DESIGN.md has no Layers table"
    return found


def allowed_upward() -> set[tuple[str, str]]:
    return {(m.group(1), m.group(2)) for line in section("Layers")
            if (m := UPWARD_ROW.match(line))}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, tree: ast.AST | None = None) -> Iterator[str]:
    """Every shmstore module ``path`` (or the part ``tree`` of it) imports, at any depth."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree or ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "shmstore":
                continue
            # `from .pkg import module` imports the module, not just the package.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                yield candidate if is_module(candidate) else target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "shmstore":
                    yield alias.name


def is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def graph() -> dict[str, set[str]]:
    return {module_name(path): set(imports(path)) for path in PACKAGE.rglob("*.py")}


def folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and is_package(parts[1])) else None


def is_package(name: str) -> bool:
    return (PACKAGE / name / "__init__.py").exists()


def test_the_layers_table_names_every_folder_of_the_package() -> None:
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert set(layers()) == folders


def test_no_module_imports_a_higher_layer() -> None:
    rank = layers()
    allowed = allowed_upward()
    wrong = []
    for module, targets in graph().items():
        here = folder(module)
        if here is None:  # the top of the package: above every layer
            continue
        for target in targets:
            there = folder(target)
            if there is None or (module, target) in allowed:
                continue
            if rank[there] > rank[here]:
                wrong.append(f"{module} → {target}")
    assert wrong == [], "imports against DESIGN.md's layers: " + ", ".join(sorted(wrong))


def test_every_listed_upward_import_exists() -> None:
    # A stale exception would let a future upward import through unseen.
    edges = {(m, t) for m, targets in graph().items() for t in targets}
    assert allowed_upward() <= edges


def import_time(node: ast.AST) -> Iterator[ast.stmt]:
    """The import statements that run when the module is imported: at any depth of its
    top-level code (an ``if`` or ``try`` too), but not inside a function body or under
    ``if TYPE_CHECKING:`` (which never runs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and ast.unparse(child.test).endswith("TYPE_CHECKING"):
            for branch in child.orelse:
                yield from import_time(ast.Module(body=[branch], type_ignores=[]))
        elif not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from import_time(child)


def test_upward_imports_are_made_at_call_time_only() -> None:
    # An allowed upward import inside a function costs nothing until it is needed, and
    # cannot make an import-time cycle.
    at_import = set()
    for path in PACKAGE.rglob("*.py"):
        top = ast.Module(body=list(import_time(ast.parse(path.read_text()))), type_ignores=[])
        at_import |= {(module_name(path), t) for t in imports(path, top)}
    assert allowed_upward() & at_import == set()


def test_the_package_has_no_import_cycle() -> None:
    allowed = allowed_upward()
    edges = {m: sorted(t for t in targets if t != m and (m, t) not in allowed)
             for m, targets in graph().items()}
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in edges.get(node, ()):
            if nxt in path:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(node)

    for start in sorted(edges):
        if start not in done:
            visit(start, [start])
    assert cycles == [], "import cycles: " + "; ".join(" → ".join(c) for c in cycles)
