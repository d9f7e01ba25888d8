"""One replica (mesh/data/replica.py) and its three users, tested without a socket.

Given / When / Then.  The instance SDK's receive loop is driven through a
scripted stand-in for its DEALER socket: a "manager" function answers what the
instance sends, so every wait (for work, for a write's answer, for a snapshot)
is exercised in one process, with no sleep and no timer.
"""
from __future__ import annotations

import collections
import pickle
import random
from typing import Any, Callable, Deque, List, Optional

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from executor.instance import Instance
from mesh.data.cache import ObjectCache
from mesh.data.context import Document
from mesh.data.objects import PATCH_HISTORY, Objects
from mesh.data.replica import BLOB, DOC, Outcome, Replica
from mesh.errors import Conflict, Internal, InvalidArgument, ProtocolError, ResourceExhausted, Unavailable
from mesh.wire.protocol import MAGIC, Bind, Cmd, CtxPatch, CtxReject, Gone, Message, Reply, decode, encode, pack

INCR = [{"op": "incr", "path": "/n", "value": 1}]


def _state(r: Replica) -> tuple:
    return r.kind, r.version, r.value, r.encoded()


def _sequenced(writes: List[Any], start: Any = None) -> List[tuple]:
    """What a sequencer logs for ``writes``: (version, ops, None), starting from ``start`` at v0."""
    seq = Document(DOC, 0, start)
    out = []
    for ops in writes:
        out.append((seq.apply(ops, None), ops, None))
    return out


# -- the replica ------------------------------------------------------------------------------
def test_writes_apply_in_version_order():
    # Given a replica of {"n": 0, "log": []} at version 0
    r = Replica(DOC, 0, {"n": 0, "log": []})
    # When it receives versions 1, 2, 3 in order
    outcomes = [r.receive(1, INCR, None),
                r.receive(2, [{"op": "add", "path": "/log/-", "value": "a"}], None),
                r.receive(3, INCR, None)]
    # Then each is applied, and it holds version 3's content
    assert outcomes == [Outcome.APPLIED] * 3
    assert (r.version, r.value) == (3, {"n": 2, "log": ["a"]})


def test_a_duplicate_or_stale_write_is_ignored():
    # Given a replica at version 2
    r = Replica(DOC, 0, {"n": 0})
    r.receive(1, INCR, None)
    r.receive(2, INCR, None)
    before = _state(r)
    # When version 2 arrives again, and version 1 late
    # Then both are stale and nothing changes (an incr applied twice would show)
    assert r.receive(2, INCR, None) is Outcome.STALE
    assert r.receive(1, INCR, None) is Outcome.STALE
    assert _state(r) == before and r.value == {"n": 2}


def test_a_gap_is_detected_and_resynced_from_a_snapshot():
    # Given a sequencer at version 4 and a replica that saw only version 1
    seq = Document(DOC, 0, {"n": 0})
    for _ in range(4):
        seq.apply(INCR, None)
    r = Replica(DOC, 0, {"n": 0})
    r.receive(1, INCR, None)
    # When version 3 arrives (2 was lost)
    outcome = r.receive(3, INCR, None)
    # Then the gap is reported and the replica is unchanged
    assert outcome is Outcome.GAP and outcome.needs_snapshot
    assert (r.version, r.value) == (1, {"n": 1})
    # When it restores the sequencer's snapshot, and the next write follows
    assert r.restore(seq.kind, seq.version, seq.encoded()) is Outcome.APPLIED
    assert r.receive(5, INCR, None) is Outcome.APPLIED
    # Then it holds what the sequencer holds after the same write
    seq.apply(INCR, None)
    assert (r.version, r.value, r.encoded()) == (seq.version, seq.value, seq.encoded())


def test_an_older_snapshot_does_not_move_a_replica_back():
    r = Replica(DOC, 0, {"n": 0})
    r.receive(1, INCR, None)
    r.receive(2, INCR, None)
    assert r.restore(DOC, 1, pack({"n": 1})) is Outcome.STALE
    assert (r.version, r.value) == (2, {"n": 2})


def test_a_write_that_does_not_fit_is_divergence_and_changes_nothing():
    # Given a replica whose content lacks /x
    r = Replica(DOC, 0, {"n": 0})
    before = _state(r)
    # When the next version replaces /x
    outcome = r.receive(1, [{"op": "incr", "path": "/n", "value": 1}, {"op": "replace", "path": "/x", "value": 1}], None)
    # Then it asks for a snapshot, and not even the first op (incr /n) took effect
    assert outcome is Outcome.DIVERGED and outcome.needs_snapshot
    assert _state(r) == before


