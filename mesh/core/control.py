"""Control calls (REQUEST -> REPLY): registry, sessions, contexts, objects, management, identity.

Rare compared with tasks, so clarity beats speed here.  Each method is a
``do_<name>(args, blob, who)`` that returns a msgpack-able value, a
:class:`WithBlob` (bulk data as its own frame), or a :class:`Later` (the answer
needs the store or a worker thread first; its ``then`` continues with the
result), or raises a :class:`~mesh.errors.MeshError` that goes back to the
caller with its stable code.  A reply after a handler changed the store batch
is an ``after_commit`` send: the caller learns of a change only once it is on
disk.  Registry and session changes are written by a ``Later`` (their own
transaction) before the reply.  Argument names are the record field names
(``application``, ``session``, ``id`` for the record itself).
"""
from __future__ import annotations

import logging
import re
import secrets
from typing import Any, Callable, Dict, List, Optional

from mesh.core import query
from mesh.core.base import AUTH_ERRORS, Base, log
from mesh.core.effects import CPU, STORE, Call
from mesh.data.context import DOC, KINDS, Document
from mesh.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from mesh.model import auth
from mesh.model import flows as flow_model
from mesh.model.auth import INSECURE, Principal
from mesh.model.records import CANCELLED, CLOSED, OPEN, RUNNING, App, Executor, Session, Task
from mesh.model.resources import Resources
from mesh.model.spec import AppSpec
from mesh.ops import keys
from mesh.ops.log import event
from mesh.wire.protocol import VERSION, Reply, Request

APP_FIELDS = ["name", "version", "command", "working_directory", "description", "created_at", "labels"]
SESSION_FIELDS = ["id", "application", "version", "state", "created_at", "closed_at", "pending", "running", "succeeded",
                  "failed", "cancelled", "instances", "context_version", "bytes_in", "conflicts"]
EXECUTOR_FIELDS = ["id", "state", "hostname", "slots", "used_slots", "instances", "cpu", "memory", "gpu",
                   "python", "last_seen", "joined_at", "labels"]
TASK_FIELDS = ["id", "session", "state", "attempts", "created_at", "finished_at", "error"]   # find_tasks

Args = Dict[str, Any]
SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")   # a caller-chosen session id
MAX_OBJECT_WAIT = 60.0   # seconds a get_object may wait for an object to be put (its ``wait``)


def _arg(args: Args, name: str, typ: type, required: bool = True) -> Any:
    if name not in args or args[name] is None:
        if required:
            raise InvalidArgument(f"argument {name!r} is required", argument=name)
        return None
    value = args[name]
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise InvalidArgument(f"argument {name!r} must be {typ.__name__}", argument=name)
    return value


class WithBlob:
    """A reply whose bulk data travels as its own frame (zero-copy), not inside the header."""

    __slots__ = ("result", "blob")

    def __init__(self, result: Any, blob: Any) -> None:
        self.result = result
        self.blob = blob


class Waiting:
    """An answer that waits for an object to be put (``get_object {key, have, wait}``): the reply
    goes out when it is, or ``NotFound`` at ``deadline`` (mesh/core/results.py)."""

    __slots__ = ("key", "have", "deadline", "who")

    def __init__(self, key: str, have: int, deadline: float, who: Principal) -> None:
        self.key, self.have, self.deadline, self.who = key, have, deadline, who


class RunWait:
    """An answer that waits for a flow run to end (``get_flow_run {id, wait}``), or its deadline
    (mesh/core/flows.py)."""

    __slots__ = ("run", "deadline", "who")

    def __init__(self, run: str, deadline: float, who: Principal) -> None:
        self.run, self.deadline, self.who = run, deadline, who


class ContextWait:
    """A get_context waiting for a write past ``have`` (``watch_context``), or its deadline."""

    __slots__ = ("session", "have", "deadline")

    def __init__(self, session: str, have: int, deadline: float) -> None:
        self.session, self.have, self.deadline = session, have, deadline


class CallWait:
    """An fn_call waiting for the function's reply (mesh/core/functions.py), or its deadline."""

    __slots__ = ("mid", "deadline")

    def __init__(self, mid: str, deadline: float) -> None:
        self.mid, self.deadline = mid, deadline


