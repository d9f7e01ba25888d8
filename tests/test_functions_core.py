"""The functions engine without a socket: the core routes, batches and commits; we play the instance.

The instance's answers are built by the real SDK (``StatefulFunctions.invoke``) on the request
the core sent, so the wire between them is exercised as it is in production.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, List, Optional, Tuple, Union

import cloudpickle
import pytest

from executor import StatefulFunctions, ValueSpec
from mesh.errors import MeshError
from mesh.model import functions as model
from mesh.wire.pickled import unwrap_bytes
from mesh.wire.protocol import Done, Heartbeat, InstHello, Launch, Reply, Tasks, unpack
from test_core import ECHO, Mesh


@dataclass
class User:
    name: str


@dataclass
class Admin:
    name: str


def greeter() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind("example/count", specs=[ValueSpec("count", expire_after_write=timedelta(seconds=60))])
    def count(context, message: User) -> None:
        n = (context["count"] or 0) + 1
        context["count"] = n
        context.reply(f"Hello {message.name} #{n}")
        context.send_egress("example/greetings", {"user": message.name, "n": n})
        if n == 1:
            context.send("example/audit", message.name, message)
            context.send_after(timedelta(seconds=5), "example/audit", message.name, Admin("later"), "t-" + message.name)

    @functions.bind("example/audit")
    def audit(context, message: Union[User, Admin]) -> None:
        context["seen"] = (context["seen"] or []) + [type(message).__name__]

    @functions.bind("example/boom")
    def boom(context, message: Any) -> None:
        context["x"] = 1
        raise ValueError("no")

    return functions


class FnMesh:
    """A core with one executor; instances of the functions application answer through the SDK."""

    def __init__(self, m: Optional[Mesh] = None, functions: Optional[StatefulFunctions] = None) -> None:
        self.m = m or Mesh()
        self.fx = functions or greeter()
        if "echo" not in self.m.core.apps:
            self.m.ok("register_application", spec=ECHO)
        self.ex = self.m.executor(slots=4)
        self.instances: Dict[bytes, str] = {}
        self.answered: set = set()

    def start_instances(self) -> None:
        for s in list(self.m.sent):
            if isinstance(s.record, Launch) and s.record.iid not in self.m._started:
                self.m._started.add(s.record.iid)
                peer = b"inst-" + s.record.iid.encode()
                self.instances[peer] = s.record.iid
                self.m.msg(peer, InstHello(s.record.iid, "e1", 4242, s.record.token, self.fx.typenames))

    def pending(self) -> List[Tuple[bytes, int, bytes]]:
        out = []
        for s in self.m.sent:
            if s.peer in self.instances and isinstance(s.record, Tasks):
                for (tid, _), payload in zip(s.record.items, s.payloads):
                    if tid in self.m.core.tasks and tid not in self.answered:
                        out.append((s.peer, tid, bytes(payload)))
        return out

    def serve(self, rounds: int = 20) -> int:
        """Start instances and answer every batch until nothing is left (bounded)."""
        done = 0
        for _ in range(rounds):
            self.start_instances()
            work = self.pending()
            if not work:
                return done
            for peer, tid, payload in work:
                self.answered.add(tid)
                os.environ["ZMESH_INSTANCE_ID"] = self.instances[peer]   # as its executor sets it
                try:
                    out = self.fx.invoke(unwrap_bytes(payload))
                except MeshError as exc:   # as executor/instance.py answers it
                    self.m.msg(peer, Done([(tid, exc.to_wire())]), [b""])
                    continue
                finally:
                    del os.environ["ZMESH_INSTANCE_ID"]
                self.m.msg(peer, Done([(tid, None)]), [pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)])
                done += 1
        raise AssertionError("still serving after the rounds allowed")

    def tick(self, seconds: float) -> None:
        """The clock moves on; the executor and its instances stay alive (heartbeats)."""
        for _ in range(int(seconds) + 1):
            step = min(1.0, seconds)
            seconds -= step
            self.m.msg(self.ex, Heartbeat())
            self.m.tick(step)

    def send(self, typename: str, ident: str, message: Any) -> Reply:
        return self.m.request("fn_send", blob=cloudpickle.dumps(message), type=typename, id=ident)

    def call(self, typename: str, ident: str, message: Any, peer: bytes = b"caller") -> int:
        rid = next(self.m.rids)
        from mesh.wire.protocol import Request
        self.m.msg(peer, Request(rid, "fn_call", {"type": typename, "id": ident, "timeout": 30.0}, None, True),
                   [cloudpickle.dumps(message)])
        return rid

    def reply(self, rid: int, peer: bytes = b"caller") -> Reply:
        [r] = [s.record for s in self.m.sent if s.peer == peer and isinstance(s.record, Reply) and s.record.rid == rid]
        return r

    def reply_value(self, rid: int, peer: bytes = b"caller") -> Any:
        [s] = [s for s in self.m.sent if s.peer == peer and isinstance(s.record, Reply) and s.record.rid == rid]
        assert s.record.ok, s.record.error
        return cloudpickle.loads(bytes(s.payloads[0]))

    def state(self, typename: str, ident: str) -> Dict[str, Any]:
        st = self.m.ok("fn_state", type=typename, id=ident)["state"]
        return {k: cloudpickle.loads(v) for k, v in st.items()}

    def egress(self, typename: str) -> List[Any]:
        self.m.commit()
        rows = self.m.store.egress(typename, 0, 1000)
        return [unpack(r[3]) if r[2] == "doc" else cloudpickle.loads(r[3]) for r in rows]


@pytest.fixture
def fm() -> FnMesh:
    return FnMesh()


def test_a_message_is_routed_by_the_type_an_instance_serves_and_its_effects_commit_together(fm: FnMesh) -> None:
    # Given nothing is known to serve example/count: the engine starts an instance of each application
    assert fm.send("example/count", "alice", User("alice")).ok
    fm.serve()
    assert fm.m.core.fn_types["example/count"] == "echo"
    # Then the count ran, its egress record, its message to audit and its delayed message are stored
    assert fm.state("example/count", "alice") == {"count": 1}
    assert fm.state("example/audit", "alice") == {"seen": ["User"]}
    assert fm.egress("example/greetings") == [{"user": "alice", "n": 1}]
    fm.m.commit()
    assert fm.m.store.db.execute("SELECT count(*) FROM fn_inbox").fetchone()[0] == 0
    assert fm.m.store.db.execute("SELECT token FROM fn_delayed").fetchall() == [("t-alice",)]


def test_a_call_gets_the_reply_and_messages_of_one_address_run_one_batch_at_a_time(fm: FnMesh) -> None:
    fm.send("example/count", "bob", User("bob"))
    fm.serve()
    # When three calls arrive while the address is busy
    first = fm.call("example/count", "bob", User("bob"))
    fm.start_instances()
    busy = fm.pending()
    assert len(busy) == 1
    rids = [fm.call("example/count", "bob", User("bob")) for _ in range(2)]
    assert len(fm.pending()) == 1        # nothing more goes out for bob until the batch answers
    fm.serve()
    # Then each got its own reply, in order
    assert [fm.reply_value(r) for r in [first, *rids]] == ["Hello bob #2", "Hello bob #3", "Hello bob #4"]
    batches = [unpack(unwrap_bytes(p)) for s in fm.m.sent if isinstance(s.record, Tasks) for p in s.payloads]
    assert [len(b["messages"]) for b in batches if b["address"] == ["example/count", "bob"]] == [1, 1, 2]


def test_a_message_of_the_wrong_type_is_refused_naming_the_types(fm: FnMesh) -> None:
    rid = fm.call("example/count", "carol", Admin("carol"))
    fm.serve()
    r = fm.reply(rid)
    assert not r.ok and r.error["code"] == "invalid_argument" and "takes User, not Admin" in r.error["message"]
    # sent by a function or a client's send (no call): the dead-letter egress, with the reason
    fm.send("example/count", "carol", Admin("carol"))
    fm.serve()
    [dead] = fm.egress(model.DEAD_LETTERS)
    assert dead["address"] == ["example/count", "carol"] and "takes User, not Admin" in dead["reason"]
    assert fm.state("example/count", "carol") == {}


def test_an_exception_fails_the_call_and_undoes_that_messages_state(fm: FnMesh) -> None:
    rid = fm.call("example/boom", "x", 1)
    fm.serve()
    r = fm.reply(rid)
    assert not r.ok and r.error["code"] == "task_failed" and r.error["details"]["type"] == "ValueError"
    assert fm.state("example/boom", "x") == {}


def test_delayed_messages_fire_no_earlier_than_due_and_a_cancelled_one_never(fm: FnMesh) -> None:
    fm.send("example/count", "dan", User("dan"))
    fm.serve()
    assert fm.state("example/audit", "dan") == {"seen": ["User"]}
    fm.tick(4.0)
    fm.serve()
    assert fm.state("example/audit", "dan") == {"seen": ["User"]}
    fm.tick(1.5)
    fm.serve()
    assert fm.state("example/audit", "dan") == {"seen": ["User", "Admin"]}
    # a cancelled one
    functions = StatefulFunctions()

    @functions.bind("t/later")
    def later(context, message: str) -> None:
        if message == "arm":
            context.send_after(timedelta(seconds=2), "t/later", "x", "fired", "tok")
        elif message == "disarm":
            context.cancel_delayed_message("tok")
        else:
            context["fired"] = True

    fm2 = FnMesh(functions=functions)
    fm2.send("t/later", "x", "arm")
    fm2.serve()
    fm2.send("t/later", "x", "disarm")
    fm2.serve()
    fm2.tick(5)
    fm2.serve()
    assert fm2.state("t/later", "x") == {}


def test_expired_state_reads_as_none_and_is_deleted(fm: FnMesh) -> None:
    fm.send("example/count", "eve", User("eve"))
    fm.serve()
    assert fm.state("example/count", "eve") == {"count": 1}
    fm.m.now += 61
    fm.m.tick(0)
    assert fm.state("example/count", "eve") == {}
    fm.m.commit()
    [(state,)] = fm.m.store.db.execute("SELECT state FROM fn_state WHERE id='eve' AND type='example/count'")
    assert unpack(state) == {}


def test_a_restart_replays_what_was_not_committed_and_nothing_that_was(fm: FnMesh) -> None:
    fm.send("example/count", "fay", User("fay"))
    fm.serve()
    fm.send("example/count", "fay", User("fay"))   # accepted (committed), its batch out, no answer yet
    fm.start_instances()
    assert len(fm.pending()) == 1
    fm.m.commit()
    m2 = Mesh()
    m2.store = fm.m.store
    m2.now = fm.m.now
    m2.run(m2.core.restore(fm.m.store.load_state(), m2.now))
    fm2 = FnMesh(m2)
    fm2.serve()
    assert fm2.state("example/count", "fay") == {"count": 2}
    assert [e["n"] for e in fm2.egress("example/greetings")] == [1, 2]


def test_unknown_type_is_not_found_after_the_route_wait(fm: FnMesh) -> None:
    rid = fm.call("nobody/serves", "x", 1)
    fm.serve()
    fm.m.tick(model.ROUTE_WAIT + 1)
    r = fm.reply(rid)
    assert not r.ok and r.error["code"] == "not_found" and "nobody/serves" in r.error["message"]


@pytest.mark.parametrize("bad", [{"type": "no-slash", "id": "x"}, {"type": "a/b", "id": ""}, {"type": "a/b"}])
def test_bad_addresses_are_invalid_argument(fm: FnMesh, bad: Dict[str, Any]) -> None:
    r = fm.m.request("fn_send", blob=b"x", **bad)
    assert not r.ok and r.error["code"] == "invalid_argument"


def test_a_resent_message_id_is_delivered_once(fm: FnMesh) -> None:
    for _ in range(2):
        r = fm.m.request("fn_send", blob=cloudpickle.dumps(User("gil")), type="example/count", id="gil", mid="m-1")
        assert r.ok
    fm.serve()
    r = fm.m.request("fn_send", blob=cloudpickle.dumps(User("gil")), type="example/count", id="gil", mid="m-1")
    assert r.result == {"mid": "m-1", "duplicate": True}
    fm.serve()
    assert fm.state("example/count", "gil") == {"count": 1}


def test_a_type_nobody_serves_is_not_found_at_once_once_every_application_has_said(fm: FnMesh) -> None:
    fm.send("example/count", "hal", User("hal"))
    fm.serve()   # the only application has said what it serves
    r = fm.m.request("fn_send", blob=b"x", type="nobody/serves", id="x")
    assert not r.ok and r.error["code"] == "not_found" and "example/count" in r.error["message"]


def test_a_cancel_then_a_new_delay_under_the_same_token_keeps_the_new_one() -> None:
    functions = StatefulFunctions()

    @functions.bind("t/rearm")
    def rearm(context, message: str) -> None:
        if message == "go":
            context.send_after(timedelta(seconds=1), "t/rearm", "x", "first", "tok")
            context.cancel_delayed_message("tok")
            context.send_after(timedelta(seconds=2), "t/rearm", "x", "second", "tok")
        else:
            context["got"] = (context["got"] or []) + [message]

    fm = FnMesh(functions=functions)
    fm.send("t/rearm", "x", "go")
    fm.serve()
    fm.tick(3)
    fm.serve()
    assert fm.state("t/rearm", "x") == {"got": ["second"]}


def test_state_stays_in_the_instance_that_ran_the_address_last_and_moves_when_it_cannot_serve(fm: FnMesh) -> None:
    fm.send("example/count", "ivy", User("ivy"))
    fm.serve()
    fm.send("example/count", "ivy", User("ivy"))
    fm.start_instances()
    [(peer, tid, payload)] = fm.pending()
    req = unpack(unwrap_bytes(payload))
    first = [s.peer for s in fm.m.sent if isinstance(s.record, Tasks)
             and unpack(unwrap_bytes(bytes(s.payloads[0])))["address"] == ["example/count", "ivy"]][0]
    assert req["state"] is None and peer == first   # the holder, without the state
    # When the process lost what it held (another instance got the batch, or it restarted)
    fm.fx._held.clear()
    fm.serve()
    # Then the batch went again with the state, and nothing was counted twice or lost
    assert fm.state("example/count", "ivy") == {"count": 2}
    again = [unpack(unwrap_bytes(bytes(s.payloads[0]))) for s in fm.m.sent if isinstance(s.record, Tasks)]
    assert again[-1]["state"] is not None and again[-1]["address"] == ["example/count", "ivy"]


def test_a_json_object_is_built_into_the_declared_class(fm: FnMesh) -> None:
    rid = fm.call("example/count", "jo", {"name": "jo"})
    fm.serve()
    assert fm.reply_value(rid) == "Hello jo #1"
    rid = fm.call("example/count", "jo", {"nom": "jo"})
    fm.serve()
    r = fm.reply(rid)
    assert not r.ok and "unknown field(s) nom" in r.error["message"] and "missing field(s) name" in r.error["message"]
