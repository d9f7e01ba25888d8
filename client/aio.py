"""The asyncio client: ``AsyncSession``, awaitable calls without a thread per call.

    async with AsyncSession("llm") as s:
        r = await s.invoke(Req(...))
        rs = await asyncio.gather(*(s.invoke(Req(i)) for i in range(10_000)))
        async for part in s.stream(Prompt("hi")): ...
        ctx = await s.context()
        async for version, ctx in s.watch_context(): ...

It rides on the same :class:`client.connection.Connection` as ``Session`` (one I/O thread per
connection, whatever the number of calls), so it has the same errors, timeouts, resends after a
manager restart and flow control.  Answers reach the event loop through one
:class:`_Bridge` per loop: the I/O thread queues every finished future and wakes the loop once
per batch (``call_soon_threadsafe``), not once per answer, so 10,000 calls in flight cost about
what their futures cost.  Works under uvloop.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import weakref
from typing import Any, AsyncIterator, Deque, Dict, Iterable, List, Optional, Tuple

import cloudpickle

from mesh.data import patch
from mesh.data.replica import Outcome, Replica
from mesh.errors import DeadlineExceeded, InvalidArgument, MeshError, Unauthenticated

from .connection import Connection, TaskFuture
from .session import ResReq, _pickle, decode_context, encode_context, session_args
from .streams import StreamBuffer

__all__ = ["AsyncSession", "AsyncPartStream"]

WATCH_STEP = 30.0   # seconds one watch_context call asks the manager to wait for a write


class _Bridge:
    """Finished concurrent futures -> asyncio futures of one loop, a batch per loop wake-up."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._done: Deque[Tuple[concurrent.futures.Future, "asyncio.Future[Any]", Any]] = collections.deque()
        self._scheduled = False
        self._lock = threading.Lock()

    def watch(self, fut: concurrent.futures.Future, convert: Any = None) -> "asyncio.Future[Any]":
        afut: "asyncio.Future[Any]" = self.loop.create_future()
        if isinstance(fut, TaskFuture):   # a task: no Condition per future (TaskFuture.when_settled)
            fut.when_settled(lambda f: self._finished(f, afut, convert))
        else:
            fut.add_done_callback(lambda f: self._finished(f, afut, convert))
        return afut

    def _finished(self, fut: concurrent.futures.Future, afut: "asyncio.Future[Any]", convert: Any) -> None:
        self._done.append((fut, afut, convert))   # any thread
        if not self._scheduled:
            with self._lock:
                if not self._scheduled:
                    self._scheduled = True
                    try:
                        self.loop.call_soon_threadsafe(self._drain)
                    except RuntimeError:   # the loop is closed: nobody waits any more
                        self._scheduled = False

    def _drain(self) -> None:
        self._scheduled = False
        done = self._done
        while done:
            fut, afut, convert = done.popleft()
            if afut.done():
                continue   # cancelled by its awaiter
            exc = fut.exception()
            if exc is not None:
                afut.set_exception(exc)
                continue
            try:
                afut.set_result(convert(fut.result()) if convert is not None else fut.result())
            except BaseException as err:  # noqa: B902 (a result class unknown here)
                afut.set_exception(err)


_bridges: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Bridge]" = weakref.WeakKeyDictionary()
_bridges_lock = threading.Lock()


def _bridge() -> _Bridge:
    loop = asyncio.get_running_loop()
    b = _bridges.get(loop)
    if b is None:
        with _bridges_lock:
            b = _bridges.get(loop)
            if b is None:
                b = _bridges[loop] = _Bridge(loop)
    return b


async def _await(fut: "asyncio.Future[Any]", timeout: Optional[float], what: str) -> Any:
    """``fut``'s result, or DeadlineExceeded after ``timeout`` seconds (``fut`` is then cancelled).
    Not ``asyncio.wait_for``: on Python 3.11 it can swallow a cancellation of the awaiting task that
    arrives as ``fut`` completes, and a cancelled consumer would go on (a stream would not stop)."""
    if timeout is None:
        return await fut
    try:
        done, _ = await asyncio.wait({fut}, timeout=timeout)
    finally:
        if not fut.done():
            fut.cancel()
    if not done:
        raise DeadlineExceeded(f"{what}: no answer within {timeout}s", timeout=timeout)
    return fut.result()


