"""``zmesh invoke APP --stream`` against a real mesh: parts printed as they arrive.

The CLI runs as its own process (``python -m client.cli``), as a user runs it; the service is
tests/apps/stream_service.py (an entrypoint that yields ``part-0``, ``part-1``, ...).
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import HERE, mesh_with_app, wait_until, zmesh_cli

from client.local import LocalMesh
from mesh import errors

APP = {"metadata": {"name": "stream-cli"},
       "spec": {"command": sys.executable, "arguments": ["stream_service.py"],
                "working_directory": os.path.join(HERE, "apps"), "max_retries": 0}}


@pytest.fixture(scope="module")
def smesh(tmp_path_factory):
    yield from mesh_with_app(tmp_path_factory, APP, "stream-cli")


def _env(mesh) -> dict:
    return {**os.environ, "ZMESH_MANAGER": mesh.endpoint, "PYTHONUNBUFFERED": "1"}


_zmesh = zmesh_cli


def test_parts_print_in_order_one_line_each(smesh):
    r = _zmesh(smesh, "invoke", "stream-cli", "--input", '{"n": 5, "delay": 0.02}', "--stream", "--timeout", "30")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == [f"part-{i}" for i in range(5)]
    # without --stream, the same entrypoint answers the list of its parts at once
    whole = _zmesh(smesh, "invoke", "stream-cli", "--input", '{"n": 3}', "--timeout", "30")
    assert whole.returncode == 0, whole.stderr
    assert json.loads(whole.stdout) == ["part-0", "part-1", "part-2"]


def test_json_prints_one_object_per_part(smesh):
    r = _zmesh(smesh, "invoke", "-a", "stream-cli", "--input", '{"n": 4}', "--stream", "--json")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == [{"seq": i, "part": f"part-{i}"} for i in range(4)]


def test_parts_arrive_before_the_stream_ends(smesh):
    """Each line is out while the generator is still making the next part (not printed at the end)."""
    p = subprocess.Popen([sys.executable, "-m", "client.cli", "invoke", "stream-cli", "--input",
                          '{"n": 3, "delay": 1.0}', "--stream", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env(smesh), cwd=HERE)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stdout], daemon=True).start()
    try:
        assert json.loads(lines.get(timeout=30)) == {"seq": 0, "part": "part-0"}
        assert p.poll() is None, "the first part printed while the stream went on"
        assert [json.loads(lines.get(timeout=30))["seq"] for _ in range(2)] == [1, 2]
        assert p.wait(timeout=30) == 0
    finally:
        LocalMesh.end(p)


def test_an_error_after_parts_prints_them_then_the_error(smesh):
    r = _zmesh(smesh, "invoke", "stream-cli", "--input", '{"n": 5, "fail_at": 3}', "--stream")
    assert r.returncode == errors.TaskFailed.exit_code, (r.stdout, r.stderr)
    assert [json.loads(line) for line in r.stdout.splitlines()] == ["part-0", "part-1", "part-2"]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: task_failed: "), r.stderr
    assert "failed after 3 parts" in err[0] and "Traceback" not in r.stderr


def test_timeout_bounds_the_wait_for_each_part(smesh):
    """--timeout 0.5: part-0 comes at once, part-1 only 20 s later: deadline_exceeded after ~0.5 s."""
    started = time.monotonic()
    r = _zmesh(smesh, "invoke", "stream-cli", "--input", '{"n": 3, "delay": 20}', "--stream", "--json",
               "--timeout", "0.5")
    took = time.monotonic() - started
    assert r.returncode == errors.DeadlineExceeded.exit_code, (r.stdout, r.stderr)
    assert [json.loads(line) for line in r.stdout.splitlines()] == [{"seq": 0, "part": "part-0"}]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: deadline_exceeded: no part of the stream within 0.5s"), r.stderr
    assert took < 15, f"took {took:.1f}s: not bounded by --timeout"


def test_ctrl_c_stops_the_remote_generator_and_exits_130(smesh, tmp_path):
    req = json.dumps({"n": 1000, "delay": 0.2, "dir": str(tmp_path), "tag": "cli"})
    p = subprocess.Popen([sys.executable, "-m", "client.cli", "invoke", "stream-cli", "--input", req, "--stream"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(smesh), cwd=HERE)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stdout], daemon=True).start()
    try:
        assert json.loads(lines.get(timeout=30)) == "part-0"
        assert json.loads(lines.get(timeout=30)) == "part-1"
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 130
        stderr = p.stderr.read()
        assert "Traceback" not in stderr, stderr
        # the generator was closed (its finally wrote the marker), not left running to its end
        wait_until(lambda: (tmp_path / "closed-cli").exists(), timeout=15, what="the generator closed")
    finally:
        LocalMesh.end(p)


def test_stream_refuses_count(smesh):
    r = _zmesh(smesh, "invoke", "stream-cli", "--stream", "--count", "2")
    assert r.returncode == 2 and "--stream sends one request" in r.stderr
