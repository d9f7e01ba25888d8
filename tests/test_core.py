"""The manager's core without a socket: feed events, assert effects (Given / When / Then).

The store calls the core asks for run synchronously against a real SQLite
store (``:memory:``); nothing here opens a socket, starts a process or sleeps.
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import pytest

from mesh.core import Call, Core, Effects, Send
from mesh.data.store import Store
from mesh.errors import ERRORS, InvalidArgument, ResourceExhausted
from mesh.ops.config import Settings
from mesh.wire.protocol import (
    Bind,
    CtxPatch,
    CtxReject,
    CtxWrite,
    Done,
    ExecHello,
    Exited,
    Heartbeat,
    InstHello,
    Launch,
    Message,
    Reply,
    Request,
    Result,
    Resync,
    Stop,
    Submit,
    Tasks,
    decode,
    encode,
    pack,
)

ECHO = {"metadata": {"name": "echo"}, "spec": {"command": "python3", "arguments": ["echo.py"], "max_retries": 2}}


class Mesh:
    """One core, a real in-memory store, and a clock; records every send by peer."""

    def __init__(self, secured: bool = False, **settings: Any) -> None:
        self.settings = Settings(**{"prefetch": 4, **settings})
        self.core = Core(self.settings, secured=secured)
        self.store = Store(":memory:")
        self.now = 1000.0
        self.sent: List[Send] = []
        self.rids = itertools.count(1)
        self._started: set = set()   # instances that said hello

    # -- driving the core ---------------------------------------------------------------
    def run(self, effects: Effects) -> List[Send]:
        """Perform effects like the loop does (calls synchronously, batch committed first)."""
        sends: List[Send] = []
        todo = list(effects)
        while todo:
            eff = todo.pop(0)
            if isinstance(eff, Send):
                # every record the core sends must survive the codec unchanged
                back = decode(encode(eff.record, eff.payloads))
                if "sizes" in back.header._fields:
                    back.header = back.header._replace(sizes=None)   # the codec's bundling, undone
                assert encode(back.header) == encode(eff.record)
                assert [bytes(p) for p in back.payloads] == [bytes(p) for p in eff.payloads]
                sends.append(eff)
            else:
                assert isinstance(eff, Call)
                self.store.write(self.core.take_batch(self.now))   # as the loop does before a call
                try:
                    result = eff.fn(self.store, *eff.args) if eff.where == "store" else eff.fn(*eff.args)
                except Exception as exc:
                    todo[:0] = self.core.complete(eff, self.now, error=exc)
                else:
                    todo[:0] = self.core.complete(eff, self.now, result)
        sends += self.core.end_round(self.now)  # type: ignore[arg-type]
        self.sent += sends
        return sends

    def commit(self) -> None:
        """Write everything, young task records included (as a shutdown does)."""
        self.store.write(self.core.take_batch())

    def msg(self, peer: bytes, record: Any, payloads: Sequence[Any] = (), key: Optional[str] = None) -> List[Send]:
        return self.run(self.core.handle(peer, Message(_cmd(record), record,
                                                       list(payloads)), self.now, key))

    def request(self, method: str, peer: bytes = b"client", blob: Optional[bytes] = None, token: Optional[str] = None,
                **args: Any) -> Reply:
        rid = next(self.rids)
        sends = self.msg(peer, Request(rid, method, args, token, blob is not None), [blob] if blob is not None else [])
        replies = [s.record for s in sends if isinstance(s.record, Reply) and s.record.rid == rid]
        assert len(replies) == 1, sends
        return replies[0]

    def ok(self, method: str, **args: Any) -> Any:
        reply = self.request(method, **args)
        assert reply.ok, reply.error
        return reply.result

    def tick(self, seconds: float = 0.0) -> List[Send]:
        self.now += seconds
        return self.run(self.core.tick(self.now))

    # -- building a mesh -----------------------------------------------------------------
    def app_and_session(self, sid: str = "s1") -> str:
        self.ok("register_application", spec=ECHO)
        return self.ok("create_session", application="echo", id=sid)["id"]

    def executor(self, eid: str = "e1", slots: int = 2) -> bytes:
        peer = eid.encode()
        self.msg(peer, ExecHello(eid, {"slots": slots, "cpu": 4, "memory": 1 << 30}))
        return peer

    def instance(self, peer: bytes) -> Tuple[str, bytes]:
        """Start the instance a Launch asked for: it says hello with its token."""
        launches = [s.record for s in self.sent if isinstance(s.record, Launch)
                    and s.record.iid not in self._started]
        assert launches, "no instance was launched"
        launch = launches[0]
        self._started.add(launch.iid)
        ipeer = b"inst-" + launch.iid.encode()
        self.msg(ipeer, InstHello(launch.iid, launch.iid.split(".")[0], 4242, launch.token))
        return launch.iid, ipeer

    def submit(self, n: int, sid: str = "s1", client: bytes = b"client", cid: str = "c1", first_tag: int = 1,
               resend: bool = False, timeout: Optional[float] = None) -> List[Send]:
        tags = list(range(first_tag, first_tag + n))
        return self.msg(client, Submit(sid, tags, cid, resend, None, None, timeout), [b"req-%d" % t for t in tags])

    def to(self, peer: bytes, kind: Type[Any]) -> List[Any]:
        return [s.record for s in self.sent if s.peer == peer and isinstance(s.record, kind)]


def _cmd(record: Any) -> Any:
    from mesh.wire.protocol import CMD_OF
    return CMD_OF[type(record)]


@pytest.fixture
def mesh() -> Mesh:
    return Mesh()


def running(m: Mesh, n_tasks: int = 1, slots: int = 1) -> Tuple[str, bytes]:
    """Given a session with one ready instance and ``n_tasks`` submitted."""
    m.app_and_session()
    ex = m.executor(slots=slots)
    m.submit(n_tasks)
    return m.instance(ex)


# -- tasks -------------------------------------------------------------------------------------

def test_tasks_are_dispatched_with_the_attempt_counted_before_the_run(mesh: Mesh) -> None:
    # Given a ready instance and two queued tasks
    iid, inst = running(mesh, 2)
    # Then they were sent to it, attempt 1 each, with their payloads
    tasks = mesh.to(inst, Tasks)
    assert [item for t in tasks for item in t.items][:1] == [(1, 1)]
    assert all(a == 1 for t in tasks for _, a in t.items)


def test_credit_starts_at_one_and_grows_to_prefetch_for_fast_tasks(mesh: Mesh) -> None:
    # Given one instance and 20 queued tasks
    iid, inst = running(mesh, 20)
    first = mesh.to(inst, Tasks)
    # Then it gets one task until its speed is known
    assert sum(len(t.items) for t in first) == 1
    # When it answers quickly
    tid = first[0].items[0][0]
    mesh.now += 0.0001
    mesh.msg(inst, Done([(tid, None)]), [b"out"])
    # Then it is kept `prefetch` tasks ahead
    later = mesh.to(inst, Tasks)[len(first):]
    assert sum(len(t.items) for t in later) == mesh.settings.prefetch


def test_an_answer_goes_to_the_submitter_once(mesh: Mesh) -> None:
    iid, inst = running(mesh, 1)
    tid = mesh.to(inst, Tasks)[0].items[0][0]
    # When the instance answers twice (a duplicate DONE)
    mesh.msg(inst, Done([(tid, None)]), [b"out"])
    mesh.msg(inst, Done([(tid, None)]), [b"out"])
    # Then the client got one RESULT with the output, and the duplicate was counted as dropped
    results = mesh.to(b"client", Result)
    assert [r.outcomes for r in results] == [[(1, None)]]
    assert mesh.core.stats["late_answers_dropped"] == 1


@pytest.mark.parametrize("deaths,outcome", [(2, "retried"), (3, "failed")])
def test_retry_budget(mesh: Mesh, deaths: int, outcome: str) -> None:
    # Given an app with max_retries=2 and one task
    mesh.app_and_session()
    ex = mesh.executor(slots=1)
    mesh.submit(1)
    for _ in range(deaths):
        # When the instance running it dies (killed by a signal, after hello)
        iid, inst = mesh.instance(ex)
        assert mesh.to(inst, Tasks), "the task was dispatched"
        mesh.msg(ex, Exited(iid, -9, "killed"))
    results = mesh.to(b"client", Result)
    if outcome == "retried":
        # Then within the budget it is queued again, never answered with an error
        assert results == []
        assert mesh.core.stats["tasks_retried"] == deaths
        assert mesh.core.tasks[1].attempt == deaths
    else:
        # Then past it the client gets task_failed naming the attempts
        [(tag, err)] = results[0].outcomes
        assert err["code"] == "task_failed" and err["details"]["attempts"] == 3


def test_a_late_answer_from_an_evicted_instance_is_dropped(mesh: Mesh) -> None:
    # Given a task running on an instance of an executor that then goes silent
    iid, inst = running(mesh, 1)
    tid = mesh.to(inst, Tasks)[0].items[0][0]
    mesh.tick(mesh.settings.dead_after + 1)          # evicted: its task is requeued
    assert mesh.core.tasks[tid].state == "pending"
    ex2 = mesh.executor("e2", slots=1)
    iid2, inst2 = mesh.instance(ex2)
    assert [i for t in mesh.to(inst2, Tasks) for i in t.items] == [(tid, 2)]
    # When the evicted instance's answer arrives late
    mesh.msg(inst, Done([(tid, None)]), [b"stale"])
    # Then it is dropped (the sender is told it is gone), and only the new run answers
    assert mesh.to(b"client", Result) == []
    mesh.msg(inst2, Done([(tid, None)]), [b"fresh"])
    results = [s for s in mesh.sent if s.peer == b"client" and isinstance(s.record, Result)]
    assert len(results) == 1 and [bytes(p) for p in results[0].payloads] == [b"fresh"]


def test_max_pending_refuses_the_excess_with_resource_exhausted() -> None:
    m = Mesh(max_pending=3)
    m.app_and_session()
    # When 5 tasks arrive and no instance can take them
    m.submit(5)
    # Then 3 are queued and 2 refused at once, naming the limit
    [refused] = m.to(b"client", Result)
    assert [tag for tag, _ in refused.outcomes] == [4, 5]
    assert {err["code"] for _, err in refused.outcomes} == {"resource_exhausted"}
    assert len(m.core.sessions["s1"].pending) == 3


def test_resend_after_a_manager_restart_is_answered_once(mesh: Mesh) -> None:
    # Given a task that finished before the manager restarted, its answer undelivered
    iid, inst = running(mesh, 2)
    tids = [i[0] for t in mesh.to(inst, Tasks) for i in t.items]
    [result] = [s for s in mesh.msg(inst, Done([(tids[0], None)]), [b"out-1"]) if isinstance(s.record, Result)]
    mesh.run(mesh.core.lost(result, mesh.now))      # the client had gone: the output is kept for it
    mesh.commit()
    # When a new core restores from the same store and the client resends both tasks
    m2 = Mesh()
    m2.store = mesh.store
    m2.run(m2.core.restore(mesh.store.load_state(), m2.now))
    assert tids == [1] and list(m2.core.sessions["s1"].pending) == [2]   # the unfinished one is queued again
    m2.submit(2, client=b"client-2", resend=True)
    # Then the finished one is answered from the database, the other waits for its run
    [answer] = [s for s in m2.sent if s.peer == b"client-2" and isinstance(s.record, Result)]
    assert answer.record.outcomes == [(1, None)] and [bytes(p) for p in answer.payloads] == [b"out-1"]
    m2.submit(2, client=b"client-2", resend=True)   # resent again: still one answer each
    assert len(m2.to(b"client-2", Result)) == 2 and m2.to(b"client-2", Result)[1].outcomes == [(1, None)]
    assert len(m2.core.sessions["s1"].pending) == 1


def test_sessions_share_executors_fairly(mesh: Mesh) -> None:
    # Given two sessions with work and an executor with two slots
    mesh.app_and_session("a")
    mesh.ok("create_session", application="echo", id="b")
    mesh.submit(10, sid="a")
    mesh.submit(10, sid="b", first_tag=100)
    mesh.executor(slots=2)
    # Then each session gets one instance
    launched = {s.record.iid for s in mesh.sent if isinstance(s.record, Launch)}
    bound = sorted(len(mesh.core.sessions[sid].instances) for sid in ("a", "b"))
    assert len(launched) == 2 and bound == [1, 1]


# -- contexts ------------------------------------------------------------------------------------

def test_context_writes_are_sequenced_and_announced_only_after_commit(mesh: Mesh) -> None:
    iid, inst = running(mesh, 1)
    # When the instance writes twice
    mesh.msg(inst, CtxWrite("s1", 1, [{"op": "replace", "path": "", "value": {"n": 1}}]))
    mesh.msg(inst, CtxWrite("s1", 2, [{"op": "incr", "path": "/n", "value": 1}]))
    patches = [s for s in mesh.sent if isinstance(s.record, CtxPatch)]
    # Then it hears both, in version order, as its own writes, each one held for the commit
    assert [(p.record.version, p.record.seq) for p in patches] == [(1, 1), (2, 2)]
    assert all(p.after_commit for p in patches)
    # And a client's write is acknowledged with its version after the commit too
    reply = mesh.request("write_context", id="s1", ops=[{"op": "incr", "path": "/n", "value": 1}])
    assert reply.result == {"version": 3}
    assert [s.after_commit for s in mesh.sent if s.record == reply] == [True]
    assert mesh.core.sessions["s1"].context.value == {"n": 3}


def test_a_failed_test_op_is_rejected_and_changes_nothing(mesh: Mesh) -> None:
    iid, inst = running(mesh, 1)
    mesh.msg(inst, CtxWrite("s1", 1, [{"op": "test", "path": "/x", "value": 1}]))
    [reject] = mesh.to(inst, CtxReject)
    assert reject.seq == 1 and reject.error["code"] in ERRORS
    assert mesh.core.sessions["s1"].context.version == 0


def test_a_replica_gap_is_repaired_with_a_snapshot(mesh: Mesh) -> None:
    iid, inst = running(mesh, 1)
    mesh.ok("write_context", id="s1", ops=[{"op": "replace", "path": "", "value": {"a": 1}}])
    # When the replica reports a gap
    mesh.msg(inst, Resync("s1", 0))
    # Then it gets a BIND with the current version and snapshot
    bind = [s for s in mesh.sent if s.peer == inst and isinstance(s.record, Bind)][-1]
    assert bind.record.version == 1
    from mesh.wire.protocol import unpack
    assert unpack(bind.payloads[0]) == {"a": 1}


# -- control -------------------------------------------------------------------------------------

def test_unknown_method_and_bad_arguments_are_typed_errors(mesh: Mesh) -> None:
    assert mesh.request("no_such_method").error["code"] == "invalid_argument"
    assert mesh.request("create_session").error["details"] == {"argument": "application"}
    assert mesh.request("get_session", id="nope").error["code"] == "not_found"


def test_a_secured_core_refuses_calls_without_a_token() -> None:
    m = Mesh(secured=True)
    reply = m.request("find_sessions")
    assert not reply.ok and reply.error["code"] == "unauthenticated"
    assert m.core.stats["auth_denied"] == 1
    assert m.request("ping").ok


# -- records ---------------------------------------------------------------------------------------

def _rows(m: Mesh) -> Dict[int, Tuple[str, Optional[bytes]]]:
    """What the store holds: open tasks with their requests, and finished ones from the log."""
    rows = {r[0]: (r[1], r[2]) for r in m.store.db.execute("SELECT id, state, input FROM tasks")}
    return {**rows, **{r["id"]: (r["state"], None) for r in m.store.task_rows("s1") if r["id"] not in rows}}


def test_a_task_that_ends_young_is_written_once_finished_and_without_its_request(mesh: Mesh) -> None:
    # Given a task answered within record_after of its submission
    iid, inst = running(mesh, 1)
    mesh.store.write(mesh.core.take_batch(mesh.now))
    assert _rows(mesh) == {}, "not written while young"
    mesh.now += mesh.settings.record_after / 2
    mesh.msg(inst, Done([(1, None)]), [b"out"])
    # When the next group commit runs
    mesh.store.write(mesh.core.take_batch(mesh.now))
    # Then its record is there, finished, with no request kept: one log row, no open row
    assert _rows(mesh) == {1: ("succeeded", None)}
    assert mesh.store.db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0


def test_a_task_that_lives_longer_is_written_with_its_request_then_finished(mesh: Mesh) -> None:
    iid, inst = running(mesh, 1)
    # When it is still running record_after later
    mesh.now += mesh.settings.record_after + 0.1
    mesh.store.write(mesh.core.take_batch(mesh.now))
    # Then its record and request are on disk (a restart would run it again)
    assert _rows(mesh) == {1: ("pending", b"req-1")}
    mesh.msg(inst, Done([(1, None)]), [b"out"])
    mesh.store.write(mesh.core.take_batch(mesh.now))
    assert _rows(mesh) == {1: ("succeeded", None)}
    assert mesh.store.db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0, "the open row moved to the log"
    assert mesh.store.get_task(1)["state"] == "succeeded"


def test_finished_tasks_of_one_commit_are_one_log_row_per_session(mesh: Mesh) -> None:
    # Given 200 tasks of one session answered within one commit window
    iid, inst = running(mesh, 200)
    for _ in range(200):
        tids = [i[0] for t in mesh.to(inst, Tasks) for i in t.items if i[0] in mesh.core.tasks]
        if not tids:
            break
        mesh.msg(inst, Done([(tid, None) for tid in tids]), [b"out"] * len(tids))
    mesh.store.write(mesh.core.take_batch(mesh.now))
    # Then one row holds them all, and every record reads back
    assert mesh.store.db.execute("SELECT count(*) FROM task_log").fetchone()[0] == 1
    assert [r["id"] for r in mesh.store.task_rows("s1")] == list(range(1, 201))
    assert mesh.store.get_task(137)["state"] == "succeeded"


def test_tasks_whose_dispatch_was_not_delivered_are_queued_again_without_spending_an_attempt(mesh: Mesh) -> None:
    # Given a TASKS message to an instance that the loop could not send (its queue was full)
    iid, inst = running(mesh, 1)
    [sent] = [s for s in mesh.sent if s.peer == inst and isinstance(s.record, Tasks)]
    # When the loop reports it lost
    mesh.run(mesh.core.lost(sent, mesh.now))
    # Then the task is pending again at the front, its attempt not counted, and runs on the next dispatch
    t = mesh.core.tasks[1]
    assert (t.state, t.attempt, t.instance) == ("pending", 0, None)
    assert list(mesh.core.sessions["s1"].pending) == [1] and not mesh.core.instances[iid].inflight


def test_a_running_task_of_a_closed_session_whose_instance_dies_is_cancelled_not_kept(mesh: Mesh) -> None:
    iid, inst = running(mesh, 1)
    assert mesh.ok("close_session", id="s1")["state"] == "closed"
    mesh.msg(b"e1", Exited(iid, -9, "killed"))
    [result] = mesh.to(b"client", Result)
    assert result.outcomes[0][1]["code"] == "cancelled" and mesh.core.tasks == {}


def test_task_ids_are_never_reused_after_a_restart(mesh: Mesh) -> None:
    # Given a task id seen in a listing while the task is still young (not written)
    iid, inst = running(mesh, 1)
    assert [r["id"] for r in mesh.ok("find_tasks", session="s1")["items"]] == [1]
    # When the manager restarts on the same store (the young task's record never written)
    m2 = Mesh()
    m2.store = mesh.store
    m2.run(m2.core.restore(mesh.store.load_state(), m2.now))
    m2.submit(1, client=b"other", cid="c2")
    # Then the next task gets another id
    assert 1 not in m2.core.tasks, "the young task was not written: only a resend brings it back"
    [new] = m2.core.tasks.values()
    assert new.cid == "c2" and new.id > 1


def test_a_version_1_database_keeps_answering_resent_tasks(tmp_path: Any) -> None:
    # Given a database as version 1 left it: answers kept in the task rows
    import sqlite3
    path = str(tmp_path / "v1.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE tasks (id INTEGER PRIMARY KEY, session TEXT NOT NULL, state TEXT NOT NULL,
            attempts INTEGER NOT NULL, created_at REAL NOT NULL, finished_at REAL, input BLOB, output BLOB,
            error TEXT, client TEXT NOT NULL DEFAULT '', tag INTEGER NOT NULL DEFAULT 0);
        INSERT INTO tasks VALUES (7, 's', 'succeeded', 1, 1.0, 2.0, NULL, X'4f5554', NULL, 'c', 7);
        INSERT INTO tasks VALUES (8, 's', 'failed', 1, 1.0, 2.0, NULL, NULL, '{"code": "task_failed"}', 'c', 8);
        INSERT INTO tasks VALUES (9, 's', 'succeeded', 1, 1.0, 2.0, NULL, NULL, NULL, 'c', 9);""")
    db.close()
    # When this version opens it
    store = Store(path)
    # Then a resending client is still answered from it, and the schema says so
    assert store.find_by_tags("c", [7, 8, 9]) == {7: ("succeeded", b"OUT", None),
                                                  8: ("failed", None, '{"code": "task_failed"}')}
    assert store.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "2"
    assert [r["id"] for r in store.task_rows("s")] == [7, 8, 9] and store.max_task_id() == 9