class AsyncSession:
    """A session, asyncio-native: ``async with AsyncSession("app") as s`` opens it (or
    ``session_id=`` reopens one, both create one with that id; ``resreq`` as in Session); leaving
    closes it (``detach()`` first to keep it open)."""

    def __init__(self, name: Optional[str] = None, *, session_id: Optional[str] = None, ctx: Any = None,
                 resreq: ResReq = None, manager: Optional[str] = None,
                 connection: Optional[Connection] = None, auth: Any = None, manager_key: Optional[str] = None,
                 max_instances: Optional[int] = None) -> None:
        self._args = session_args(name, session_id, resreq, max_instances, "AsyncSession")
        self._sid, self._ctx = session_id, ctx
        self._own = connection is None
        self._conn = connection or Connection(manager, manager_key=manager_key, auth=auth)
        self._id: Optional[str] = None
        self._closed = False
        self._keep_open = False

    # -- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> "AsyncSession":
        if self._id is not None:
            return self
        if self._args is None:
            info = (await self._call("open_session", {"id": self._sid}))[0]
        else:
            args = dict(self._args)
            blob = None
            if self._ctx is not None:
                enc = encode_context(self._ctx)
                args["kind"], blob = enc["kind"], enc["context"]
            info = (await self._call("create_session", args, blob))[0]
        self._id = info["id"]
        self.application = info["application"]
        return self

    async def __aenter__(self) -> "AsyncSession":
        try:
            return await self.open()
        except BaseException:
            if self._own:
                self._conn.close()
            raise

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def id(self) -> str:
        if self._id is None:
            raise InvalidArgument("the session is not open yet: `async with AsyncSession(...)` or `await s.open()`")
        return self._id

    def detach(self) -> None:
        """Leave the session open on the manager when this object closes."""
        self._keep_open = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._id is not None and not self._keep_open:
                await self._call("close_session", {"id": self._id})
        finally:
            if self._own:
                self._conn.close()

    # -- tasks ------------------------------------------------------------------------------------
    def submit(self, req: Any = None, timeout: Optional[float] = None) -> "asyncio.Future[Any]":
        """Queue one task; an asyncio future of its answer (``timeout``: how long one attempt may run
        on an instance, as ``Session.submit``)."""
        fut = self._conn.submit(self.id(), _pickle(req, "the request"), cloudpickle.loads, timeout)
        return _bridge().watch(fut)

    async def invoke(self, req: Any = None, timeout: Optional[float] = None) -> Any:
        """Run one task and return its answer (on a streaming entrypoint: the list of its parts);
        ``DeadlineExceeded`` if it is not in within ``timeout`` seconds (the task keeps running)."""
        return await _await(self.submit(req), timeout, f"a task of session {self._id}")

    async def map(self, reqs: Iterable[Any], timeout: Optional[float] = None) -> List[Any]:
        """One task per request, the answers in request order; ``timeout`` bounds the whole call."""
        futs = [self.submit(r) for r in reqs]
        return list(await _await(asyncio.gather(*futs), timeout, f"{len(futs)} tasks of session {self._id}"))

    def stream(self, req: Any = None, timeout: Optional[float] = 30.0) -> "AsyncPartStream":
        """``async for part in s.stream(req)``: the parts of a streaming entrypoint as they are made
        (docs/streaming.md).  ``timeout``: seconds to wait for each part.  Breaking out (or
        cancelling the task that iterates) stops the remote generator."""
        buf = StreamBuffer(self.id(), self._conn.settings.stream_window)
        self._conn.submit(self.id(), _pickle(req, "the request"), cloudpickle.loads, stream=buf)
        return AsyncPartStream(buf, timeout)

    # -- context --------------------------------------------------------------------------------------
    async def context(self) -> Any:
        r, _ = await self._call("get_context", {"id": self.id()})
        return decode_context(r["kind"], r["data"])

    async def update_context(self, value: Any) -> int:
        enc = encode_context(value)
        r, _ = await self._call("write_context", {"id": self.id(), "kind": enc["kind"]}, enc["context"])
        return int(r["version"])

    async def patch_context(self, ops: List[Dict[str, Any]]) -> int:
        patch.validate_ops(ops)
        r, _ = await self._call("write_context", {"id": self.id(), "ops": list(ops)})
        return int(r["version"])

    async def watch_context(self, timeout: Optional[float] = None) -> AsyncIterator[Tuple[int, Any]]:
        """Every version of the context, in order, from the current one: ``(version, value)``, each
        write applied here as the patch it was (a private copy each time).  A watcher that falls more
        than 256 writes behind gets the whole value at the newest version (the versions between are
        skipped).  ``timeout``: stop after that many seconds without a write (None: watch until
        the loop breaks)."""
        r, _ = await self._call("get_context", {"id": self.id(), "watch": True})   # the writes from here are kept
        replica = Replica.from_wire(r["kind"], r["data"], r["version"])
        yield replica.version, _value(replica)
        idle = 0.0
        while True:
            step = WATCH_STEP if timeout is None else min(WATCH_STEP, timeout - idle)
            if step <= 0:
                return
            r, data = await self._call("get_context", {"id": self.id(), "have": replica.version, "wait": step},
                                       timeout=step + self._conn.settings.request_timeout)
            if r["version"] <= replica.version:
                idle += step
                continue
            idle = 0.0
            if r["mode"] == "patches":
                for version, ops in r["patches"]:
                    if replica.receive(version, ops, None) is Outcome.APPLIED:
                        yield version, _value(replica)
            else:
                replica.restore(r["kind"], r["version"], r["data"])
                yield replica.version, _value(replica)

    async def info(self) -> Dict[str, Any]:
        return (await self._call("get_session", {"id": self.id()}))[0]

    async def _call(self, method: str, args: Dict[str, Any], blob: Optional[bytes] = None,
                    timeout: Optional[float] = None) -> Tuple[Any, Optional[bytes]]:
        conn = self._conn
        if conn.auth is not None and conn.needs_login():   # a login blocks: not on the event loop
            await asyncio.get_running_loop().run_in_executor(None, conn.login_if_due)
        try:
            return await _bridge().watch(conn.call_future(method, args, blob, timeout))   # settled by its deadline
        except Unauthenticated:
            if conn.auth is None:
                raise
            await asyncio.get_running_loop().run_in_executor(None, conn.relogin)   # revoked or expired: as Session
            return await _bridge().watch(conn.call_future(method, args, blob, timeout))

    def __repr__(self) -> str:
        return f"<AsyncSession {self._id or self._sid or self._args and self._args['application']}>"


