"""End to end: a manager and two executors as real processes on loopback."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import zmq
from echo_service import EchoRequest, EchoResponse

from client import Session
from mesh import errors
from mesh.wire.protocol import MAGIC, Done, Submit, encode


def test_echo_example_verbatim(mesh):
    with Session("echo-app", ctx=[]) as session:
        r = session.invoke(EchoRequest("hello"))
        assert r == EchoResponse("HELLO", 1)
        fut = session.submit(EchoRequest("x"))
        assert fut.result(30) == EchoResponse("X", 2)
        assert session.context() == ["hello", "x"]
        assert session.id().startswith("echo-app-")
        sid = session.id()
    with pytest.raises(errors.FailedPrecondition):
        Session(session_id=sid)


def test_context_carries_over_whichever_instance_runs(mesh):
    """Sequential tasks see each other's writes, also when different processes run them."""
    with Session("tools", ctx=[]) as s:
        pids = set()
        for i in range(1, 31):
            pid, n = s.invoke(("append", i), timeout=30)
            assert n == i
            pids.add(pid)
            if i == 10:  # force more instances into the session: a burst of parallel sleeps
                list(s.map([("sleep", 0.2)] * 4, timeout=30))
        assert s.context() == list(range(1, 31))
        assert len(pids) >= 2, "all tasks ran on one instance; the test did not exercise replication"


def test_400_tasks_at_once_all_come_back_right(mesh):
    with Session("echo-app", ctx=[]) as s:
        futs = [s.submit(EchoRequest(f"t{i}")) for i in range(400)]
        results = [f.result(60) for f in futs]
        assert [r.text for r in results] == [f"T{i}" for i in range(400)]
        # every append was a commuting "/-" patch: none is lost
        assert sorted(s.context()) == sorted(f"t{i}" for i in range(400))


def test_more_sessions_than_slots_all_progress(mesh):
    """4 slots, 7 sessions with work: idle instances move between sessions."""
    sessions = [Session("tools") for _ in range(7)]
    try:
        futs = [(s, s.submit(("sleep", 0.05))) for s in sessions for _ in range(3)]
        for s, f in futs:
            assert isinstance(f.result(60), int)
    finally:
        for s in sessions:
            s.close()


def test_unknown_application_is_not_found(mesh):
    with pytest.raises(errors.NotFound, match="no-such-app"):
        Session("no-such-app")


def test_entrypoint_exception_is_task_failed_and_mesh_keeps_serving(mesh):
    with Session("tools") as s:
        with pytest.raises(errors.TaskFailed) as info:
            s.invoke(("raise", 42), timeout=30)
        assert info.value.remote_type == "ValueError"
        assert "bad value 42" in str(info.value)
        assert "tools_service.py" in info.value.remote_traceback
        assert s.invoke(("echo", "still here"), timeout=30) == "still here"


def test_wrong_request_type_is_invalid_argument(mesh):
    with Session("echo-app", ctx=[]) as s:
        with pytest.raises(errors.InvalidArgument, match="EchoRequest"):
            s.invoke("not a request", timeout=30)


def test_crashing_instance_is_retried_then_fails_and_others_succeed(mesh, client):
    client.register_application(__import__("conftest").tools_spec("crashy", max_retries=1))
    try:
        with Session("crashy") as s:
            poison = s.submit(("crash", None))
            good = [s.submit(("echo", i)) for i in range(20)]
            with pytest.raises(errors.TaskFailed, match="2 attempts died"):
                poison.result(60)
            assert [f.result(60) for f in good] == list(range(20))
            assert s.invoke(("echo", "after"), timeout=30) == "after"
    finally:
        client.unregister_application("crashy")


