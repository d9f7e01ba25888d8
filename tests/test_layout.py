"""The architecture as tests: one-way imports and an explicit public API."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# package -> packages it must never import
FORBIDDEN = {"mesh": {"client", "executor"}, "executor": {"client"}}
# inside mesh: the pure layers import no I/O layer
PURE = {"protocol", "errors", "scheduler", "patch", "resources", "spec", "context", "config"}
IO_MODULES = {"zmq", "asyncio", "sqlite3", "socket", "cloudpickle", "pickle"}


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
    for mod in PURE:
        for name in _imports(ROOT / "mesh" / f"{mod}.py"):
            assert name.split(".")[0] not in IO_MODULES, f"mesh/{mod}.py imports {name}"


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
