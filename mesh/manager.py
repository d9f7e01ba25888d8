"""The session manager: one asyncio (uvloop) process, one ROUTER socket.

Clients, executors and service instances all connect with DEALER sockets.  The
hot path (SUBMIT -> TASKS -> DONE -> RESULT) moves payload frames untouched:
nothing is unpickled here.  Each wake-up drains every message already queued;
each instance is kept ``prefetch`` tasks ahead (credit), so instances never
wait for a round trip to the manager.  Placement decisions come from
:mod:`mesh.scheduler`; control calls are handled by :mod:`mesh.control`;
persistence is group-committed by :mod:`mesh.store` on its own thread.
"""
from __future__ import annotations

import asyncio
import itertools
import hmac
import json
import secrets
import logging
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, cast

import zmq

import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from . import auth, keys, scheduler, sdnotify, transport
from .config import Settings
from .context import Document
from .errors import (Conflict, FailedPrecondition, InvalidArgument, MeshError, NotFound, PermissionDenied,
                     ProtocolError, ResourceExhausted, TaskFailed, Unauthenticated)
from .log import event
from .protocol import Cmd, Message, decode, encode, pack
from .resources import Resources
from .spec import AppSpec
from .state import (ALIVE, CANCELLED, DRAINING, FAILED, LOST, OPEN, PENDING, RUNNING, SUCCEEDED, App, Executor,
                    Instance, Session, Task)
from .metrics import Histogram, render
from .objects import Objects, StoredObject
from .store import OBJECT_PREFIX, Batch, Store, Writer

log = logging.getLogger("zeromesh.manager")

DRAIN_BATCH = 4096  # messages handled per wake-up before timers get a turn
EXECUTOR_TRAFFIC = frozenset({Cmd.HEARTBEAT, Cmd.EXITED, Cmd.DRAIN, Cmd.REQUEST})  # what executors send