@pytest.mark.parametrize("ops, error", [
    ([{"op": "test", "path": "/n", "value": 5}, {"op": "replace", "path": "/n", "value": 9}], Conflict),
    ([{"op": "incr", "path": "/n", "value": 1}, {"op": "remove", "path": "/nope"}], InvalidArgument),
    ([{"op": "frobnicate", "path": "/n"}], InvalidArgument),
    (None, InvalidArgument),   # neither ops nor a blob
])
def test_a_rejected_write_leaves_the_sequencer_unchanged(ops, error):
    # Given a sequencer at version 1
    doc = Document(DOC, 0, {"n": 0})
    doc.apply(INCR, None)
    before = _state(doc)
    # When a write fails
    with pytest.raises(error):
        doc.apply(ops, None)
    # Then version, content and snapshot are as before, and the next write gets version 2
    assert _state(doc) == before
    assert doc.apply(INCR, None) == 2


def test_a_write_past_the_size_limit_leaves_the_sequencer_unchanged():
    doc = Document(DOC, 0, {"s": ""})
    before = _state(doc)
    big = "x" * 1000
    with pytest.raises(ResourceExhausted):
        doc.apply([{"op": "replace", "path": "/s", "value": big}], None, max_size=500,
                  write_size=len(pack([{"op": "replace", "path": "/s", "value": big}])))
    assert _state(doc) == before


def test_copy_ops_are_measured_against_the_size_limit():
    # Given a document of about 600 bytes, and a copy op whose own size is tiny
    doc = Document.from_wire(DOC, pack({"a": "x" * 600}))
    ops = [{"op": "copy", "from": "/a", "path": "/b"}]
    size = len(pack(ops))
    # Negative control: the size estimate alone (grown by the op's size) would let it pass
    assert doc.size_hint + size <= 1000
    # When the copy would double the document past 1000 bytes
    # Then it is refused, and nothing changed
    with pytest.raises(ResourceExhausted):
        doc.apply(ops, None, max_size=1000, write_size=size)
    assert (doc.version, doc.value) == (0, {"a": "x" * 600})


def test_a_snapshot_that_does_not_decode_leaves_the_replica_unchanged():
    r = Replica(DOC, 0, {"n": 0})
    r.receive(1, INCR, None)
    before = _state(r)
    with pytest.raises(InvalidArgument):
        r.restore(DOC, 5, b"\xc1")   # 0xc1 is never valid msgpack
    assert _state(r) == before


def test_opaque_values_are_replaced_whole_and_can_become_documents_again():
    # Given a replica and a sequencer holding a blob
    seq = Document(DOC, 0, {"n": 0})
    r = Replica(DOC, 0, {"n": 0})
    assert r.receive(seq.apply(None, b"pickled"), None, b"pickled") is Outcome.APPLIED
    assert (r.kind, r.value) == (BLOB, b"pickled")
    # When ops that are not a whole replacement come
    # Then the sequencer refuses them, and a replica reports them as divergence
    with pytest.raises(InvalidArgument, match="opaque"):
        seq.apply(INCR, None)
    assert r.receive(2, INCR, None) is Outcome.DIVERGED
    # When a document replaces it whole
    whole = [{"op": "replace", "path": "", "value": {"n": 7}}]
    assert r.receive(seq.apply(whole, None), whole, None) is Outcome.APPLIED
    # Then both hold the document again
    assert (r.kind, r.value) == (seq.kind, seq.value) == (DOC, {"n": 7})


def test_replay_skips_what_the_snapshot_holds_and_refuses_a_gap():
    log = _sequenced([INCR, INCR, INCR], {"n": 0})
    packed = [(v, pack(ops), None) for v, ops, _ in log]
    # Given the snapshot at version 1 and the whole log (version 1 is already in the snapshot)
    doc = Document.from_wire(DOC, pack({"n": 1}), 1)
    doc.replay(packed)
    assert (doc.version, doc.value) == (3, {"n": 3})
    # When the log lacks version 2
    doc = Document.from_wire(DOC, pack({"n": 1}), 1)
    # Then replay refuses rather than give version 3 another content
    with pytest.raises(Internal, match="version 3 after 1"):
        doc.replay([packed[0], packed[2]])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["incr", "append", "set", "blob", "whole"]), min_size=1, max_size=30),
       st.randoms(use_true_random=False))
