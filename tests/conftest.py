"""Fixtures: a real local mesh (manager + executors as processes) on random loopback ports."""
from __future__ import annotations

import os
import sys
from typing import Dict, Iterator

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples", "echo"))
sys.path.insert(0, os.path.join(HERE, "apps"))

# Every timer shrunk: tests wait on events, and these bound how long an event can take.
FAST: Dict[str, str] = {
    "ZMESH_HEARTBEAT_INTERVAL": "0.2",
    "ZMESH_LIVENESS": "10",
    "ZMESH_IDLE_TIMEOUT": "5",
    "ZMESH_REQUEST_TIMEOUT": "10",
    "ZMESH_LOG_LEVEL": "INFO",
}
for k, v in FAST.items():
    os.environ.setdefault(k, v)

from client import Client  # noqa: E402
from client.local import LocalMesh  # noqa: E402

ECHO_YAML = os.path.join(ROOT, "examples", "echo", "echo-app.yaml")


def tools_spec(name: str = "tools", **spec: object) -> dict:
    return {"metadata": {"name": name},
            "spec": {"working_directory": os.path.join(HERE, "apps"), "command": sys.executable,
                     "arguments": ["tools_service.py"], **spec}}


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
