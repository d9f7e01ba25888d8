"""The public testing kit, mesh.testing, tested: bounded waits, the socket tracker (with a
negative control), fast settings reaching the daemons, and every process ended by its PID."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import zmq
from conftest import tools_spec

from client import Client, Session
from mesh import testing
from mesh.errors import DeadlineExceeded, Unavailable
from mesh.ops.config import Settings
from mesh.testing import FAST, LocalMesh, SocketTracker, fast_settings, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gone(pid: int) -> bool:
    """True once no process has this PID (or only a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# -- wait_until ----------------------------------------------------------------------------------

def test_wait_until_returns_the_first_truthy_value():
    calls = []

    def third_time_lucky():
        calls.append(1)
        return "ready" if len(calls) == 3 else None

    assert wait_until(third_time_lucky, timeout=5, interval=0.01) == "ready"
    assert len(calls) == 3, "it stops polling once the predicate holds"


def test_wait_until_deadline_names_what_it_waited_for_and_the_last_value():
    calls = []

    def queue_is_empty():
        calls.append(1)
        return len(calls) * 0     # always 0: falsy, and the last value seen

    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        wait_until(queue_is_empty, timeout=0.3, interval=0.05)
    elapsed = time.monotonic() - t0
    assert "queue_is_empty" in str(info.value) and "last value: 0" in str(info.value)
    assert 0.3 <= elapsed < 2.0, "bounded in time"
    assert len(calls) <= 0.3 / 0.05 + 2, "bounded in count"
    with pytest.raises(DeadlineExceeded, match="the answers to arrive.*last value: \\[\\]"):
        wait_until(lambda: [], timeout=0.05, interval=0.01, what="the answers to arrive")


def test_wait_until_lets_a_failing_predicate_fail_at_once():
    def broken():
        raise KeyError("nope")

    t0 = time.monotonic()
    with pytest.raises(KeyError):
        wait_until(broken, timeout=30)
    assert time.monotonic() - t0 < 1


# -- socket tracking -----------------------------------------------------------------------------

def test_socket_tracker_names_a_socket_left_open_and_closes_it():
    ctx = zmq.Context.instance()
    with SocketTracker() as tracker:
        leaked = ctx.socket(zmq.DEALER)
        closed = ctx.socket(zmq.PUSH)
        closed.close(linger=0)
    assert len(tracker.open_sockets()) == 1
    assert "DEALER" in tracker.open_sockets()[0] and "test_testing_kit.py" in tracker.open_sockets()[0]
    tracker.close_all()
    assert leaked.closed and tracker.open_sockets() == []
    after = ctx.socket(zmq.DEALER)           # stopped: no longer recorded
    after.close(linger=0)
    assert len(tracker.sockets) == 2


PLUGIN_USER = textwrap.dedent("""
    import os, zmq
    from client import Session

    def test_leaks_a_socket():
        zmq.Context.instance().socket(zmq.DEALER)

    def test_closes_its_socket():
        zmq.Context.instance().socket(zmq.DEALER).close(linger=0)

    def test_runs_a_task_on_the_fixture_mesh(local_mesh):
        from client import Client
        with open(os.environ["PIDS_FILE"], "w") as f:
            f.write(" ".join(map(str, local_mesh.pids())))
        with Client(local_mesh.endpoint) as c:
            c.register_application({"metadata": {"name": "tools"}, "spec": {
                "working_directory": os.environ["APPS"], "command": os.environ["PYTHON"],
                "arguments": ["tools_service.py"]}})
        with Session("tools", manager=local_mesh.endpoint) as s:
            with open(os.environ["PIDS_FILE"], "a") as f:
                f.write(" %d" % s.invoke(("pid", None), timeout=60))
""")


def test_a_users_suite_with_the_plugin_fails_a_leak_passes_a_clean_test_and_ends_the_mesh(tmp_path):
    # Given a user's own test suite that loads the kit as a pytest plugin, with the tracker on
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["mesh.testing"]\nimport pytest\n\n'
                                          '@pytest.fixture(autouse=True)\ndef _tracked(zmq_sockets):\n    yield\n')
    (tmp_path / "test_user.py").write_text(PLUGIN_USER)
    pids_file = tmp_path / "pids"
    env = {**os.environ, "PYTHONPATH": ROOT, "PIDS_FILE": str(pids_file), "PYTHON": sys.executable,
           "APPS": os.path.join(ROOT, "tests", "apps")}
    # When it runs
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    # Then the leak fails (negative control; in teardown, so pytest says "error"), the clean tests
    # pass, and the leak is named
    assert r.returncode == 1 and "3 passed, 1 error" in out, out
    assert "ERROR test_user.py::test_leaks_a_socket" in out and "open sockets remain: DEALER" in out, out
    assert "test_user.py" in out.split("open sockets remain:")[1], "the leak says where the socket was made"
    # and every process of the fixture's mesh (manager, executors, the instance) is gone
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 4, pids
    wait_until(lambda: all(_gone(p) for p in pids), timeout=10, what=f"processes {pids} to end")


