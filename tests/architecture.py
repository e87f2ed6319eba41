"""What code each part of clipcap runs, read from the source (no import): for the import-rule
and DVC-dependency tests.

A module's imports are every ``import clipcap...`` / ``from clipcap... import`` in it, at the top
or inside functions (a lazy import still runs when its function does), except in ``cli.py``,
where only the top-level ones count: the CLI imports a verb's code only when that verb runs.
Importing ``clipcap.a.b`` also runs the ``__init__.py`` of ``clipcap`` and ``clipcap.a``, and a
module that reads a file beside it (``environment.py`` reads ``offline.env``) depends on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "clipcap"
TOP_LEVEL_ONLY = {"clipcap.cli"}
DATA_FILES = {"clipcap.environment": ["offline.env"]}


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.resolve().relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def direct_imports(name: str) -> set[str]:
    """The clipcap modules that module ``name`` imports."""
    tree = ast.parse(module_file(name).read_text())
    nodes = tree.body if name in TOP_LEVEL_ONLY else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "clipcap"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "clipcap":
            found.add(node.module)
            # `from clipcap.pipeline.stages import fetch` imports the submodule fetch
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return {m for m in found if module_file(m)}


def closure(*roots: str) -> set[str]:
    """Every clipcap module that importing ``roots`` runs, package ``__init__``s included."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the parent packages
        todo += sorted(direct_imports(name))
    return seen


def files_of(modules: set[str]) -> set[Path]:
    """The source files (and data files read beside them) of ``modules``, relative to the repository."""
    root = SRC.parent
    files = set()
    for name in modules:
        path = module_file(name)
        files.add(path.relative_to(root))
        files |= {(path.parent / extra).relative_to(root) for extra in DATA_FILES.get(name, [])}
    return files


def package_files() -> set[Path]:
    root = SRC.parent
    return {p.relative_to(root) for p in PACKAGE.rglob("*") if p.is_file() and p.suffix in (".py", ".env")
            and "__pycache__" not in p.parts}
