"""The shape of the package, checked statically (ast, no import of pyqcow).

* imports flow one way: no import cycle inside ``pyqcow``, imports inside
  functions included (``if TYPE_CHECKING:`` blocks are not imports at run time);
* no file in pyqcow/ over 600 lines, no function over 80;
* entry bits (spec's L1/L2/refcount-table masks and QCOW_OFLAG_* flags) are
  masked only in pyqcow/entries.py;
* only the metadata door writes the header: ``build_cluster0(`` is called only
  in header.py, writer.py and metadata.py;
* nothing inside pyqcow imports the package root ``pyqcow`` (its __init__).

Each check has an explicit allow-list {what: why} for what is over today; an
entry that is no longer needed fails its own test, so the lists only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "pyqcow"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
IGNORED_MODULES = {"pyqcow._native"}  # the C extension (csrc/), no source to parse

# -- allow-lists (the lead empties them as the branches are merged) ---------------
#: import edges (importer, imported) left out of the cycle search
CYCLE_EDGES_ALLOWED: dict[tuple[str, str], str] = {}
#: files over MAX_FILE_LINES
LONG_FILES_ALLOWED: dict[str, str] = {}
#: functions (path::qualname) over MAX_FUNCTION_LINES
LONG_FUNCTIONS_ALLOWED: dict[str, str] = {}
#: files that use an entry-bit mask outside entries.py/spec.py
ENTRY_MASKS_ALLOWED: dict[str, str] = {}
#: files that call build_cluster0 outside the door
CLUSTER0_WRITERS_ALLOWED: dict[str, str] = {}
#: files that import the package root
ROOT_IMPORTS_ALLOWED: dict[str, str] = {}

ENTRY_MASKS = frozenset({
    "L1E_OFFSET_MASK", "L1E_RESERVED_MASK", "L2E_OFFSET_MASK", "L2E_RESERVED_MASK",
    "REFT_OFFSET_MASK", "QCOW_OFLAG_COPIED", "QCOW_OFLAG_COMPRESSED", "QCOW_OFLAG_ZERO",
})
ENTRY_MASK_OWNERS = {"pyqcow/entries.py", "pyqcow/spec.py"}
CLUSTER0_DOOR = {"pyqcow/header.py", "pyqcow/writer.py", "pyqcow/metadata.py"}


# -- the package as the checks see it ---------------------------------------------
def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


@cache
def sources() -> dict[str, Path]:
    """Module name -> file, for every pyqcow/**/*.py."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


@cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node`` (functions too), but not the body of an
    ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                if isinstance(other, ast.Import | ast.ImportFrom):
                    yield other
                else:
                    yield from _import_nodes(other)
        else:
            yield from _import_nodes(child)


