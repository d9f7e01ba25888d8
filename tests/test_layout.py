"""The architecture as tests: one-way imports and an explicit public API."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# package -> packages it must never import
FORBIDDEN = {"mesh": {"client", "executor"}, "executor": {"client"}}
# inside mesh: the pure layers import no I/O layer (the core is sans-I/O: effects out, no sockets)
PURE = {"protocol", "errors", "scheduler", "patch", "resources", "spec", "context", "config", "batch",
        "core/__init__", "core/base", "core/effects", "core/tasks", "core/members", "core/contexts", "core/control"}
IO_MODULES = {"zmq", "asyncio", "sqlite3", "socket", "cloudpickle", "pickle", "threading", "subprocess"}
# modules of ours that do I/O: the core must not import them either
IO_OURS = {"mesh.store", "mesh.manager", "mesh.transport", "mesh.sdnotify", "mesh.process", "mesh.testing"}
PACKAGES = ("mesh", "executor", "client")


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    for path in (ROOT / package).glob("*.py"):
        for name in _imports(path):
            assert name.split(".")[0] not in FORBIDDEN[package], f"{path.name} imports {name}"


def test_pure_modules_do_no_io():
    graph = _graph()
    for mod in PURE:
        for name in _imports(ROOT / "mesh" / f"{mod}.py"):
            assert name.split(".")[0] not in IO_MODULES, f"mesh/{mod}.py imports {name}"
        own = _module_name(ROOT / "mesh" / f"{mod}.py")
        assert not graph[own] & IO_OURS, f"{own} imports {graph[own] & IO_OURS}"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph():
    """module -> modules of ours it imports, anywhere in the file (functions and TYPE_CHECKING too)."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                stem = ".".join(p for p in (base if node.level else "", node.module or "") if p)
                names = [stem] + [f"{stem}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {n for n in names if n in modules and n != mod}
        graph[mod] = deps
    return graph


def test_no_import_cycles_anywhere():
    """Tarjan's strongly connected components over every import of ours, lazy ones included."""
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            # a package importing its own submodules (its __init__ re-exporting them) is not a cycle
            if len(scc) > 1 and not all(m.startswith(min(scc, key=len) + ".") or m == min(scc, key=len)
                                        for m in scc):
                cycles.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_manager_never_unpickles():
    for path in (ROOT / "mesh").glob("*.py"):
        for name in _imports(path):
            assert name.split(".")[0] not in {"pickle", "cloudpickle", "dill"}, f"{path.name} imports {name}"


def test_public_api_exports():
    import client
    import executor
    assert set(client.__all__) == {"Client", "Connection", "Session", "ObjectRef", "put_object", "get_object",
                                   "update_object", "patch_object", "delete_object"}
    assert set(executor.__all__) == {"Instance"}
    for mod in (client, executor):
        for name in mod.__all__:
            assert getattr(mod, name) is not None


def test_every_error_has_a_distinct_stable_code():
    from mesh import errors
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.MeshError)]
    codes = {c.code for c in classes if c is not errors.MeshError}
    assert len(codes) == len(errors.ERRORS)
    for code in ("not_found", "invalid_argument", "task_failed", "unavailable", "deadline_exceeded"):
        assert code in errors.ERRORS
