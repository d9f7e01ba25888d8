"""Control calls (REQUEST -> REPLY): registry, sessions, contexts, listings.

Rare compared with tasks, so clarity beats speed here.  Every handler takes
the request's ``args`` map and returns a msgpack-able value or raises a
:class:`MeshError`, which goes back to the caller with its stable code.
Changes that a user acts on (register, create, close) are committed to SQLite
before the reply is sent.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Optional

from . import keys
from .context import DOC, KINDS, Document
from . import auth
from .auth import INSECURE, Principal
from .errors import (AlreadyExists, Cancelled, FailedPrecondition, Internal, InvalidArgument, MeshError,
                     NotFound, PermissionDenied, ResourceExhausted, Unauthenticated)
from .log import event
from .protocol import VERSION, Cmd, Message
from .resources import Resources
from .spec import AppSpec
from . import query
from .state import CANCELLED, CLOSED, OPEN, PENDING, App, Session

APP_FIELDS = ["name", "command", "working_directory", "description", "created_at", "labels"]
SESSION_FIELDS = ["id", "application", "state", "created_at", "closed_at", "pending", "running", "succeeded",
                  "failed", "cancelled", "instances", "context_version", "bytes_in", "conflicts"]
EXECUTOR_FIELDS = ["id", "state", "hostname", "slots", "used_slots", "instances", "cpu", "memory", "gpu",
                   "python", "last_seen", "joined_at", "labels"]
TASK_FIELDS = ["id", "session", "state", "attempts", "created_at", "finished_at", "error"]

if TYPE_CHECKING:
    from .manager import Manager

log = logging.getLogger("zeromesh.manager")


def _arg(args: Dict[str, Any], name: str, typ: type, required: bool = True) -> Any:
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


class Control:
    def __init__(self, manager: "Manager") -> None:
        self.m = manager
        self.methods: Dict[str, Callable[..., Any]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("do_")
        }

    def handle(self, identity: bytes, msg: Message) -> None:
        rid, method, args = msg.header["rid"], msg.header["method"], msg.header["args"]
        self.m.stats["requests"] += 1
        fn = self.methods.get(method)
        if fn is None:
            self._reply(identity, rid, error=InvalidArgument(f"unknown method {method!r}", method=method))
            return
        try:
            who = self.m.principal(msg.header.get("token"), method)
            result = fn(args, msg.payloads[0] if msg.payloads else None, who)
        except (Unauthenticated, PermissionDenied) as exc:
            self.m.denied(identity, method, exc)
            self._reply(identity, rid, error=exc)
            return
        except MeshError as exc:
            self._reply(identity, rid, error=exc)
            return
        except Exception as exc:
            log.exception("control call %s failed", method)
            self._reply(identity, rid, error=Internal(f"{method} failed: {type(exc).__name__}: {exc}"))
            return
        if asyncio.iscoroutine(result):
            asyncio.ensure_future(self._finish(identity, rid, method, result))
        else:
            self._reply(identity, rid, result=result)

    async def _finish(self, identity: bytes, rid: int, method: str, coro: Awaitable[Any]) -> None:
        try:
            self._reply(identity, rid, result=await coro)
        except MeshError as exc:
            self._reply(identity, rid, error=exc)
        except Exception as exc:
            log.exception("control call %s failed", method)
            self._reply(identity, rid, error=Internal(f"{method} failed: {type(exc).__name__}: {exc}"))
        self.m.wake()

    def _reply(self, identity: bytes, rid: int, result: Any = None, error: Optional[MeshError] = None) -> None:
        if isinstance(result, WithBlob):
            self.m.send(identity, Cmd.REPLY, {"rid": rid, "ok": True, "result": result.result, "blob": True},
                        [result.blob])
        elif error is None:
            self.m.send(identity, Cmd.REPLY, {"rid": rid, "ok": True, "result": result})
        else:
            self.m.send(identity, Cmd.REPLY, {"rid": rid, "ok": False, "error": error.to_wire()})

    # -- helpers ------------------------------------------------------------------
    def _app(self, name: str) -> App:
        app = self.m.apps.get(name)
        if app is None:
            raise NotFound(f"application {name!r} is not registered", application=name)
        return app

    def _session(self, sid: str, who: Principal, open_only: bool = False, change: bool = False) -> Session:
        """The session, if ``who`` may read it (or change it, with ``change``)."""
        s = self.m.sessions.get(sid)
        if s is None:
            raise NotFound(f"session {sid!r} does not exist", session=sid)
        if not who.may_read(s.owner) or change and not who.may_touch(s.owner):
            raise PermissionDenied(f"session {sid!r} belongs to {s.owner!r}", session=sid)
        if open_only and s.state != OPEN:
            raise FailedPrecondition(f"session {sid!r} is closed", session=sid)
        return s

    # -- methods --------------------------------------------------------------------
    def do_ping(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return {"protocol": VERSION, "time": time.time(), "endpoint": self.m.endpoint, "boot": self.m.boot}

    def do_stats(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return {**self.m.stats, "tasks_in_memory": len(self.m.tasks), "sessions": len(self.m.sessions),
                "objects": len(self.m.objects.items), "object_bytes_out": self.m.objects.bytes_out,
                "store_backlog": self.m.writer.backlog(),
                "executors": len(self.m.executors), "instances": len(self.m.instances)}

    async def do_register_app(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        spec = AppSpec.from_dict(_arg(args, "spec", dict))
        replace = bool(args.get("replace", False))
        old = self.m.apps.get(spec.name)
        if old is not None and not replace:
            raise AlreadyExists(f"application {spec.name!r} is already registered; unregister it or update it",
                                application=spec.name)
        created = old.created_at if old else time.time()
        await self.m.writer.call(self.m.store.put_app, spec.name, spec.to_dict(), created)
        self.m.apps[spec.name] = App(spec, created)
        event(log, logging.INFO, "application registered", application=spec.name)
        return self.m.apps[spec.name].view()

    async def do_unregister_app(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        name = _arg(args, "name", str)
        self._app(name)
        open_sessions = [s.id for s in self.m.sessions.values() if s.app == name and s.state == OPEN]
        if open_sessions:
            raise FailedPrecondition(
                f"application {name!r} has {len(open_sessions)} open session(s) ({', '.join(open_sessions[:3])}); "
                "close them first", application=name, sessions=open_sessions)
        await self.m.writer.call(self.m.store.delete_app, name)
        self.m.apps.pop(name, None)
        for inst in list(self.m.instances.values()):
            if inst.app == name and not inst.stopping:
                self.m.stop_instance(inst)
        event(log, logging.INFO, "application unregistered", application=name)
        return {"name": name}

    def do_get_app(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return self._app(_arg(args, "name", str)).view()

    def do_list_apps(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> List[Dict[str, Any]]:
        return [a.view() for a in sorted(self.m.apps.values(), key=lambda a: a.spec.name)]

    async def do_create_session(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        app = self._app(_arg(args, "app", str))
        kind = _arg(args, "kind", str, required=False) or DOC
        if kind not in KINDS:
            raise InvalidArgument(f"context kind must be one of {KINDS}", argument="kind")
        data = blob if blob is not None else _arg(args, "context", bytes, required=False)
        if data is not None and len(data) > self.m.settings.max_context_size:
            raise ResourceExhausted(f"the context is {len(data)} bytes; max_context_size is "
                                    f"{self.m.settings.max_context_size}", limit="max_context_size")
        doc = Document.from_wire(kind, data) if data is not None else Document()
        resreq = args.get("resreq")
        req = Resources.parse(resreq) if resreq else app.spec.resreq
        sid = _arg(args, "session_id", str, required=False)
        if sid is None:
            sid = f"{app.spec.name}-{secrets.token_hex(3)}"
            while sid in self.m.sessions:
                sid = f"{app.spec.name}-{secrets.token_hex(3)}"
        elif sid in self.m.sessions:
            raise AlreadyExists(f"session {sid!r} already exists", session=sid)
        now = time.time()
        s = Session(sid, app.spec.name, req, now, doc, owner=who.name)
        await self.m.writer.call(self._persist_new_session, s)
        self.m.sessions[sid] = s
        event(log, logging.INFO, "session opened", session=sid, application=app.spec.name)
        return s.view()

    def _persist_new_session(self, s: Session) -> None:
        store = self.m.store
        with store.db:
            store.put_session(s.id, s.app, s.state, s.created_at, None, s.resreq.to_dict(), s.owner)
            store.db.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?)",
                             (s.id, 0, s.context.kind, s.context.encoded()))

    def do_get_session(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return self._session(_arg(args, "id", str), who).view()

    def do_open_session(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return self._session(_arg(args, "id", str), who, open_only=True, change=True).view()

    def do_list_sessions(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> List[Dict[str, Any]]:
        return [s.view() for s in sorted(self.m.sessions.values(), key=lambda s: s.created_at) if who.may_read(s.owner)]

    async def do_close_session(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        s = self._session(_arg(args, "id", str), who, change=True)
        if s.state == OPEN:
            s.state = CLOSED
            s.closed_at = time.time()
            cancelled = [t for t in (self.m.tasks.get(tid) for tid in s.pending) if t is not None]
            s.pending.clear()
            self.m.waiting.discard(s.id)
            self.m.fail_tasks(cancelled, Cancelled(f"session {s.id!r} was closed", session=s.id), CANCELLED)
            await self.m.writer.call(self.m.store.put_session, s.id, s.app, s.state, s.created_at, s.closed_at,
                                     s.resreq.to_dict(), s.owner)
            self.m.writer.submit(self.m.store.drop_context, s.id)
            self.m.delete_objects(self.m.objects.of_session(s.id))
            self.m.plan_soon()
            event(log, logging.INFO, "session closed", session=s.id)
        return s.view()

    def do_drain_executor(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        eid = _arg(args, "id", str)
        ex = self.m.executors.get(eid)
        if ex is None:
            raise NotFound(f"executor {eid!r} is not connected", executor=eid)
        self.m.drain_executor(ex)
        return ex.view()

    def do_list_executors(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> List[Dict[str, Any]]:
        return [e.view() for e in sorted(self.m.executors.values(), key=lambda e: e.id)]

    def do_get_context(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        s = self._session(_arg(args, "id", str), who)
        return {"kind": s.context.kind, "version": s.context.version, "data": s.context.encoded()}

    def do_write_context(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        """Ops in the header, or a whole new value in the blob frame (``kind`` says how it is encoded)."""
        s = self._session(_arg(args, "id", str), who, open_only=True, change=True)
        ops = _arg(args, "ops", list, required=False)
        if ops is None:
            if blob is None:
                raise InvalidArgument("write_context needs 'ops' or a blob frame with the new value")
            if (_arg(args, "kind", str, required=False) or DOC) == DOC:
                ops = [{"op": "replace", "path": "", "value": Document.from_wire(DOC, blob).value}]
                blob = None
        elif blob is not None:
            raise InvalidArgument("write_context takes 'ops' or a blob frame, not both")
        version = self.m.apply_context_write(s, ops, blob)
        return {"version": version}

    # -- object cache -------------------------------------------------------------------
    def do_put_object(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        if blob is None:
            raise InvalidArgument("put_object carries the object as a blob frame")
        sid = _arg(args, "session", str, required=False)
        if sid is not None:
            self._session(sid, who, open_only=True, change=who.role != "instance")
        ttl = args.get("ttl")
        if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0):
            raise InvalidArgument("ttl must be a positive number of seconds", argument="ttl")
        obj = self.m.objects.put(_arg(args, "kind", str), blob, sid, time.time() + ttl if ttl else None)
        self.m.persist_object(obj)
        return {"key": obj.key, "version": obj.doc.version}

    def do_get_object(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Any:
        have = _arg(args, "have", int, required=False) or 0
        header, data = self.m.objects.get(_arg(args, "key", str), have)
        return header if data is None else WithBlob(header, data)

    def do_update_object(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        if blob is None:
            raise InvalidArgument("update_object carries the object as a blob frame")
        obj = self.m.objects.update(_arg(args, "key", str), _arg(args, "kind", str), blob)
        self.m.persist_object(obj)
        return {"key": obj.key, "version": obj.doc.version}

    def do_patch_object(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        ops = _arg(args, "ops", list)
        obj = self.m.objects.patch(_arg(args, "key", str), ops)
        self.m.persist_object(obj, ops)
        return {"key": obj.key, "version": obj.doc.version}

    def do_delete_object(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        key = _arg(args, "key", str)
        self.m.objects.delete(key)
        self.m.delete_objects([key])
        return {"key": key}

    # -- management: find / get / cancel / metrics --------------------------------------
    def _find(self, rows: List[Dict[str, Any]], fields: List[str], args: Dict[str, Any]) -> Dict[str, Any]:
        return query.find(rows, fields, args.get("filter"), args.get("page"), args.get("sort"))

    def do_find_apps(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return self._find([a.view() for a in self.m.apps.values()], APP_FIELDS, args)

    def do_find_sessions(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return self._find([s.view() for s in self.m.sessions.values() if who.may_read(s.owner)], SESSION_FIELDS, args)

    def do_find_executors(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return self._find([e.view() for e in self.m.executors.values()], EXECUTOR_FIELDS, args)

    def do_get_executor(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        eid = _arg(args, "id", str)
        ex = self.m.executors.get(eid)
        if ex is None:
            raise NotFound(f"executor {eid!r} is not connected", executor=eid)
        return ex.view()

    async def _task_rows(self, sid: str) -> List[Dict[str, Any]]:
        """Records from SQLite, overlaid with what only memory knows (running, attempts so far)."""
        self.m._flush()
        rows = await self.m.writer.call(self.m.store.task_rows, sid)
        for row in rows:
            t = self.m.tasks.get(row["id"])
            if t is not None:
                row["state"], row["attempts"] = t.state, t.attempt
        return rows

    async def do_find_tasks(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        s = self._session(_arg(args, "session", str), who)
        return self._find(await self._task_rows(s.id), TASK_FIELDS, args)

    async def do_get_task(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        tid = _arg(args, "id", int)
        self.m._flush()
        row = await self.m.writer.call(self.m.store.get_task, tid)
        if row is None or row["session"] not in self.m.sessions:
            raise NotFound(f"task {tid} does not exist", task=tid)
        self._session(row["session"], who)
        t = self.m.tasks.get(tid)
        if t is not None:
            row["state"], row["attempts"], row["instance"] = t.state, t.attempt, t.instance
        return row

    def do_cancel_task(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        tid = _arg(args, "id", int)
        t = self.m.tasks.get(tid)
        if t is None:
            raise FailedPrecondition(f"task {tid} is not queued (finished, or unknown)", task=tid)
        self._session(t.sid, who, change=True)
        if t.state != PENDING:
            raise FailedPrecondition(f"task {tid} is already running on {t.instance}; a running task "
                                     "cannot be interrupted", task=tid)
        s = self.m.sessions[t.sid]
        s.pending.remove(tid)
        self.m.fail_tasks([t], Cancelled(f"task {tid} was cancelled", task=tid), CANCELLED)
        return {"id": tid, "state": CANCELLED}

    def do_metrics(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return {"text": self.m.metrics_text()}

    # -- identity: login, users, robots, executor keys --------------------------------------
    async def do_login(self, args: Dict[str, Any], blob: Optional[bytes] = None,
                       who: Principal = INSECURE) -> Dict[str, Any]:
        """Credentials for a token.  On an insecure manager everyone is admin and no token is needed."""
        if self.m.curve is None:
            return {"token": "", "expires_at": None, "name": "insecure", "role": "admin", "insecure": True}
        claimed, stored = await self.m.writer.call(auth.credentials, self.m.store, args)
        secret = args.get("password") if claimed.kind == "user" else args.get("secret")
        loop = asyncio.get_running_loop()
        if not isinstance(secret, str) or not await loop.run_in_executor(None, keys.verify_secret, secret, stored):
            raise Unauthenticated("wrong user name or password" if claimed.kind == "user" else "wrong robot secret")
        token, expires = self.m.tokens.issue(claimed, self.m.settings.token_ttl)
        await self.m.writer.call(auth.save_token, self.m.store, token, claimed, expires)
        event(log, logging.INFO, "login", principal=claimed.name, kind=claimed.kind, role=claimed.role)
        return {"token": token, "expires_at": expires, "name": claimed.name, "role": claimed.role}

    def do_whoami(self, args: Dict[str, Any], blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        return {"name": who.name, "role": who.role, "kind": who.kind}

    async def do_users_add(self, args: Dict[str, Any], blob: Optional[bytes] = None,
                           who: Principal = INSECURE) -> Dict[str, Any]:
        return await self.m.writer.call(auth.add_user, self.m.store, _arg(args, "name", str),
                                        _arg(args, "role", str), _arg(args, "password", str))

    async def do_users_remove(self, args: Dict[str, Any], blob: Optional[bytes] = None,
                              who: Principal = INSECURE) -> Dict[str, Any]:
        name = _arg(args, "name", str)
        await self.m.writer.call(auth.remove_user, self.m.store, name)
        self.m.tokens.drop_principal(name, "user")
        return {"name": name}

    async def do_users_list(self, args: Dict[str, Any], blob: Optional[bytes] = None,
                            who: Principal = INSECURE) -> List[Dict[str, Any]]:
        return await self.m.writer.call(auth.list_users, self.m.store)

    async def do_robots_create(self, args: Dict[str, Any], blob: Optional[bytes] = None,
                               who: Principal = INSECURE) -> Dict[str, Any]:
        return await self.m.writer.call(auth.create_robot, self.m.store, _arg(args, "name", str),
                                        _arg(args, "role", str))

    async def do_robots_revoke(self, args: Dict[str, Any], blob: Optional[bytes] = None,
                               who: Principal = INSECURE) -> Dict[str, Any]:
        rid = _arg(args, "id", str)
        await self.m.writer.call(auth.revoke_robot, self.m.store, rid)
        self.m.tokens.drop_principal(rid, "robot")
        return {"id": rid}

    async def do_robots_list(self, args: Dict[str, Any], blob: Optional[bytes] = None,
                             who: Principal = INSECURE) -> List[Dict[str, Any]]:
        return await self.m.writer.call(auth.list_robots, self.m.store)

    async def do_executor_keys_add(self, args: Dict[str, Any], blob: Optional[bytes] = None,
                                   who: Principal = INSECURE) -> Dict[str, Any]:
        public, name = _arg(args, "public", str), _arg(args, "name", str)
        await self.m.writer.call(self.m.store.add_executor_key, public, name, time.time())
        return {"public": public, "name": name}

    async def do_executor_keys_list(self, args: Dict[str, Any], blob: Optional[bytes] = None,
                                    who: Principal = INSECURE) -> List[Dict[str, Any]]:
        return await self.m.writer.call(self.m.store.executor_keys)

    async def do_executor_keys_revoke(self, args: Dict[str, Any], blob: Optional[bytes] = None,
                                      who: Principal = INSECURE) -> Dict[str, Any]:
        key = _arg(args, "key", str)
        if not await self.m.writer.call(self.m.store.remove_executor_key, key):
            raise NotFound(f"no executor key {key!r} on the allow-list", key=key)
        return {"key": key}
