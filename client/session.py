"""``Session``: the user's handle on one job of one application.

Requests are cloudpickled in the caller's thread and travel to an instance as
opaque bytes; responses come back the same way.  The context is encoded as a
msgpack document when it is one (so the mesh can patch it) and cloudpickled
whole otherwise (see docs/context.md).
"""
from __future__ import annotations

import concurrent.futures
import pickle
import time
from typing import Any, Dict, List, Mapping, Optional, Union

import cloudpickle

from mesh.data import patch
from mesh.errors import DeadlineExceeded, InvalidArgument
from mesh.model.resources import Resources
from mesh.wire.protocol import pack, unpack

from .connection import Connection
from .streams import PartStream, StreamBuffer

_PLAIN = frozenset({type(None), bool, int, float, str, bytes})


def _pickle(value: Any, what: str) -> bytes:
    """cloudpickle, with its failures (an open file, a lock, ...) as ``InvalidArgument``.

    Plain data (None, numbers, strings, bytes, and short tuples of them) takes the standard
    pickler: the same bytes cloudpickle would write, in a tenth of the time."""
    t = type(value)
    if t in _PLAIN or t is tuple and len(value) <= 8 and all(type(x) in _PLAIN for x in value):
        return pickle.dumps(value, protocol=cloudpickle.DEFAULT_PROTOCOL)
    try:
        return cloudpickle.dumps(value)
    except Exception as exc:
        raise InvalidArgument(f"{what} cannot be pickled: {type(exc).__name__}: {exc}") from None


def encode_context(value: Any) -> Dict[str, Any]:
    if patch.is_document(value):
        return {"kind": "doc", "context": pack(value)}
    return {"kind": "blob", "context": _pickle(value, "the context")}


def decode_context(kind: str, data: bytes) -> Any:
    return unpack(data) if kind == "doc" else cloudpickle.loads(data)


ResReq = Union[str, Mapping[str, Any], Resources, None]


def session_args(name: Optional[str], session_id: Optional[str], resreq: ResReq,
                 max_instances: Optional[int], who: str = "Session") -> Optional[Dict[str, Any]]:
    """The ``create_session`` arguments of a ``Session(...)`` call, or None when it reopens
    ``session_id`` (no name).  With both, the session is created with that id (Flame's custom
    session ids).  ``resreq`` is checked here, so a typo fails before anything is sent."""
    if name is None and session_id is None:
        raise InvalidArgument(f"{who} takes an application name, session_id=... to reopen a session, or both "
                              "to create one with that id")
    if name is None:
        if resreq is not None or max_instances is not None:
            raise InvalidArgument(f"{who}(session_id=...) reopens a session: resreq and max_instances belong "
                                  "to a new one (give the application name too)")
        return None
    args: Dict[str, Any] = {"application": name,
                            "resreq": Resources.parse(resreq).to_dict() if resreq else None}
    if session_id is not None:
        args["id"] = session_id
    if max_instances is not None:   # this session's own bound (beside its application's)
        args["max_instances"] = max_instances
    return args


