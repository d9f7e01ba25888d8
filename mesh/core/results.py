"""Results kept as objects: a task's answer that another task will read on its executor.

A client that passes a pending result to another call (the runner's ``ObjectFuture`` as an
argument) asks ``keep_result {cid, tag, key}``: when that task answers, the manager also stores
its answer as an object named ``key`` (a key the client drew: 128 random bits), bound to the
task's session.  The dependent call reads it on its executor with ``get_object {key, wait}``,
which waits (up to ``wait`` seconds, at most ``MAX_OBJECT_WAIT``) for the object to be put.  So
the value goes from executor to executor through the manager, never through the client.

A failed task's kept result is a document ``{"error": <the error's wire form>}``; the reader
raises it.  A task that already answered cannot be kept (``{"kept": false}``): its client has the
value.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Dict, List, Optional

from mesh.core.base import Base
from mesh.core.control import Args, Waiting, _arg
from mesh.errors import InvalidArgument, NotFound
from mesh.model.auth import INSECURE, Principal
from mesh.model.records import OPEN, Task
from mesh.wire.protocol import pack

KEY = re.compile(r"[0-9a-f]{32,64}")
MAX_WAITERS = 10_000   # get_object calls that may wait for objects at once


class ResultRules(Base):
    def do_keep_result(self, args: Args, blob: Optional[bytes] = None, who: Principal = INSECURE) -> Dict[str, Any]:
        cid, tag, key = _arg(args, "cid", str), _arg(args, "tag", int), _arg(args, "key", str)
        if not KEY.fullmatch(key) or key in self.objects.items:
            raise InvalidArgument("a kept result's key is 32 to 64 lowercase hex digits, not in use", argument="key")
        tid = self.by_tag.get((cid, tag))
        t = self.tasks.get(tid) if tid is not None else None
        if t is None:
            return {"kept": False}   # answered already (or unknown): its client has the answer
        s = self.sessions.get(t.sid)
        if s is None or not who.may_touch(s.owner):
            raise NotFound(f"no task {tag} of client {cid}", tag=tag)
        if t.keep is None:
            t.keep = key
        return {"kept": True, "key": t.keep}   # one key per task, whoever asks again

    def keep_answer(self, t: Task, err: Optional[Dict[str, Any]], payload: Any) -> None:
        """Task ``t`` answered and a result was asked to be kept: store it, wake who waits."""
        key = t.keep
        assert key is not None
        s = self.sessions.get(t.sid)
        if s is None or s.state != OPEN:   # its session closed: its objects are gone, and so is this
            self.object_put_failed(key)
            return
        kind, data = ("blob", bytes(payload)) if err is None else ("doc", pack({"error": err}))
        obj = self.objects.put(kind, data, t.sid, None, key=key)
        self.persist_object(obj)
        self.object_put(key)

    # -- get_object {wait} -----------------------------------------------------------------
    def wait_for_object(self, peer: bytes, rid: int, waiting: Waiting) -> None:
        """Park a get_object until its object is put (it is authorized then, like any read)."""
        if sum(len(w) for w in self.object_waiters.values()) >= MAX_WAITERS:
            self.reply(peer, rid, error=NotFound(f"object {waiting.key!r} does not exist (and "
                                                 f"{MAX_WAITERS} reads already wait)", key=waiting.key))
            return
        self.object_waiters.setdefault(waiting.key, []).append((peer, rid, waiting))

    def object_put(self, key: str) -> None:
        """Answer those waiting for ``key`` (it was just put)."""
        for peer, rid, waiting in self.object_waiters.pop(key, []):
            self.answer(peer, rid, "get_object", functools.partial(self.object_reply, waiting.key, waiting.have,
                                                                   waiting.who))

    def object_put_failed(self, key: str) -> None:
        """``key`` will never be put: those waiting for it hear NotFound now."""
        for peer, rid, _ in self.object_waiters.pop(key, []):
            self.reply(peer, rid, error=NotFound(f"object {key!r} will not be put: its session closed", key=key))

    def expire_object_waits(self) -> None:
        for key, waiters in list(self.object_waiters.items()):
            keep: List[Any] = []
            for peer, rid, waiting in waiters:
                if waiting.deadline <= self.now:
                    self.reply(peer, rid, error=NotFound(f"object {key!r} was not put within the wait", key=key))
                else:
                    keep.append((peer, rid, waiting))
            if keep:
                self.object_waiters[key] = keep
            else:
                del self.object_waiters[key]
