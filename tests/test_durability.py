"""What the manager acknowledged survives a kill -9 (the durability rule, docs/reliability.md).

A reply that tells a peer something (a context version, an object version, a
task's answer) is sent only after the group commit holding it.  The tests kill
the manager with SIGKILL at several moments while clients write the context,
patch an object and run tasks that write the context, restart it on the same
database, and count:

* every acknowledged context write and object version is there (found >= acknowledged);
* every answered task's context write is there;
* no version names two contents: a context's version is the number of writes
  applied to it (each write counts itself), an object's content is a function
  of its version, after the restart and after writing again.

Tasks run at least once: one answered after a restart may have run twice, so
the tasks' writes are idempotent and counted apart (``/marks``).

The negative control runs the same scenario with ``unsafe_ack_before_commit``
(acknowledgements sent before their commit) and shows the checks catch the loss.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Dict, List, Set, Tuple

import pytest
from conftest import FAST, tools_spec

from client import Client, Session
from client.local import LocalMesh
from mesh.errors import MeshError, NotFound
from mesh.wire.protocol import pack, unpack

KILL_AFTER = (0.0, 0.1, 0.3, 0.6, 1.0)   # seconds of concurrent writing before each kill -9
WRITES_MAX = 2000                          # bound on each writer's loop


def _env(**extra: str) -> Dict[str, str]:
    # a longer group-commit interval widens the window a broken rule would lose writes in
    return {**FAST, "ZMESH_FLUSH_INTERVAL": "0.1", "ZMESH_REQUEST_TIMEOUT": "3", **extra}


class Round:
    """One timing: writers running against the manager until it is killed."""

    def __init__(self, endpoint: str, sid: str, key: str) -> None:
        self.endpoint, self.sid, self.key = endpoint, sid, key
        self.stop = threading.Event()
        self.ctx_acked = 0              # context increments answered with a version
        self.ctx_version = 0            # the highest context version answered
        self.obj_version = 0            # the highest object version answered
        self.answered: Set[str] = set()  # tasks answered (each wrote /done/<tag>)
        self.errors: List[BaseException] = []

    def _ctx_writer(self, s: Session) -> None:
        for _ in range(WRITES_MAX):
            if self.stop.is_set():
                return
            v = s.patch_context([{"op": "incr", "path": "/n", "value": 1}])
            self.ctx_acked += 1
            self.ctx_version = max(self.ctx_version, v)

    def _obj_writer(self, c: Client) -> None:
        for _ in range(WRITES_MAX):
            if self.stop.is_set():
                return
            r = c.conn.call("patch_object", {"key": self.key, "ops": [{"op": "incr", "path": "/n", "value": 1}]})
            self.obj_version = max(self.obj_version, r["version"])

    def _tasks(self, s: Session, prefix: str) -> None:
        futures = {f"{prefix}-{i}": s.submit(("mark", f"{prefix}-{i}")) for i in range(200)}
        while not self.stop.is_set() and futures:
            for tag, f in list(futures.items()):
                if f.done():
                    futures.pop(tag)
                    if f.exception() is None:
                        self.answered.add(tag)
            self.stop.wait(0.005)

    def run(self, kill_after: float, kill: Any, prefix: str) -> None:
        s = Session(session_id=self.sid, manager=self.endpoint)
        s.invoke(("echo", "ready"), timeout=60)   # an instance serves the session before the clock starts
        with Client(self.endpoint) as c:
            def guard(fn: Any, *args: Any) -> None:
                try:
                    fn(*args)
                except MeshError:
                    pass          # the call the kill interrupted: neither acknowledged nor counted
                except BaseException as exc:  # noqa: B902 - reported by the test
                    self.errors.append(exc)
            threads = [threading.Thread(target=guard, args=(self._ctx_writer, s)),
                       threading.Thread(target=guard, args=(self._obj_writer, c)),
                       threading.Thread(target=guard, args=(self._tasks, s, prefix))]
            for t in threads:
                t.start()
            time.sleep(kill_after)          # the timing under test, not a wait for an event
            answered_before = set(self.answered)
            kill()
            self.answered = answered_before    # only answers seen before the kill count
            self.stop.set()
            for t in threads:
                t.join(30)
            s.detach()
            assert not any(t.is_alive() for t in threads), "a writer did not stop"


def _scenario(tmp_path: Any, env: Dict[str, str]) -> Tuple[List[str], Dict[str, int]]:
    """Run every timing; returns the violations found (empty when nothing acknowledged was lost)
    and how much was acknowledged in all (so a test can tell that the scenario exercised each kind)."""
    problems: List[str] = []
    totals = {"context writes": 0, "object writes": 0, "answered tasks": 0}
    with LocalMesh(executors=1, slots=2, env=env, log_dir=str(tmp_path)) as m:
        with Client(m.endpoint) as c:
            c.register_application(tools_spec())
            key = c.conn.call_blob("put_object", {"kind": "doc", "ttl": 3600},
                                   pack({"n": 0}))[0]["key"]
        s = Session("tools", manager=m.endpoint, ctx={"n": 0, "done": {}, "marks": 0})
        sid = s.id()
        s.invoke(("echo", "warm"), timeout=60)   # an instance is up before the first timing
        s.detach()

        def kill() -> None:
            os.kill(m.manager.pid, signal.SIGKILL)
            m.manager.wait(10)

        acked_ctx = acked_version = acked_obj = 0
        answered: Set[str] = set()
        for i, delay in enumerate(KILL_AFTER):
            r = Round(m.endpoint, sid, key)
            r.run(delay, kill, f"t{i}")
            assert not r.errors, r.errors
            acked_ctx += r.ctx_acked
            totals["context writes"] += r.ctx_acked
            totals["object writes"] += max(r.obj_version - acked_obj, 0)
            totals["answered tasks"] += len(r.answered)
            acked_version = max(acked_version, r.ctx_version)
            acked_obj = max(acked_obj, r.obj_version)
            answered |= r.answered
            m.start_manager()
            again = Session(session_id=sid, manager=m.endpoint)
            with Client(m.endpoint) as c2:
                ctx = again.context()
                version = again.info()["context_version"]
                header, data = c2.conn.call_blob("get_object", {"key": key, "have": 0})
                obj = unpack(bytes(data))
                where = f"kill after {delay}s"
                if version < acked_version:
                    problems.append(f"{where}: context at version {version}, {acked_version} was acknowledged")
                if ctx["n"] < acked_ctx:
                    problems.append(f"{where}: context n={ctx['n']}, {acked_ctx} increments were acknowledged")
                lost = sorted(answered - set(ctx["done"]))
                if lost:
                    problems.append(f"{where}: {len(lost)} answered tasks' writes are gone: {lost[:5]}")
                if version != ctx["n"] + ctx["marks"]:   # each write is one version (a task may run twice)
                    problems.append(f"{where}: context version {version} names {ctx['n'] + ctx['marks']} writes")
                if header["version"] < acked_obj:
                    problems.append(f"{where}: object at version {header['version']}, {acked_obj} was acknowledged")
                if obj["n"] != header["version"] - 1:
                    problems.append(f"{where}: object version {header['version']} holds n={obj['n']}")
                # writing again after the restart continues the versions, never reuses one
                v = again.patch_context([{"op": "incr", "path": "/n", "value": 1}])
                acked_ctx, acked_version = ctx["n"] + 1, v
                if v != version + 1:
                    problems.append(f"{where}: the next context write got version {v} after {version}")
                r2 = c2.conn.call("patch_object", {"key": key, "ops": [{"op": "incr", "path": "/n", "value": 1}]})
                if r2["version"] != header["version"] + 1:
                    problems.append(f"{where}: the next object write got version {r2['version']}")
                acked_obj = r2["version"]
                answered = set(ctx["done"])   # lost ones were reported; what is there is the new floor
            again.detach()
            with pytest.raises(NotFound):
                with Client(m.endpoint) as c3:
                    c3.conn.call_blob("get_object", {"key": "no-such-key", "have": 0})
    return problems, totals


@pytest.fixture(autouse=True)
def _short_calls(monkeypatch: Any) -> None:
    """The test's own clients give up on a call the kill interrupted after 2 s (default 10 s)."""
    monkeypatch.setenv("ZMESH_REQUEST_TIMEOUT", "2")


def test_nothing_acknowledged_is_lost_across_repeated_manager_kills(tmp_path: Any) -> None:
    # Given clients writing a context, patching an object and running tasks that write the context
    # When the manager is killed -9 at five different moments and restarted on the same database
    problems, totals = _scenario(tmp_path, _env())
    # Then every acknowledged write is there and no version names two contents
    assert problems == []
    assert all(totals.values()), f"some kind of write was never acknowledged before a kill: {totals}"


def test_negative_control_acknowledging_before_the_commit_loses_writes(tmp_path: Any) -> None:
    # Given the same scenario with acknowledgements sent before their group commit
    problems, _ = _scenario(tmp_path, _env(ZMESH_UNSAFE_ACK_BEFORE_COMMIT="1"))
    # Then the same checks catch acknowledged writes that a kill -9 took away
    assert problems, "the checks found nothing with the durability rule off: they cannot fail"