def test_reopen_session_by_id_and_exclusive_arguments(mesh):
    with pytest.raises(ValueError):   # a reopen takes no new settings (name and id together: test_parity.py)
        Session(session_id="x", resreq={"cpu": 1})
    with Session("tools", ctx={"k": 1}) as s:
        again = Session(session_id=s.id())
        try:
            assert again.context() == {"k": 1}
            assert again.invoke(("echo", 5), timeout=30) == 5
        finally:
            again._conn.close()


def test_resreq_that_fits_nowhere_waits_and_small_one_runs(mesh):
    with Session("tools", resreq={"cpu": 0, "memory": "1m", "gpu": 0}) as s:
        assert s.invoke(("echo", 1), timeout=30) == 1
    with pytest.raises(errors.InvalidArgument, match="memory"):
        Session("tools", resreq={"memory": "lots"})


def test_garbage_on_the_port_does_not_stop_the_manager(mesh):
    host, port = mesh.endpoint.replace("tcp://", "").rsplit(":", 1)
    rnd = __import__("random").Random(7)
    for _ in range(20):  # raw TCP garbage: never completes a ZMTP handshake
        with socket.create_connection((host, int(port)), timeout=2) as raw:
            raw.sendall(bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 4096))))
    ctx = zmq.Context.instance()
    bad = ctx.socket(zmq.DEALER)
    bad.setsockopt(zmq.LINGER, 0)
    bad.connect(mesh.endpoint)
    try:  # well-formed ZMTP carrying malformed zeromesh messages
        bad.send_multipart([b"hello"])
        bad.send_multipart([MAGIC, b"\x10", b"\xc1garbage"])
        bad.send_multipart([b"ZM\x09", b"\x01", b"\x80"])
        bad.send_multipart(encode(Submit("nope", [1, 2], "c", False), [b"only one payload"]))
        bad.send_multipart(encode(Done([(1, None)]), [b"x"]))
        for _ in range(200):
            bad.send_multipart([MAGIC, bytes([rnd.randrange(256)]), bytes(rnd.getrandbits(8) for _ in range(16))])
        assert bad.poll(5000), "a bad peer gets a protocol error back"
        with Session("tools") as s:
            assert s.invoke(("echo", "ok"), timeout=30) == "ok"
    finally:
        bad.close(linger=0)
    assert mesh.manager.poll() is None


def _zmesh(*args, **kw):
    return subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True,
                          timeout=60, **kw)


def test_cli_register_list_view_close_unregister(mesh, tmp_path):
    spec = tmp_path / "cli-app.yaml"
    spec.write_text(f"metadata:\n  name: cli-app\nspec:\n  working_directory: {os.path.dirname(__file__)}/apps\n"
                    f"  command: {sys.executable}\n  arguments: [tools_service.py]\n")
    env = {**os.environ, "ZMESH_MANAGER": mesh.endpoint}
    r = _zmesh("register", "-f", str(spec), env=env)
    assert r.returncode == 0, r.stderr
    apps = __import__("json").loads(_zmesh("list", "-a", "--json", env=env).stdout)
    assert "cli-app" in [a["name"] for a in apps]
    execs = __import__("json").loads(_zmesh("list", "-e", "--json", "--manager", mesh.endpoint).stdout)
    assert len(execs) == 2 and all({"id", "state", "slots", "cpu", "memory", "gpu", "labels"} <= set(e) for e in execs)
    with Session("cli-app") as s:
        assert s.invoke(("echo", 1), timeout=30) == 1
        sessions = __import__("json").loads(_zmesh("list", "-s", "--json", env=env).stdout)
        mine = [x for x in sessions if x["id"] == s.id()][0]
        assert {"id", "application", "state", "created_at"} <= set(mine) and mine["state"] == "open"
        v = _zmesh("view", "-s", s.id(), env=env)
        assert v.returncode == 0 and s.id() in v.stdout
        c = _zmesh("close", "-s", s.id(), env=env)
        assert c.returncode == 0 and "closed" in c.stdout
    assert _zmesh("unregister", "-a", "cli-app", env=env).returncode == 0
    missing = _zmesh("unregister", "-a", "cli-app", env=env)
    assert missing.returncode == errors.NotFound.exit_code
    assert "not_found" in missing.stderr and "cli-app" in missing.stderr
    table = _zmesh("list", "-e", env=env)
    assert table.returncode == 0 and "executors" in table.stdout