def test_a_session_exists_for_others_only_once_it_is_on_disk(mesh: Mesh) -> None:
    mesh.ok("register_application", spec=ECHO)
    # Given a create whose store write has not run yet
    create = Request(1, "create_session", {"application": "echo", "id": "s9"})
    effects = mesh.core.handle(b"a", Message(_cmd(create), create, []), mesh.now)
    [call] = [e for e in effects if isinstance(e, Call)]
    # Then another caller neither sees it nor can take its id
    assert mesh.request("get_session", id="s9").error["code"] == "not_found"
    assert mesh.request("create_session", application="echo", id="s9").error["code"] == "already_exists"
    # When the write fails, the id is free again; when it succeeds, the session exists
    mesh.run(mesh.core.complete(call, mesh.now, error=RuntimeError("disk full")))
    assert "s9" not in mesh.core.creating and "s9" not in mesh.core.sessions
    assert mesh.ok("create_session", application="echo", id="s9")["id"] == "s9"
    assert mesh.ok("get_session", id="s9")["state"] == "open"


# -- instances that never start ------------------------------------------------------------------

def idle(m: Mesh, ex: bytes, seconds: float, step: float = 0.2) -> None:
    """Let ``seconds`` pass in ticks, the executor's heartbeats arriving meanwhile."""
    for _ in range(int(round(seconds / step))):
        m.tick(step)
        m.msg(ex, Heartbeat())


