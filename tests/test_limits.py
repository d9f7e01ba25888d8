"""Every limit is named in its error, and hitting one loses nothing else."""
from __future__ import annotations

import subprocess
import sys

import pytest
import zmq
from conftest import FAST, tools_spec

from client import Client, Connection, Session
from client.local import LocalMesh
from mesh import errors
from mesh.ops.config import Settings
from mesh.wire.protocol import Submit, encode

LIMITS = {**FAST, "ZMESH_MAX_MESSAGE_SIZE": str(1 << 20), "ZMESH_MAX_PENDING": "50",
          "ZMESH_MAX_CONTEXT_SIZE": str(64 * 1024)}


@pytest.fixture(scope="module")
def small_mesh(tmp_path_factory):
    m = LocalMesh(executors=1, slots=1, env=LIMITS, log_dir=str(tmp_path_factory.mktemp("limits")))
    with m:
        with Client(m.endpoint) as c:
            c.register_application(tools_spec(labels={"never": "match"}, name="nowhere"))
            c.register_application(tools_spec())
        yield m


def test_queue_limit_refuses_the_overflow_by_name(small_mesh):
    with Session("nowhere", manager=small_mesh.endpoint) as s:   # no executor fits: everything queues
        futs = [s.submit(("echo", i)) for i in range(60)]
        refused = [f for f in futs[50:]]
        for f in refused:
            with pytest.raises(errors.ResourceExhausted, match="max_pending"):
                f.result(30)
        assert s.info()["pending"] == 50


def test_oversized_request_is_refused_before_it_is_sent(small_mesh):
    conn = Connection(small_mesh.endpoint, Settings.load(max_message_size=1 << 20))
    try:
        with Session("tools", connection=conn) as s:
            with pytest.raises(errors.ResourceExhausted, match="max_message_size"):
                s.submit(("echo", b"x" * (2 << 20)))
            assert s.invoke(("echo", "small"), timeout=30) == "small"
    finally:
        conn.close()


def test_oversized_message_from_a_raw_peer_is_dropped_and_others_are_served(small_mesh):
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(small_mesh.endpoint)
    try:
        raw.send_multipart(encode(Submit("x", [1], "c", False), [b"y" * (2 << 20)]))
        with Session("tools", manager=small_mesh.endpoint) as s:
            assert s.invoke(("echo", 1), timeout=30) == 1
    finally:
        raw.close(0)


def test_context_limit_is_named_and_the_context_is_unchanged(small_mesh):
    with pytest.raises(errors.ResourceExhausted, match="max_context_size"):
        Session("tools", ctx="x" * (100 * 1024), manager=small_mesh.endpoint)
    with Session("tools", ctx={"log": []}, manager=small_mesh.endpoint) as s:
        s.patch_context([{"op": "add", "path": "/log/-", "value": "a" * 1000}])
        with pytest.raises(errors.ResourceExhausted, match="max_context_size"):
            for _ in range(100):
                s.patch_context([{"op": "add", "path": "/log/-", "value": "b" * 1000}])
        ctx = s.context()
        assert 1 < len(ctx["log"]) < 100
        assert s.invoke(("context", None), timeout=30) == ctx, "replicas saw no refused write"


def test_cli_drain_unknown_executor_is_not_found(small_mesh):
    r = subprocess.run([sys.executable, "-m", "client.cli", "drain", "-e", "nope", "--manager",
                        small_mesh.endpoint], capture_output=True, text=True, timeout=60)
    assert r.returncode == errors.NotFound.exit_code and "nope" in r.stderr
