"""Process faults on a private mesh: an executor killed mid-stream, the manager restarted."""
from __future__ import annotations

import os
import signal

import pytest
from conftest import FAST, stored, tools_spec, wait_until

from client import Client, Session
from client.local import LocalMesh


def _task(i):
    """Odd tasks echo their number (so an answer given to the wrong task shows); even ones
    sleep 20 ms, so that work is still queued and running when the fault strikes."""
    return ("echo", i) if i % 2 else ("sleep", 0.02)


def _right(answers):
    return all(a == i if i % 2 else isinstance(a, int) for i, a in enumerate(answers))


@pytest.fixture
def private_mesh(tmp_path):
    m = LocalMesh(executors=2, slots=2, env=FAST, log_dir=str(tmp_path))
    with m:
        with Client(m.endpoint) as c:
            c.register_application(tools_spec())
        yield m


def test_killed_executor_tasks_run_elsewhere(private_mesh):
    m = private_mesh
    with Session("tools", manager=m.endpoint) as s:
        futs = [s.submit(("where", 0.02)) for _ in range(150)]
        wait_until(lambda: sum(f.done() for f in futs) >= 20, timeout=20, what="20 answers")
        LocalMesh.end(m.executors[0], signal.SIGKILL)
        where = [f.result(60) for f in futs]
        assert set(where) <= {"exec-0", "exec-1"} and "exec-1" in where
        with Client(m.endpoint) as c:
            wait_until(lambda: [e["id"] for e in c.list_executors()] == ["exec-1"], timeout=20,
                       what="the killed executor to leave the list")
            info = c.get_session(s.id())
            stats = c.stats()
        assert info.succeeded == 150 and info.failed == 0
        assert stats["tasks_finished"] == 150, "an answer was accepted twice"


def test_manager_restart_keeps_registry_sessions_and_context(private_mesh):
    m = private_mesh
    s = Session("tools", ctx={"log": []}, manager=m.endpoint)
    sid = s.id()
    assert s.invoke(("echo", 1), timeout=30) == 1
    version = s.patch_context([{"op": "add", "path": "/log/-", "value": "before"}])
    s._conn.close()
    # the write is acknowledged before its group commit: wait until it is on disk
    wait_until(lambda: stored(m.db, "SELECT max(version) FROM (SELECT version FROM patches WHERE session=? "
                                    "UNION SELECT version FROM snapshots WHERE session=?)", sid, sid) == version,
               timeout=10, what=f"context version {version} in the database")
    LocalMesh.end(m.manager, signal.SIGKILL)
    m.start_manager()
    with Client(m.endpoint) as c:
        assert c.get_application("tools") is not None
        wait_until(lambda: len(c.list_executors()) == 2, timeout=20,
                   what="executors to rejoin a restarted manager by themselves")
    again = Session(session_id=sid, manager=m.endpoint)
    try:
        assert again.context() == {"log": ["before"]}
        again.patch_context([{"op": "add", "path": "/log/-", "value": "after"}])
        assert again.invoke(("context", None), timeout=30) == {"log": ["before", "after"]}
    finally:
        again.close()


def test_manager_killed_with_tasks_queued_and_running_every_future_completes(private_mesh):
    m = private_mesh
    with Session("tools", manager=m.endpoint) as s:
        futs = [s.submit(_task(i)) for i in range(200)]
        wait_until(lambda: sum(f.done() for f in futs) >= 30, timeout=20, what="30 answers")
        LocalMesh.end(m.manager, signal.SIGKILL)       # ended by PID and reaped: the port is free
        m.start_manager()
        answers = [f.result(90) for f in futs]         # every future completes, with its own answer
        assert _right(answers)
        with Client(m.endpoint) as c:
            stats = c.stats()
        assert stats["tasks_resent"] > 0, "the client resent what it had no answer for"


def test_sigterm_drains_an_executor_running_tasks_finish_and_it_exits_0(private_mesh):
    m = private_mesh
    with Session("tools", manager=m.endpoint) as s:
        futs = [s.submit(("sleep", 0.3)) for _ in range(8)]
        wait_until(lambda: any(f.done() for f in futs), timeout=30, what="a first answer")
        m.executors[0].send_signal(signal.SIGTERM)
        assert m.executors[0].wait(30) == 0
        assert all(isinstance(f.result(60), int) for f in futs)
        with Client(m.endpoint) as c:
            info = c.get_session(s.id())
            assert info.failed == 0
            assert c.stats()["tasks_retried"] == 0, "a running task was cut off instead of finishing"
            wait_until(lambda: [e["id"] for e in c.list_executors()] == ["exec-1"] or
                       all(e["state"] != "alive" for e in c.list_executors() if e["id"] == "exec-0"),
                       timeout=20, what="the drained executor to leave")
        assert s.invoke(("echo", "after"), timeout=30) == "after"


def _gone(pid):
    """No such process any more (or a zombie its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _children(pid):
    """Every process below ``pid``: an executor's instance guards and their services (executor/guard.py)."""
    from executor.guard import descendants
    return list(descendants(pid))


def test_frozen_executor_is_evicted_its_tasks_reassigned_and_it_rejoins(private_mesh):
    m = private_mesh
    frozen = m.executors[0]
    with Session("tools", manager=m.endpoint) as s, Client(m.endpoint) as c:
        futs = [s.submit(_task(i)) for i in range(120)]
        wait_until(lambda: sum(f.done() for f in futs) >= 10, timeout=20, what="10 answers")
        instances = _children(frozen.pid)
        pids = [frozen.pid, *instances]   # the whole machine freezes: daemon and instances
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(lambda: "exec-0" not in [e["id"] for e in c.list_executors()], timeout=20,
                       what="the frozen executor to be evicted")
            assert _right([f.result(60) for f in futs])
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        wait_until(lambda: "exec-0" in [e["id"] for e in c.list_executors()], timeout=20, what="exec-0 to rejoin")
        # the thawed instances send their late answers, then are stopped: once they have exited,
        # no late answer can still arrive
        wait_until(lambda: all(_gone(p) for p in instances), timeout=20, what=f"thawed instances {instances} to exit")
        info = c.get_session(s.id())
        assert info.succeeded == 120 and info.failed == 0
        assert c.stats()["tasks_finished"] == 120, "a late answer was counted as a second result"
        assert s.invoke(("echo", "ok"), timeout=30) == "ok"