def _resolve(name: str) -> str | None:
    """The module of pyqcow that importing ``name`` runs last (None: not pyqcow's)."""
    mods = sources()
    while name and name not in mods:
        if name in IGNORED_MODULES:
            return None
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> Iterator[tuple[str, int]]:
    """(imported pyqcow module, line) for every import in ``module``'s file.

    Relative imports are resolved; ``from pkg import name`` is an import of the
    submodule ``pkg.name`` when there is one, else of ``pkg``.
    """
    path = sources()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _import_nodes(tree(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pyqcow":
                    target = _resolve(alias.name)
                    if target:
                        yield target, node.lineno
            continue
        if node.level:
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        if base.split(".")[0] != "pyqcow":
            continue
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in IGNORED_MODULES:
                continue
            target = sub if sub in sources() else _resolve(base)
            if target:
                yield target, node.lineno


@cache
def import_graph() -> dict[str, dict[str, int]]:
    """importer -> {imported: first line}."""
    graph: dict[str, dict[str, int]] = {}
    for module in sources():
        edges: dict[str, int] = {}
        for target, line in imports_of(module):
            if target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            for child in children:
                if state.get(child) == 1:
                    return path[path.index(child):] + [child]
                if child not in state and child in graph:
                    state[child] = 1
                    path.append(child)
                    stack.append((child, iter(sorted(graph[child]))))
                    break
            else:
                state[node] = 2
                path.pop()
                stack.pop()
    return None


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return "\n".join(
        f"  {a} -> {b}  ({_rel(sources()[a])}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])
    )


# -- imports ----------------------------------------------------------------------
def test_the_import_graph_sees_function_level_and_relative_imports() -> None:
    g = import_graph()
    assert "pyqcow.chain" in g["pyqcow.info"]  # from .chain import ... (module level)
    assert "pyqcow.snapshot_table" in g["pyqcow.info"]  # from .snapshot_table import ... (in a function)
    assert "pyqcow.fuse" in g["pyqcow.cli.mount"]  # from .. import fuse (a submodule)
    assert "pyqcow.testing.guestops" in g["pyqcow.testing.reproduce"]
    assert not any(t in IGNORED_MODULES for edges in g.values() for t in edges)
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_no_import_cycle_inside_pyqcow() -> None:
    graph = {m: {t: line for t, line in edges.items() if (m, t) not in CYCLE_EDGES_ALLOWED}
             for m, edges in import_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle:\n" + _describe(cycle, graph)


def test_cycle_allow_list_names_only_edges_that_exist() -> None:
    g = import_graph()
    stale = [e for e in CYCLE_EDGES_ALLOWED if e[1] not in g.get(e[0], {})]
    assert stale == [], f"no longer imported: remove from CYCLE_EDGES_ALLOWED: {stale}"


def test_nothing_inside_pyqcow_imports_the_package_root() -> None:
    offenders = {
        _rel(sources()[m]): line
        for m, edges in import_graph().items() if m != "pyqcow"
        for t, line in edges.items() if t == "pyqcow"
    }
    assert sorted(set(offenders) - set(ROOT_IMPORTS_ALLOWED)) == [], offenders
    assert sorted(set(ROOT_IMPORTS_ALLOWED) - set(offenders)) == [], "stale allow-list entries"


# -- sizes ------------------------------------------------------------------------
def _functions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                yield name, child
            yield from _functions(child, name + ".")
        else:
            yield from _functions(child, prefix)


def long_files() -> dict[str, int]:
    out = {}
    for path in sources().values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_FILE_LINES:
            out[_rel(path)] = n
    return out


def long_functions() -> dict[str, int]:
    out = {}
    for path in sources().values():
        for name, fn in _functions(tree(path)):
            n = fn.end_lineno - fn.lineno + 1
            if n > MAX_FUNCTION_LINES:
                out[f"{_rel(path)}::{name}"] = n
    return out


def test_no_file_over_600_lines() -> None:
    over = {k: v for k, v in long_files().items() if k not in LONG_FILES_ALLOWED}
    assert over == {}, f"files over {MAX_FILE_LINES} lines: {over}"
    stale = sorted(set(LONG_FILES_ALLOWED) - set(long_files()))
    assert stale == [], f"no longer over: remove from LONG_FILES_ALLOWED: {stale}"


def test_no_function_over_80_lines() -> None:
    over = {k: v for k, v in long_functions().items() if k not in LONG_FUNCTIONS_ALLOWED}
    assert over == {}, f"functions over {MAX_FUNCTION_LINES} lines: {over}"
    stale = sorted(set(LONG_FUNCTIONS_ALLOWED) - set(long_functions()))
    assert stale == [], f"no longer over: remove from LONG_FUNCTIONS_ALLOWED: {stale}"


# -- who may touch what -----------------------------------------------------------
def _names_used(path: Path) -> Iterator[tuple[str, int]]:
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Name):
            yield node.id, node.lineno
        elif isinstance(node, ast.Attribute):
            yield node.attr, node.lineno
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                yield alias.name, node.lineno


def entry_mask_users() -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for path in sources().values():
        rel = _rel(path)
        if rel in ENTRY_MASK_OWNERS:
            continue
        lines = sorted({line for name, line in _names_used(path) if name in ENTRY_MASKS})
        if lines:
            out[rel] = lines
    return out


def test_entry_bits_are_masked_only_in_entries() -> None:
    users = entry_mask_users()
    over = {k: v for k, v in users.items() if k not in ENTRY_MASKS_ALLOWED}
    assert over == {}, f"entry-bit masks outside pyqcow/entries.py (file: lines): {over}"
    stale = sorted(set(ENTRY_MASKS_ALLOWED) - set(users))
    assert stale == [], f"no longer masking: remove from ENTRY_MASKS_ALLOWED: {stale}"


def cluster0_writers() -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for path in sources().values():
        rel = _rel(path)
        lines = [n.lineno for n in ast.walk(tree(path)) if isinstance(n, ast.Call) and (
            getattr(n.func, "id", None) == "build_cluster0"
            or getattr(n.func, "attr", None) == "build_cluster0")]
        if lines and rel not in CLUSTER0_DOOR:
            out[rel] = lines
    return out


def test_only_the_metadata_door_builds_the_header_cluster() -> None:
    users = cluster0_writers()
    over = {k: v for k, v in users.items() if k not in CLUSTER0_WRITERS_ALLOWED}
    assert over == {}, f"build_cluster0() called outside the door (file: lines): {over}"
    stale = sorted(set(CLUSTER0_WRITERS_ALLOWED) - set(users))
    assert stale == [], f"no longer calling: remove from CLUSTER0_WRITERS_ALLOWED: {stale}"


def test_every_module_has_a_layer_in_the_import_linter_contract() -> None:
    """lint-imports checks only the modules its layers name: a new top-level module
    or package of pyqcow must be placed in a layer (pyproject.toml)."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    named = {m.strip("() ") for layer in layers for m in layer.replace("|", ":").split(":")}
    top = {p.stem for p in PKG.glob("*.py") if p.name != "__init__.py"}
    top |= {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert sorted(top - named) == [], "modules with no layer in [tool.importlinter]"
    assert sorted(named - top) == [], "layers naming modules that do not exist"
