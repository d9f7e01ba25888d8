"""The manager's core: every decision of the session manager, as a state machine over plain data.

``Core`` knows no socket, thread or file (h11's lesson applied to a broker).
The event loop (:mod:`mesh.manager`) feeds it events and performs the effects
it returns (:mod:`mesh.core.effects`, which also states the durability rule):

* :meth:`Core.handle` one decoded message from a peer;
* :meth:`Core.bad_message` a message that failed to decode;
* :meth:`Core.tick` the clock (heartbeats, liveness, expiry, placement);
* :meth:`Core.complete` the result of a :class:`~mesh.core.effects.Call`;
* :meth:`Core.lost` a send the loop could not perform;
* :meth:`Core.end_round` after a batch of messages (placement, when wanted).

Each returns the effects to perform, in order.  The rules live in mixins, one
module each: :mod:`.tasks` (queues, credit, retries, resends), :mod:`.members`
(executors, instances, liveness, placement), :mod:`.contexts` (context and
object versions), :mod:`.control` (REQUEST methods).
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Dict, Optional, Sequence

from mesh.core import report
from mesh.core.base import log
from mesh.core.contexts import ContextRules
from mesh.core.leases import LeaseRules
from mesh.core.results import ResultRules
from mesh.core.control import ControlRules, Later, WithBlob
from mesh.core.effects import CPU, STORE, Call, Effect, Effects, Send
from mesh.core.flows import FlowRules
from mesh.core.functions import FunctionRules
from mesh.core.streams import StreamRules
from mesh.core.members import MemberRules
from mesh.core.tasks import TaskRules
from mesh.data.batch import SavedState
from mesh.data.context import Document
from mesh.errors import ProtocolError
from mesh.model import auth
from mesh.model.records import OPEN, App, Lease, Session, Task
from mesh.model.resources import Resources
from mesh.model.spec import AppSpec
from mesh.ops.config import Settings
from mesh.ops.log import event
from mesh.wire.protocol import Cmd, Message, Reply

__all__ = ["Core", "Send", "Call", "Effect", "Effects", "STORE", "CPU", "Later", "WithBlob"]

EXECUTOR_TRAFFIC = frozenset({Cmd.HEARTBEAT, Cmd.EXITED, Cmd.DRAIN, Cmd.REQUEST})  # what executors send


class Core(TaskRules, StreamRules, MemberRules, ContextRules, LeaseRules, ResultRules, FlowRules, FunctionRules,
           ControlRules):
    def __init__(self, settings: Optional[Settings] = None, secured: bool = False) -> None:
        super().__init__(settings or Settings(), secured)
        self.init_flows()
        self.init_functions()
        self.methods = self.control_methods()
        self._table: Dict[Cmd, Callable[[bytes, Any, Sequence[Any], Optional[str]], None]] = {
            Cmd.SUBMIT: lambda p, r, f, k: self.on_submit(p, r, f),
            Cmd.DONE: lambda p, r, f, k: self.on_done(p, r, f),
            Cmd.PARTS: lambda p, r, f, k: self.on_parts(p, r, f),
            Cmd.STREAM_CREDIT: lambda p, r, f, k: self.on_stream_credit(p, r),
            Cmd.REQUEST: lambda p, r, f, k: self.on_request(p, r, list(f), k),
            Cmd.CTX_WRITE: lambda p, r, f, k: self.on_ctx_write(p, r, f),
            Cmd.HEARTBEAT: lambda p, r, f, k: self.on_heartbeat(p, r),
            Cmd.EXEC_HELLO: lambda p, r, f, k: self.on_exec_hello(p, r, k),
            Cmd.INST_HELLO: lambda p, r, f, k: self.on_inst_hello(p, r),
            Cmd.EXITED: lambda p, r, f, k: self.on_exited(p, r),
            Cmd.RESYNC: lambda p, r, f, k: self.on_resync(p, r),
            Cmd.DRAIN: lambda p, r, f, k: self.on_drain(p),
        }

    # -- events ----------------------------------------------------------------------
    def handle(self, peer: bytes, msg: Message, now: float, key: Optional[str] = None) -> Effects:
        """One decoded message from ``peer`` (``key``: its CURVE public key when secured)."""
        self.now = now
        self.stats["messages_in"] += 1
        if msg.cmd in EXECUTOR_TRAFFIC:
            self.heard_from(peer)
        rule = self._table.get(msg.cmd)
        try:
            if rule is None:
                raise ProtocolError(f"{msg.cmd.name} is not a command peers send to the manager")
            rule(peer, msg.header, msg.payloads, key)
        except ProtocolError as exc:
            self._protocol_error(peer, exc)
        except Exception:  # a bug must not kill the mesh for everyone else
            log.exception("handler failed for %s", msg.cmd.name)
        return self.take()

    def bad_message(self, peer: bytes, exc: ProtocolError) -> Effects:
        self.stats["messages_in"] += 1
        self._protocol_error(peer, exc)
        return self.take()

    def _protocol_error(self, peer: bytes, exc: ProtocolError) -> None:
        n = self.stats["protocol_errors"] = self.stats["protocol_errors"] + 1
        if n <= 10 or n % 1000 == 0:
            event(log, logging.WARNING, "protocol error", peer=peer.hex()[:16], error=str(exc), total=n)
        self.send(peer, Reply(-1, False, error=exc.to_wire()))

    def tick(self, now: float) -> Effects:
        """The clock: heartbeats, evictions, slow starters, expired objects, then placement."""
        self.now = now
        for step in (self.check_liveness, self.check_deadlines, self.expire_objects, self.expire_leases,
                     self.expire_results,
                     self.expire_object_waits, self.expire_context_watches, self.flow_clock,
                     self.function_clock,
                     self.plan):
            try:
                step()
            except Exception:  # a bug in one step must not stop the clock (heartbeats) for everyone
                log.exception("tick step %s failed", step.__name__)
        return self.take()

    def store_behind(self, behind: bool, now: float) -> Effects:
        """The writer thread is (still) behind, or has caught up: see ``TaskRules.set_backlogged``."""
        self.now = now
        self.set_backlogged(behind)
        return self.take()

    def end_round(self, now: float) -> Effects:
        """After a batch of messages: run placement if a rule asked for it."""
        if self.plan_wanted:
            self.now = now
            self.plan()
        return self.take()

    def complete(self, call: Call, now: float, result: Any = None, error: Optional[BaseException] = None) -> Effects:
        """The outcome of a Call this core asked for."""
        self.now = now
        try:
            if error is not None:
                if call.fail is None:
                    raise error
                call.fail(error)
            elif call.then is not None:
                call.then(result)
        except Exception:
            log.exception("completing %s failed", call.label or call.fn)
        return self.take()

    def lost(self, send: Send, now: float) -> Effects:
        """The loop could not deliver ``send`` (peer gone, or its queue full)."""
        self.now = now
        self.stats["send_failures"] += 1
        if send.if_lost is not None:
            send.if_lost()
        return self.take()

    def metrics_text(self, who: Optional[auth.Principal] = None) -> str:
        """Prometheus text of the counters and gauges as of the last event.  Per-session series only
        for the sessions ``who`` may change (its own; every one for an admin or without ``who``:
        the loop's loopback HTTP endpoint); others see totals."""
        return report.metrics_text(self, who)

    # -- restart -----------------------------------------------------------------------
    def restore(self, saved: SavedState, now: Optional[float] = None) -> Effects:
        """Rebuild registry, open sessions, contexts, objects and unfinished tasks from the store;
        ``now``: the clock at the restart (what the engines restarting their work read)."""
        if now is not None:
            self.now = now
        for lid, owner, ttl, until, members in saved.leases:
            self.leases[lid] = Lease(lid, owner, ttl, until, set(members.get("apps", ())),
                                     set(members.get("sessions", ())), set(members.get("objects", ())))
        temporary = {name: lease for lease in self.leases.values() for name in lease.apps}
        for name, spec, created in saved.apps:
            lease = temporary.get(name)
            self.apps[name] = App(AppSpec.from_dict(spec), created, lease.owner if lease else "",
                                  lease.id if lease else None)
        for rec in saved.sessions:
            doc = Document()
            ctx = saved.contexts.get(rec["id"])
            if ctx is not None:
                kind, version, data, patches = ctx
                doc = Document.from_wire(kind, data, version)
                doc.replay(patches)
            self.sessions[rec["id"]] = Session(rec["id"], rec["app"], Resources.parse(rec["resreq"]),
                                               rec["created_at"], doc, owner=rec["owner"],
                                               max_instances=rec.get("max_instances"), version=rec.get("version"))
        for key, sid, expires_at, (kind, version, data, patches) in saved.objects:
            doc = Document.from_wire(kind, data, version)
            doc.replay(patches)
            self.objects.load(key, doc, sid, expires_at)
        self._next_tid = itertools.count(saved.max_task_id + 1)
        self.tids_reserved = saved.max_task_id
        self._iids = itertools.count(saved.max_instance_id + 1)
        self.iids_reserved = saved.max_instance_id
        if self.secured:   # a restart logs nobody out
            self.tokens = auth.Tokens(auth.token_table(saved.tokens))
        lost = []
        for tid, sid, attempts, payload, cid, tag in saved.unfinished:
            s = self.sessions.get(sid)
            if s is None or s.state != OPEN or payload is None:   # too large to keep: its client resends it
                lost.append(tid)
                continue
            t = self.tasks[tid] = Task(tid, sid, b"", tag, payload, attempts, cid)  # the client re-attaches by resending
            t.recorded = True
            app = self.apps.get(s.app)
            t.timeout = app.spec.task_timeout if app is not None else None   # a submit's own timeout is not stored
            self.by_tag[(cid, tag)] = tid
            s.pending.append(tid)
        if lost:
            self.call(Call(lambda store, tids: store.mark_lost(tids), (lost,), label="mark_lost"))
        self.restore_flows(saved.flows)
        self.restore_functions(saved.functions)
        return self.take()