def test_cli_bad_yaml_names_the_missing_field(mesh, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("metadata:\n  name: bad-app\nspec:\n  arguments: [x.py]\n")
    r = _zmesh("register", "-f", str(spec), "--manager", mesh.endpoint)
    assert r.returncode == errors.InvalidArgument.exit_code
    assert "spec.command" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_unreachable_manager_is_unavailable_not_a_hang(tmp_path):
    r = _zmesh("list", "-a", "--manager", "tcp://127.0.0.1:1", env={**os.environ, "ZMESH_REQUEST_TIMEOUT": "1"})
    assert r.returncode == errors.Unavailable.exit_code
    assert "unavailable" in r.stderr


def test_one_session_shared_by_many_threads(mesh):
    import concurrent.futures as cf
    with Session("tools") as s:
        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: s.invoke(("echo", i), timeout=60), range(200)))
        assert results == list(range(200))


def test_zmesh_up_starts_and_stops_a_local_mesh(tmp_path):
    import signal as sig

    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "up", "--executors", "2", "--slots", "1",
                             "--bind", "tcp://127.0.0.1:*", "--db", str(tmp_path / "up.db")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("zeromesh up: manager tcp://127.0.0.1:"), line
        endpoint = line.split()[3].rstrip(",")
        from client import Client
        with Client(endpoint) as c:
            assert len(c.list_executors()) == 2
    finally:
        proc.send_signal(sig.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    with pytest.raises(errors.Unavailable):
        from client import Client
        with Client(endpoint) as c:
            c.ping(timeout=1)


@pytest.mark.parametrize("command,arguments", [
    ("/bin/true", []),                                                       # exit 0 before hello
    (sys.executable, ["-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]),   # its own SIGKILL
])
def test_app_that_ends_before_hello_fails_its_tasks_instead_of_relaunching_forever(mesh, client, command, arguments):
    client.register_application({"metadata": {"name": "quitter"}, "spec": {"command": command, "arguments": arguments}})
    try:
        with Session("quitter") as s:
            with pytest.raises(errors.TaskFailed, match="failed to start 3 times"):
                s.invoke(("echo", 1), timeout=60)
        with Session("tools") as s:
            assert s.invoke(("echo", "fine"), timeout=30) == "fine"
    finally:
        client.unregister_application("quitter")


def test_app_that_cannot_start_fails_its_tasks_with_the_reason(mesh, client):
    client.register_application({"metadata": {"name": "broken"},
                                 "spec": {"command": "/nonexistent/python", "arguments": ["x.py"]}})
    try:
        with Session("broken") as s:
            with pytest.raises(errors.TaskFailed, match="failed to start 3 times.*nonexistent"):
                s.invoke(("echo", 1), timeout=60)
        with Session("tools") as s:
            assert s.invoke(("echo", "fine"), timeout=30) == "fine"
    finally:
        client.unregister_application("broken")


def test_cli_invoke_builds_a_dataclass_request_from_json_and_prints_the_answer_as_json(mesh):
    import json
    cli = [sys.executable, "-m", "client.cli", "invoke", "echo-app", "--manager", mesh.endpoint]
    ok = subprocess.run(cli + ["--input", '{"text": "hi"}'], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    answer = json.loads(ok.stdout)
    assert answer["text"] == "HI" and isinstance(answer["count"], int)
    bad = subprocess.run(cli + ["--input", '{"txt": "hi"}'], capture_output=True, text=True, timeout=120)
    assert bad.returncode == errors.InvalidArgument.exit_code
    assert "unknown field(s) txt" in bad.stderr and "missing field(s) text" in bad.stderr, bad.stderr
