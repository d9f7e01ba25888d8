"""``zmesh functions list / send / state`` and ``zmesh egress tail`` against a real mesh.

The CLI runs as its own process (``python -m client.cli``) where tests/apps is not importable, so
a reply of the functions' own classes is printed leniently, as its fields.
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
from click.testing import CliRunner
from conftest import HERE, mesh_with_app, zmesh_cli

from client import Functions
from client.cli import main
from client.local import LocalMesh
from mesh import errors

APP = {"metadata": {"name": "fn-demo"},
       "spec": {"command": sys.executable, "arguments": ["fn_demo.py"],
                "working_directory": os.path.join(HERE, "apps")}}


@pytest.fixture(scope="module")
def fmesh(tmp_path_factory):
    yield from mesh_with_app(tmp_path_factory, APP, "fn-cli")


_zmesh = zmesh_cli


def test_send_call_state_and_list(fmesh):
    sent = _zmesh(fmesh, "functions", "send", "demo/counter", "a", '{"k": 1}')
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.startswith("sent ") and sent.stdout.strip().endswith(" to demo/counter/a")
    # the inbox keeps order: the call is the address's second message
    called = _zmesh(fmesh, "functions", "send", "demo/counter", "a", "[1, 2]", "--call", "--timeout", "30")
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout) == {"n": 2, "got": [1, 2]}
    as_json = _zmesh(fmesh, "functions", "send", "demo/counter", "b", '"hi"', "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["id"] == "b"

    st = _zmesh(fmesh, "functions", "state", "demo/counter", "a", "--json")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout) == {"last": [1, 2], "n": 2}
    human = _zmesh(fmesh, "functions", "state", "demo/counter", "a")
    assert human.stdout.splitlines() == ["last = [1, 2]", "n = 2"]
    empty = _zmesh(fmesh, "functions", "state", "demo/counter", "nobody")
    assert empty.returncode == 0 and "holds no state" in empty.stdout

    rows = json.loads(_zmesh(fmesh, "functions", "list", "--json").stdout)
    by_type = {r["type"]: r for r in rows}
    assert {"demo/counter", "demo/point", "demo/maker"} <= set(by_type)
    assert by_type["demo/counter"]["application"] == "fn-demo"
    assert by_type["demo/counter"]["addresses"] >= 2 and by_type["demo/counter"]["instances"] >= 1
    table = CliRunner().invoke(main, ["functions", "list", "--manager", fmesh.endpoint])
    assert table.exit_code == 0, table.output
    assert "function types" in table.output and "demo/counter" in table.output and "fn-demo" in table.output


def test_a_json_object_is_built_into_the_dataclass_a_function_takes(fmesh):
    """JSON arrives as a dict: demo/point takes Point, so the dict is built into a Point from its
    fields; fields that do not fit fail the call with invalid_argument naming them, and a plain
    send of something else ends up in the dead-letter egress with the reason."""
    called = _zmesh(fmesh, "functions", "send", "demo/point", "p", '{"x": 1, "y": 2}', "--call")
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout) == {"x": 2, "y": 3}
    wrong = _zmesh(fmesh, "functions", "send", "demo/point", "p", '{"x": 1, "z": 2}', "--call")
    assert wrong.returncode == errors.InvalidArgument.exit_code, wrong.stdout
    assert "unknown field(s) z" in wrong.stderr and wrong.stderr.count("\n") == 1

    with Functions(fmesh.endpoint) as fx:
        before = sum(1 for _ in fx.egress("zmesh/dead-letters", timeout=0.5))
        sent = _zmesh(fmesh, "functions", "send", "demo/point", "p", "[1, 2]")
        assert sent.returncode == 0, sent.stderr
        assert next(fx.egress("zmesh/dead-letters", offset=before, timeout=30), None), "no dead letter in 30s"
    tail = _zmesh(fmesh, "egress", "tail", "zmesh/dead-letters", "--offset", str(before), "--timeout", "0.5",
                  "--json")
    assert tail.returncode == 0, tail.stderr
    dead = [json.loads(line) for line in tail.stdout.splitlines()]
    assert dead and dead[0]["offset"] == before
    assert dead[0]["message"]["reason"] == "demo/point takes Point, not list"
    assert dead[0]["message"]["message"] == [1, 2] and dead[0]["message"]["address"] == ["demo/point", "p"]


def test_replies_of_classes_not_importable_here_print_as_their_fields(fmesh):
    r = _zmesh(fmesh, "functions", "send", "demo/maker", "m", '"abcd"', "--call")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"x": 4, "y": 0}


def test_bad_input_is_one_line_and_the_errors_exit_code(fmesh):
    bad = _zmesh(fmesh, "functions", "send", "demo/counter", "a", "{oops")
    assert bad.returncode == errors.InvalidArgument.exit_code
    assert bad.stderr.startswith("error: invalid_argument: the message is not JSON") and "Traceback" not in bad.stderr
    name = _zmesh(fmesh, "functions", "send", "no-slash", "a", "1")
    assert name.returncode == errors.InvalidArgument.exit_code and "<namespace>/<name>" in name.stderr
    tail = _zmesh(fmesh, "egress", "tail", "bad name")
    assert tail.returncode == errors.InvalidArgument.exit_code and len(tail.stderr.splitlines()) == 1


def test_egress_tail_prints_offsets_and_stops_when_quiet(fmesh):
    with Functions(fmesh.endpoint) as fx:
        for i in range(3):
            fx.call("demo/counter", "tail", {"i": i}, timeout=30)
    started = time.monotonic()
    r = _zmesh(fmesh, "egress", "tail", "demo/out", "--timeout", "1")
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    mine = [line for line in r.stdout.splitlines() if '"id": "tail"' in line]
    assert [json.loads(line.split(" ", 1)[1])["got"] for line in mine] == [{"i": 0}, {"i": 1}, {"i": 2}]
    offsets = [int(line.split(" ", 1)[0]) for line in r.stdout.splitlines()]
    assert offsets == list(range(len(offsets)))
    assert took < 30, "it stops about --timeout after the last record"
    rest = _zmesh(fmesh, "egress", "tail", "demo/out", "--offset", str(offsets[-1]), "--timeout", "0", "--json")
    assert [json.loads(line)["offset"] for line in rest.stdout.splitlines()] == [offsets[-1]]
    nothing = _zmesh(fmesh, "egress", "tail", "demo/none", "--timeout", "0.5")
    assert nothing.returncode == 0 and nothing.stdout == ""


def test_egress_tail_follow_prints_new_records_until_ctrl_c(fmesh):
    env = {**os.environ, "ZMESH_MANAGER": fmesh.endpoint, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "client.cli", "egress", "tail", "demo/follow-out", "--follow",
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE)
    lines: "queue.Queue[str]" = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in p.stdout], daemon=True)
    reader.start()
    try:
        with Functions(fmesh.endpoint) as fx:
            fx.call("demo/echo-egress", "f", "first", timeout=30)
            first = json.loads(lines.get(timeout=30))
            assert first["offset"] == 0 and first["message"] == "first"
            fx.call("demo/echo-egress", "f", "second", timeout=30)
            second = json.loads(lines.get(timeout=30))
            assert second["offset"] == 1 and second["message"] == "second"
        assert p.poll() is None, "--follow keeps going"
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 0
        assert "Traceback" not in p.stderr.read()
    finally:
        LocalMesh.end(p)
