"""TaskFuture: a concurrent.futures.Future whose Condition is made only when someone waits.

No sockets: the future is settled by hand, as the client's I/O thread does.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, List

import pytest

from client.connection import TaskFuture
from mesh.errors import DeadlineExceeded, NotFound


def test_settled_before_anyone_looks_it_reads_without_a_condition() -> None:
    f = TaskFuture()
    f.set_result(42)
    assert f.done() and f.result() == 42 and f.exception() is None
    assert f._cond is None, "nobody waited: no Condition was made"
    g = TaskFuture()
    g.set_exception(NotFound("gone"))
    with pytest.raises(NotFound):
        g.result()


def test_a_waiter_is_woken_by_the_answer() -> None:
    f = TaskFuture()
    got: List[Any] = []
    waiting = threading.Event()

    def wait() -> None:
        waiting.set()
        got.append(f.result(30))

    t = threading.Thread(target=wait)
    t.start()
    waiting.wait(10)
    f.set_result("answer")
    t.join(30)
    assert got == ["answer"]


def test_callbacks_wait_and_as_completed_work_as_with_any_future() -> None:
    seen: List[Any] = []
    early, late = TaskFuture(), TaskFuture()
    early.add_done_callback(lambda fut: seen.append(("early", fut.result())))
    early.set_result(1)
    late.set_result(2)
    late.add_done_callback(lambda fut: seen.append(("late", fut.result())))
    assert seen == [("early", 1), ("late", 2)]
    pending = TaskFuture()
    threading.Timer(0.05, pending.set_result, (3,)).start()
    done, not_done = concurrent.futures.wait([early, pending], timeout=30)
    assert done == {early, pending} and not not_done
    assert sorted(f.result() for f in concurrent.futures.as_completed([early, late, pending], timeout=30)) == [1, 2, 3]


def test_settling_twice_or_after_cancel_is_refused_and_a_wait_has_a_deadline() -> None:
    f = TaskFuture()
    f.set_result(1)
    with pytest.raises(concurrent.futures.InvalidStateError):
        f.set_result(2)
    c = TaskFuture()
    assert c.cancel() and c.cancelled()
    with pytest.raises(concurrent.futures.InvalidStateError):
        c.set_result(1)
    with pytest.raises(DeadlineExceeded):
        TaskFuture().result(0.01)


def test_no_waiter_is_ever_missed_when_settling_races_waiting() -> None:
    # Given many futures, each waited on by one thread while another thread settles it
    futures = [TaskFuture() for _ in range(300)]
    results: List[Any] = [None] * len(futures)

    def wait(i: int) -> None:
        results[i] = futures[i].result(30)

    waiters = [threading.Thread(target=wait, args=(i,)) for i in range(len(futures))]
    for t in waiters:
        t.start()
    for i, f in enumerate(futures):   # settled while the waiters are between "look" and "wait"
        f.set_result(i)
    for t in waiters:
        t.join(30)
    # Then every waiter got its answer
    assert results == list(range(len(futures)))
