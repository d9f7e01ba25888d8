"""Process faults on a private mesh: an executor killed mid-stream, the manager restarted."""
from __future__ import annotations

import os
import signal
import time

import pytest

from client import Client, Session
from client.local import LocalMesh
from conftest import FAST, tools_spec


@pytest.fixture
def private_mesh(tmp_path):
    m = LocalMesh(executors=2, slots=2, env=FAST, log_dir=str(tmp_path))
    with m:
        with Client(m.endpoint) as c:
            c.register_application(tools_spec())
        yield m


def _wait(pred, timeout=20.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


def test_killed_executor_tasks_run_elsewhere(private_mesh):
    m = private_mesh
    with Session("tools", manager=m.endpoint) as s:
        futs = [s.submit(("sleep", 0.02)) for _ in range(150)]
        assert _wait(lambda: sum(f.done() for f in futs) >= 20)
        LocalMesh.end(m.executors[0], signal.SIGKILL)
        pids = [f.result(60) for f in futs]
        assert len(pids) == 150
        with Client(m.endpoint) as c:
            assert _wait(lambda: [e["id"] for e in c.list_executors()] == ["exec-1"])
            info = c.get_session(s.id())
        assert info.succeeded == 150 and info.failed == 0


def test_manager_restart_keeps_registry_sessions_and_context(private_mesh):
    m = private_mesh
    s = Session("tools", ctx={"log": []}, manager=m.endpoint)
    sid = s.id()
    assert s.invoke(("echo", 1), timeout=30) == 1
    s.patch_context([{"op": "add", "path": "/log/-", "value": "before"}])
    s._conn.close()
    time.sleep(0.3)  # past one group commit
    LocalMesh.end(m.manager, signal.SIGKILL)
    m.start_manager()
    with Client(m.endpoint) as c:
        assert c.get_application("tools") is not None
        assert _wait(lambda: len(c.list_executors()) == 2), "executors rejoin a restarted manager by themselves"
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
        futs = [s.submit(("sleep", 0.02)) for _ in range(200)]
        assert _wait(lambda: sum(f.done() for f in futs) >= 30)
        LocalMesh.end(m.manager, signal.SIGKILL)
        time.sleep(0.3)
        m.start_manager()
        pids = [f.result(90) for f in futs]          # every future completes, each exactly once
        assert len(pids) == 200 and all(isinstance(p, int) for p in pids)
        with Client(m.endpoint) as c:
            stats = c.stats()
        assert stats["tasks_resent"] > 0, "the client resent what it had no answer for"


def test_sigterm_drains_an_executor_running_tasks_finish_and_it_exits_0(private_mesh):
    m = private_mesh
    with Session("tools", manager=m.endpoint) as s:
        futs = [s.submit(("sleep", 0.3)) for _ in range(8)]
        assert _wait(lambda: any(f.done() for f in futs), timeout=30)
        m.executors[0].send_signal(signal.SIGTERM)
        assert m.executors[0].wait(30) == 0
        assert all(isinstance(f.result(60), int) for f in futs)
        with Client(m.endpoint) as c:
            info = c.get_session(s.id())
            assert info.failed == 0
            assert c.stats()["tasks_retried"] == 0, "a running task was cut off instead of finishing"
            assert _wait(lambda: [e["id"] for e in c.list_executors()] == ["exec-1"] or
                         all(e["state"] != "alive" for e in c.list_executors() if e["id"] == "exec-0"))
        assert s.invoke(("echo", "after"), timeout=30) == "after"


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_frozen_executor_is_evicted_its_tasks_reassigned_and_it_rejoins(private_mesh):
    m = private_mesh
    frozen = m.executors[0]
    with Session("tools", manager=m.endpoint) as s, Client(m.endpoint) as c:
        futs = [s.submit(("sleep", 0.02)) for _ in range(120)]
        assert _wait(lambda: sum(f.done() for f in futs) >= 10)
        pids = [frozen.pid, *_children(frozen.pid)]   # the whole machine freezes: daemon and instances
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            assert _wait(lambda: "exec-0" not in [e["id"] for e in c.list_executors()], timeout=20)
            results = [f.result(60) for f in futs]
            assert len(results) == 120
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert _wait(lambda: "exec-0" in [e["id"] for e in c.list_executors()], timeout=20), "it rejoins"
        time.sleep(0.5)   # late answers from the thawed instances arrive now, and must be dropped
        info = c.get_session(s.id())
        assert info.succeeded == 120 and info.failed == 0
        assert c.stats()["tasks_finished"] == 120, "a late answer was counted as a second result"
        assert s.invoke(("echo", "ok"), timeout=30) == "ok"