class Manager:
    def __init__(self, bind: str, db: str, settings: Optional[Settings] = None, curve_secret: Optional[str] = None,
                 insecure: bool = False) -> None:
        if bool(curve_secret) == bool(insecure):
            raise InvalidArgument("start the manager with --curve-secret FILE (encrypted and authenticated; "
                                  "see docs/security.md) or with --insecure (plain TCP, every peer is admin)")
        self.curve = keys.load_secret(curve_secret) if curve_secret else None
        self.settings = settings or Settings.load()
        self.bind_addr = bind
        self.store = Store(db)
        self.writer = Writer(self.store)
        self.apps: Dict[str, App] = {}
        self.sessions: Dict[str, Session] = {}
        self.executors: Dict[str, Executor] = {}
        self.instances: Dict[str, Instance] = {}
        self.peers: Dict[bytes, Any] = {}          # identity -> Executor | Instance
        self.tasks: Dict[int, Task] = {}
        self.by_tag: Dict[Tuple[str, int], int] = {}   # (client id, tag) -> task id, for resends
        self.boot = secrets.token_hex(8)                 # changes at every start: clients resend when it does
        self.objects = Objects()
        self.latency = Histogram()                      # seconds from submit to answer
        self.batch = Batch()
        self.stats: Dict[str, int] = {"messages_in": 0, "bytes_in": 0, "protocol_errors": 0,
                                      "tasks_submitted": 0, "tasks_finished": 0, "tasks_retried": 0,
                                      "late_answers_dropped": 0, "send_failures": 0, "auth_denied": 0, "requests": 0, "store_pauses": 0,
                                      "bytes_out": 0}
        self._iids = itertools.count(1)
        self.waiting: Set[str] = set()             # sessions with tasks no instance has credit for
        self.start_failures: Dict[str, int] = {}   # app -> instances that died before hello, in a row
        self._plan_pending = False
        self._closing = False
        self._frames: Optional[List[Any]] = None
        self._admitting: Set[bytes] = set()         # executors whose key is being checked
        self._paused = False                        # not reading: the store is behind
        self.endpoint = ""
        self.on_reload: Optional[Callable[[], None]] = None   # SIGHUP (systemctl reload)
        self._load()
        self.tokens = auth.Tokens(auth.load_tokens(self.store) if self.curve is not None else {})
        from .control import Control  # control handlers need the manager's state; imported late to stay one-way
        self.control = Control(self)

    # -- start-up ------------------------------------------------------------
    def _load(self) -> None:
        """Reload registry, open sessions, contexts and unfinished tasks from SQLite."""
        for name, spec, created in self.store.load_apps():
            self.apps[name] = App(AppSpec.from_dict(spec), created)
        for rec in self.store.load_sessions():
            if rec["state"] != OPEN:
                continue
            doc = Document()
            saved = self.store.load_context(rec["id"])
            if saved is not None:
                kind, version, data, patches = saved
                doc = Document.from_wire(kind, data, version)
                doc.replay(patches)
            self.sessions[rec["id"]] = Session(rec["id"], rec["app"], Resources.parse(rec["resreq"]),
                                               rec["created_at"], doc, owner=rec["owner"])
        for key, sid, expires_at in self.store.load_objects():
            saved = self.store.load_context(OBJECT_PREFIX + key)
            if saved is not None:
                kind, version, data, patches = saved
                doc = Document.from_wire(kind, data, version)
                doc.replay(patches)
                self.objects.load(key, doc, sid, expires_at)
        self._next_tid = itertools.count(self.store.max_task_id() + 1)
        lost = []
        for tid, sid, attempts, payload, cid, tag in self.store.load_unfinished_tasks():
            s = self.sessions.get(sid)
            if s is None or payload is None:   # a request too large to keep: its client resends it
                lost.append(tid)
                continue
            t = Task(tid, sid, b"", tag, payload, attempts, cid)  # the client re-attaches when it resends
            self.tasks[tid] = t
            self.by_tag[(cid, tag)] = tid
            s.pending.append(tid)
        if lost:
            self.store.mark_lost(lost)   # their clients resend them (docs/reliability.md)

    # -- socket plumbing -----------------------------------------------------
    def _open_socket(self) -> None:
        if self.curve is not None:
            # ZAP: any CURVE key may connect (clients use fresh keys and prove who they are with
            # credentials); the key becomes the frames' User-Id, which executors are checked by.
            self.auth = ThreadAuthenticator(zmq.Context.instance(), log=logging.getLogger("zeromesh.zap"))
            self.auth.start()
            self.auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        else:
            event(log, logging.WARNING, "INSECURE: plain TCP, no authentication, every peer acts as admin; "
                  "use --curve-secret on a network you do not own")
        self.sock = transport.router(self.bind_addr, self.settings.max_message_size, self.settings.send_hwm,
                                     curve=self.curve)
        self.endpoint = cast(bytes, self.sock.getsockopt(zmq.LAST_ENDPOINT)).decode()

    def principal(self, token: Optional[str], method: str) -> auth.Principal:
        """Who sent the message being handled, and whether they may call ``method`` (raises if not)."""
        if self.curve is None:
            return auth.INSECURE
        if auth.required_role(method) == "public":
            return auth.INSECURE if method == "ping" else auth.Principal("anonymous", "viewer", "anonymous")
        who = self.tokens.principal(token)
        auth.authorize(who, method)
        return who

    def denied(self, identity: bytes, method: str, exc: MeshError) -> None:
        self.stats["auth_denied"] += 1
        event(log, logging.WARNING, "denied", method=method, code=exc.code, reason=str(exc),
              peer=identity.hex()[:16], key=self.peer_key())

    def peer_key(self) -> Optional[str]:
        """The CURVE public key (z85) of the peer whose message is being handled, when secured."""
        frame = self._frames[1] if self._frames else None
        return str(frame.get("User-Id")) if isinstance(frame, zmq.Frame) else None

    def send(self, identity: bytes, cmd: Cmd, header: Any, payloads: Sequence[Any] = ()) -> bool:
        try:
            transport.send(self.sock, [identity, *encode(cmd, header, payloads)])
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH (peer gone) or EAGAIN
            self.stats["send_failures"] += 1
            event(log, logging.DEBUG, "send failed", cmd=cmd.name, error=exc.strerror)
            return False

    def wake(self) -> None:
        """Re-check the socket after sending outside the reader (the FD is edge-triggered)."""
        self.loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        if self._paused:
            return
        sock = self.sock
        recv = transport.recv
        for _ in range(DRAIN_BATCH):
            try:
                # identity + 3 header frames as bytes, payloads zero-copy; when secured, the
                # signature frame stays a Frame too, for its User-Id (the peer's CURVE key)
                frames = recv(sock, 1 if self.curve is not None else 4)
            except zmq.ZMQError:
                return
            if frames is None:
                return
            self.stats["messages_in"] += 1
            self.stats["bytes_in"] += sum(len(f) for f in frames)
            identity = frames[0]
            self._frames = frames
            try:
                msg = decode(frames[1:])
            except ProtocolError as exc:
                self._protocol_error(identity, exc)
                continue
            try:
                self._handle(identity, msg)
            except ProtocolError as exc:
                self._protocol_error(identity, exc)
            except Exception:  # a bug must not kill the mesh for everyone else
                log.exception("handler failed for %s", msg.cmd.name)
        self.loop.call_soon(self._on_readable)  # more queued: give timers a turn first

    def _protocol_error(self, identity: bytes, exc: ProtocolError) -> None:
        self.stats["protocol_errors"] += 1
        if self.stats["protocol_errors"] <= 10 or self.stats["protocol_errors"] % 1000 == 0:
            event(log, logging.WARNING, "protocol error", peer=identity.hex()[:16], error=str(exc),
                  total=self.stats["protocol_errors"])
        self.send(identity, Cmd.REPLY, {"rid": -1, "ok": False, "error": exc.to_wire()})

    def _handle(self, identity: bytes, msg: Message) -> None:
        cmd = msg.cmd
        if cmd in EXECUTOR_TRAFFIC:
            peer = self.peers.get(identity)
            if peer.__class__ is Executor:
                peer.last_seen = time.time()   # any traffic from an executor counts as a heartbeat
        if cmd is Cmd.SUBMIT:
            self._on_submit(identity, msg)
        elif cmd is Cmd.DONE:
            self._on_done(identity, msg)
        elif cmd is Cmd.REQUEST:
            self.control.handle(identity, msg)
        elif cmd is Cmd.CTX_WRITE:
            self._on_ctx_write(identity, msg)
        elif cmd is Cmd.HEARTBEAT:
            self._on_heartbeat(identity, msg)
        elif cmd is Cmd.EXEC_HELLO:
            self._on_exec_hello(identity, msg)
        elif cmd is Cmd.INST_HELLO:
            self._on_inst_hello(identity, msg)
        elif cmd is Cmd.EXITED:
            self._on_exited(identity, msg)
        elif cmd is Cmd.RESYNC:
            self._on_resync(identity, msg)
        elif cmd is Cmd.DRAIN:
            ex = self.peers.get(identity)
            if isinstance(ex, Executor):
                self.drain_executor(ex)
        else:
            raise ProtocolError(f"{cmd.name} is not a command peers send to the manager")

    # -- tasks: the hot path -------------------------------------------------
    def _on_submit(self, identity: bytes, msg: Message) -> None:
        sid, tags, cid, resend = msg.header[:4]
        s = self.sessions.get(sid)
        if self.curve is not None and s is not None:
            try:
                who = self.principal(msg.header[4] if len(msg.header) > 4 else None, "submit")
                if not who.may_touch(s.owner):
                    raise PermissionDenied(f"session {sid!r} belongs to {s.owner!r}", session=sid)
            except (Unauthenticated, PermissionDenied) as exc:
                self.denied(identity, "submit", exc)
                err = exc.to_wire()
                self.send(identity, Cmd.RESULT, [sid, [[tag, err] for tag in tags]], [b""] * len(tags))
                return
        if s is None or s.state != OPEN:
            err = (NotFound(f"session {sid!r} does not exist", session=sid) if s is None
                   else FailedPrecondition(f"session {sid!r} is closed", session=sid)).to_wire()
            self.send(identity, Cmd.RESULT, [sid, [[tag, err] for tag in tags]], [b""] * len(tags))
            return
        if resend:
            asyncio.ensure_future(self._on_resend(identity, s, tags, cid, msg.payloads))
            return
        self._enqueue(identity, s, tags, cid, msg.payloads)

    def _enqueue(self, identity: bytes, s: Session, tags: Sequence[int], cid: str, payloads: Sequence[Any]) -> None:
        room = self.settings.max_pending - len(s.pending)
        if room < len(tags):
            refused = list(tags[max(room, 0):])
            err = ResourceExhausted(
                f"session {s.id!r} has {len(s.pending)} tasks queued; max_pending is {self.settings.max_pending}",
                limit="max_pending", session=s.id).to_wire()
            self.send(identity, Cmd.RESULT, [s.id, [[tag, err] for tag in refused]], [b""] * len(refused))
            tags, payloads = tags[:max(room, 0)], payloads[:max(room, 0)]
        now = time.time()
        add = self.batch.add_task
        keep_max = self.settings.persist_input_max
        sid = s.id
        for tag, payload in zip(tags, payloads):
            tid = next(self._next_tid)
            t = Task(tid, sid, identity, tag, payload, 0, cid)
            t.created_at = now
            self.tasks[tid] = t
            self.by_tag[(cid, tag)] = tid
            s.pending.append(tid)
            s.bytes_in += len(payload)
            add(tid, sid, now, payload if len(payload) <= keep_max else None, cid, tag)
        self.stats["tasks_submitted"] += len(tags)
        self._dispatch(s)

    async def _on_resend(self, identity: bytes, s: Session, tags: List[int], cid: str, payloads: List[Any]) -> None:
        """A client that lost its connection resends what it has no answer for: each task runs or
        answers once from the client's view (docs/reliability.md)."""
        fresh_tags, fresh_payloads, lookup = [], [], []
        for tag, payload in zip(tags, payloads):
            tid = self.by_tag.get((cid, tag))
            t = self.tasks.get(tid) if tid is not None else None
            if t is not None:
                t.client = identity          # still queued or running: answer the new connection
            else:
                lookup.append((tag, payload))
        if lookup:
            self._flush()
            known = await self.writer.call(self.store.find_by_tags, cid, [tag for tag, _ in lookup])
            items, frames = [], []
            for tag, payload in lookup:
                state, output, error = known.get(tag, (None, None, None))
                if state == SUCCEEDED and output is not None:
                    items.append([tag, None])
                    frames.append(output)
                elif state in (FAILED, CANCELLED) and error:
                    items.append([tag, json.loads(error)])
                    frames.append(b"")
                else:                           # unknown, or its answer died with the old manager
                    fresh_tags.append(tag)
                    fresh_payloads.append(payload)
            if items:
                self.send(identity, Cmd.RESULT, [s.id, items], frames)
        if fresh_tags and s.state == OPEN:
            self._enqueue(identity, s, fresh_tags, cid, fresh_payloads)
        self.stats["tasks_resent"] = self.stats.get("tasks_resent", 0) + len(tags)
        self.wake()

    def _dispatch(self, s: Session) -> None:
        """Give each ready instance of ``s`` as many pending tasks as it has credit for."""
        pending = s.pending
        if not pending:
            return
        tasks = self.tasks
        instances = s.instances
        n = len(instances)
        s.rr += 1
        target = self.settings.queue_target
        now = time.time()
        for k in range(n):
            inst = instances[(s.rr + k) % n]
            if inst.identity is None or inst.draining:
                continue
            credit = inst.credit_limit(target) - len(inst.inflight)
            if credit <= 0:
                continue
            items: List[List[int]] = []
            frames: List[Any] = []
            while credit > 0 and pending:
                t = tasks.get(pending.popleft())
                if t is None or t.state != PENDING:
                    continue
                t.state = RUNNING
                t.attempt += 1          # counted before the run: at-least-once, see docs/reliability.md
                t.instance = inst.id
                items.append([t.id, t.attempt])
                frames.append(t.payload)
                credit -= 1
            if items:
                if not inst.inflight:
                    inst.busy_since = now
                inst.inflight.update(i[0] for i in items)
                s.running += len(items)
                self.send(inst.identity, Cmd.TASKS, [s.id, s.context.version, items], frames)
            if not pending:
                break
        if pending:
            if s.id not in self.waiting:
                self.waiting.add(s.id)
                self.plan_soon()   # more work than credit: maybe more instances
        else:
            self.waiting.discard(s.id)

    def _on_done(self, identity: bytes, msg: Message) -> None:
        inst = self.peers.get(identity)
        if not isinstance(inst, Instance):
            self.send(identity, Cmd.GONE, {"reason": "unknown instance"})
            return
        now = time.time()
        out: Dict[Tuple[bytes, str], Tuple[List[Any], List[Any], List[int]]] = {}
        finish = self.batch.finish_task
        for (tid, err), payload in zip(msg.header, msg.payloads):
            t = self.tasks.get(tid)
            if t is None or t.instance != inst.id or t.state != RUNNING:
                continue  # a late answer for a task reassigned elsewhere: dropped
            inst.inflight.discard(tid)
            del self.tasks[tid]
            self.by_tag.pop((t.cid, t.tag), None)
            s = self.sessions.get(t.sid)
            state = SUCCEEDED if err is None else FAILED
            t.state = state
            if s is not None:
                s.running -= 1
                s.counts[state] += 1
            finish(tid, state, t.attempt, now, None if err is None else _json(err))
            self.latency.observe(now - t.created_at)
            items, frames, tids = out.setdefault((t.client, t.sid), ([], [], []))
            items.append([t.tag, err])
            frames.append(payload if err is None else b"")
            tids.append(tid)
        accepted = sum(len(items) for items, _, _ in out.values())
        self.stats["tasks_finished"] += accepted
        self.stats["late_answers_dropped"] += len(msg.header) - accepted
        inst.observe(now, len(msg.header))
        for (client, sid), (items, frames, tids) in out.items():
            self.stats["bytes_out"] += sum(len(f) for f in frames)
            if not (client and self.send(client, Cmd.RESULT, [sid, items], frames)):
                for tid, (_, err), payload in zip(tids, items, frames):
                    if err is None:
                        self.batch.keep_output(tid, payload, now)
        s = inst.session
        if s is not None and s.pending and not inst.draining:
            self._dispatch(s)
        if not inst.inflight:
            inst.idle_since = now
            ex = self.executors.get(inst.executor)
            if ex is not None and ex.state == DRAINING:
                self.stop_instance(inst)
            elif self.waiting or inst.draining or s is None or s.state != OPEN:
                self.plan_soon()   # an idle instance may serve a session that waits

    def fail_tasks(self, tasks: List[Task], error: MeshError, state: str = FAILED) -> None:
        """Finish tasks without a result (cancelled, or out of retries): one RESULT per client."""
        now = time.time()
        err = error.to_wire()
        text = _json(err)
        out: Dict[Tuple[bytes, str], List[List[Any]]] = {}
        for t in tasks:
            self.tasks.pop(t.id, None)
            self.by_tag.pop((t.cid, t.tag), None)
            t.state = state
            s = self.sessions.get(t.sid)
            if s is not None:
                s.counts[state] += 1
            self.batch.finish_task(t.id, state, t.attempt, now, text)
            if t.client:
                out.setdefault((t.client, t.sid), []).append([t.tag, err])
        for (client, sid), items in out.items():
            self.send(client, Cmd.RESULT, [sid, items], [b""] * len(items))

    def _requeue(self, inst: Instance, reason: str) -> None:
        """The instance is gone: its tasks run again elsewhere, within the app's retry budget."""
        s = inst.session
        app = self.apps.get(inst.app)
        max_retries = app.spec.max_retries if app else 0
        for tid in sorted(inst.inflight):
            t = self.tasks.get(tid)
            if t is None:
                continue
            if s is not None:
                s.running -= 1
            if t.attempt > max_retries:
                self.fail_tasks([t], TaskFailed(
                    f"task {tid} failed: {t.attempt} attempts died (max_retries={max_retries}); "
                    f"last on executor {inst.executor}: {reason}",
                    type="InstanceLost", attempts=t.attempt, executor=inst.executor, reason=reason))
            elif s is not None and s.state == OPEN:
                t.state = PENDING
                t.instance = None
                s.pending.appendleft(tid)
                self.stats["tasks_retried"] += 1
        inst.inflight.clear()

    # -- context writes --------------------------------------------------------
    def apply_context_write(self, s: Session, ops: Optional[List[Any]], blob: Optional[bytes],
                            writer: Optional[Instance] = None, seq: Optional[int] = None) -> int:
        """Sequence one write: apply, log, broadcast to every replica in version order.

        Counts the write's bytes in ``s.bytes_in`` and failed ``test`` ops in ``s.conflicts``.
        """
        packed = pack(ops) if ops is not None else None
        s.bytes_in += len(packed) if packed is not None else len(blob or b"")
        try:
            version = s.context.apply(ops, blob, self.settings.max_context_size, len(packed or b""))
        except MeshError as exc:
            if exc.code == Conflict.code:
                s.conflicts += 1
            raise
        self.batch.patches.append((s.id, version, packed, blob))
        s.patches_since_snapshot += 1
        if s.patches_since_snapshot >= self.settings.snapshot_every:
            self.snapshot(s)
        payloads = [] if ops is not None else [blob]
        for inst in s.instances:
            if inst.identity is not None:
                mine = inst is writer
                self.send(inst.identity, Cmd.CTX_PATCH,
                          {"sid": s.id, "version": version, "ops": ops, "seq": seq if mine else None}, payloads)
        return version

    def snapshot(self, s: Session) -> None:
        s.patches_since_snapshot = 0
        self.batch.snapshots.append((s.id, s.context.version, s.context.kind, s.context.encoded()))

    def _on_ctx_write(self, identity: bytes, msg: Message) -> None:
        inst = self.peers.get(identity)
        h = msg.header
        s = self.sessions.get(h["sid"])
        if not isinstance(inst, Instance) or s is None or inst.session is not s:
            err = FailedPrecondition(f"instance is not bound to session {h['sid']!r}")
            self.send(identity, Cmd.CTX_REJECT, {"sid": h["sid"], "seq": h["seq"], "error": err.to_wire()})
            return
        try:
            blob = bytes(msg.payloads[0]) if msg.payloads else None
            self.apply_context_write(s, h["ops"], blob, writer=inst, seq=h["seq"])
        except MeshError as exc:
            self.send(identity, Cmd.CTX_REJECT, {"sid": s.id, "seq": h["seq"], "error": exc.to_wire()})

    def _on_resync(self, identity: bytes, msg: Message) -> None:
        """A replica saw a version gap: send it a fresh snapshot (the Clone pattern's repair)."""
        inst = self.peers.get(identity)
        if not isinstance(inst, Instance):
            self.send(identity, Cmd.GONE, {"reason": "unknown instance"})
            return
        s = inst.session
        self.stats["resyncs"] = self.stats.get("resyncs", 0) + 1
        event(log, logging.INFO, "replica resync", instance=inst.id, session=msg.header["sid"],
              have=msg.header["have"], version=s.context.version if s else None)
        self._bind(inst, s, keep_draining=True)

    # -- objects -------------------------------------------------------------------
    def persist_object(self, obj: StoredObject, ops: Optional[List[Any]] = None) -> None:
        """Log a patch, or snapshot the object (new, replaced, or every ``snapshot_every`` patches)."""
        doc = obj.doc
        if ops is not None and doc.version % self.settings.snapshot_every:
            self.batch.patches.append((OBJECT_PREFIX + obj.key, doc.version, pack(ops), None))
        else:
            self.batch.objects.append(obj.row())
            self.batch.snapshots.append((OBJECT_PREFIX + obj.key, doc.version, doc.kind, doc.encoded()))

    def delete_objects(self, keys: List[str]) -> None:
        for key in keys:
            self.objects.items.pop(key, None)
            self.batch.deleted_objects.append(key)

    # -- executors and instances ------------------------------------------------
    def _welcome(self, identity: bytes) -> None:
        self.send(identity, Cmd.WELCOME, {"heartbeat_ms": int(self.settings.heartbeat_interval * 1000),
                                          "liveness": self.settings.liveness})

    def _on_exec_hello(self, identity: bytes, msg: Message) -> None:
        if self.curve is not None:
            self._admitting.add(identity)
            asyncio.ensure_future(self._admit_executor(identity, msg, self.peer_key() or ""))
        else:
            self._join_executor(identity, msg)

    async def _admit_executor(self, identity: bytes, msg: Message, key: str) -> None:
        """Secured mesh: an executor joins only with a public key on the allow-list."""
        try:
            allowed = await self.writer.call(self.store.executor_key_allowed, key)
        finally:
            self._admitting.discard(identity)
        if allowed:
            self._join_executor(identity, msg)
        else:
            self.stats["auth_denied"] += 1
            event(log, logging.WARNING, "executor refused: key not on the allow-list", executor=msg.header["id"],
                  key=key)
            self.send(identity, Cmd.GONE, {"fatal": True, "reason": f"executor key {key} is not allowed; on the "
                                           "manager run: zmesh executor-keys add PUBLIC_KEY_FILE"})
        self.wake()

    def _join_executor(self, identity: bytes, msg: Message) -> None:
        eid, caps = msg.header["id"], msg.header["caps"]
        old = self.executors.get(eid)
        if old is not None:
            self._lose_executor(old, "executor reconnected")
        try:
            slots = int(caps.get("slots", 1))
            capacity = Resources(float(caps.get("cpu", 0)), int(caps.get("memory", 0)), int(caps.get("gpu", 0)))
            labels = {str(k): str(v) for k, v in dict(caps.get("labels") or {}).items()}
        except (TypeError, ValueError):
            raise ProtocolError("EXEC_HELLO: capabilities are malformed") from None
        now = time.time()
        ex = Executor(eid, identity, caps, slots, capacity, labels, now, now)
        self.executors[eid] = ex
        self.peers[identity] = ex
        event(log, logging.INFO, "executor joined", executor=eid, slots=slots, host=caps.get("hostname"))
        self._welcome(identity)
        self.plan_soon()

    def _on_heartbeat(self, identity: bytes, msg: Message) -> None:
        peer = self.peers.get(identity)
        if isinstance(peer, Executor):
            peer.last_seen = time.time()
            if "labels" in msg.header and isinstance(msg.header["labels"], dict):
                peer.labels = {str(k): str(v) for k, v in msg.header["labels"].items()}
            if isinstance(msg.header.get("cache"), dict):
                peer.cache = msg.header["cache"]
        elif peer is None and identity not in self._admitting:
            self.send(identity, Cmd.GONE, {"reason": "unknown peer; introduce yourself again"})

    def _on_inst_hello(self, identity: bytes, msg: Message) -> None:
        inst = self.instances.get(msg.header["iid"])
        if inst is None or inst.stopping or inst.executor != msg.header["eid"] \
                or not hmac.compare_digest(inst.token, str(msg.header.get("token", ""))):
            self.stats["auth_denied"] += 1
            self.send(identity, Cmd.GONE, {"reason": f"instance {msg.header['iid']} is not expected", "fatal": True})
            return
        inst.identity = identity
        inst.pid = msg.header["pid"]
        self.start_failures.pop(inst.app, None)
        inst.idle_since = time.time()
        self.peers[identity] = inst
        self._welcome(identity)
        self._bind(inst, inst.session)
        if inst.session is not None:
            self._dispatch(inst.session)
        self.plan_soon()

    def _bind(self, inst: Instance, s: Optional[Session], keep_draining: bool = False) -> None:
        """Point an instance at a session (or none) and send it that session's context."""
        old = inst.session
        if old is not None and old is not s and inst in old.instances:
            old.instances.remove(inst)
        inst.session = s
        inst.draining = inst.draining and keep_draining
        if s is not None and inst not in s.instances:
            s.instances.append(inst)
        if inst.identity is None:
            return  # it gets BIND when it says hello
        if s is None:
            self.send(inst.identity, Cmd.BIND, {"sid": None, "app": inst.app, "kind": "doc", "version": 0}, [pack(None)])
        else:
            self.send(inst.identity, Cmd.BIND, {"sid": s.id, "app": inst.app, "kind": s.context.kind,
                                                "version": s.context.version}, [s.context.encoded()])

    def _on_exited(self, identity: bytes, msg: Message) -> None:
        ex = self.peers.get(identity)
        if not isinstance(ex, Executor):
            return
        inst = self.instances.get(msg.header["iid"])
        if inst is None or inst.executor != ex.id:
            return
        reason = msg.header["reason"] or f"instance exited with code {msg.header['code']}"
        if not inst.stopping:
            event(log, logging.WARNING, "instance died", instance=inst.id, executor=ex.id, reason=reason)
        self._remove_instance(inst, reason)
        code = msg.header["code"]
        if not inst.ready and not inst.stopping and (code > 0 or code == -1):
            self._start_failed(inst.app, reason)  # it failed by itself (not killed by a signal) before hello
        self.plan_soon()

    def _start_failed(self, app: str, reason: str) -> None:
        """An app whose instances keep dying before hello fails its queued tasks instead of looping."""
        n = self.start_failures[app] = self.start_failures.get(app, 0) + 1
        if n < self.settings.start_failures:
            return
        self.start_failures[app] = 0
        err = TaskFailed(f"application {app!r} failed to start {n} times in a row; last: {reason}",
                         type="StartFailed", application=app, reason=reason)
        for s in self.sessions.values():
            if s.app == app and s.state == OPEN and s.pending:
                doomed = [self.tasks[tid] for tid in s.pending if tid in self.tasks]
                s.pending.clear()
                self.waiting.discard(s.id)
                self.fail_tasks(doomed, err)

    def _remove_instance(self, inst: Instance, reason: str) -> None:
        self._requeue(inst, reason)
        self.tokens.drop(inst.token)
        self.instances.pop(inst.id, None)
        if inst.identity is not None:
            self.peers.pop(inst.identity, None)
        if inst.session is not None and inst in inst.session.instances:
            inst.session.instances.remove(inst)
        ex = self.executors.get(inst.executor)
        if ex is not None and inst.id in ex.instances:
            ex.instances.discard(inst.id)
            ex.used_slots -= 1
            ex.allocated = ex.allocated - inst.resreq
        if inst.session is not None:
            self._dispatch(inst.session)

    def drain_executor(self, ex: Executor) -> None:
        """No new instances or tasks on ``ex``; each of its instances stops once its tasks are done."""
        if ex.state == DRAINING:
            return
        ex.state = DRAINING
        event(log, logging.INFO, "executor draining", executor=ex.id, instances=len(ex.instances))
        for iid in list(ex.instances):
            inst = self.instances.get(iid)
            if inst is None or inst.stopping:
                continue
            inst.draining = True
            if not inst.inflight:
                self.stop_instance(inst)
        self.plan_soon()

    def _lose_executor(self, ex: Executor, reason: str) -> None:
        event(log, logging.WARNING, "executor lost", executor=ex.id, reason=reason)
        ex.state = LOST
        for iid in list(ex.instances):
            inst = self.instances.get(iid)
            if inst is not None:
                if inst.identity is not None:
                    self.send(inst.identity, Cmd.GONE, {"reason": f"executor {ex.id} lost: {reason}"})
                self._remove_instance(inst, f"executor {ex.id} lost: {reason}")
        self.executors.pop(ex.id, None)
        self.peers.pop(ex.identity, None)
        self.plan_soon()

    # -- placement ----------------------------------------------------------------
    def plan_soon(self) -> None:
        if not self._plan_pending:
            self._plan_pending = True
            self.loop.call_soon(self._plan)

    def _plan(self) -> None:
        self._plan_pending = False
        now = time.time()
        sessions = []
        for s in self.sessions.values():
            if s.state != OPEN:
                continue
            app = self.apps.get(s.app)
            if app is None:
                continue
            sessions.append(scheduler.SessionView(
                s.id, s.app, len(s.pending) + s.running, s.resreq, dict(app.spec.labels),
                app.spec.max_instances, s.created_at))
        executors = [scheduler.ExecutorView(e.id, e.slots, e.used_slots, e.capacity, e.allocated, e.labels,
                                            e.state != ALIVE) for e in self.executors.values()]
        instances = [scheduler.InstanceView(
            i.id, i.executor, i.app,
            i.session.id if i.session is not None and i.session.state == OPEN else None,
            i.resreq, i.ready, bool(i.inflight), i.draining, i.stopping, i.idle_since)
            for i in self.instances.values()]
        for action in scheduler.plan(sessions, executors, instances, now, self.settings.idle_timeout,
                                     self.settings.bind_grace):
            self._carry_out(action, now)

    def _carry_out(self, action: scheduler.Action, now: float) -> None:
        if isinstance(action, scheduler.Launch):
            s, ex = self.sessions[action.session], self.executors[action.executor]
            app = self.apps[s.app]
            iid = f"{ex.id}.{next(self._iids)}"
            inst = Instance(iid, ex.id, s.app, s.resreq, app.spec.prefetch or self.settings.prefetch,
                            launched_at=now, idle_since=now)
            self.instances[iid] = inst
            ex.instances.add(iid)
            ex.used_slots += 1
            ex.allocated = ex.allocated + s.resreq
            self._bind(inst, s)
            self.tokens.add(inst.token, auth.Principal(iid, "instance", "instance"), float("inf"))
            event(log, logging.INFO, "launch instance", instance=iid, session=s.id, executor=ex.id)
            self.send(ex.identity, Cmd.LAUNCH, {"iid": iid, "app": app.spec.to_dict(), "token": inst.token})
        elif isinstance(action, scheduler.Rebind):
            inst = self.instances[action.instance]
            target = self.sessions.get(action.session) if action.session else None
            self._bind(inst, target)
            if target is not None:
                self._dispatch(target)
        elif isinstance(action, scheduler.Stop):
            inst = self.instances[action.instance]
            self.stop_instance(inst)
        elif isinstance(action, scheduler.Drain):
            self.instances[action.instance].draining = True

    def stop_instance(self, inst: Instance) -> None:
        inst.stopping = True
        if inst.session is not None and inst in inst.session.instances:
            inst.session.instances.remove(inst)
        ex = self.executors.get(inst.executor)
        if ex is not None:
            self.send(ex.identity, Cmd.STOP, {"iid": inst.id})

    # -- timers ---------------------------------------------------------------------
    def _tick(self) -> None:
        """Heartbeats out, dead peers evicted, slow starters given up on, placement re-run."""
        now = time.time()
        dead_after = self.settings.dead_after
        for ex in list(self.executors.values()):
            if now - ex.last_seen > dead_after:
                self._lose_executor(ex, f"no heartbeat for {now - ex.last_seen:.1f}s")
            else:
                self.send(ex.identity, Cmd.HEARTBEAT, {})
        for inst in list(self.instances.values()):
            if not inst.ready and not inst.stopping and now - inst.launched_at > self.settings.instance_start_timeout:
                event(log, logging.WARNING, "instance did not start in time", instance=inst.id)
                self.stop_instance(inst)
        expired = self.objects.expired(now)
        if expired:
            self.delete_objects(expired)
        self._plan()
        self.wake()
        self.loop.call_later(min(self.settings.heartbeat_interval, 0.5), self._tick)

    def _flush(self) -> None:
        """Hand the changes collected so far to the writer thread (one group commit).

        When the disk falls ``max_store_backlog`` commits behind, the manager stops reading
        its socket until it catches up: it takes work no faster than it can record it, and
        its memory stays bounded (peers' messages wait in their own queues meanwhile).
        """
        if self.batch:
            batch, self.batch = self.batch, Batch()
            done = self.writer.submit(self.store.write, batch)
            if self.writer.backlog() >= self.settings.max_store_backlog and not self._paused:
                self._paused = True
                self.stats["store_pauses"] += 1
                self.loop.remove_reader(self._fd)   # or the loop would spin on a readable socket
                done.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self._resume))

    def _resume(self) -> None:
        if self.writer.backlog() >= self.settings.max_store_backlog // 2:
            self.writer.submit(lambda: None).add_done_callback(
                lambda _: self.loop.call_soon_threadsafe(self._resume))
            return
        self._paused = False
        self.loop.add_reader(self._fd, self._on_readable)
        self._on_readable()

    def _flush_timer(self) -> None:
        self._flush()
        if not self._closing:
            self.loop.call_later(self.settings.flush_interval, self._flush_timer)

    # -- lifecycle --------------------------------------------------------------------
    async def serve(self, ready_file: Optional[str] = None, metrics_port: Optional[int] = None) -> None:
        self.loop = asyncio.get_running_loop()
        self._open_socket()
        if metrics_port is not None:
            host = self.settings.metrics_host
            self._metrics_server = await asyncio.start_server(self._serve_metrics, host, metrics_port)
            event(log, logging.INFO, "metrics over HTTP", url=f"http://{host}:{metrics_port}/metrics")
        self._stopped = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.loop.add_signal_handler(sig, self._stopped.set)
            except (NotImplementedError, RuntimeError):
                pass
        try:  # without a handler SIGHUP (systemctl reload) would kill the manager
            self.loop.add_signal_handler(signal.SIGHUP, self._reload)
        except (NotImplementedError, RuntimeError, AttributeError):
            pass
        self._fd = cast(int, self.sock.getsockopt(zmq.FD))
        self.loop.add_reader(self._fd, self._on_readable)
        self.loop.call_soon(self._tick)
        self.loop.call_soon(self._flush_timer)
        self.loop.call_soon(self._on_readable)
        event(log, logging.INFO, "manager serving", endpoint=self.endpoint, db=self.store.path,
              sessions=len(self.sessions), apps=len(self.apps), pending=len(self.tasks))
        if ready_file:
            tmp = ready_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(self.endpoint)
            os.replace(tmp, ready_file)
        sdnotify.ready(self.status_line())
        self.loop.call_soon(self._sd_tick)
        await self._stopped.wait()
        sdnotify.stopping()
        await self.shutdown()

    def status_line(self) -> str:
        """One line for ``systemctl status`` (STATUS=)."""
        running = sum(s.running for s in self.sessions.values())
        open_ = sum(1 for s in self.sessions.values() if s.state == OPEN)
        alive = sum(1 for e in self.executors.values() if e.state != LOST)
        return (f"serving {self.endpoint}: {open_} sessions, {len(self.tasks)} tasks in flight "
                f"({running} running), {alive} executors, {len(self.instances)} instances")

    def _sd_tick(self) -> None:
        """WATCHDOG=1 from the event loop itself (a stuck loop stops pinging) and STATUS= every 5 s."""
        if self._closing:
            return
        sdnotify.watchdog()
        sdnotify.status(self.status_line())
        self.loop.call_later(min(sdnotify.watchdog_interval() or 5.0, 5.0), self._sd_tick)

    def _reload(self) -> None:
        sdnotify.reload(self.on_reload, log, self.status_line())

    def stop(self) -> None:
        self._stopped.set()

    # -- metrics ----------------------------------------------------------------------
    def metrics_text(self) -> str:
        """Every counter, gauge and histogram in the Prometheus text format."""
        now = time.time()
        Series = List[Tuple[str, str, Dict[str, str], float]]
        counters: Series = [(f"zeromesh_{k}_total", f"manager counter {k}", {}, v)
                            for k, v in sorted(self.stats.items())]
        by_state: Dict[str, int] = {}
        for s in self.sessions.values():
            for state, n in s.counts.items():
                by_state[state] = by_state.get(state, 0) + n
        counters += [("zeromesh_tasks_total", "tasks that ended, by state", {"state": k}, v)
                     for k, v in sorted(by_state.items())]
        gauges: Series = [("zeromesh_tasks", "tasks in the manager now, by state", {"state": PENDING},
                   sum(len(s.pending) for s in self.sessions.values())),
                  ("zeromesh_tasks", "tasks in the manager now, by state", {"state": RUNNING},
                   sum(s.running for s in self.sessions.values())),
                  ("zeromesh_sessions_open", "open sessions", {},
                   sum(1 for s in self.sessions.values() if s.state == OPEN)),
                  ("zeromesh_instances", "service instances", {}, len(self.instances)),
                  ("zeromesh_store_backlog", "group commits waiting for the writer thread", {}, self.writer.backlog())]
        gauges += [("zeromesh_session_queue_depth", "tasks queued per open session", {"session": s.id},
                    len(s.pending)) for s in self.sessions.values() if s.state == OPEN]
        gauges += [("zeromesh_executor_up", "1 if the executor is alive", {"executor": e.id},
                    1 if e.state == ALIVE else 0) for e in self.executors.values()]
        gauges += [("zeromesh_executor_silence_seconds", "seconds since the executor was last heard",
                    {"executor": e.id}, round(now - e.last_seen, 3)) for e in self.executors.values()]
        return render(counters, gauges, [("zeromesh_task_latency_seconds", "submit to answer", self.latency)])

    async def _serve_metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A minimal HTTP/1.0 answer to GET /metrics (Prometheus scrapes need no more)."""
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            path = request.split()[1] if len(request.split()) > 1 else b""
            if path.split(b"?")[0] == b"/metrics":
                body, status = self.metrics_text().encode(), b"200 OK"
            else:
                body, status = b"not found; try /metrics\n", b"404 Not Found"
            writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def shutdown(self) -> None:
        self._closing = True
        self.loop.remove_reader(cast(int, self.sock.getsockopt(zmq.FD)))
        for s in self.sessions.values():
            if s.state == OPEN:
                self.snapshot(s)
        batch, self.batch = self.batch, Batch()
        await self.writer.call(self.store.write, batch)
        self.writer.close()
        self.sock.close(linger=0)
        event(log, logging.INFO, "manager stopped")


def _json(err: Dict[str, Any]) -> str:
    return json.dumps(err, default=str)


def run(bind: str, db: str, settings: Optional[Settings] = None, ready_file: Optional[str] = None,
        on_reload: Optional[Callable[[], None]] = None, metrics_port: Optional[int] = None,
        curve_secret: Optional[str] = None, insecure: bool = False) -> None:
    """Run a manager in the foreground until SIGINT/SIGTERM, on uvloop where it is installed.

    Under systemd (``Type=notify``) it sends READY=1 once serving, WATCHDOG=1 and
    STATUS= from the loop, STOPPING=1 on shutdown; SIGHUP calls ``on_reload``.
    """
    manager = Manager(bind, db, settings, curve_secret=curve_secret, insecure=insecure)
    manager.on_reload = on_reload
    try:
        import uvloop
    except ImportError:  # uvloop is optional where it does not build (e.g. Windows)
        asyncio.run(manager.serve(ready_file, metrics_port))
    else:
        uvloop.run(manager.serve(ready_file, metrics_port))