@pytest.mark.parametrize("code,reason", [(0, "exited with code 0"), (-9, "killed by SIGKILL"), (1, "exit 1")])
def test_any_end_before_hello_counts_as_a_start_failure_and_relaunches_back_off(code: int, reason: str) -> None:
    # Given an app whose instances end before saying hello, whatever their exit status
    m = Mesh(start_failures=3, start_backoff=1.0, start_backoff_max=3.0)
    m.app_and_session()
    ex = m.executor(slots=1)
    m.submit(1)
    launch_times = []
    for _ in range(3):
        [launch] = [s.record for s in m.sent if isinstance(s.record, Launch)][len(launch_times):]
        launch_times.append(m.now)
        # When the instance ends before hello
        m.msg(ex, Exited(launch.iid, code, reason))
        # Then no new launch happens before the backoff, however often the clock ticks
        idle(m, ex, 0.8)
        if len(launch_times) < 3:
            assert len(m.to(ex, Launch)) == len(launch_times), "relaunched within the backoff"
            idle(m, ex, 3.0)
            assert len(m.to(ex, Launch)) == len(launch_times) + 1, "relaunched once the backoff passed"
    gaps = [b - a for a, b in zip(launch_times, launch_times[1:])]
    assert gaps[1] > gaps[0] - 1e-9, "the backoff does not shrink"
    # And after start_failures in a row the queued task fails with the reason
    [result] = m.to(b"client", Result)
    [(_, err)] = result.outcomes
    assert err["code"] == "task_failed" and err["details"]["type"] == "StartFailed" and reason in err["message"]


