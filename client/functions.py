"""The client of stateful functions: send, call, read egress and state.

    from client import Functions
    fx = Functions()                                   # manager from $ZMESH_MANAGER, like Session
    fx.send("example/count", "alice", User("alice"))   # returns once the message is durably accepted
    fx.call("example/count", "alice", User("alice"), timeout=10)   # -> the value passed to context.reply
    for rec in fx.egress("example/greetings", offset=0, timeout=5):  # EgressRecord(offset, message)
        ...
    fx.state("example/count", "alice")                 # -> {"count": 3}

Messages are any cloudpickle-able object.  docs/functions.md states the guarantees.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional

import cloudpickle

from mesh.errors import InvalidArgument
from mesh.model.functions import MAX_CALL_WAIT, check_id, check_typename
from mesh.wire.protocol import unpack

from .api import Page
from .connection import Connection

__all__ = ["Functions", "EgressRecord"]

EGRESS_STEP = 30.0   # seconds one fn_egress asks the manager to wait for a record


@dataclass(frozen=True)
class EgressRecord:
    """One record of an egress: its offset (resume from ``offset + 1``), the message, when."""
    offset: int
    message: Any
    at: float = 0.0


def _pickle(message: Any) -> bytes:
    try:
        return cloudpickle.dumps(message)
    except Exception as exc:
        raise InvalidArgument(f"the message cannot be pickled: {type(exc).__name__}: {exc}") from None


class Functions:
    """A connection to the mesh's stateful functions (one ZeroMQ connection; thread-safe)."""

    def __init__(self, manager: Optional[str] = None, *, auth: Any = None, manager_key: Optional[str] = None,
                 connection: Optional[Connection] = None) -> None:
        self._own = connection is None
        self._conn = connection or Connection(manager, manager_key=manager_key, auth=auth)

    def close(self) -> None:
        if self._own:
            self._conn.close()

    def __enter__(self) -> "Functions":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, typename: str, id: str, message: Any, mid: Optional[str] = None) -> str:
        """Send ``message`` to ``(typename, id)``; returns its message id once the manager has it on
        disk.  ``mid``: your own id, so a resend after an error is not delivered twice while queued."""
        args: Dict[str, Any] = {"type": check_typename(typename), "id": check_id(str(id))}
        if mid is not None:
            args["mid"] = mid
        r, _ = self._conn.call_blob("fn_send", args, _pickle(message))
        return str(r["mid"])

    def call(self, typename: str, id: str, message: Any, timeout: float = 30.0) -> Any:
        """Send and wait for the function's ``context.reply`` (None if it did not reply).  A message
        of a type the function does not take is ``InvalidArgument`` naming the types it takes; an
        exception in the function is its ``TaskFailed``; no reply within ``timeout`` is
        ``DeadlineExceeded`` (the message stays queued and is still delivered)."""
        if not 0 < timeout <= MAX_CALL_WAIT:
            raise InvalidArgument(f"timeout is 0 to {MAX_CALL_WAIT:g} seconds", argument="timeout")
        args = {"type": check_typename(typename), "id": check_id(str(id)), "timeout": float(timeout)}
        r, blob = self._conn.call_blob("fn_call", args, _pickle(message),
                                       timeout=timeout + self._conn.settings.request_timeout)
        return cloudpickle.loads(blob) if r.get("replied") and blob is not None else None

    def egress(self, typename: str, offset: int = 0, timeout: float = 5.0) -> Iterator[EgressRecord]:
        """Records of egress ``typename`` from ``offset`` on, in order; the iterator ends once no new
        record came for ``timeout`` seconds.  Resumable: start again at the last offset + 1."""
        check_typename(typename)
        while True:
            deadline = time.monotonic() + timeout
            got = False
            while not got:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                wait = min(left, EGRESS_STEP)
                r = self._conn.call("fn_egress", {"typename": typename, "offset": offset, "wait": wait},
                                    timeout=wait + self._conn.settings.request_timeout)
                for o, at, kind, rec in r["records"]:
                    got = True
                    offset = o + 1
                    yield EgressRecord(o, unpack(rec) if kind == "doc" else cloudpickle.loads(rec), at)

    def state(self, typename: str, id: str) -> Dict[str, Any]:
        """The address's live state, ``{name: value}`` (read-only: for debugging and admin)."""
        r = self._conn.call("fn_state", {"type": check_typename(typename), "id": check_id(str(id))})
        return {name: cloudpickle.loads(blob) for name, blob in r["state"].items()}

    def list(self, filter: Optional[Mapping[str, Any]] = None, page: Optional[Mapping[str, Any]] = None,
             sort: Optional[Mapping[str, Any]] = None) -> "Page[Dict[str, Any]]":
        """Function types: the application serving each, its instances, the addresses held, queued messages
        (fields type, application, instances, addresses, queued; ``page`` and ``sort`` as in find_sessions)."""
        r = self._conn.call("fn_list", {"filter": dict(filter or {}), "page": dict(page or {}), "sort": dict(sort or {})})
        rows: List[Dict[str, Any]] = list(r["items"])
        return Page(rows, r["total"])
