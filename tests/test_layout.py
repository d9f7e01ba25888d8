"""The architecture as tests: one-way imports and an explicit public API."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# package -> packages it must never import
FORBIDDEN = {"mesh": {"client", "executor"}, "executor": {"client"}}
# inside mesh: the pure layers import no I/O (the core is sans-I/O: effects out, no sockets)
PURE = {"errors", "wire/protocol", "wire/pickled", "core/__init__", "core/flows", "model/flows", "core/functions",
        "model/functions", "core/base", "core/effects", "core/tasks", "core/members",
        "core/contexts", "core/control", "core/scheduler", "core/query", "model/records", "model/spec",
        "model/resources", "data/batch", "data/patch", "data/replica", "data/context", "data/objects",
        "data/cache", "ops/config"}
IO_MODULES = {"zmq", "asyncio", "sqlite3", "socket", "cloudpickle", "pickle", "threading", "subprocess"}
# modules of ours that do I/O: a pure module must not import them either
IO_OURS = {"mesh.data.store", "mesh.manager", "mesh.wire.transport", "mesh.ops.sdnotify", "mesh.ops.process",
           "mesh.testing"}
# the layers, top to bottom: a module imports only from its own layer or those below it
LAYERS = ["mesh.testing", "mesh.manager", "mesh.core", "mesh.data.store", "mesh.wire.transport", "mesh.model",
          "mesh.data", "mesh.wire.protocol", "mesh.wire.pickled", "mesh.ops", "mesh.errors"]
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


def _type_only(tree: ast.AST) -> set:
    """Import nodes under ``if TYPE_CHECKING:`` (annotations only: no dependency at run time)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            found |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return found


def _graph(runtime_only: bool = False):
    """module -> modules of ours it imports, anywhere in the file (in functions too; under
    TYPE_CHECKING too unless ``runtime_only``)."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        tree = ast.parse(path.read_text())
        skip = _type_only(tree) if runtime_only else set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
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
            # "from pkg import sub" depends on the submodule only, not on the package
            deps |= {n for n in names if n in modules and n != mod and not (n + "." + names[-1].rpartition(".")[2]
                                                                          in modules and n == names[0])}
        graph[mod] = deps
    return graph


def _layer(mod: str) -> int:
    """Index of the most specific layer ``mod`` belongs to (lower index = higher layer)."""
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return LAYERS.index(best)


def test_mesh_layers_import_downwards():
    graph = _graph(runtime_only=True)
    for mod, deps in graph.items():
        if not mod.startswith("mesh.") or mod == "mesh":
            continue
        for dep in deps:
            if dep.startswith("mesh.") and dep != "mesh":
                assert _layer(dep) >= _layer(mod) or dep.startswith(mod + "."), f"{mod} imports {dep}, a layer above it"


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
                                   "update_object", "patch_object", "delete_object", "Runner", "ObjectFuture",
                                   "SessionContext", "Functions", "EgressRecord", "AsyncSession",
                                   "AsyncPartStream", "PartStream", "FilterOperator"}
    assert set(executor.__all__) == {"Instance", "StatefulFunctions", "ValueSpec", "Address", "Context",
                                     "TypedValue", "RequestReplyHandler", "AsyncRequestReplyHandler"}
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