def test_an_instance_that_says_hello_resets_the_start_backoff(mesh: Mesh) -> None:
    # Given an app whose first instance ended before hello
    mesh.app_and_session()
    ex = mesh.executor(slots=1)
    mesh.submit(1)
    [launch] = mesh.to(ex, Launch)
    mesh.msg(ex, Exited(launch.iid, 0, "exited"))
    mesh._started.add(launch.iid)   # (it never will)
    assert mesh.core.start_backoff.get("echo", 0) > mesh.now
    # When the next one starts and says hello
    idle(mesh, ex, mesh.settings.start_backoff + 0.2)
    mesh.instance(ex)
    # Then the app launches without delay again
    assert "echo" not in mesh.core.start_backoff and "echo" not in mesh.core.start_streak


# -- the store falls behind ----------------------------------------------------------------------

def test_while_the_store_is_behind_only_busy_sessions_wait_and_everything_else_is_answered() -> None:
    # Given two sessions, one busy (backlog_admit tasks queued) and one idle, and a ready executor
    m = Mesh(backlog_admit=5)
    m.app_and_session("busy")
    m.ok("create_session", application="echo", id="idle")
    ex = m.executor(slots=2)
    m.submit(5, sid="busy", client=b"flood", cid="f")
    # When the store falls behind
    m.run(m.core.store_behind(True, m.now))
    # Then the busy session's new tasks are held back, in order, not refused
    sends = m.submit(3, sid="busy", client=b"flood", cid="f", first_tag=100)
    assert sends == [] and m.core.stats["submits_deferred"] == 1
    assert not [t for t in m.core.tasks.values() if t.tag >= 100]
    # And the idle session's task is taken at once
    m.submit(1, sid="idle", client=b"other", cid="o")
    assert [t for t in m.core.tasks.values() if t.sid == "idle"]
    # And heartbeats, hellos and control calls are still answered
    m.msg(ex, Heartbeat())
    assert m.ok("ping")
    # And a later submission of the busy session queues behind the held one
    m.submit(2, sid="busy", client=b"flood", cid="f", first_tag=200)
    assert m.core.stats["submits_deferred"] == 2
    # When the store catches up
    m.run(m.core.store_behind(False, m.now))
    # Then the held tasks are taken, in the order they came
    busy = sorted((t.id, t.tag) for t in m.core.tasks.values() if t.sid == "busy" and t.tag >= 100)
    assert [tag for _, tag in busy] == [100, 101, 102, 200, 201]
    assert m.core.sessions["busy"].deferred == 0 and not m.core.deferred


