"""Nothing hangs forever (issue 11, item 6): task timeouts, cancelling a running task, and a
closed session's running tasks, on a real mesh with one slot, where a hung task used to hold
the slot for good."""
from __future__ import annotations

from typing import Any, Iterator

import pytest
from conftest import FAST, tools_spec

from client import Client, Session
from client.local import LocalMesh
from mesh import errors
from mesh.testing import wait_until

HANG = 3600.0   # a task that would hold its slot for an hour


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(executors=1, slots=1, env=dict(FAST), log_dir=str(tmp_path_factory.mktemp("deadlines"))) as m:
        with Client(m.endpoint) as c:
            c.register_application(tools_spec(max_retries=0))
            c.register_application(tools_spec("tools-limited", max_retries=0, task_timeout=1.0))
        yield m


def test_a_hung_task_past_its_timeout_fails_and_the_slot_serves_the_next_session(one_slot: LocalMesh) -> None:
    with Session("tools", manager=one_slot.endpoint) as s:
        # Given a task that hangs, submitted with a 1 s timeout
        f = s.submit(("sleep", HANG), timeout=1.0)
        # Then it fails with DeadlineExceeded naming the timeout, promptly
        with pytest.raises(errors.DeadlineExceeded, match="longer than its timeout of 1s"):
            f.result(30)
    # And the only slot serves the next session
    with Session("tools", manager=one_slot.endpoint) as s2:
        assert s2.invoke(("echo", "next"), timeout=30) == "next"


def test_the_applications_task_timeout_applies_without_one_in_submit(one_slot: LocalMesh) -> None:
    with Session("tools-limited", manager=one_slot.endpoint) as s:
        with pytest.raises(errors.DeadlineExceeded):
            s.submit(("sleep", HANG)).result(30)
        assert s.invoke(("echo", "after"), timeout=30) == "after"


def test_cancelling_a_running_task_frees_its_slot(one_slot: LocalMesh) -> None:
    with Session("tools", manager=one_slot.endpoint) as s, Client(one_slot.endpoint) as c:
        # Given a task that hangs, running
        f = s.submit(("sleep", HANG))
        task = wait_until(lambda: next((t for t in c.find_tasks(s.id()) if t.state == "running"), None), 30,
                          what="the hung task to run")
        # When it is cancelled
        c.cancel_task(task.id)
        # Then its caller hears Cancelled, and the session's next task runs on the freed slot
        with pytest.raises(errors.Cancelled):
            f.result(30)
        assert s.invoke(("echo", "again"), timeout=30) == "again"


def test_closing_a_session_with_a_hung_task_frees_the_slot_after_close_grace(one_slot: LocalMesh) -> None:
    s = Session("tools", manager=one_slot.endpoint)
    f = s.submit(("sleep", HANG))
    with Client(one_slot.endpoint) as c:
        wait_until(lambda: any(t.state == "running" for t in c.find_tasks(s.id())), 30, what="the hung task")
    s.close()
    with pytest.raises(errors.MeshError):
        f.result(30)
    with Session("tools", manager=one_slot.endpoint) as s2:   # close_grace is 2 s under FAST
        assert s2.invoke(("echo", "free"), timeout=30) == "free"


def test_a_bad_timeout_is_invalid_argument(one_slot: LocalMesh) -> Any:
    with Session("tools", manager=one_slot.endpoint) as s:
        for bad in (0, -1, float("inf"), "1", True):
            with pytest.raises(errors.InvalidArgument):
                s.submit(("echo", 1), timeout=bad)