def test_a_replica_fed_duplicates_out_of_order_converges_with_the_sequencer(kinds, rnd):
    """A version names one content: whatever a replica receives, and in whatever order,
    at every version it reports it holds the sequencer's content of that version."""
    seq = Document(DOC, 0, {"n": 0, "log": []})
    history = {0: (seq.kind, seq.encoded())}
    log = []
    for k in kinds:
        ops: Optional[List[Any]]
        blob = None
        if k == "blob":
            ops, blob = None, pickle.dumps(len(log))
        elif k == "whole":
            ops = [{"op": "replace", "path": "", "value": {"n": 0, "log": []}}]
        elif seq.kind == BLOB:
            continue
        elif k == "incr":
            ops = INCR
        elif k == "append":
            ops = [{"op": "add", "path": "/log/-", "value": len(log)}]
        else:
            ops = [{"op": "replace", "path": "/n", "value": len(log)}]
        log.append((seq.apply(ops, blob), ops, blob))
        history[seq.version] = (seq.kind, seq.encoded())
    arrivals = log + [rnd.choice(log) for _ in range(len(log) // 2)]   # duplicates
    rnd.shuffle(arrivals)
    r = Replica(DOC, 0, {"n": 0, "log": []})
    for version, ops, blob in arrivals:
        if r.receive(version, ops, blob).needs_snapshot:
            r.restore(*history[version][:1], version, history[version][1])
        assert (r.kind, r.encoded()) == history[r.version]
    if r.version < seq.version:    # the last writes were lost: the final snapshot repairs it
        r.restore(seq.kind, seq.version, seq.encoded())
    assert (r.kind, r.encoded()) == (seq.kind, seq.encoded())


# -- the object cache: same / patches / full answers through the same replica ---------------
def _answer(objects: Objects, key: str, cache: ObjectCache) -> tuple:
    """The manager's answer to this cache's reader (it sends the version it holds)."""
    return objects.get(key, cache.version(key))


def test_object_cache_folds_full_then_patches_then_same():
    # Given an object at version 1 and an empty cache
    objects, cache = Objects(), ObjectCache()
    key = objects.put(DOC, pack({"n": 0}), None, None).key
    # When the cache reads it, then reads after two patches, then reads again
    h, d = _answer(objects, key, cache)
    assert h["mode"] == "full" and cache.apply(key, h, d).value == {"n": 0}
    objects.patch(key, INCR)
    objects.patch(key, [{"op": "add", "path": "/k", "value": "v"}])
    h, d = _answer(objects, key, cache)
    assert h["mode"] == "patches" and d is None
    entry = cache.apply(key, h, d)
    h2, d2 = _answer(objects, key, cache)
    # Then the patches bring it to version 3 and the last answer costs nothing
    assert (entry.version, entry.value) == (3, {"n": 1, "k": "v"})
    assert h2["mode"] == "same" and cache.apply(key, h2, d2) is entry
    assert {k: cache.stats[k] for k in ("full", "patches", "same")} == {"full": 1, "patches": 1, "same": 1}
    assert objects.bytes_out == len(pack({"n": 0}))


def test_object_cache_ignores_a_stale_answer_and_reports_a_gap():
    # Given a cache at version 3 of an object
    objects, cache = Objects(), ObjectCache()
    key = objects.put(DOC, pack({"n": 0}), None, None).key
    old_full = objects.get(key, 0)
    for _ in range(2):
        objects.patch(key, INCR)
    cache.apply(key, *objects.get(key, 0))
    assert cache.version(key) == 3
    # When an older full answer arrives late (a slower reader's)
    # Then the newer copy stands
    assert cache.apply(key, *old_full).value == {"n": 2}
    # When a patch answer starts beyond what the cache holds (it lost version 4)
    objects.patch(key, INCR)
    objects.patch(key, INCR)
    header, _ = objects.get(key, 4)
    assert header["mode"] == "patches" and len(header["patches"]) == 1
    # Then apply says so (None: ask for the whole object) and the entry is unchanged
    assert cache.apply(key, header, None) is None
    assert (cache.version(key), cache.get(key).value) == (3, {"n": 2})
    # And a duplicate of patches it already holds changes nothing
    dup, _ = objects.get(key, 2)
    cache.apply(key, dup, None)
    assert (cache.version(key), cache.get(key).value) == (5, {"n": 4})


def test_object_cache_answers_that_cannot_be_used():
    cache = ObjectCache()
    # a same or patches answer for a key the cache no longer holds (evicted meanwhile)
    assert cache.apply("k", {"key": "k", "version": 2, "kind": DOC, "mode": "same"}, None) is None
    assert cache.apply("k", {"key": "k", "version": 2, "kind": DOC, "mode": "patches", "patches": [INCR]}, None) is None
    with pytest.raises(ProtocolError):
        cache.apply("k", {"key": "k", "version": 2, "kind": DOC, "mode": "full"}, None)
    with pytest.raises(ProtocolError, match="mode"):
        cache.apply("k", {"key": "k", "version": 2, "kind": DOC, "mode": "guess"}, b"")
    with pytest.raises(ProtocolError, match="version"):
        cache.apply("k", {"key": "k", "kind": DOC, "mode": "full"}, pack(1))
    assert cache.entries == {} and cache.size == 0


def test_a_whole_replacement_between_versions_is_answered_in_full():
    objects, cache = Objects(), ObjectCache()
    key = objects.put(DOC, pack({"n": 0}), None, None).key
    cache.apply(key, *objects.get(key, 0))
    objects.update(key, BLOB, b"opaque")
    header, data = objects.get(key, cache.version(key))
    assert header["mode"] == "full" and data == b"opaque"
    entry = cache.apply(key, header, data)
    assert (entry.kind, entry.value, entry.version) == (BLOB, b"opaque", 2)


def test_a_reader_too_far_behind_gets_the_whole_object():
    objects = Objects()
    key = objects.put(DOC, pack({"n": 0}), None, None).key
    for _ in range(PATCH_HISTORY + 1):
        objects.patch(key, INCR)
    assert objects.get(key, 1)[0]["mode"] == "full"
    assert objects.get(key, 2)[0]["mode"] == "patches"


def test_an_opaque_objects_unpickled_value_is_dropped_when_it_changes():
    cache = ObjectCache()
    entry = cache.apply("k", {"key": "k", "version": 1, "kind": BLOB, "mode": "full"}, pickle.dumps({1}))
    entry.obj = {1}
    same = cache.apply("k", {"key": "k", "version": 1, "kind": BLOB, "mode": "same"}, None)
    assert same.obj == {1}, "same version: the unpickled object is reused"
    cache.apply("k", {"key": "k", "version": 2, "kind": BLOB, "mode": "full"}, pickle.dumps({2}))
    assert entry.obj is None and pickle.loads(entry.value) == {2}


def test_eviction_by_bytes_drops_the_least_recently_used():
    # Given a cache of 250 bytes holding a (100 B) and b (100 B)
    cache = ObjectCache(max_bytes=250)

    def full(key: str, version: int, size: int) -> None:
        cache.apply(key, {"key": key, "version": version, "kind": BLOB, "mode": "full"}, b"x" * size)

    full("a", 1, 100)
    full("b", 1, 100)
    # When a is read again (now used last) and c (100 B) arrives
    cache.apply("a", {"key": "a", "version": 1, "kind": BLOB, "mode": "same"}, None)
    full("c", 1, 100)
    # Then b, the least recently used, is evicted, and the count of bytes is exact
    assert list(cache.entries) == ["a", "c"]
    assert cache.size == 200 and cache.stats["evictions"] == 1
    # When one object alone is larger than the cache, it is kept (the reader needs it) and all else goes
    full("huge", 1, 1000)
    assert list(cache.entries) == ["huge"] and cache.size == 1000
    # When an entry is replaced by a smaller version, the count follows it
    full("huge", 2, 10)
    assert cache.size == 10
    cache.forget("huge")
    assert cache.size == 0 and not cache.entries


def test_patches_grow_an_entrys_counted_size():
    cache = ObjectCache(max_bytes=1 << 20)
    cache.apply("k", {"key": "k", "version": 1, "kind": DOC, "mode": "full"}, pack({"log": []}))
    before = cache.size
    ops = [{"op": "add", "path": "/log/-", "value": "y" * 100}]
    cache.apply("k", {"key": "k", "version": 2, "kind": DOC, "mode": "patches", "patches": [ops]}, None)
    assert cache.size == before + len(pack(ops))


# -- the instance SDK: one receive loop --------------------------------------------------------
Manager = Callable[[Message], List[List[Any]]]


class ScriptedSocket:
    """The part of a zmq DEALER the instance uses, fed by a script instead of a network.

    ``inbox`` holds whole messages (frame lists) the instance will receive; every
    message the instance sends is decoded into ``sent`` and shown to ``manager``,
    whose answers join the inbox.  A wait with no deadline on an empty inbox would
    block forever, so it fails the test instead.
    """

    def __init__(self, manager: Optional[Manager] = None) -> None:
        self.inbox: Deque[List[Any]] = collections.deque()
        self.sent: List[Message] = []
        self.manager = manager or (lambda msg: [])
        self._reading: Deque[Any] = collections.deque()
        self._writing: List[Any] = []
        self.closed = False

    def deliver(self, cmd: Cmd, header: Any, payloads: Any = ()) -> None:
        self.inbox.append(frames_of(cmd, header, list(payloads)))

    def getsockopt(self, option: int) -> int:
        if option == zmq.EVENTS:
            return zmq.POLLIN if (self._reading or self.inbox) else 0
        if option == zmq.RCVMORE:
            return 1 if self._reading else 0
        raise AssertionError(f"unexpected getsockopt({option})")

    def recv(self, flags: int = 0, copy: bool = True) -> Any:
        if not self._reading:
            self._reading.extend(self.inbox.popleft())
        return self._reading.popleft()

    def poll(self, timeout: Optional[int] = None) -> int:
        if not self.inbox and timeout is None:
            raise AssertionError("the instance would wait forever on an empty socket")
        return zmq.POLLIN if self.inbox else 0

    def send(self, frame: Any, flags: int = 0, copy: bool = True) -> None:
        self._writing.append(frame)
        if not flags & zmq.SNDMORE:
            frames, self._writing = self._writing, []
            self.send_multipart(frames)

    def send_multipart(self, frames: List[Any], *args: Any, **kwargs: Any) -> None:
        msg = decode(frames)
        self.sent.append(msg)
        for answer in self.manager(msg):
            self.inbox.append(answer)

    def close(self, linger: Optional[int] = None) -> None:
        self.closed = True

    def sent_cmds(self) -> List[Cmd]:
        return [m.cmd for m in self.sent]


def frames_of(cmd: Cmd, header: Any, payloads: List[Any]) -> List[Any]:
    """A message as a peer puts it on the wire, from a raw header (checked when the instance decodes it)."""
    return [MAGIC, bytes((cmd,)), pack(header), *payloads]


def _instance(fn: Callable[[Any], Any], sock: ScriptedSocket, sid: str = "s1", ctx: Any = None,
              version: int = 0, write_timeout: float = 30.0) -> Instance:
    ins = Instance()
    ins.entrypoint(fn)
    ins._sock = sock  # type: ignore[assignment]
    ins._write_timeout = write_timeout
    ins._bind(Message(Cmd.BIND, Bind(sid, "t", DOC, version), [pack(ctx)]))
    return ins


def _tasks(sid: str, version: int, *requests: Any) -> tuple:
    return Cmd.TASKS, [sid, version, [[i + 1, 1] for i in range(len(requests))]], [pickle.dumps(r) for r in requests]


class Sequencer:
    """A manager that sequences CTX_WRITEs on a Document and answers RESYNC with BIND."""

    def __init__(self, ctx: Any, sid: str = "s1") -> None:
        self.doc = Document(DOC, 0, ctx)
        self.sid = sid

    def __call__(self, msg: Message) -> List[List[Any]]:
        h = msg.header
        if msg.cmd is Cmd.CTX_WRITE:
            try:
                version = self.doc.apply(h.ops, msg.payloads[0] if msg.payloads else None)
            except (Conflict, InvalidArgument) as exc:
                return [encode(CtxReject(self.sid, h.seq, exc.to_wire()))]
            return [encode(CtxPatch(self.sid, version, h.ops, h.seq))]
        if msg.cmd is Cmd.RESYNC:
            return [self.bind()]
        return []

    def bind(self) -> List[Any]:
        return encode(Bind(self.sid, "t", self.doc.kind, self.doc.version), [self.doc.encoded()])

    def broadcast(self, sock: ScriptedSocket, ops: List[Any]) -> None:
        """Another writer's write: sequenced here, delivered to the instance."""
        version = self.doc.apply(ops, None)
        sock.deliver(Cmd.CTX_PATCH, {"session": self.sid, "version": version, "ops": ops, "seq": None})


def release_after(results: int, manager: Manager) -> Manager:
    """``manager``, which also releases the instance (GONE) once it has reported ``results`` tasks."""
    seen = [0]

    def answer(msg: Message) -> List[List[Any]]:
        out = manager(msg)
        if msg.cmd is Cmd.DONE:
            seen[0] += len(msg.header.outcomes)
            if seen[0] >= results:
                out.append(encode(Gone("test over")))
        return out

    return answer


def test_a_write_returns_once_sequenced_and_its_replica_includes_it():
    # Given an instance of session s1 at {"n": 0}
    seqr = Sequencer({"n": 0})
    sock = ScriptedSocket(seqr)
    ins = _instance(lambda req: None, sock, ctx={"n": 0})
    # When a task's code writes
    ins.patch_context(INCR)
    # Then the write was sent once and the replica holds the sequenced version
    assert sock.sent_cmds() == [Cmd.CTX_WRITE]
    assert (ins._version, ins.context()) == (1, {"n": 1})


def test_messages_arriving_during_a_write_are_handled_as_at_any_other_time():
    # Given an instance at version 0, and, queued before the write's answer: a task,
    # another writer's patch (version 1), and a heartbeat
    seqr = Sequencer({"n": 0})
    sock = ScriptedSocket(seqr)
    ins = _instance(lambda req: None, sock, ctx={"n": 0})
    sock.deliver(*_tasks("s1", 0, "queued"))
    seqr.broadcast(sock, [{"op": "add", "path": "/other", "value": True}])
    sock.deliver(Cmd.HEARTBEAT, {})
    # When the instance writes (its write is sequenced as version 2)
    ins.patch_context(INCR)
    # Then the patch was applied in order, the task waits its turn (not run inside the write),
    # and the replica equals the sequencer's document
    assert (ins._version, ins.context()) == (2, {"n": 1, "other": True}) == (seqr.doc.version, seqr.doc.value)
    assert [m.cmd for m in ins._work] == [Cmd.TASKS]
    assert ins.resyncs == 0


def test_a_gap_during_a_write_is_resynced_before_the_write_returns():
    # Given a sequencer whose version 1 (another writer's) is lost on its way to this instance
    seqr = Sequencer({"n": 0})
    sock = ScriptedSocket(seqr)
    ins = _instance(lambda req: None, sock, ctx={"n": 0})
    seqr.doc.apply([{"op": "add", "path": "/lost", "value": 1}], None)   # version 1, never delivered
    # When the instance writes (version 2 arrives: a gap)
    ins.patch_context(INCR)
    # Then it asked for one snapshot, and returned only once it held its own write
    assert sock.sent_cmds() == [Cmd.CTX_WRITE, Cmd.RESYNC]
    assert ins.resyncs == 1
    assert (ins._version, ins.context()) == (2, {"n": 1, "lost": 1})


def test_a_rejected_write_raises_what_the_manager_said():
    seqr = Sequencer({"v": 1})
    sock = ScriptedSocket(seqr)
    ins = _instance(lambda req: None, sock, ctx={"v": 1})
    with pytest.raises(Conflict, match="/v"):
        ins.patch_context([{"op": "test", "path": "/v", "value": 2}])
    assert (ins._version, ins.context()) == (0, {"v": 1})
    assert ins._answers == {}


def test_an_unanswered_write_times_out_with_unavailable_and_a_late_answer_is_dropped():
    # Given a manager that never answers, and instance_write_timeout 0 (no sleeping in this test)
    sock = ScriptedSocket(lambda msg: [])
    ins = _instance(lambda req: None, sock, ctx={"n": 0}, write_timeout=0.0)
    # When a write is sent
    with pytest.raises(Unavailable, match="instance_write_timeout"):
        ins.patch_context(INCR)
    # Then a late answer still updates the replica (it is a sequenced write) but answers no one
    sock.deliver(Cmd.CTX_PATCH, {"session": "s1", "version": 1, "ops": INCR, "seq": 1})
    ins._pump(lambda: not sock.inbox, 0.0)
    assert ins._answers == {} and ins._version == 1


def test_the_write_timeout_is_the_instance_write_timeout_setting(monkeypatch):
    # Given ZMESH_INSTANCE_WRITE_TIMEOUT in the instance's environment, and a manager that
    # binds the instance and releases it at once
    from executor import instance
    monkeypatch.setenv("ZMESH_INSTANCE_WRITE_TIMEOUT", "0.25")
    monkeypatch.delenv("ZMESH_MANAGER_KEY", raising=False)
    sock = ScriptedSocket(lambda msg: [Sequencer(None).bind(), encode(Gone("done"))]
                          if msg.cmd is Cmd.INST_HELLO else [])
    monkeypatch.setattr(instance.transport, "dealer", lambda *a, **k: sock)
    ins = Instance()
    ins.entrypoint(lambda req: None)
    # When it serves
    ins._serve("tcp://manager", "i-1", "e-1")
    # Then its writes wait as long as the setting says, and it said hello and closed its socket
    assert ins._write_timeout == 0.25
    assert sock.sent_cmds() == [Cmd.INST_HELLO] and sock.closed
    assert "WRITE_TIMEOUT" not in vars(instance), "no hard-coded timeout beside the setting"


def test_gone_during_a_write_fails_it_at_once():
    sock = ScriptedSocket(lambda msg: [encode(Gone("unknown instance"))]
                          if msg.cmd is Cmd.CTX_WRITE else [])
    ins = _instance(lambda req: None, sock, ctx={"n": 0})
    with pytest.raises(Unavailable, match="released"):
        ins.patch_context(INCR)


def test_an_entrypoint_annotated_any_takes_any_request():
    # typing.Any is a class since Python 3.11, and isinstance(x, Any) raises: every task would fail
    ins = Instance()
    ins.entrypoint(lambda req: req)

    def typed(req: Any) -> Any:
        return req

    ins2 = Instance()
    ins2.entrypoint(typed)
    assert ins._run_one(pickle.dumps(1)) == ins2._run_one(pickle.dumps(1)) == (None, pickle.dumps(1, protocol=pickle.HIGHEST_PROTOCOL))


def test_the_main_loop_runs_tasks_writes_and_reports_until_released():
    # Given an instance whose entrypoint increments the context and returns what it read
    seqr = Sequencer({"n": 0})
    sock = ScriptedSocket(release_after(3, seqr))
    ins: Instance

    def incr(req: Any) -> Any:
        ins.patch_context(INCR)
        return req, ins.context()["n"]

    ins = _instance(incr, sock, ctx={"n": 0})
    # When two batches arrive (the manager releases it after three results)
    sock.deliver(*_tasks("s1", 0, "a", "b"))
    sock.deliver(*_tasks("s1", 2, "c"))
    ins._main()
    # Then every task ran once, in order, each seeing its own write, and every result was reported
    results = [(tid, err, pickle.loads(frame)) for m in sock.sent if m.cmd is Cmd.DONE
               for (tid, err), frame in zip(m.header.outcomes, m.payloads)]
    assert [r[2] for r in results] == [("a", 1), ("b", 2), ("c", 3)]
    assert all(err is None for _, err, _ in results)
    assert seqr.doc.value == {"n": 3} and ins.resyncs == 0


def test_a_task_sent_after_writes_the_replica_missed_waits_for_a_snapshot():
    # Given a replica at version 0 that lost the patch of version 1 (a client's write)
    seqr = Sequencer({"k": 0})
    seqr.doc.apply([{"op": "replace", "path": "/k", "value": 1}], None)
    sock = ScriptedSocket(release_after(1, seqr))
    ins = _instance(lambda req: ins.context(), sock, ctx={"k": 0})
    # When a task dispatched at version 1 arrives
    sock.deliver(*_tasks("s1", 1, "read"))
    ins._main()
    # Then the instance resynced before running it, and the task saw the write
    assert sock.sent_cmds() == [Cmd.RESYNC, Cmd.DONE]
    done = sock.sent[-1]
    assert pickle.loads(done.payloads[0]) == {"k": 1}


def test_a_bind_to_another_session_waits_behind_the_work_before_it():
    # Given an instance of s1 whose task writes, and, arriving while that write waits:
    # a BIND to s2 and an s2 task
    seqr = Sequencer("first")
    sock = ScriptedSocket(release_after(2, seqr))
    ins: Instance

    def task(req: Any) -> Any:
        if req == "x":
            sock.deliver(Cmd.BIND, {"session": "s2", "app": "t", "kind": DOC, "version": 4}, [pack("second")])
            sock.deliver(*_tasks("s2", 4, "y"))
            ins.update_context("first, changed")
        return ins.session_id(), ins.context()

    ins = _instance(task, sock, ctx="first")
    sock.deliver(*_tasks("s1", 0, "x"))
    # When it serves them
    ins._main()
    # Then the s1 task finished with s1's context (its own write included), and only then did s2 begin
    outs = [pickle.loads(f) for m in sock.sent if m.cmd is Cmd.DONE for f in m.payloads]
    assert outs == [("s1", "first, changed"), ("s2", "second")]


def test_binds_keep_their_order_when_the_instance_returns_to_its_session():
    # Given an instance of s1 whose running task sees the manager move it to s2 and back to s1
    sock = ScriptedSocket(release_after(2, Sequencer("s1 v0")))
    ins: Instance

    def task(req: Any) -> Any:
        if req == "x":
            sock.deliver(Cmd.BIND, {"session": "s2", "app": "t", "kind": DOC, "version": 0}, [pack("s2 v0")])
            sock.deliver(Cmd.BIND, {"session": "s1", "app": "t", "kind": DOC, "version": 3}, [pack("s1 v3")])
            sock.deliver(*_tasks("s1", 3, "y"))
            ins.update_context("s1 v1")
        return ins.session_id(), ins.context()

    ins = _instance(task, sock, ctx="s1 v0")
    sock.deliver(*_tasks("s1", 0, "x"))
    # When it serves
    ins._main()
    # Then it ends where the manager put it last: s1, at the snapshot of version 3
    outs = [pickle.loads(f) for m in sock.sent if m.cmd is Cmd.DONE for f in m.payloads]
    assert outs == [("s1", "s1 v1"), ("s1", "s1 v3")]
    assert (ins.session_id(), ins._version) == ("s1", 3)


@pytest.mark.parametrize("seed", range(5))
def test_a_lossy_link_never_leaves_a_replica_wrong(seed):
    """Patches lost at random between the writes this instance makes itself: it ends equal."""
    rnd = random.Random(seed)
    seqr = Sequencer({"n": 0, "log": []})
    sock = ScriptedSocket(seqr)
    ins = _instance(lambda req: None, sock, ctx={"n": 0, "log": []})
    for i in range(40):
        ops = [{"op": "add", "path": "/log/-", "value": i}]
        version = seqr.doc.apply(ops, None)
        if rnd.random() < 0.7:   # 30 % of the other writers' patches are lost
            sock.deliver(Cmd.CTX_PATCH, {"session": "s1", "version": version, "ops": ops, "seq": None})
        if rnd.random() < 0.2:
            ins.patch_context(INCR)
    sock.deliver(*_tasks("s1", seqr.doc.version, "check"))
    ins._pump(lambda: bool(ins._work), 0.0)
    ins._catch_up(seqr.doc.version)
    assert (ins._version, ins.context()) == (seqr.doc.version, seqr.doc.value)
    assert ins.resyncs > 0, "the scenario lost patches, so only a resync can have repaired it"


# -- the executor's cache proxy: a gap between its copy and an answer ---------------------------
class Replies:
    """Stands in for the proxy's ROUTER: records what it sends to instances."""

    def __init__(self) -> None:
        self.sent: List[tuple] = []

    def send_multipart(self, frames: List[Any], *args: Any, **kwargs: Any) -> None:
        msg = decode(frames[1:])
        self.sent.append((frames[0], msg.header._asdict(), [bytes(p) for p in msg.payloads]))


def _proxy():
    from executor.cache_proxy import CacheProxy
    asked: List[dict] = []
    replies = Replies()
    proxy = CacheProxy("/nonexistent", 1 << 20, lambda request, frames: asked.append(request._asdict()), sock=replies)
    return proxy, asked, replies


def _reply(rid: int, result: dict, data: Optional[bytes] = None) -> Message:
    return Message(Cmd.REPLY, Reply(rid, True, result, blob=data is not None), [] if data is None else [data])


def test_the_cache_proxy_refetches_whole_when_an_answer_does_not_follow_on():
    # Given a proxy holding version 1 of an object, and an instance asking for it
    objects = Objects()
    key = objects.put(DOC, pack({"n": 0}), None, None).key
    proxy, asked, replies = _proxy()
    proxy.cache.apply(key, *objects.get(key, 0))
    proxy._get(b"inst", 7, key, 1)
    assert asked[-1]["args"] == {"key": key, "have": 1}
    # When the manager's answer does not follow on from version 1 (its patches start at version 3)
    for _ in range(3):
        objects.patch(key, INCR)
    header, _ = objects.get(key, 2)
    assert proxy.on_reply(_reply(asked[-1]["rid"], header))
    # Then the proxy asks once for the whole object, and answers the instance only with that
    assert asked[-1]["args"] == {"key": key, "have": 0} and not replies.sent
    header, data = objects.get(key, 0)
    assert proxy.on_reply(_reply(asked[-1]["rid"], header, data))
    (identity, answer, payloads), = replies.sent
    assert identity == b"inst" and answer["rid"] == 7
    assert answer["result"]["mode"] == "full" and answer["result"]["version"] == 4
    assert Replica.from_wire(DOC, payloads[0]).value == {"n": 3}


def test_the_cache_proxy_forwards_patches_to_a_reader_at_its_own_version():
    objects = Objects()
    key = objects.put(DOC, pack({"n": 0}), None, None).key
    proxy, asked, replies = _proxy()
    proxy.cache.apply(key, *objects.get(key, 0))
    assert proxy.stats()["full"] == 1
    proxy._get(b"a", 1, key, 1)        # at the proxy's version: gets the patches
    proxy._get(b"b", 2, key, 0)        # holds nothing: gets the whole object
    assert len(asked) == 1, "one fetch per key"
    objects.patch(key, INCR)
    proxy.on_reply(_reply(asked[0]["rid"], objects.get(key, 1)[0]))
    modes = {ident: ans["result"]["mode"] for ident, ans, _ in replies.sent}
    assert modes == {b"a": "patches", b"b": "full"}
    assert proxy.stats()["patches"] == 1 and proxy.stats()["full"] == 1, "the object crossed the network once"


def test_the_cache_proxy_reports_a_malformed_answer_without_refetching():
    proxy, asked, replies = _proxy()
    proxy._get(b"inst", 3, "k", 0)
    proxy.on_reply(_reply(asked[-1]["rid"], {"key": "k", "version": 1, "kind": DOC, "mode": "full"}))  # no data
    (_, answer, _), = replies.sent
    assert answer["ok"] is False and answer["error"]["code"] == ProtocolError.code
    assert len(asked) == 1 and "k" not in proxy.cache.entries


def test_the_cache_proxy_asks_with_each_readers_token_and_loses_none_across_a_gap():
    # Given a proxy holding version 1, a reader with token A asking, then one with token B
    objects = Objects()
    key = objects.put(DOC, pack({"n": 0}), None, None).key
    proxy, asked, replies = _proxy()
    proxy.cache.apply(key, *objects.get(key, 0))
    proxy._get(b"a", 1, key, 1, "token-a")
    proxy._get(b"b", 2, key, 1, "token-b")
    assert [r["token"] for r in asked] == ["token-a"], "one fetch in flight, made with A's token"
    # When A's answer does not follow on (a gap), A's reader is put back and refetched whole ...
    for _ in range(3):
        objects.patch(key, INCR)
    proxy.on_reply(_reply(asked[-1]["rid"], objects.get(key, 2)[0]))
    assert [r["token"] for r in asked] == ["token-a", "token-a"] and not replies.sent
    header, data = objects.get(key, 0)
    proxy.on_reply(_reply(asked[-1]["rid"], header, data))
    # ... then B's reader asks with B's own token (the manager authorizes every reader)
    assert [r["token"] for r in asked] == ["token-a", "token-a", "token-b"]
    proxy.on_reply(_reply(asked[-1]["rid"], {"key": key, "version": 4, "kind": DOC, "mode": "same"}))
    # Then each reader got exactly one answer, version 4, and nothing is left waiting
    answers = {ident: ans["result"]["version"] for ident, ans, _ in replies.sent}
    assert answers == {b"a": 4, b"b": 4} and len(replies.sent) == 2
    assert not proxy._waiters and not proxy._fetching


def test_the_cache_proxy_gives_up_on_a_fetch_the_manager_never_answers():
    # Given a reader whose fetch was lost (a manager restart, a reconnect)
    proxy, asked, replies = _proxy()
    proxy.fetch_timeout = 0.0
    proxy._get(b"inst", 4, "k", 0)
    # When its time is up, the reader hears Unavailable and nothing is left waiting
    proxy.expire()
    (identity, answer, _), = replies.sent
    assert identity == b"inst" and answer["error"]["code"] == "unavailable"
    assert not proxy._waiters and not proxy._fetching
    # And the next reader of that key starts a fetch of its own
    proxy._get(b"inst", 5, "k", 0)
    assert len(asked) == 2