def test_held_tasks_of_a_session_closed_meanwhile_are_refused_when_taken(mesh: Mesh) -> None:
    # Given a busy session whose new tasks are held while the store is behind
    m = Mesh(backlog_admit=1)
    m.app_and_session()
    m.submit(1)
    m.run(m.core.store_behind(True, m.now))
    m.submit(2, first_tag=10)
    # When the session is closed, then the store catches up
    m.ok("close_session", id="s1")
    m.run(m.core.store_behind(False, m.now))
    # Then the held tasks are answered with the session's state, not lost
    outcomes = [o for r in m.to(b"client", Result) for o in r.outcomes if o[0] >= 10]
    assert sorted(tag for tag, _ in outcomes) == [10, 11]
    assert all(err["code"] == "failed_precondition" for _, err in outcomes)


# -- one message must not hold the loop ------------------------------------------------------------

@pytest.mark.parametrize("method", ["write_context", "patch_object"])
def test_a_patch_over_max_patch_ops_is_refused_naming_the_limit_and_changes_nothing(method: str) -> None:
    # Given a session context and an object, and a limit of 100 ops per patch
    m = Mesh(max_patch_ops=100)
    m.app_and_session()
    key = m.ok("put_object", blob=pack({"n": 0}), kind="doc")["key"]
    m.ok("write_context", id="s1", ops=[{"op": "replace", "path": "", "value": {"n": 0}}])
    target = {"id": "s1"} if method == "write_context" else {"key": key}
    ops = [{"op": "incr", "path": "/n", "value": 1}]
    # When a patch of 101 ops arrives
    reply = m.request(method, ops=ops * 101, **target)
    # Then it is refused with the limit named, and nothing was applied
    assert not reply.ok and reply.error["code"] == "resource_exhausted"
    assert reply.error["details"]["limit"] == "max_patch_ops" and reply.error["details"]["size"] == 101
    # And a patch at the limit is applied, as the next version after the last good one
    assert m.ok(method, ops=ops * 100, **target)["version"] == 2


def test_an_object_over_max_object_size_is_refused(mesh: Mesh) -> None:
    m = Mesh(max_object_size=1000)
    reply = m.request("put_object", blob=b"x" * 1001, kind="blob")
    assert not reply.ok and reply.error["details"]["limit"] == "max_object_size"
    assert m.ok("put_object", blob=b"x" * 1000, kind="blob")["version"] == 1


# -- task timeouts, cancelling running tasks, closing sessions with running tasks ---------------

def _errors_for(m: Mesh, client: bytes = b"client") -> Dict[int, Any]:
    return {tag: err for r in m.to(client, Result) for tag, err in r.outcomes}


def _stopped(m: Mesh, ex: bytes) -> List[str]:
    return [r.iid for r in m.to(ex, Stop)]


def _warm(max_retries: int = 0) -> Tuple[Mesh, bytes, str, bytes]:
    """Given an app with ``max_retries`` and one instance whose credit has grown to prefetch (4)
    after one fast answer: (mesh, executor, instance id, instance peer)."""
    m = Mesh(prefetch=4)
    m.ok("register_application", spec={**ECHO, "spec": {**ECHO["spec"], "max_retries": max_retries}})
    m.ok("create_session", application="echo", id="s1")
    ex = m.executor(slots=1)
    m.submit(1)
    iid, inst = m.instance(ex)
    m.now += 0.001
    m.msg(inst, Done([(1, None)]), [b"ok"])
    return m, ex, iid, inst


def test_a_task_past_its_timeout_stops_its_instance_and_other_queued_tasks_keep_their_attempt() -> None:
    # Given an instance whose credit has grown (one fast answer), then three tasks with a 1 s timeout
    m, ex, iid, inst = _warm()
    m.submit(3, first_tag=10, timeout=1.0)
    assert sorted(t.id for t in m.core.tasks.values() if t.state == "running") == [2, 3, 4]
    # When the first runs past its timeout (the clock ticks, the executor's heartbeats arrive)
    idle(m, ex, 1.2)
    # Then its instance is stopped and the task fails with deadline_exceeded (max_retries 0)
    assert _stopped(m, ex) == [iid]
    err = _errors_for(m)[10]
    assert err["code"] == "deadline_exceeded" and err["details"]["timeout"] == 1.0
    # And the two tasks queued behind it are queued again, their attempt not spent
    assert [(t.id, t.state, t.attempt) for t in sorted(m.core.tasks.values(), key=lambda t: t.id)] == \
        [(3, "pending", 0), (4, "pending", 0)]
    assert list(m.core.sessions["s1"].pending) == [3, 4] and m.core.sessions["s1"].running == 0
    # And a late answer from the stopped instance is dropped
    m.msg(inst, Done([(2, None)]), [b"late"])
    assert 10 not in {tag for r in m.to(b"client", Result) for tag, err in r.outcomes if err is None}


def test_a_timed_out_task_is_retried_within_max_retries_then_fails() -> None:
    # Given an app with max_retries 1 and a task with a 1 s timeout
    m = Mesh()
    m.ok("register_application", spec={**ECHO, "spec": {**ECHO["spec"], "max_retries": 1}})
    m.ok("create_session", application="echo", id="s1")
    ex = m.executor(slots=1)
    m.submit(1, timeout=1.0)
    for attempt in (1, 2):
        iid, _ = m.instance(ex)
        assert m.core.tasks[1].attempt == attempt
        # When the attempt runs past the timeout, and its instance exits
        idle(m, ex, 1.2)
        m.msg(ex, Exited(iid, -15, "stopped"))
        idle(m, ex, 0.2)
    # Then the first timeout was retried and the second failed the task
    assert m.core.stats["tasks_retried"] == 1
    assert _errors_for(m)[1]["code"] == "deadline_exceeded"