# -- settings ------------------------------------------------------------------------------------

def test_fast_shrinks_every_timer_and_limit_including_the_newly_named_ones():
    default = Settings()
    fast = fast_settings()
    names = {f.name for f in dataclasses.fields(Settings)}
    assert {k[len("ZMESH_"):].lower() for k in FAST if k != "ZMESH_LOG_LEVEL"} == names - testing.NOT_SHRUNK
    for name in names - testing.NOT_SHRUNK - {"liveness"}:   # liveness counts heartbeats: see dead_after
        assert getattr(fast, name) <= getattr(default, name), f"FAST raises {name}"
    assert fast.dead_after < default.dead_after
    for name in ("instance_write_timeout", "stop_grace", "cache_bytes", "heartbeat_interval", "idle_timeout"):
        assert getattr(fast, name) < getattr(default, name), f"FAST does not shrink {name}"
    assert fast_settings(stop_grace=0.1).stop_grace == 0.1


def test_executor_stop_grace_comes_from_settings(tmp_path):
    # Given an instance that ignores SIGTERM, on an executor whose stop grace is 1.5 s
    (tmp_path / "stubborn.py").write_text(textwrap.dedent("""
        import os, signal
        from executor import Instance
        ins = Instance()

        @ins.entrypoint
        def stubborn(req):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return os.getpid()

        if __name__ == "__main__":
            ins.run()
    """))
    with LocalMesh(executors=1, slots=1, env={**FAST, "ZMESH_STOP_GRACE": "1.5"}, log_dir=str(tmp_path)) as m:
        with Client(m.endpoint) as c:
            c.register_application({"metadata": {"name": "stubborn"}, "spec": {
                "working_directory": str(tmp_path), "command": sys.executable, "arguments": ["stubborn.py"]}})
        with Session("stubborn", manager=m.endpoint) as s:
            instance = s.invoke(None, timeout=60)
        # When the executor is told to stop
        t0 = time.monotonic()
        m.executors[0].send_signal(signal.SIGTERM)
        assert m.executors[0].wait(30) == 0
        elapsed = time.monotonic() - t0
    # Then it waited the grace (not the old hard-coded 5 s), then killed the instance
    assert 1.5 <= elapsed < 4.5, f"the executor took {elapsed:.1f}s to stop"
    wait_until(lambda: _gone(instance), timeout=10, what="the stubborn instance to be killed")


# -- LocalMesh -----------------------------------------------------------------------------------

def test_local_mesh_ends_every_process_by_pid_and_client_local_is_the_same_class(tmp_path):
    from client import local
    assert issubclass(local.LocalMesh, LocalMesh) and local.end_process is testing.end_process
    # Given a mesh that ran a task (so an instance process exists)
    with local.LocalMesh(executors=2, slots=1, env=FAST, log_dir=str(tmp_path)) as m:
        daemons = m.pids()
        assert len(set(daemons)) == 3 and all(not _gone(p) for p in daemons)
        with m.client() as c:
            assert sorted(e["id"] for e in c.list_executors() if e["state"] == "alive") == ["exec-0", "exec-1"]
            c.register_application(tools_spec())
        with Session("tools", manager=m.endpoint) as s:
            instance = s.invoke(("pid", None), timeout=60)
    # When it exits, then the manager, the executors and the instance are gone
    assert all(p.poll() is not None for p in [m.manager, *m.executors])
    wait_until(lambda: all(_gone(p) for p in [*daemons, instance]), timeout=10, what="every mesh process to end")


def test_the_kit_imports_without_pytest():
    # pytest is not a runtime dependency: without it, everything but the fixtures is there
    code = ("import sys; sys.modules['pytest'] = None; import mesh.testing as t; "
            "print(sorted(n for n in ('LocalMesh', 'wait_until', 'FAST', 'zmq_sockets', 'local_mesh') if hasattr(t, n)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['FAST', 'LocalMesh', 'wait_until']"


def test_local_mesh_fails_at_once_when_an_executor_cannot_join(tmp_path):
    # Given an executor that exits at start (a label the CLI refuses)
    m = LocalMesh(executors=1, env=FAST, labels=[{"": "no-key"}], log_dir=str(tmp_path))
    t0 = time.monotonic()
    # When the mesh starts, then it says so without waiting out its 20 s, and names the executor
    with pytest.raises(Unavailable, match="exited executor-0"):
        with m:
            pass
    assert time.monotonic() - t0 < 15
    assert all(_gone(p) for p in m.pids())
