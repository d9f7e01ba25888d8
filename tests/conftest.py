"""Fixtures: a real local mesh (manager + executors as processes) on random loopback ports.

The kit is the public one, mesh.testing: FAST shrinks every timer, wait_until bounds
every wait, and zmq_sockets (autouse here) fails any test that leaves a socket open.
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from typing import Any, Iterator

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples", "echo"))
sys.path.insert(0, os.path.join(HERE, "apps"))

from mesh.testing import FAST, wait_until, zmq_sockets  # noqa: E402,F401  (zmq_sockets: a fixture)

# The test process itself (clients, sessions) runs with the same short timers as the daemons.
for k, v in FAST.items():
    os.environ.setdefault(k, v)

from client import Client  # noqa: E402
from client.local import LocalMesh  # noqa: E402

ECHO_YAML = os.path.join(ROOT, "examples", "echo", "echo-app.yaml")



@pytest.fixture(autouse=True)
def _no_open_sockets(zmq_sockets: object) -> Iterator[None]:
    """Every test here: a zmq socket left open fails it (mesh.testing.zmq_sockets)."""
    yield


def tools_spec(name: str = "tools", **spec: object) -> dict:
    return {"metadata": {"name": name},
            "spec": {"working_directory": os.path.join(HERE, "apps"), "command": sys.executable,
                     "arguments": ["tools_service.py"], **spec}}


def stored(db: str, sql: str, *args: Any) -> Any:
    """One value read from a manager's SQLite database, read-only (the manager keeps writing):
    what is on disk, for tests that wait until something survives a crash."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute(sql, args).fetchone()
    finally:
        conn.close()
    return None if row is None else row[0]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """Two executors with two slots each; echo-app and tools registered."""
    m = LocalMesh(executors=2, slots=2, env=FAST, log_dir=str(tmp_path_factory.mktemp("logs")))
    with m:
        os.environ["ZMESH_MANAGER"] = m.endpoint
        with Client(m.endpoint) as c:
            c.register_application(ECHO_YAML)
            c.register_application(tools_spec())
        yield m
    os.environ.pop("ZMESH_MANAGER", None)


@pytest.fixture
def client(mesh: LocalMesh) -> Iterator[Client]:
    with Client(mesh.endpoint) as c:
        yield c


def zmesh_cli(mesh: Any, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``zmesh ARGS`` as a real process against ``mesh`` (its exit code and one-line errors)."""
    env = {**os.environ, "ZMESH_MANAGER": mesh.endpoint, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=HERE)


def mesh_with_app(tmp_path_factory: Any, spec: dict, name: str, **kwargs: Any) -> Iterator[LocalMesh]:
    """A module's own mesh (1 executor x 2 slots, FAST timers) with the application ``spec``."""
    m = LocalMesh(**{"executors": 1, "slots": 2, "env": FAST, "log_dir": str(tmp_path_factory.mktemp(name)),
                     **kwargs})
    with m:
        with Client(m.endpoint) as c:
            c.register_application(spec)
        yield m