def test_the_spec_task_timeout_applies_when_submit_gives_none() -> None:
    m = Mesh()
    m.ok("register_application", spec={**ECHO, "spec": {**ECHO["spec"], "task_timeout": 0.5, "max_retries": 0}})
    m.ok("create_session", application="echo", id="s1")
    ex = m.executor(slots=1)
    m.submit(1)
    iid, _ = m.instance(ex)
    idle(m, ex, 0.6)
    assert _stopped(m, ex) == [iid] and _errors_for(m)[1]["code"] == "deadline_exceeded"


def test_cancelling_a_running_task_stops_its_instance_and_answers_cancelled(mesh: Mesh) -> None:
    # Given a running task
    iid, _ = running(mesh, 1)
    [(tid, _)] = mesh.to(b"inst-" + iid.encode(), Tasks)[0].items
    # When it is cancelled
    assert mesh.ok("cancel_task", id=tid)["state"] == "cancelled"
    # Then its instance is stopped and its client hears cancelled, once
    assert _stopped(mesh, b"e1") == [iid]
    assert _errors_for(mesh)[1]["code"] == "cancelled"
    assert mesh.core.sessions["s1"].running == 0 and tid not in mesh.core.tasks


def test_a_closed_sessions_running_tasks_get_close_grace_then_their_instance_is_stopped() -> None:
    # Given a running task, and its session closed
    m = Mesh(close_grace=2.0)
    iid, _ = running(m, 1)
    m.ok("close_session", id="s1")
    # When less than close_grace passes, nothing is stopped
    idle(m, b"e1", 1.0)
    assert _stopped(m, b"e1") == [] and 1 not in _errors_for(m)
    # When close_grace has passed, the instance is stopped and the task cancelled
    idle(m, b"e1", 1.2)
    assert _stopped(m, b"e1") == [iid]
    assert _errors_for(m)[1]["code"] == "cancelled"


def test_a_task_answered_within_close_grace_is_delivered_and_nothing_is_stopped() -> None:
    m = Mesh(close_grace=2.0)
    iid, inst = running(m, 1)
    m.ok("close_session", id="s1")
    m.msg(inst, Done([(1, None)]), [b"fine"])
    idle(m, b"e1", 2.4)
    assert _errors_for(m)[1] is None and _stopped(m, b"e1") == []


def test_a_timeout_counts_from_when_the_task_starts_not_while_it_waits_behind_another() -> None:
    # Given an instance with credit for several tasks, running a slow task with no timeout,
    # and a task with a 1 s timeout queued behind it at the instance
    m, ex, iid, inst = _warm()     # credit grows to prefetch
    m.submit(1, first_tag=10)                   # task 2: slow, no timeout
    m.submit(1, first_tag=20, timeout=1.0)      # task 3: queued behind it at the instance
    assert list(m.core.instances[iid].inflight) == [2, 3]
    # When 3 s pass while task 2 still runs
    idle(m, ex, 3.0)
    # Then nothing timed out: task 3 has not started
    assert _stopped(m, ex) == [] and 20 not in _errors_for(m)
    # When task 2 answers, task 3 starts; 1.2 s later it has timed out
    m.msg(inst, Done([(2, None)]), [b"ok"])
    idle(m, ex, 1.2)
    assert _stopped(m, ex) == [iid] and _errors_for(m)[20]["code"] == "deadline_exceeded"


def test_a_timed_out_task_sent_again_is_not_stopped_by_its_old_deadline() -> None:
    # Given two ready instances and a task with a 1 s timeout behind another timed task on one of them
    m = Mesh(prefetch=4)
    m.ok("register_application", spec={**ECHO, "spec": {**ECHO["spec"], "max_retries": 3}})
    m.ok("create_session", application="echo", id="s1")
    ex = m.executor(slots=2)
    m.submit(2)
    (i1, p1), (i2, p2) = m.instance(ex), m.instance(ex)
    for peer in (p1, p2):   # both answer once: credit grows
        sent = [t for r in m.to(peer, Tasks) for t, _ in r.items]
        m.now += 0.001
        m.msg(peer, Done([(sent[0], None)]), [b"ok"])
    m.submit(4, first_tag=10, timeout=1.0)
    # When the first timed task on each instance runs past its timeout
    idle(m, ex, 1.2)
    # Then only tasks that were running are retried; a task re-sent elsewhere keeps running
    stopped = _stopped(m, ex)
    assert stopped and len(stopped) == len(set(stopped))
    running = [t for t in m.core.tasks.values() if t.state == "running"]
    assert all(m.core.instances[t.instance].id not in stopped for t in running)
    assert not [e for e in _errors_for(m).values() if e is not None], "nothing ran out of its retries"


def test_the_deadline_heap_does_not_grow_with_finished_tasks() -> None:
    m = Mesh(prefetch=4)
    m.app_and_session()
    ex = m.executor(slots=1)
    m.submit(1)
    iid, inst = m.instance(ex)
    for i in range(300):   # 300 timed tasks answered at once, one by one
        m.submit(1, first_tag=100 + i, timeout=3600.0)
        [tid] = [t.id for t in m.core.tasks.values() if t.tag == 100 + i] or [None]
        if i == 0:
            m.msg(inst, Done([(1, None)]), [b"ok"])
        m.msg(inst, Done([(tid, None)]), [b"ok"])
        m.tick(0.01)
    assert len(m.core.deadlines) <= 64 + 2 * len(m.core.instances)


def test_held_tasks_count_against_max_pending() -> None:
    m = Mesh(backlog_admit=1, max_pending=10)
    m.app_and_session()
    m.submit(1)
    m.run(m.core.store_behind(True, m.now))
    m.submit(5, first_tag=10)                    # held: 1 + 5 <= 10
    sends = m.submit(5, first_tag=20)            # 1 + 5 + 5 > 10: refused, not held
    [(tag, err)] = sorted({tag: err for r in m.to(b"client", Result) for tag, err in r.outcomes}.items())[:1]
    assert tag == 20 and err["details"]["limit"] == "max_pending"
    assert m.core.deferred_tasks == 5 and m.core.sessions["s1"].deferred == 5