class Session:
    """Open a new session of application ``name``, or reopen ``session_id``; with both, create a
    session of ``name`` with the id ``session_id`` (``AlreadyExists`` if the id is taken).

    ``resreq``: each instance's resources, as a mapping (``{"cpu": 2, "memory": "4g"}``) or
    Flame's string (``"cpu=2,mem=4g,gpu=0"``); default: the application's.

    Thread-safe: many threads may submit through one session; all tasks share
    one connection to the manager.
    """

    def __init__(self, name: Optional[str] = None, *, session_id: Optional[str] = None, ctx: Any = None,
                 resreq: ResReq = None, manager: Optional[str] = None,
                 connection: Optional[Connection] = None, auth: Any = None,
                 manager_key: Optional[str] = None, max_instances: Optional[int] = None) -> None:
        args = session_args(name, session_id, resreq, max_instances)
        self._own = connection is None
        self._conn = connection or Connection(manager, manager_key=manager_key, auth=auth)
        try:
            if args is None:
                info = self._conn.call("open_session", {"id": session_id})
            else:
                blob = None
                if ctx is not None:
                    enc = encode_context(ctx)
                    args["kind"], blob = enc["kind"], enc["context"]
                info, _ = self._conn.call_blob("create_session", args, blob)
        except BaseException:
            if self._own:
                self._conn.close()
            raise
        self._id: str = info["id"]
        self.application: str = info["application"]
        self._closed = False

    def id(self) -> str:
        return self._id

    def submit(self, req: Any = None, timeout: Optional[float] = None) -> "concurrent.futures.Future[Any]":
        """Queue one task; the future resolves to the entrypoint's return value or raises its error.

        ``timeout``: seconds each attempt of the task may run once it starts (default: the
        application's ``task_timeout``, else no limit).  Past it the manager stops the instance
        (and its process tree) and retries the task within ``max_retries``; the last attempt's
        timeout fails it with ``DeadlineExceeded``.

        The future is a :class:`client.connection.TaskFuture`: ``result(timeout)`` raises
        ``DeadlineExceeded`` (also a ``TimeoutError``) when the wait runs out; the task keeps running.
        ``cancel()`` only stops this caller waiting (``Client.cancel_task`` cancels a task, queued
        or running)."""
        return self._conn.submit(self._id, _pickle(req, "the request"), cloudpickle.loads, timeout)

    def invoke(self, req: Any = None, timeout: Optional[float] = None) -> Any:
        """Run one task and return its answer; ``DeadlineExceeded`` after ``timeout`` seconds."""
        return self._conn.invoke(self._id, _pickle(req, "the request"), cloudpickle.loads, timeout)

    def stream(self, req: Any = None, timeout: Optional[float] = 30.0) -> PartStream:
        """Run one task of a streaming entrypoint (one that yields) and iterate over its parts as
        they are made, in order (docs/streaming.md).  ``timeout``: seconds to wait for each part
        (``DeadlineExceeded``; the stream goes on).  Leaving the loop early and closing the iterator
        (``close()``, ``with``) stops the remote generator.  An error of the generator is raised after
        the parts made before it.  On an entrypoint that returns, its value is the one part."""
        buf = StreamBuffer(self._id, self._conn.settings.stream_window)
        fut = self._conn.submit(self._id, _pickle(req, "the request"), cloudpickle.loads, stream=buf)
        return PartStream(buf, cloudpickle.loads, timeout, fut)

    def map(self, reqs: Any, timeout: Optional[float] = None) -> List[Any]:
        """Run one task per request and return the answers in request order.

        ``timeout`` bounds the whole call, as in ``concurrent.futures.Executor.map``: if every
        answer is not in within ``timeout`` seconds of the call, ``DeadlineExceeded`` (the tasks
        keep running).  A failed task raises its error when its turn in the order comes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        futs = [self.submit(r) for r in reqs]
        out = []
        for i, f in enumerate(futs):
            try:
                out.append(f.result(None if deadline is None else max(deadline - time.monotonic(), 0.0)))
            except DeadlineExceeded:
                if f.done():
                    raise            # the task's own error, not our wait running out
                unanswered = sum(1 for g in futs[i:] if not g.done())
                raise DeadlineExceeded(f"{unanswered} of {len(futs)} tasks unanswered after {timeout}s "
                                       "(they keep running)", session=self._id, timeout=timeout) from None
        return out

    def context(self) -> Any:
        r = self._conn.call("get_context", {"id": self._id})
        return decode_context(r["kind"], r["data"])

    def update_context(self, value: Any) -> int:
        """Replace the context; returns its new version."""
        enc = encode_context(value)
        result, _ = self._conn.call_blob("write_context", {"id": self._id, "kind": enc["kind"]}, enc["context"])
        return result["version"]

    def patch_context(self, ops: List[Dict[str, Any]]) -> int:
        patch.validate_ops(ops)
        return self._conn.call("write_context", {"id": self._id, "ops": list(ops)})["version"]

    def info(self) -> Dict[str, Any]:
        return self._conn.call("get_session", {"id": self._id})

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._conn.call("close_session", {"id": self._id})
        finally:
            if self._own:
                self._conn.close()

    def detach(self) -> None:
        """Stop using this session here without closing it: it stays open on the manager (others,
        or a later ``Session(session_id=...)``, carry on with it); closes the connection if this
        Session made its own.  Unanswered tasks of this Session are not collected any more."""
        if self._closed:
            return
        self._closed = True
        if self._own:
            self._conn.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session({self._id!r})"