class EgressWait:
    """An fn_egress waiting for a record past ``offset``, or its deadline."""

    __slots__ = ("typename", "offset", "limit", "deadline")

    def __init__(self, typename: str, offset: int, limit: int, deadline: float) -> None:
        self.typename, self.offset, self.limit, self.deadline = typename, offset, limit, deadline


class Later:
    """An answer that needs ``fn`` run off the loop first (``fn(store, *args)`` on the writer thread,
    or ``fn(*args)`` on a worker with ``where=CPU``); ``then(result)`` continues on the loop and may
    return another Later."""

    __slots__ = ("fn", "args", "then", "fail", "where")

    def __init__(self, fn: Callable[..., Any], *args: Any, then: Optional[Callable[[Any], Any]] = None,
                 fail: Optional[Callable[[BaseException], Any]] = None, where: str = STORE) -> None:
        self.fn, self.args, self.then, self.fail, self.where = fn, args, then, fail, where


def _raise(exc: BaseException) -> Any:
    raise exc


class ControlRules(Base):
    def control_methods(self) -> Dict[str, Callable[[Args, Optional[bytes], Principal], Any]]:
        return {name[3:]: getattr(self, name) for name in dir(self) if name.startswith("do_")}

    def on_request(self, peer: bytes, rec: Request, payloads: List[Any], key: Optional[str] = None) -> None:
        self.stats["requests"] += 1
        self.caller = key or peer.hex()   # who is calling, for per-peer limits (its CURVE key when secured)
        fn = self.methods.get(rec.method)
        if fn is None:
            self.reply(peer, rec.rid, error=InvalidArgument(f"unknown method {rec.method!r}", method=rec.method))
            return
        blob = payloads[0] if payloads else None

        def run() -> Any:
            return fn(rec.args, blob, self.principal(rec.token, rec.method))

        self.answer(peer, rec.rid, rec.method, run)

    def answer(self, peer: bytes, rid: int, method: str, step: Callable[[], Any]) -> None:
        """Run one step of a handler and reply with its outcome, or schedule its next step."""
        try:
            result = step()
        except AUTH_ERRORS as exc:
            self.denied(peer, method, exc)
            self.reply(peer, rid, error=exc)
            return
        except MeshError as exc:
            self.reply(peer, rid, error=exc)
            return
        except Exception as exc:  # a bug must not kill the mesh for everyone else
            log.exception("control call %s failed", method)
            self.reply(peer, rid, error=Internal(f"{method} failed: {type(exc).__name__}: {exc}"))
            return
        if isinstance(result, Later):
            later = result
            self.call(Call(later.fn, later.args, where=later.where, label=method,
                           then=lambda value: self.answer(peer, rid, method,
                                                          lambda: later.then(value) if later.then else value),
                           fail=lambda exc: self.answer(peer, rid, method,
                                                        lambda: later.fail(exc) if later.fail else _raise(exc))))
        elif isinstance(result, Waiting):
            self.wait_for_object(peer, rid, result)
        elif isinstance(result, RunWait):
            self.wait_for_run(peer, rid, result)
        elif isinstance(result, ContextWait):
            self.wait_for_context(peer, rid, result)
        elif isinstance(result, CallWait):
            self.wait_for_call(peer, rid, result)
        elif isinstance(result, EgressWait):
            self.wait_for_egress(peer, rid, result)
        else:
            self.reply(peer, rid, result=result, after_commit=True)

    def reply(self, peer: bytes, rid: int, result: Any = None, error: Optional[MeshError] = None,
              after_commit: bool = False) -> None:
        if error is not None:
            self.send(peer, Reply(rid, False, error=error.to_wire()))
        elif isinstance(result, WithBlob):
            self.send(peer, Reply(rid, True, result.result, blob=True), [result.blob], after_commit=after_commit)
        else:
            self.send(peer, Reply(rid, True, result), after_commit=after_commit)

    # -- helpers ------------------------------------------------------------------
    def _app(self, name: str) -> App:
        app = self.apps.get(name)
        if app is None:
            raise NotFound(f"application {name!r} is not registered", application=name)
        return app

    def _session(self, sid: str, who: Principal, open_only: bool = False, change: bool = False) -> Session:
        """The session, if ``who`` may read it (or change it, with ``change``)."""
        s = self.sessions.get(sid)
        if s is None:
            raise NotFound(f"session {sid!r} does not exist", session=sid)
        if not who.may_read(s.owner) or change and not who.may_touch(s.owner):
            raise PermissionDenied(f"session {sid!r} belongs to {s.owner!r}", session=sid)
        if open_only and s.state != OPEN:
            raise FailedPrecondition(f"session {sid!r} is closed", session=sid)
        return s

    def _object(self, key: str, who: Principal, change: bool = False) -> str:
        """``key``, if ``who`` may read (or, with ``change``, write) its object.  An object bound to a
        session follows the session's ownership; one that is not is a capability: whoever holds
        its key (128 random bits) may use it.  An object the caller may not read is NotFound, as a
        missing one is (no oracle for other users' keys)."""
        obj = self.objects.items.get(key)
        if obj is not None and obj.session is not None:
            s = self.sessions.get(obj.session)
            owner = s.owner if s is not None else ""
            if not (who.may_touch(owner) if change else who.may_read(owner)):
                obj = None
        if obj is None:
            raise NotFound(f"object {key!r} does not exist (deleted, expired, or its session closed)", key=key)
        return key

    def _find(self, rows: List[Dict[str, Any]], fields: List[str], args: Args) -> Dict[str, Any]:
        return query.find(rows, fields, args.get("filter"), args.get("page"), args.get("sort"))

    def metrics_text(self, who: Optional[Principal] = None) -> str:   # mesh.core.Core
        raise NotImplementedError

    # -- mesh ---------------------------------------------------------------------
    def do_ping(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return {"protocol": VERSION, "time": self.now, "endpoint": self.endpoint, "boot": self.boot}

    def do_stats(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return {**self.stats, "tasks_in_memory": len(self.tasks), "sessions": len(self.sessions),
                "objects": len(self.objects.items), "object_bytes_out": self.objects.bytes_out,
                "store_backlog": self.store_backlog, "executors": len(self.executors),
                "instances": len(self.instances)}

    def do_metrics(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return {"text": self.metrics_text(who)}   # self.now is this request's time

    # -- applications -------------------------------------------------------------------
    def do_register_application(self, args: Args, blob: Optional[bytes] = None,
                                who: Principal = INSECURE) -> Later:
        spec = AppSpec.from_dict(_arg(args, "spec", dict))
        flow_model.check_app_name(spec.name)
        old = self.apps.get(spec.name)
        if old is not None and not args.get("replace", False):
            raise AlreadyExists(f"application {spec.name!r} is already registered; unregister it or update it",
                                application=spec.name)
        created = old.created_at if old else self.now
        spec = spec.bumped(old.spec if old else None)

        def registered(_: Any) -> Dict[str, Any]:
            self.apps[spec.name] = App(spec, created)
            event(log, logging.INFO, "application registered", application=spec.name)
            return self.apps[spec.name].view()

        return Later(lambda store: store.put_app(spec.name, spec.to_dict(), created), then=registered)

    def do_unregister_application(self, args: Args, blob: Optional[bytes] = None,
                                  who: Principal = INSECURE) -> Later:
        name = _arg(args, "name", str)
        self._app(name)
        open_sessions = [s.id for s in self.sessions.values() if s.app == name and s.state == OPEN]
        if open_sessions:
            raise FailedPrecondition(
                f"application {name!r} has {len(open_sessions)} open session(s) ({', '.join(open_sessions[:3])}); "
                "close them first", application=name, sessions=open_sessions)

        def unregistered(_: Any) -> Dict[str, Any]:
            self.apps.pop(name, None)
            for inst in list(self.instances.values()):
                if inst.app == name and not inst.stopping:
                    self.stop_instance(inst)
            event(log, logging.INFO, "application unregistered", application=name)
            return {"name": name}

        return Later(lambda store: store.delete_app(name), then=unregistered)

    def do_get_application(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return self._app(_arg(args, "name", str)).view()

    def do_find_applications(self, args: Args, blob: Optional[bytes] = None,
                             who: Principal = INSECURE) -> Dict[str, Any]:
        return self._find([a.view() for a in self.apps.values()], APP_FIELDS, args)

    # -- sessions and contexts ------------------------------------------------------------
    def do_create_session(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Later:
        app = self._app(_arg(args, "application", str))
        if app.lease is not None and not who.may_touch(app.owner):   # a user's temporary application runs
            raise PermissionDenied(f"application {app.spec.name!r} is a temporary application of "   # their code
                                   f"{app.owner!r}", application=app.spec.name)
        kind = _arg(args, "kind", str, required=False) or DOC
        if kind not in KINDS:
            raise InvalidArgument(f"context kind must be one of {KINDS}", argument="kind")
        data = blob if blob is not None else _arg(args, "context", bytes, required=False)
        if data is not None and len(data) > self.settings.max_context_size:
            raise ResourceExhausted(f"the context is {len(data)} bytes; max_context_size is "
                                    f"{self.settings.max_context_size}", limit="max_context_size")
        doc = Document.from_wire(kind, data) if data is not None else Document()
        resreq = args.get("resreq")
        req = Resources.parse(resreq) if resreq else app.spec.resreq
        sid = _arg(args, "id", str, required=False)
        chosen = sid is not None
        taken = lambda name: name in self.sessions or name in self.creating  # noqa: E731
        if sid is None:
            sid = f"{app.spec.name}-{secrets.token_hex(3)}"
            while taken(sid):
                sid = f"{app.spec.name}-{secrets.token_hex(3)}"
        else:   # the caller's own id (Flame's custom session ids)
            if not SESSION_ID_RE.fullmatch(sid):
                raise InvalidArgument(f"session id {sid!r} must match {SESSION_ID_RE.pattern}", argument="id")
            if taken(sid):
                old = self.sessions.get(sid)
                why = ("and is closed (session ids are not reused)" if old is not None and old.state != OPEN
                       else f"and is open: reopen it with Session(session_id={sid!r})")
                raise AlreadyExists(f"session {sid!r} already exists {why}", session=sid)
        max_instances = _arg(args, "max_instances", int, required=False)
        if max_instances is not None and max_instances < 1:
            raise InvalidArgument("max_instances is at least 1", argument="max_instances")
        s = Session(sid, app.spec.name, req, self.now, doc, owner=who.name, max_instances=max_instances,
                    version=app.spec.version)
        lease = self.attach(_arg(args, "lease", str, required=False), who)
        self.creating.add(sid)   # the id is taken now; the session exists for others once it is on disk

        def created(_: Any) -> Dict[str, Any]:
            self.creating.discard(sid)
            self.sessions[sid] = s
            if lease is not None and lease.id in self.leases:
                lease.sessions.add(sid)
                self.save_lease(lease)
            elif lease is not None:   # the lease ended while the session was written: it ends too
                self.close_and_record(s, f"ended with its lease {lease.id}")
            event(log, logging.INFO, "session opened", session=sid, application=app.spec.name)
            return s.view()

        def undo(exc: BaseException) -> Any:
            self.creating.discard(sid)
            raise exc

        return Later(lambda store: store.create_session(s.id, s.app, s.created_at, s.resreq.to_dict(), s.owner,
                                                        s.context.kind, s.context.encoded(), s.max_instances,
                                                        unique=chosen, version=s.version),
                     then=created, fail=undo)

    def do_get_session(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return self._session(_arg(args, "id", str), who).view()

    def do_open_session(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return self._session(_arg(args, "id", str), who, open_only=True, change=True).view()

    def do_find_sessions(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return self._find([s.view() for s in self.sessions.values() if who.may_read(s.owner)], SESSION_FIELDS, args)

    def do_close_session(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Any:
        s = self._session(_arg(args, "id", str), who, change=True)
        if s.state != OPEN:
            return s.view()
        self.close_session(s, "was closed")

        def closed(_: Any) -> Dict[str, Any]:
            event(log, logging.INFO, "session closed", session=s.id)
            return s.view()

        return Later(lambda store: store.close_session(s.id, s.closed_at), then=closed)

    def close_and_record(self, s: Session, why: str) -> None:
        """:meth:`close_session`, and the closing written down (a store call after the batch)."""
        self.close_session(s, why)
        self.call(Call(lambda store, i, at: store.close_session(i, at), (s.id, s.closed_at), label="close_session"))

    def open_engine_session(self, sid: str, app_name: str, owner: str) -> Session:
        """A session the manager opens for one of its engines (flows, functions): in memory at once,
        written by a store call after the batch."""
        app = self.apps[app_name]
        s = self.sessions[sid] = Session(sid, app_name, app.spec.resreq, self.now, Document(), owner=owner)
        self.call(Call(lambda store: store.create_session(s.id, s.app, s.created_at, s.resreq.to_dict(), s.owner,
                                                          s.context.kind, s.context.encoded(), None),
                       label="engine session"))
        return s

    def close_session(self, s: Session, why: str) -> None:
        """Close ``s`` in memory (the caller writes it down): its queued tasks are cancelled, its running
        ones get ``close_grace`` to finish, its objects go."""
        s.state = CLOSED
        s.closed_at = self.now
        cancelled = [t for t in (self.tasks.get(tid) for tid in s.pending) if t is not None]
        s.pending.clear()
        self.waiting.discard(s.id)
        self.fail_tasks(cancelled, Cancelled(f"session {s.id!r} {why}", session=s.id), CANCELLED)
        if s.running:   # running tasks may finish within close_grace; then their instances are stopped
            self.closing[s.id] = self.now + self.settings.close_grace
        self.delete_objects(self.objects.of_session(s.id))
        for lease in self.leases.values():
            if s.id in lease.sessions:
                lease.sessions.discard(s.id)
                self.save_lease(lease)
        self.plan_soon()

    def do_get_context(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Any:
        """The context; with ``have`` (a version the caller holds), only the writes after it when the
        manager still has them (``mode: patches``), and with ``wait`` (seconds) the answer waits for
        the next write if there is none yet (``watch_context``; mesh/core/contexts.py)."""
        s = self._session(_arg(args, "id", str), who)
        have = _arg(args, "have", int, required=False)
        if args.get("watch"):   # a watcher's first read: keep the writes from here on
            self.watch_session(s.id)
        if have is None:
            return {"kind": s.context.kind, "version": s.context.version, "data": s.context.encoded()}
        wait = args.get("wait")
        self.watch_session(s.id)
        if have >= s.context.version and isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > 0:
            return ContextWait(s.id, have, self.now + min(float(wait), MAX_OBJECT_WAIT))
        return self.context_since(s, have)

    def do_write_context(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        """Ops in the header, or a whole new value in the blob frame (``kind`` says how it is encoded)."""
        s = self._session(_arg(args, "id", str), who, open_only=True, change=True)
        ops = _arg(args, "ops", list, required=False)
        if ops is None:
            if blob is None:
                raise InvalidArgument("write_context needs 'ops' or a blob frame with the new value")
            if len(blob) > self.settings.max_context_size:   # refused before it is decoded on the loop
                raise ResourceExhausted(f"the context is {len(blob)} bytes; max_context_size is "
                                        f"{self.settings.max_context_size}", limit="max_context_size",
                                        size=len(blob))
            if (_arg(args, "kind", str, required=False) or DOC) == DOC:
                ops = [{"op": "replace", "path": "", "value": Document.from_wire(DOC, blob).value}]
                blob = None
        elif blob is not None:
            raise InvalidArgument("write_context takes 'ops' or a blob frame, not both")
        return {"version": self.apply_context_write(s, ops, blob)}

    # -- executors and tasks ------------------------------------------------------------------
    def _executor(self, eid: str) -> Any:
        ex = self.executors.get(eid)
        if ex is None:
            raise NotFound(f"executor {eid!r} is not connected", executor=eid)
        return ex

    def do_find_executors(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return self._find([self._executor_view(e, who) for e in self.executors.values()], EXECUTOR_FIELDS, args)

    def do_get_executor(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return self._executor_view(self._executor(_arg(args, "id", str)), who)

    def _executor_view(self, e: Executor, who: Principal) -> Dict[str, Any]:
        """An executor with its instances: application, and session when ``who`` may read it."""
        view = e.view()
        rows = []
        for iid in sorted(e.instances):
            inst = self.instances.get(iid)
            if inst is None:
                continue
            s = inst.session
            rows.append({"id": iid, "application": inst.app, "ready": inst.identity is not None,
                         "busy": bool(inst.inflight), "draining": inst.draining,
                         "session": s.id if s is not None and who.may_read(s.owner) else None})
        view["instance_list"] = rows
        return view

    def do_drain_executor(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        ex = self._executor(_arg(args, "id", str))
        self.drain_executor(ex)
        return ex.view()

    def _overlay(self, row: Dict[str, Any]) -> Dict[str, Any]:
        """A task record from SQLite, with what only memory knows (running, attempts so far)."""
        t = self.tasks.get(row["id"])
        if t is not None:
            row["state"], row["attempts"], row["instance"] = t.state, t.attempt, t.instance
        return row

    @staticmethod
    def _memory_row(t: Task) -> Dict[str, Any]:
        """The record of a task too young to be written yet (``record_after``)."""
        return {"id": t.id, "session": t.sid, "state": t.state, "attempts": t.attempt, "created_at": t.created_at,
                "finished_at": None, "error": None, "instance": t.instance}

    def _task_rows(self, sid: str, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        stored = {r["id"] for r in rows}
        young = [self._memory_row(t) for t in self.tasks.values() if t.sid == sid and t.id not in stored]
        return [self._overlay(r) for r in rows] + young

    def do_find_tasks(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Later:
        s = self._session(_arg(args, "session", str), who)
        return Later(lambda store: store.task_rows(s.id),
                     then=lambda rows: self._find(self._task_rows(s.id, rows), TASK_FIELDS, args))

    def do_get_task(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Later:
        """The task's record; with ``has_result`` true, its result (pickled, as the instance sent it:
        the manager never unpickles) as the blob frame, while its session is open and for
        ``result_retention`` seconds after it closed."""
        tid = _arg(args, "id", int)

        def read(store: Any) -> Any:
            return store.get_task(tid), store.task_result(tid)

        def found(got: Any) -> Any:
            row, output = got
            t = self.tasks.get(tid)
            if row is None and t is not None:
                row = self._memory_row(t)
            if row is None or row["session"] not in self.sessions:
                raise NotFound(f"task {tid} does not exist", task=tid)
            s = self._session(row["session"], who)
            row = self._overlay(row)
            kept = s.state == OPEN or s.closed_at is not None and \
                self.now < s.closed_at + self.settings.result_retention
            row["has_result"] = output is not None and kept
            return WithBlob(row, output) if row["has_result"] else row

        return Later(read, then=found)

    def do_cancel_task(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        tid = _arg(args, "id", int)
        t = self.tasks.get(tid)
        if t is None:
            raise FailedPrecondition(f"task {tid} is not queued (finished, or unknown)", task=tid)
        self._session(t.sid, who, change=True)
        if t.state == RUNNING:   # its instance is stopped; the instance's other tasks run elsewhere
            self.interrupt(t, Cancelled(f"task {tid} was cancelled while running on {t.instance}", task=tid),
                           CANCELLED, retry=False)
        else:
            self.sessions[t.sid].pending.remove(tid)
            self.fail_tasks([t], Cancelled(f"task {tid} was cancelled", task=tid), CANCELLED)
        return {"id": tid, "state": CANCELLED}

    # -- object cache -------------------------------------------------------------------
    def do_put_object(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        if blob is None:
            raise InvalidArgument("put_object carries the object as a blob frame")
        self.check_object_size(blob)
        sid = _arg(args, "session", str, required=False)
        if sid is not None:   # bound to a session: its owner's (an instance acts for the owner it serves)
            self._session(sid, who, open_only=True, change=True)
        ttl = args.get("ttl")
        if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0):
            raise InvalidArgument("ttl must be a positive number of seconds", argument="ttl")
        lease = self.attach(_arg(args, "lease", str, required=False), who)
        obj = self.objects.put(_arg(args, "kind", str), blob, sid, self.now + ttl if ttl else None)
        self.persist_object(obj)
        if lease is not None:
            lease.objects.add(obj.key)
            self.save_lease(lease)
        return {"key": obj.key, "version": obj.doc.version}

    def do_get_object(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Any:
        have = _arg(args, "have", int, required=False) or 0
        key = _arg(args, "key", str)
        wait = args.get("wait")
        if key not in self.objects.items and isinstance(wait, (int, float)) and not isinstance(wait, bool) \
                and 0 < wait <= MAX_OBJECT_WAIT:   # a result still being computed (mesh/core/results.py)
            return Waiting(key, have, self.now + wait, who)
        return self.object_reply(key, have, who)

    def object_reply(self, key: str, have: int, who: Principal) -> Any:
        key = self._object(key, who)
        header, data = self.objects.get(key, have)
        return header if data is None else WithBlob(header, data)

    def do_update_object(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        if blob is None:
            raise InvalidArgument("update_object carries the object as a blob frame")
        self.check_object_size(blob)
        obj = self.objects.update(self._object(_arg(args, "key", str), who, change=True), _arg(args, "kind", str), blob)
        self.persist_object(obj)
        return {"key": obj.key, "version": obj.doc.version}

    def do_patch_object(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        ops = _arg(args, "ops", list)
        self.check_patch_size(ops)
        obj = self.objects.patch(self._object(_arg(args, "key", str), who, change=True), ops)
        self.persist_object(obj, ops)
        return {"key": obj.key, "version": obj.doc.version}

    def do_delete_object(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        key = self._object(_arg(args, "key", str), who, change=True)
        self.objects.delete(key)
        self.delete_objects([key])
        return {"key": key}

    # -- identity: login, users, robots, executor keys --------------------------------------
    def do_login(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Any:
        """Credentials for a token.  On an insecure manager everyone is admin and no token is needed."""
        if not self.secured:
            return {"token": "", "expires_at": None, "name": "insecure", "role": "admin", "insecure": True}

        caller, started = self.caller, self.now
        name = args.get("user") if isinstance(args.get("user"), str) else args.get("robot")
        self.logins.check(str(name), caller, started)   # ResourceExhausted after too many failures

        def failed(wrong: str) -> Any:
            event(log, logging.WARNING, "login failed", principal=name, peer=caller[:16],
                  failures=self.logins.failures(str(name)))
            raise auth.Unauthenticated(wrong)

        def check(found: Any) -> Later:
            # an unknown name is checked against a dummy hash: the answer takes as long and says the same
            claimed, stored, known = found
            secret = args.get("password") if claimed.kind == "user" else args.get("secret")
            wrong = "wrong user name or password" if claimed.kind == "user" else "wrong robot id or secret"
            if not isinstance(secret, str):
                secret = ""
            return Later(keys.verify_secret, secret, stored, where=CPU,
                         then=lambda ok: issue(claimed) if ok and known else failed(wrong))

        def issue(claimed: Principal) -> Later:
            self.logins.succeeded(str(name), caller, started)
            token, expires = self.tokens.issue(claimed, self.settings.token_ttl)
            event(log, logging.INFO, "login", principal=claimed.name, kind=claimed.kind, role=claimed.role)

            def unsaved(exc: BaseException) -> Any:
                self.tokens.drop(token)   # a token that would not survive a restart is not handed out
                raise exc

            return Later(lambda store: auth.save_token(store, token, claimed, expires),
                         then=lambda _: {"token": token, "expires_at": expires, "name": claimed.name,
                                         "role": claimed.role}, fail=unsaved)

        return Later(lambda store: auth.credentials(store, args), then=check)

    def do_whoami(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return {"name": who.name, "role": who.role, "kind": who.kind}

    def do_add_user(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Later:
        name, role, password = _arg(args, "name", str), _arg(args, "role", str), _arg(args, "password", str)
        return Later(lambda store: auth.add_user(store, name, role, password))

    def do_remove_user(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Later:
        name = _arg(args, "name", str)

        def removed(_: Any) -> Dict[str, Any]:
            self.tokens.drop_principal(name, "user")
            return {"name": name}

        return Later(lambda store: auth.remove_user(store, name), then=removed)

    def do_list_users(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Later:
        return Later(auth.list_users)

    def do_create_robot(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Later:
        name, role = _arg(args, "name", str), _arg(args, "role", str)
        return Later(lambda store: auth.create_robot(store, name, role))

    def do_revoke_robot(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Later:
        rid = _arg(args, "id", str)

        def revoked(_: Any) -> Dict[str, Any]:
            self.tokens.drop_principal(rid, "robot")
            return {"id": rid}

        return Later(lambda store: auth.revoke_robot(store, rid), then=revoked)

    def do_list_robots(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Later:
        return Later(auth.list_robots)

    def do_add_executor_key(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Later:
        public, name = _arg(args, "public", str), _arg(args, "name", str)
        return Later(lambda store: auth.add_executor_key(store, public, name))

    def do_list_executor_keys(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Later:
        return Later(auth.list_executor_keys)

    def do_revoke_executor_key(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Later:
        key = _arg(args, "key", str)

        def revoked(result: Dict[str, Any]) -> Dict[str, Any]:
            self.revoked_executor_keys(result["public"])
            return result

        return Later(lambda store: auth.revoke_executor_key(store, key), then=revoked)