def test_logins_in_flight_count_against_the_limit_and_a_success_is_forgiven() -> None:
    from mesh.model.auth import LoginLimits
    limits = LoginLimits(limit=2, window=60.0)
    # Given two logins for a name checked at once, their hash checks not done yet
    limits.check("eve", "peer-1", 100.0)
    limits.check("eve", "peer-2", 100.0)
    # Then a third, sent before they finish, is refused already
    with pytest.raises(ResourceExhausted, match="for 'eve'"):
        limits.check("eve", "peer-3", 100.0)
    # When one of them succeeds it no longer counts, and the window moves on for the rest
    limits.succeeded("eve", "peer-1", 100.0)
    limits.check("eve", "peer-4", 101.0)
    with pytest.raises(ResourceExhausted):
        limits.check("eve", "peer-5", 101.0)
    limits.check("eve", "peer-6", 161.0)
    with pytest.raises(InvalidArgument):
        limits.check("x" * 300, "peer-7", 200.0)


# -- leases: what a client holds only while it renews --------------------------------------------

def _leased(m: Mesh, ttl: float = 10.0) -> Tuple[str, str, str]:
    """Given a lease holding a temporary application, a session on it and an object."""
    lid = m.ok("create_lease", ttl=ttl)["id"]
    m.ok("register_temporary_application", spec={**ECHO, "metadata": {"name": "tmp-app"}}, lease=lid)
    sid = m.ok("create_session", application="tmp-app", id="tmp-s", lease=lid)["id"]
    key = m.ok("put_object", blob=pack({"n": 1}), kind="doc", lease=lid)["key"]
    return lid, sid, key


def test_a_lease_not_renewed_takes_its_application_sessions_and_objects_with_it(mesh: Mesh) -> None:
    lid, sid, key = _leased(mesh, ttl=10.0)
    # When its holder renews it, it lives on past its first ttl
    mesh.tick(6.0)
    mesh.ok("renew_lease", id=lid)
    mesh.tick(6.0)
    assert "tmp-app" in mesh.core.apps and mesh.core.sessions[sid].state == "open"
    # When the holder stops renewing (it was killed), the ttl runs out
    mesh.tick(10.5)
    # Then its session is closed, its object deleted and its application unregistered, on disk too
    assert mesh.core.sessions[sid].state == "closed" and key not in mesh.core.objects.items
    assert "tmp-app" not in mesh.core.apps and lid not in mesh.core.leases
    mesh.commit()
    assert "tmp-app" not in [name for name, _, _ in mesh.store.load_state().apps]
    assert mesh.store.load_state().leases == []
    reply = mesh.request("renew_lease", id=lid)
    assert not reply.ok and reply.error["code"] == "not_found"


def test_releasing_a_lease_cleans_up_at_once(mesh: Mesh) -> None:
    lid, sid, key = _leased(mesh)
    released = mesh.ok("release_lease", id=lid)
    assert released["applications"] == ["tmp-app"] and released["sessions"] == [sid]
    assert mesh.core.sessions[sid].state == "closed" and "tmp-app" not in mesh.core.apps


def test_a_lease_survives_a_manager_restart_and_still_expires(mesh: Mesh) -> None:
    lid, sid, key = _leased(mesh, ttl=10.0)
    mesh.commit()
    # When the manager restarts on the same store
    m2 = Mesh()
    m2.store = mesh.store
    m2.now = mesh.now + 2.0
    m2.run(m2.core.restore(mesh.store.load_state(), m2.now))
    # Then the lease and what it holds are back, and the application knows its lease
    assert m2.core.leases[lid].sessions == {sid} and m2.core.apps["tmp-app"].lease == lid
    m2.ok("renew_lease", id=lid)
    # And when it is not renewed any more, it ends there too
    m2.tick(10.5)
    assert "tmp-app" not in m2.core.apps and m2.core.sessions[sid].state == "closed"


def test_a_user_registers_only_temporary_applications_and_touches_only_their_leases() -> None:
    m = Mesh(secured=True)
    from mesh.model.auth import Principal
    ana, bo = "tok-ana", "tok-bo"
    m.core.tokens.add(ana, Principal("ana", "user", "user"), float("inf"))
    m.core.tokens.add(bo, Principal("bo", "user", "user"), float("inf"))
    lid = m.request("create_lease", token=ana, ttl=30).result["id"]
    spec = {**ECHO, "metadata": {"name": "ana-job"}}
    assert m.request("register_application", token=ana, spec=spec).error["code"] == "permission_denied"
    app = m.request("register_temporary_application", token=ana, spec=spec, lease=lid).result
    assert app["owner"] == "ana" and app["lease"] == lid
    assert m.request("renew_lease", token=bo, id=lid).error["code"] == "permission_denied"
    assert m.request("release_lease", token=bo, id=lid).error["code"] == "permission_denied"
    assert m.request("create_session", token=bo, application="ana-job", lease=lid).error["code"] == \
        "permission_denied"


def test_a_temporary_application_reused_by_another_lease_passes_to_it(mesh: Mesh) -> None:
    # Given a temporary application of lease A, and a session on it held by lease B
    a, _, _ = _leased(mesh)
    b = mesh.ok("create_lease", ttl=10.0)["id"]
    sid = mesh.ok("create_session", application="tmp-app", id="b-s", lease=b)["id"]
    # When A ends, the application stays (B's session uses it) and passes to B
    mesh.ok("release_lease", id=a)
    assert mesh.core.apps["tmp-app"].lease == b and mesh.core.sessions[sid].state == "open"
    # When B ends too, nothing is left
    mesh.ok("release_lease", id=b)
    assert "tmp-app" not in mesh.core.apps


# -- a result kept for another task (mesh/core/results.py) ---------------------------------------

def test_a_kept_result_reaches_a_reader_waiting_for_it_without_its_client() -> None:
    m = Mesh()
    iid, inst = running(m, 1)
    key = "ab" * 16
    # Given a running task whose answer another call will read, and that reader already waiting
    assert m.ok("keep_result", cid="c1", tag=1, key=key)["kept"] is True
    sends = m.msg(b"reader", Request(77, "get_object", {"key": key, "have": 0, "wait": 5.0}))
    assert not [s for s in sends if isinstance(s.record, Reply)], "it waits for the object"
    # When the task answers
    sends = m.msg(inst, Done([(1, None)]), [b"the-answer"])
    # Then its client gets its answer, and the waiting reader gets the same bytes as an object
    [reply] = [s for s in sends if isinstance(s.record, Reply) and s.peer == b"reader"]
    assert reply.record.ok and reply.record.result["key"] == key and bytes(reply.payloads[0]) == b"the-answer"
    assert [o for r in m.to(b"client", Result) for o in r.outcomes] == [(1, None)]
    # And the object is bound to the task's session: it goes when the session closes
    assert m.core.objects.items[key].session == "s1"
    # A result already answered cannot be kept: its client has it
    assert m.ok("keep_result", cid="c1", tag=1, key="cd" * 16)["kept"] is False


