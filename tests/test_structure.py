"""The package's shape, checked on its source: no import circle, one writer of the
outbox, and imports inside functions only at the seams that need them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "django_satori"
#: The sandbox is a separate program shipped in the package (its own import rules).
LEFT_OUT = ("migrations", "sandbox")
#: (module, what it imports inside a function) and why that cannot be at the top.
SEAMS = {
    # tasks.py imports the engine to run it; the engine reaches the tasks only here.
    ("django_satori.sync.dispatch", "django_satori.tasks"),
    # An optional module that exists only inside a uWSGI worker.
    ("django_satori.sync.dispatch", "uwsgi"),
    # AppConfig.ready(): these need the models loaded.
    ("django_satori.apps", "django_satori.checks"),
    ("django_satori.apps", "django_satori.sync"),
}
SYNC_STATE_WRITES = {
    "update",
    "create",
    "bulk_create",
    "bulk_update",
    "delete",
    "get_or_create",
    "update_or_create",
    "save",
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if any(part in LEFT_OUT for part in parts):
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        package = package.rsplit(".", 1)[0]
    return f"{package}.{node.module}" if node.module else package


def _imported(module: str, path: Path, node: ast.stmt, known: set[str]) -> set[str]:
    """Modules of the package that ``node`` makes Python execute (parents included)."""
    names: set[str] = set()
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
        base = _resolve(module, path, node)
        names = {base} | {f"{base}.{alias.name}" for alias in node.names}
    result = set()
    for name in names:
        while name:
            if name in known:
                result.add(name)
            name = name.rpartition(".")[0]
    return {name for name in result if name != "django_satori" or module == name}


def _top_level_imports(tree: ast.Module) -> list[ast.stmt]:
    found: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue  # not executed
        elif isinstance(node, ast.Try | ast.If):
            found.extend(n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom))
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    graph = {}
    for module, path in found.items():
        tree = ast.parse(path.read_text())
        edges: set[str] = set()
        for node in _top_level_imports(tree):
            edges |= _imported(module, path, node, known)
        # A module's own packages run before it (importing it runs them): not a circle.
        ancestors = {module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)}
        graph[module] = edges - {module} - ancestors
    return graph


def test_no_import_circle_in_the_package():
    graph = import_graph()
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert circles == []


def test_imports_inside_functions_only_at_the_seams():
    found = modules()
    known = set(found)
    late = set()
    for module, path in found.items():
        tree = ast.parse(path.read_text())
        top = set(map(id, _top_level_imports(tree)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
                if any(
                    isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test)
                    for parent in tree.body
                    if node in ast.walk(parent)
                ):
                    continue
                targets = _imported(module, path, node, known) or {
                    alias.name for alias in node.names
                } - {"*"}
                late |= {(module, target) for target in targets if target != "django_satori"}
    assert late <= SEAMS, sorted(late - SEAMS)


def _receiver_root(node: ast.expr) -> str:
    """``SyncState.objects.filter(...).update`` -> ``SyncState``."""
    while True:
        if isinstance(node, ast.Attribute):
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Name):
            return node.id
        else:
            return ""


def test_only_the_outbox_writes_sync_state():
    writers = set()
    for module, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr in SYNC_STATE_WRITES
                and _receiver_root(func.value) == "SyncState"
            ):
                writers.add(module)
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in {"insert_rows", "update_rows", "insert_from"} and node.args:
                first = node.args[0]
                if isinstance(first, ast.Name) and first.id == "SyncState":
                    writers.add(module)
    assert writers == {"django_satori.sync.outbox"}


def test_the_checks_see_what_they_look_for():
    """The three checks above would pass on an empty graph: make sure they read code."""
    graph = import_graph()
    assert "django_satori.sync.outbox" in graph["django_satori.sync.pushing"]
    assert "django_satori.sync" in graph["django_satori.bulk"]  # a parent package runs first
    assert _receiver_root(ast.parse("SyncState.objects.filter(a=1).update(b=2)").body[0].value)