def _value(replica: Replica) -> Any:
    if replica.kind == "doc":
        return patch.copy_document(replica.value)
    return cloudpickle.loads(replica.value)


class AsyncPartStream:
    """``async for part in stream``: one stream's parts; ``await stream.aclose()`` stops it."""

    def __init__(self, buffer: StreamBuffer, timeout: Optional[float]) -> None:
        self._buf, self._timeout = buffer, timeout
        self._done = False
        self._event: Optional[asyncio.Event] = None

    def __aiter__(self) -> "AsyncPartStream":
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        if self._event is None:
            loop = asyncio.get_running_loop()
            event = self._event = asyncio.Event()
            def wake() -> None:   # any thread
                if not loop.is_closed():
                    loop.call_soon_threadsafe(event.set)
            self._buf.wake = wake
        try:
            while True:
                self._event.clear()
                ready, more, frame = self._buf.poll()
                if ready:
                    break
                try:
                    await _await(asyncio.ensure_future(self._event.wait()), self._timeout, "a stream")
                except DeadlineExceeded:
                    raise DeadlineExceeded(f"no part of the stream within {self._timeout}s ({self._buf.taken} "
                                           f"taken; the stream goes on)", timeout=self._timeout) from None
        except MeshError:
            self._done = True
            raise
        except asyncio.CancelledError:   # the task iterating was cancelled: so is the stream
            await self.aclose()
            raise
        if not more:
            self._done = True
            raise StopAsyncIteration
        return cloudpickle.loads(frame)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._buf.cancel()

    async def __aenter__(self) -> "AsyncPartStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if not self._done:
            try:
                self._buf.cancel()
            except Exception:
                pass