def test_a_reader_waiting_for_a_result_never_put_gets_not_found_at_its_deadline(mesh: Mesh) -> None:
    mesh.msg(b"reader", Request(5, "get_object", {"key": "ef" * 16, "have": 0, "wait": 1.0}))
    sends = mesh.tick(1.5)
    [reply] = [s.record for s in sends if isinstance(s.record, Reply) and s.record.rid == 5]
    assert not reply.ok and reply.error["code"] == "not_found"
    assert mesh.core.object_waiters == {}


def test_a_failed_kept_result_is_stored_as_its_error() -> None:
    m = Mesh()
    iid, inst = running(m, 1)
    key = "12" * 16
    m.ok("keep_result", cid="c1", tag=1, key=key)
    m.msg(inst, Done([(1, {"code": "task_failed", "message": "boom", "details": {}})]), [b""])
    obj = m.core.objects.items[key]
    assert obj.doc.kind == "doc" and obj.doc.value == {"error": {"code": "task_failed", "message": "boom",
                                                                  "details": {}}}


def test_only_its_owner_opens_sessions_on_a_temporary_application() -> None:
    m = Mesh(secured=True)
    from mesh.model.auth import Principal
    m.core.tokens.add("tok-bo", Principal("bo", "user", "user"), float("inf"))
    m.core.tokens.add("tok-ana", Principal("ana", "user", "user"), float("inf"))
    lid = m.request("create_lease", token="tok-bo", ttl=30).result["id"]
    m.request("register_temporary_application", token="tok-bo", spec={**ECHO, "metadata": {"name": "my-job"}},
              lease=lid)
    # bo's temporary application runs bo's code: ana may not run her sessions (and her token) in it
    assert m.request("create_session", token="tok-ana", application="my-job").error["code"] == "permission_denied"
    assert m.request("create_session", token="tok-bo", application="my-job").ok


def test_a_result_kept_twice_has_one_key_and_a_failure_without_answer_reaches_its_readers() -> None:
    m = Mesh()
    iid, inst = running(m, 1)
    first = m.ok("keep_result", cid="c1", tag=1, key="aa" * 16)["key"]
    assert m.ok("keep_result", cid="c1", tag=1, key="bb" * 16)["key"] == first, "one key per task"
    sends = m.msg(b"reader", Request(9, "get_object", {"key": first, "have": 0, "wait": 30.0}))
    assert not [s for s in sends if isinstance(s.record, Reply)]
    # When the task is cancelled (no answer ever comes), the reader hears its error at once
    m.ok("cancel_task", id=1)
    [reply] = [s for s in m.sent if isinstance(s.record, Reply) and s.peer == b"reader"]
    assert reply.record.ok   # the kept error document
    assert m.core.objects.items[first].doc.value["error"]["code"] == "cancelled"


def test_a_kept_answer_arriving_after_its_session_closed_is_not_stored(mesh: Mesh) -> None:
    iid, inst = running(mesh, 1)
    key = mesh.ok("keep_result", cid="c1", tag=1, key="cc" * 16)["key"]
    mesh.msg(b"reader", Request(9, "get_object", {"key": key, "have": 0, "wait": 30.0}))
    mesh.ok("close_session", id="s1")
    mesh.msg(inst, Done([(1, None)]), [b"late"])   # answered within close_grace
    assert key not in mesh.core.objects.items
    [reply] = [s.record for s in mesh.sent if isinstance(s.record, Reply) and s.peer == b"reader"]
    assert not reply.ok and reply.error["code"] == "not_found"


def test_removing_a_user_ends_the_tokens_of_the_instances_acting_for_them() -> None:
    from mesh.model.auth import Principal, Tokens
    tokens = Tokens({})
    tokens.add("user-tok", Principal("ana", "user", "user"), float("inf"))
    tokens.add("inst-tok", Principal("ana", "instance", "instance"), float("inf"))
    tokens.add("other", Principal("bo", "instance", "instance"), float("inf"))
    tokens.drop_principal("ana", "user")
    assert set(tokens.live) == {list(tokens.live)[0]} and tokens.principal("other").name == "bo"


def test_a_lease_forgets_what_was_closed_or_deleted_before_it_ended(mesh: Mesh) -> None:
    lid, sid, key = _leased(mesh)
    extra = mesh.ok("put_object", blob=pack({"n": 2}), kind="doc", lease=lid)["key"]
    mesh.ok("delete_object", key=extra)
    mesh.ok("close_session", id=sid)
    lease = mesh.core.leases[lid]
    assert lease.objects == {key} and lease.sessions == set()
    mesh.commit()
    [(_, _, _, _, members)] = mesh.store.load_state().leases
    assert members["objects"] == [key] and members["sessions"] == []
    released = mesh.ok("release_lease", id=lid)
    assert released["objects"] == 1
    mesh.commit()
    assert mesh.store.load_state().leases == []


def test_a_session_bounds_its_own_instances_beside_its_application(mesh: Mesh) -> None:
    # Given an application without a bound, a session of it with max_instances 1, and 4 free slots
    mesh.ok("register_application", spec=ECHO)
    mesh.ok("create_session", application="echo", id="one", max_instances=1)
    ex = mesh.executor(slots=4)
    # When it has 10 tasks queued
    mesh.submit(10, sid="one")
    mesh.tick(0.1)
    # Then it gets one instance, not four
    assert len(mesh.to(ex, Launch)) == 1
    assert mesh.request("create_session", application="echo", max_instances=0).error["code"] == "invalid_argument"
    # And the bound survives a restart
    mesh.commit()
    assert [r["max_instances"] for r in mesh.store.load_sessions() if r["id"] == "one"] == [1]


def test_an_executor_lists_its_instances_with_their_application_and_session(mesh: Mesh) -> None:
    running(mesh, 1)
    [ex] = mesh.ok("find_executors")["items"]
    [inst] = ex["instance_list"]
    assert (inst["application"], inst["session"], inst["ready"]) == ("echo", "s1", True)
    assert ex["cpu_used"] >= 0 and "memory_used" in ex
