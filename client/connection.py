"""One DEALER connection to the manager, shared safely by many threads.

ZeroMQ sockets are not thread-safe, so one I/O thread owns the socket.  Caller
threads append to a queue and wake the I/O thread through a pipe (at most one
wake-up byte per batch).  The I/O thread drains the queue into as few messages
as possible (all submits of one session go out as one SUBMIT), drains every
received message per wake-up, and resolves ``concurrent.futures.Future``s.

What is guaranteed to a caller: nothing here waits without a deadline.  A
malformed endpoint fails the constructor at once (``InvalidArgument``); if the
I/O thread dies, every pending call and task and every later one fails with
``Unavailable`` naming the cause; a control call never waits much past its
``timeout``; a task future's ``result(timeout)`` raises ``DeadlineExceeded``.

A caller's mistake costs only that call: every request is checked and encoded in
the caller's thread (a value msgpack cannot encode, a non-str session id or a
non-bytes payload is ``InvalidArgument``; a request over ``max_message_size`` is
``ResourceExhausted``), so the I/O thread only ever sends bytes and keeps serving
the calls and tasks in flight (docs/reliability.md, "Caller errors never cost the
connection").
"""
from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures._base as _futures
import errno
import itertools
import logging
import os
import secrets
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import zmq

from mesh.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MeshError,
    ProtocolError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_wire,
)
from mesh.ops import keys
from mesh.ops.config import Settings, default_manager
from mesh.wire import transport
from mesh.wire.protocol import (Cmd, Message, Reply, Request, StreamCredit, Submit, decode, encode, pack,
                                stream_end_count)

from . import auth as client_auth
from .streams import StreamBuffer, decode_all

log = logging.getLogger("zeromesh.client")

MAX_BATCH = 1024  # tasks per SUBMIT message
START_TIMEOUT = 10.0
"""Seconds the constructor waits for the I/O thread to open its socket (it takes milliseconds)."""
CALL_GRACE = 5.0
"""Seconds a control call waits past its own timeout for the I/O thread to expire it; beyond that
the I/O thread is stuck and the caller gets ``Unavailable`` by itself."""
WINDOW_POLL = 0.5
SYNC_BUDGET = 1.0   # seconds an invoke waits for its answer on its own socket before the I/O thread takes over
"""Seconds between liveness checks while submit() waits for room in the in-flight window."""
# connect() errors that mean the endpoint itself is wrong, not that the manager is away
_BAD_ENDPOINT = {errno.EINVAL, errno.EPROTONOSUPPORT, errno.ENAMETOOLONG, errno.ENODEV,
                 getattr(zmq, "ENOCOMPATPROTO", -1)}


def check_endpoint(endpoint: Any) -> str:
    """A cheap syntax check before any socket exists: a non-empty string ``TRANSPORT://ADDRESS``.
    ZeroMQ's own ``connect()`` is the full check (done by the I/O thread, reported by the constructor)."""
    if not isinstance(endpoint, str) or "://" not in endpoint or endpoint.endswith("://"):
        raise InvalidArgument(f"malformed manager endpoint {endpoint!r}: expected tcp://HOST:PORT or ipc://PATH",
                              endpoint=str(endpoint))
    return endpoint


_LAZY = threading.Lock()   # orders a task future's first waiter against its settling (see TaskFuture)
_DONE = frozenset({_futures.CANCELLED, _futures.CANCELLED_AND_NOTIFIED, _futures.FINISHED})


class TaskFuture(concurrent.futures.Future):
    """The future of one task.  ``result(timeout)`` and ``exception(timeout)`` raise
    ``DeadlineExceeded`` (also a ``TimeoutError``) when the wait runs out; the task keeps running.

    A ``concurrent.futures.Future`` in every way, but for when its ``threading.Condition`` is
    made: only once a thread must wait on it, watch it or be called back (a Condition per task
    was a third of the submitting thread's time, and most answers arrive before anyone waits).
    ``_LAZY`` makes "first observer creates the Condition" and "settled without one" exclusive,
    so a waiter either finds the result or is woken by it."""

    session: str = ""
    window: Optional["Window"] = None   # the connection's window, until the answer arrives
    tag: int = 0                        # its name on this connection: (client id, tag)

    def __init__(self) -> None:   # the base class's, without the Condition
        self._cond: Optional[threading.Condition] = None
        self._on_settle: Optional[Callable[["TaskFuture"], None]] = None
        self._state = _futures.PENDING
        self._result: Any = None
        self._exception: Optional[BaseException] = None
        self._waiters: List[Any] = []
        self._done_callbacks: List[Any] = []

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            with _LAZY:
                if self._cond is None:
                    self._cond = threading.Condition()
                cond = self._cond
        return cond

    def done(self) -> bool:
        return self._state in _DONE   # a settled future never becomes pending again

    def _settle_quietly(self, result: Any, exc: Optional[BaseException]) -> bool:
        """Settle without a Condition if nobody has observed this future yet; False otherwise."""
        with _LAZY:
            if self._cond is not None:
                return False
            if self._state in _DONE:   # (no repr here: it would take the Condition, under _LAZY)
                raise concurrent.futures.InvalidStateError(f"this task's future is already {self._state.lower()}")
            self._result, self._exception = result, exc
            self._state = _futures.FINISHED
            callback, self._on_settle = self._on_settle, None
        if callback is not None:
            callback(self)
        return True

    def when_settled(self, fn: Callable[["TaskFuture"], None]) -> None:
        """Call ``fn(self)`` once settled (now, if it is), from the settling thread, without the
        Condition a done-callback costs (``AsyncSession`` watches every task this way)."""
        with _LAZY:
            if self._cond is None and self._state not in _DONE:
                self._on_settle = fn
                return
        self.add_done_callback(lambda _: fn(self))   # observed already, or settled: the ordinary way

    def set_result(self, result: Any) -> None:
        if not self._settle_quietly(result, None):
            super().set_result(result)
            self._settled_loudly()

    def set_exception(self, exception: Optional[BaseException]) -> None:
        if not self._settle_quietly(None, exception):
            super().set_exception(exception)
            self._settled_loudly()

    def _settled_loudly(self) -> None:
        """Settled through the Condition (someone observed it after ``when_settled``): call back too."""
        with _LAZY:
            callback, self._on_settle = self._on_settle, None
        if callback is not None:
            callback(self)

    def result(self, timeout: Optional[float] = None) -> Any:
        if self._state == _futures.FINISHED:   # answered already: no Condition needed to read it
            if self._exception is not None:
                raise self._exception
            return self._result
        try:
            return super().result(timeout)
        except concurrent.futures.TimeoutError as exc:
            raise self._deadline(exc, timeout) from None

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        if self._state == _futures.FINISHED:
            return self._exception
        try:
            return super().exception(timeout)
        except concurrent.futures.TimeoutError as exc:
            raise self._deadline(exc, timeout) from None

    def _deadline(self, exc: BaseException, timeout: Optional[float]) -> BaseException:
        if isinstance(exc, MeshError):
            return exc               # the task's own outcome, not our wait running out
        return DeadlineExceeded(f"no answer within {timeout}s from a task of session {self.session} "
                                "(the task keeps running)", session=self.session, timeout=timeout)


class Window:
    """At most ``size`` tasks of a connection awaiting answers (``max_inflight``).

    A plain counter under a C lock: a ``threading.Semaphore`` (pure Python in CPython) cost a
    fifth of the submitting thread's time.  ``take`` blocks while the window is full, in
    ``WINDOW_POLL`` steps that call ``alive`` (which raises once the connection is dead)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._lock = threading.Lock()
        self._room = threading.Event()
        self._room.set()

    def take(self, alive: Callable[[], None]) -> None:
        while True:
            with self._lock:
                if self.used < self.size:
                    self.used += 1
                    return
                self._room.clear()
            if not self._room.wait(WINDOW_POLL):
                alive()

    def give(self, n: int = 1) -> None:
        with self._lock:
            self.used -= n
            if not self._room.is_set():
                self._room.set()


def _resolve(fut: concurrent.futures.Future, result: Any = None, exc: Optional[BaseException] = None) -> None:
    """Resolve ``fut`` unless it is done already: a caller may have cancelled a task's future
    (it stops waiting; the answer is dropped), and that must never kill the I/O thread.
    Nor may a caller's done-callback: the base class logs an ``Exception`` from one, and a
    ``BaseException`` (``SystemExit``) is logged here instead of ending the thread."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
    except BaseException:   # noqa: B902 (from a caller's done-callback; the future is settled)
        log.exception("a done-callback of a future raised; ignored")


def _settle(fut: concurrent.futures.Future, result: Any = None, exc: Optional[BaseException] = None) -> None:
    """:func:`_resolve`, and a task's place in the window given back, once, when its answer
    (or failure) arrives."""
    _resolve(fut, result, exc)
    window = getattr(fut, "window", None)
    if window is not None:
        fut.window = None   # type: ignore[attr-defined]
        window.give()


def _messages(sock: zmq.Socket, limit: int) -> Iterator[Message]:
    """The messages waiting on ``sock`` (at most ``limit``), decoded; a malformed one is logged
    and skipped (the manager never sends one; a bug must not stop the reader)."""
    for _ in range(limit):
        frames = transport.recv(sock)
        if frames is None:
            return
        try:
            yield decode(frames)
        except ProtocolError as exc:
            log.warning("bad message from manager: %s", exc)


_BYTES = (bytes, bytearray, memoryview)


def _nbytes(frame: Any) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def _sendable(frame: Any) -> bool:
    """bytes, a bytearray or a contiguous memoryview: what a ZeroMQ frame is sent from."""
    return isinstance(frame, _BYTES) and (not isinstance(frame, memoryview) or frame.contiguous)


def _unpackable(value: Any, path: str, depth: int = 0) -> Optional[Tuple[str, str]]:
    """(path, why) of the first part of ``value`` msgpack cannot encode, or None: the error
    names the argument (``filter.created_at[1]``), not only msgpack's terse reason."""
    try:
        pack(value)
        return None
    except (TypeError, ValueError, OverflowError) as exc:
        why = f"{type(value).__name__}: {exc}"
    if depth < 32:
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    return f"{path}[{k!r}]", f"a map key must be a str, not {type(k).__name__}"
                found = _unpackable(v, f"{path}.{k}" if path else k, depth + 1)
                if found:
                    return found
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                found = _unpackable(v, f"{path}[{i}]", depth + 1)
                if found:
                    return found
    if isinstance(value, int) and not isinstance(value, bool):
        why = f"int {value} is outside msgpack's range (-2**63 .. 2**64-1)"
    return path or "(the arguments)", why


def _request_frames(method: Any, rid: int, args: Any, token: Optional[str], blob: Any,
                    max_size: int) -> List[Any]:
    """The frames of one control call, encoded in the caller's thread (docs/reliability.md,
    "Caller errors never cost the connection"): a value msgpack cannot encode is the caller's
    ``InvalidArgument`` naming the method and the argument, a request over ``max_size`` bytes is
    ``ResourceExhausted`` naming ``max_message_size``; the I/O thread only sends bytes."""
    if not isinstance(method, str) or not method:
        raise InvalidArgument(f"a control call's method is a non-empty str, not {method!r}", method=str(method))
    if not isinstance(args, dict):
        raise InvalidArgument(f"the arguments of {method!r} are a dict, not {type(args).__name__}", method=method)
    if blob is not None and not _sendable(blob):
        raise InvalidArgument(f"the data frame of {method!r} is bytes, not {type(blob).__name__}",
                              method=method, argument="blob")
    try:
        frames = encode(Request(rid, method, args, token, blob is not None), [] if blob is None else [blob])
    except (TypeError, ValueError, OverflowError) as exc:
        path, why = _unpackable(args, "") or ("(the arguments)", f"{type(exc).__name__}: {exc}")
        raise InvalidArgument(f"the arguments of {method!r} cannot be sent: argument {path!r} cannot be "
                              f"encoded as msgpack: {why}", method=method, argument=path) from None
    size = sum(_nbytes(f) for f in frames)
    if size > max_size:
        raise ResourceExhausted(f"the {method!r} request is {size} bytes, over max_message_size ({max_size}): "
                                "the manager would drop it unanswered", limit="max_message_size",
                                size=size, max=max_size, method=method)
    return frames


def _check_task(sid: Any, payload: Any, decode_result: Any, max_size: int) -> None:
    """What submit and invoke accept, checked in the caller's thread (the I/O thread must never
    meet a value it cannot send): a str session id, a bytes payload within ``max_size``, a
    callable decoder."""
    if not isinstance(sid, str) or not sid:
        raise InvalidArgument(f"a session id is a non-empty str, not {sid!r}", argument="session")
    if not _sendable(payload):
        raise InvalidArgument(f"a task's payload is bytes, not {type(payload).__name__}", argument="payload")
    if not callable(decode_result):
        raise InvalidArgument(f"decode_result is a callable, not {type(decode_result).__name__}",
                              argument="decode_result")
    size = _nbytes(payload)
    if size > max_size:
        raise ResourceExhausted(f"request of {size} bytes exceeds max_message_size ({max_size})",
                                limit="max_message_size", size=size, max=max_size)


def _check_timeout(timeout: Any) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise InvalidArgument(f"a task's timeout is a positive number of seconds, not {timeout!r}",
                              argument="timeout")
    return float(timeout)


def _fresh(exc: MeshError) -> MeshError:
    """A new instance of ``exc`` for one more raiser (one instance raised by many threads
    would pile their tracebacks onto each other)."""
    new = type(exc)(exc.message)
    new.details = dict(exc.details)
    return new


class Connection:
    def __init__(self, manager: Optional[str] = None, settings: Optional[Settings] = None,
                 manager_key: Optional[str] = None, auth: Optional[client_auth.Auth] = None,
                 token: Optional[str] = None, plain: bool = False) -> None:
        """``manager_key``: the manager's public key file (default ``$ZMESH_MANAGER_KEY``) for a secured
        mesh; this connection then uses a fresh CURVE keypair of its own.  ``auth``: credentials
        (see client.auth), exchanged for a token that this connection renews by itself.
        ``plain``: no CURVE whatever the environment says (the executor's local ipc object cache,
        which passes the token on to the manager)."""
        self.manager = check_endpoint(default_manager() if manager is None else manager)
        if token is not None and not isinstance(token, str):   # it goes into every SUBMIT the I/O thread sends
            raise InvalidArgument(f"a token is a str, not {type(token).__name__}", argument="token")
        self.auth = auth or client_auth.from_env()
        self._renew_at: Optional[float] = None       # when to log in again (half the token's life)
        self._auth_lock = threading.Lock()
        try:
            self.settings = settings or Settings.load()
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"a ZMESH_* setting in the environment is malformed: {exc}") from None
        key_file = None if plain else manager_key or os.environ.get("ZMESH_MANAGER_KEY")
        self._curve = (keys.load_public(key_file), *keys.ephemeral()) if key_file else None
        # a stored token is found by the manager's public key first, whatever its address (client/auth.py)
        self._token = token or os.environ.get("ZMESH_TOKEN") or (
            None if self.auth else client_auth.stored_token(self.manager, self._curve[0] if self._curve else None))
        self._out: Deque[Tuple[Any, ...]] = collections.deque()
        # rid -> (future, deadline, method); no future for our own liveness pings
        self._calls: Dict[int, Tuple[Optional[concurrent.futures.Future], float, str]] = {}
        # tag -> (future, result decoder, session, payload, timeout): the payload is kept until the
        # answer arrives, so the task can be resent to a manager that restarted (docs/reliability.md)
        self._tasks: Dict[int, Tuple[TaskFuture, Callable[[bytes], Any], str, Any, Optional[float]]] = {}
        self._streams: Dict[int, StreamBuffer] = {}   # tag -> the parts of a streaming task (client/streams.py)
        self.client_id = secrets.token_hex(8)
        self._window = Window(self.settings.max_inflight)
        self._boot: Optional[str] = None
        self._last_ping = 0.0
        self._last_answer = time.monotonic()
        self._rids = itertools.count(1)
        self._tags = itertools.count(1)
        # invoke's own socket: one task, sent and answered in the caller's thread (no hand-off)
        self._direct: Optional[zmq.Socket] = None
        self._direct_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._closed = False
        # set once, by the I/O thread, before it fails what is pending: every later call raises it
        self._failure: Optional[MeshError] = None
        self._ctx: zmq.Context = zmq.Context.instance()
        self._thread = threading.Thread(target=self._io, name="zmesh-io", daemon=True)
        self._started = threading.Event()
        self._thread.start()
        if not self._started.wait(START_TIMEOUT):
            self._failure = Unavailable(f"the client's I/O thread did not start within {START_TIMEOUT}s")
        if self._failure is not None:
            failure = self._failure
            self.close()
            raise _fresh(failure)

    # -- caller side (any thread) --------------------------------------------------
    def call(self, method: str, args: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None) -> Any:
        """A control call; raises the manager's typed error, or Unavailable on silence."""
        return self.call_blob(method, args, timeout=timeout)[0]

    def call_blob(self, method: str, args: Optional[Dict[str, Any]] = None, blob: Optional[Any] = None,
                  timeout: Optional[float] = None) -> Tuple[Any, Optional[bytes]]:
        """A control call whose bulk data travels as its own frame both ways: (result, blob or None)."""
        self._ensure_token()
        try:
            return self._call(method, args, blob, timeout)
        except Unauthenticated:
            if self.auth is None:
                raise
            self._login(force=True)      # our token was revoked, expired, or forgotten
            return self._call(method, args, blob, timeout)

    def call_future(self, method: str, args: Optional[Dict[str, Any]] = None, blob: Optional[Any] = None,
                    timeout: Optional[float] = None) -> "concurrent.futures.Future[Tuple[Any, Optional[bytes]]]":
        """A control call without waiting (``AsyncSession``): a future of (result, blob) that the I/O
        thread settles, with ``Unavailable`` if no answer comes within ``timeout`` (the request
        timeout by default).  Encoding errors raise here, before anything is sent."""
        self._ensure_token()
        return self._start_call(method, args, blob, timeout)[0]

    def _start_call(self, method: str, args: Optional[Dict[str, Any]], blob: Optional[Any],
                    timeout: Optional[float]) -> Tuple["concurrent.futures.Future[Any]", float]:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        limit = self.settings.request_timeout if timeout is None else timeout
        rid = next(self._rids)
        token = self._token if self._token and method != "login" else None
        frames = _request_frames(method, rid, {} if args is None else args, token, blob,
                                 self.settings.max_message_size)
        self._push(("call", fut, rid, method, frames, time.monotonic() + limit))
        return fut, limit

    def _call(self, method: str, args: Optional[Dict[str, Any]], blob: Optional[Any],
              timeout: Optional[float]) -> Tuple[Any, Optional[bytes]]:
        fut, limit = self._start_call(method, args, blob, timeout)
        try:
            return fut.result(max(limit, 0.0) + CALL_GRACE)
        except concurrent.futures.TimeoutError as exc:
            if isinstance(exc, MeshError):
                raise                # the manager's own DeadlineExceeded
            self._check_alive()
            raise Unavailable(f"no answer to {method!r} from {self.manager} in {limit}s, and the client's I/O "
                              "thread did not time it out (is it stuck?)", manager=self.manager,
                              method=method) from None

    def needs_login(self) -> bool:
        """Is a (re)login due before the next call (``AsyncSession`` does it off its event loop)?"""
        return self.auth is not None and (self._renew_at is None or time.time() >= self._renew_at)

    def login_if_due(self) -> None:
        self._ensure_token()

    def relogin(self) -> None:
        self._login(force=True)

    @property
    def manager_public(self) -> Optional[bytes]:
        """The manager's CURVE public key (z85) on a secured mesh, else None: its identity."""
        return self._curve[0] if self._curve else None

    def _ensure_token(self) -> None:
        if self.auth is not None and (self._renew_at is None or time.time() >= self._renew_at):
            self._login()

    def _login(self, force: bool = False) -> None:
        """Trade the credentials for a token; renew at half its life (any thread; one at a time)."""
        assert self.auth is not None
        with self._auth_lock:
            if not force and self._renew_at is not None and time.time() < self._renew_at:
                return           # another thread just did
            r, _ = self._call("login", self.auth.credentials(), None, None)
            self._token = r["token"] or None
            expires = r.get("expires_at")
            now = time.time()
            self._renew_at = float("inf") if expires is None else now + (expires - now) / 2

    def whoami(self) -> Dict[str, Any]:
        return self.call("whoami")

    def submit(self, sid: str, payload: bytes, decode_result: Callable[[bytes], Any],
               timeout: Optional[float] = None, stream: Optional[StreamBuffer] = None) -> concurrent.futures.Future:
        """Queue one task.  Blocks while ``max_inflight`` tasks of this connection await answers:
        a client that submits faster than the mesh drains is slowed, not dropped.
        ``timeout``: seconds each attempt may run on an instance before the manager stops it
        (``DeadlineExceeded`` once out of retries); None: the application's ``task_timeout``.
        A bad argument is ``InvalidArgument`` here, an oversized payload ``ResourceExhausted``."""
        _check_task(sid, payload, decode_result, self.settings.max_message_size)
        timeout = _check_timeout(timeout)
        self._ensure_token()
        fut = TaskFuture()
        fut.session = sid
        self._window.take(self._check_alive)   # a dead I/O thread resolves nothing: no waiting forever
        fut.window = self._window
        try:
            fut.tag = next(self._tags)   # (cid, tag) names the task on the manager (keep_result, resends)
            if stream is not None:       # its parts go to this buffer; its consumer's credit goes out
                tag = stream.tag = fut.tag
                stream.credit = lambda upto: self._push(("credit", sid, tag, upto))
                self._streams[tag] = stream
            self._push(("task", fut, sid, payload, decode_result, timeout))
        except BaseException:
            _settle(fut, exc=Unavailable("the task was not queued"))   # gives its place back
            raise
        return fut

    def invoke(self, sid: str, payload: bytes, decode_result: Callable[[Any], Any],
               timeout: Optional[float] = None) -> Any:
        """Run one task and return its answer, ``DeadlineExceeded`` after ``timeout`` seconds.

        The latency path: the caller's own thread sends the task on the connection's second
        socket and waits for its answer there, instead of handing the task to the I/O thread and
        the answer back (two thread wake-ups, about a fifth of a round trip).  Only one thread at
        a time goes this way (others use :meth:`submit`), and only for ``SYNC_BUDGET`` seconds:
        a task not answered by then is handed to the I/O thread (a resend, which re-attaches it),
        whose resends and restart detection then cover it like any other."""
        _check_task(sid, payload, decode_result, self.settings.max_message_size)
        if not self._direct_lock.acquire(blocking=False):
            return self.submit(sid, payload, decode_result).result(timeout)
        try:
            return self._invoke_direct(sid, payload, decode_result, timeout)
        finally:
            self._direct_lock.release()

    def _invoke_direct(self, sid: str, payload: bytes, decode_result: Callable[[Any], Any],
                       timeout: Optional[float]) -> Any:
        self._check_alive()
        self._ensure_token()
        sock = self._direct_socket()
        self._window.take(self._check_alive)
        tag = next(self._tags)
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        answered = False
        parts: List[Any] = []   # a streaming entrypoint's parts: its answer is all of them
        heard = start            # when the direct socket last had something
        try:
            transport.send(sock, encode(self._submit(sid, [tag], False), [payload]), flags=0)
            until = start + SYNC_BUDGET if deadline is None else min(deadline, start + SYNC_BUDGET)
            while True:
                left = (until if not parts else deadline if deadline is not None else time.monotonic() + 1.0) \
                    - time.monotonic()   # a stream under way stays on this socket until its end
                if left <= 0:
                    break
                if not sock.poll(int(min(left, 0.05) * 1000) + 1):
                    self._check_alive()
                    if parts and time.monotonic() - heard > self.settings.resend_after:
                        answered = True   # a stream gone silent (its manager restarted?): not picked up again
                        self._window.give()
                        raise Unavailable(f"the stream went silent for {self.settings.resend_after:g}s after "
                                          f"{len(parts)} parts", session=sid, parts=len(parts))
                    continue
                heard = time.monotonic()
                answer = self._direct_answer(sock, sid, tag, parts)
                if answer is not None:
                    answered = True
                    self._window.give()
                    err, out = answer
                    if err is not None:
                        raise from_wire(err)
                    count = stream_end_count(out)
                    if count is not None:   # a stream's end: every part must be here
                        if count != len(parts):
                            raise Unavailable(f"the stream ended after {count} parts and {len(parts)} arrived",
                                              parts=len(parts))
                        return [decode_result(p) for p in parts]
                    return decode_result(out)
            if parts:   # the caller's deadline, mid-stream: the stream is stopped
                answered = True
                self._window.give()
                transport.send(sock, encode(StreamCredit(sid, self.client_id, [(tag, -1)])), flags=0)
                raise DeadlineExceeded(f"the stream did not end within {timeout}s ({len(parts)} parts arrived; "
                                       f"it was stopped)", session=sid, timeout=timeout, parts=len(parts))
        finally:
            if not answered:   # still in flight: the I/O thread takes it over (and its place in the window)
                fut = TaskFuture()
                fut.session, fut.window = sid, self._window
                self._push(("adopt", fut, sid, tag, payload, decode_result))
        if deadline is not None and not fut.done():
            concurrent.futures.wait([fut], max(deadline - time.monotonic(), 0.0))
            if not fut.done():   # the caller's whole timeout, not what was left of it, in the error
                raise fut._deadline(concurrent.futures.TimeoutError(), timeout)
        return fut.result()

    def _direct_socket(self) -> zmq.Socket:
        if self._direct is None:
            self._direct = transport.dealer(self.manager, ctx=self._ctx, curve=self._curve)
        return self._direct

    def _direct_answer(self, sock: zmq.Socket, sid: str, tag: int,
                       parts: List[Any]) -> Optional[Tuple[Optional[Dict[str, Any]], Any]]:
        """Read what the direct socket holds; (error, output) if the answer to ``tag`` is among it.
        Parts of ``tag``'s stream go to ``parts`` (credit granted as they come).  Anything else
        there is stale (answers to tasks handed over to the I/O thread) and dropped."""
        window = self.settings.stream_window
        for msg in _messages(sock, 1000):
            if msg.cmd is Cmd.RESULT:
                for (t, err), out in zip(msg.header.outcomes, msg.payloads):
                    if t == tag:
                        return err, out
            elif msg.cmd is Cmd.STREAM:
                for (t, seq), frame in zip(msg.header.items, msg.payloads):
                    if t == tag and seq == len(parts):
                        parts.append(bytes(frame))
                        if window and len(parts) % (window // 2 or 1) == 0:
                            transport.send(sock, encode(StreamCredit(sid, self.client_id,
                                                                     [(tag, len(parts) + window)])), flags=0)
        return None

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise _fresh(self._failure)
        if self._closed:
            raise Unavailable("this connection is closed")

    def _push(self, item: Tuple[Any, ...]) -> None:
        self._check_alive()
        self._out.append(item)
        if self._failure is not None:
            # the I/O thread died after our check and may have drained the queue before our
            # append: fail what is left ourselves (the failure is set before that drain)
            self._drain_out(self._failure)
            return
        if not self._wake_pending:
            with self._wake_lock:
                if not self._wake_pending:
                    self._wake_pending = True
                    os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Stop the I/O thread (bounded wait) and fail whatever is still pending with ``Unavailable``."""
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        self._thread.join(START_TIMEOUT)
        with self._direct_lock:   # after any direct invoke (its polls notice the close within 50 ms)
            if self._direct is not None:
                self._direct.close(linger=0)
                self._direct = None
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- I/O thread ---------------------------------------------------------------------
    def _open(self) -> zmq.Socket:
        """The DEALER socket, with ZeroMQ's errors mapped: a wrong endpoint is ``InvalidArgument``."""
        try:
            return transport.dealer(self.manager, ctx=self._ctx, curve=self._curve)
        except zmq.ZMQError as exc:
            if exc.errno in _BAD_ENDPOINT:
                raise InvalidArgument(f"cannot connect to manager endpoint {self.manager!r}: {exc.strerror}",
                                      endpoint=self.manager) from None
            raise Unavailable(f"cannot open a socket to {self.manager!r}: {exc.strerror}",
                              endpoint=self.manager) from None

    def _io(self) -> None:
        try:
            sock = self._open()
        except BaseException as exc:
            self._failure = exc if isinstance(exc, MeshError) else Unavailable(
                f"the client's I/O thread could not start: {type(exc).__name__}: {exc}")
            self._started.set()
            return
        self._started.set()
        failure: MeshError = Unavailable("the connection to the manager was closed")
        try:
            self._loop(sock)
        except BaseException as exc:
            log.error("the client's I/O thread died", exc_info=True)
            failure = Unavailable(f"the client's I/O thread died: {type(exc).__name__}: {exc}",
                                  manager=self.manager)
        finally:
            self._failure = failure  # before the drain below: see _push
            sock.close(linger=0)
            self._fail_all(failure)

    def _loop(self, sock: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        # a wrong manager key fails the CURVE handshake: say so at once, not "did not answer" later
        watch = transport.HandshakeWatch(sock) if self._curve else None
        if watch is not None:
            poller.register(watch.sock, zmq.POLLIN)
        try:
            self._loop_on(sock, poller, watch)
        finally:
            if watch is not None:
                watch.close()

    def _loop_on(self, sock: zmq.Socket, poller: zmq.Poller, watch: Optional[transport.HandshakeWatch]) -> None:
        rejected: Optional[Unavailable] = None
        while not self._closed:
            poller.poll(timeout=100 if (self._calls or self._tasks) else 500)
            if watch is not None:
                for kind, _, _ in watch.poll():
                    if kind == "succeeded":
                        rejected = None
                    elif kind in transport.HANDSHAKE_FAILED.values():
                        rejected = Unavailable(transport.rejected_message(self.manager), manager=self.manager,
                                               reason="curve_handshake")
                if rejected is not None and (self._calls or self._tasks or self._out):
                    self._fail_all(rejected)   # until a handshake succeeds, nothing would ever be delivered
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
            self._wake_pending = False
            self._send_queued(sock)
            self._receive(sock)
            if self._tasks:
                now = time.monotonic()
                if now - self._last_ping >= self.settings.heartbeat_interval:
                    self._ping(sock)
                if now - self._last_answer >= self.settings.resend_after:
                    # answers may have been kept for us (we were too slow to read): ask again
                    self._resend(sock, "no answer for %.0fs" % (now - self._last_answer))
            if self._calls:
                self._expire_calls()

    def _send_queued(self, sock: zmq.Socket) -> None:
        out = self._out
        batches: Dict[Tuple[str, Optional[float]], Tuple[List[int], List[Any]]] = {}
        while out:
            item = out.popleft()
            if item[0] == "adopt":   # a direct invoke's task that outlived its budget
                _, fut, sid, tag, payload, decode_result = item
                self._tasks[tag] = (fut, decode_result, sid, payload, None)
                self._send(sock, self._submit(sid, [tag], True), [payload])
            elif item[0] == "task":
                _, fut, sid, payload, decode_result, timeout = item
                tag = fut.tag
                self._tasks[tag] = (fut, decode_result, sid, payload, timeout)
                key = (sid, timeout)
                tags, frames = batches.setdefault(key, ([], []))
                tags.append(tag)
                frames.append(payload)
                if len(tags) >= MAX_BATCH:
                    self._send(sock, self._submit(sid, tags, False, timeout), frames)
                    del batches[key]
            else:                    # a control call or a stream's credit: what was queued before goes first
                for (sid, timeout), (tags, frames) in batches.items():
                    self._send(sock, self._submit(sid, tags, False, timeout), frames)
                batches.clear()
                if item[0] == "credit":
                    _, sid, tag, upto = item
                    if tag in self._tasks:
                        self._send(sock, StreamCredit(sid, self.client_id, [(tag, upto)]))
                    continue
                _, fut, rid, method, frames, deadline = item
                self._calls[rid] = (fut, deadline, method)
                self._send_frames(sock, frames)
        for (sid, timeout), (tags, frames) in batches.items():
            self._send(sock, self._submit(sid, tags, False, timeout), frames)

    def _submit(self, sid: str, tags: List[int], resend: bool, timeout: Optional[float] = None) -> Submit:
        return Submit(sid, tags, self.client_id, resend, self._token or None, None, timeout)

    def _ping(self, sock: zmq.Socket) -> None:
        """While answers are owed, ask the manager who it is: a new boot id means it restarted."""
        self._last_ping = time.monotonic()
        rid = next(self._rids)
        self._calls[rid] = (None, self._last_ping + self.settings.request_timeout, "ping")
        self._send(sock, Request(rid, "ping", {}))

    def _on_ping(self, sock: zmq.Socket, result: Any) -> None:
        boot = result.get("boot") if isinstance(result, dict) else None
        if self._boot is not None and boot != self._boot and self._tasks:
            self._resend(sock, "the manager restarted", restarted=True)
        self._boot = boot

    def _resend(self, sock: zmq.Socket, why: str, restarted: bool = False) -> None:
        """Send every unanswered task again, flagged as a resend: the manager re-attaches it,
        answers it from its database, or (if it never got it) runs it.  Idempotent.

        Streams under way: a quiet one is alive (its producer is slow, or waits for our consumer's
        credit), so it is left alone unless the manager ``restarted``; then one that had parts cannot
        go on: it is re-attached and cancelled there (its generator stops) and fails here."""
        log.warning("%s; resending %d unanswered tasks", why, len(self._tasks))
        self._last_answer = time.monotonic()
        cancel: List[Tuple[str, int]] = []
        for tag, buf in list(self._streams.items()):
            if not restarted or not buf.received:
                continue
            self._streams.pop(tag, None)
            entry = self._tasks.get(tag)
            exc = Unavailable(f"{why} after {buf.received} parts of this stream had arrived; it cannot "
                              f"go on", parts=buf.received)
            buf.finish(exc)
            if entry is not None:
                _settle(entry[0], exc=_fresh(exc))
                cancel.append((entry[2], tag))
        batches: Dict[Tuple[str, Optional[float]], Tuple[List[int], List[Any]]] = {}
        for tag, (_, _, sid, payload, timeout) in self._tasks.items():
            if not restarted and tag in self._streams:
                continue
            tags, frames = batches.setdefault((sid, timeout), ([], []))
            tags.append(tag)
            frames.append(payload)
        for (sid, timeout), (tags, frames) in batches.items():
            for i in range(0, len(tags), MAX_BATCH):
                self._send(sock, self._submit(sid, tags[i:i + MAX_BATCH], True, timeout), frames[i:i + MAX_BATCH])
        for sid, tag in cancel:   # re-attached above: now stop it there
            self._tasks.pop(tag, None)
            self._send(sock, StreamCredit(sid, self.client_id, [(tag, -1)]))

    def _send(self, sock: zmq.Socket, record: Any, payloads: Sequence[Any] = ()) -> None:
        self._send_frames(sock, encode(record, payloads))

    def _send_frames(self, sock: zmq.Socket, frames: Sequence[Any]) -> None:
        """Every message the I/O thread sends goes out here (scripts/bench_context.py counts them)."""
        transport.send(sock, frames, flags=0)

    def _receive(self, sock: zmq.Socket) -> None:
        for msg in _messages(sock, 10000):
            if msg.cmd is Cmd.RESULT:
                self._on_result(msg)
            elif msg.cmd is Cmd.STREAM:
                self._on_stream(sock, msg)
            elif msg.cmd is Cmd.REPLY:
                self._on_reply(sock, msg)

    def _on_stream(self, sock: zmq.Socket, msg: Message) -> None:
        """Parts of streaming tasks, in order: to the task's buffer (made here for a task submitted
        without one: ``invoke`` collects every part; this thread grants its credit)."""
        self._last_answer = time.monotonic()
        window = self.settings.stream_window
        for (tag, seq), frame in zip(msg.header.items, msg.payloads):
            buf = self._streams.get(tag)
            if buf is None:
                entry = self._tasks.get(tag)
                if entry is None:
                    continue         # a task answered or given up: its late parts are dropped
                buf = self._streams[tag] = StreamBuffer(entry[2], window, collect=True)
                buf.tag = tag
            buf.put(seq, bytes(frame))
            if buf.collect and window and buf.granted - buf.received <= window // 2:
                buf.granted = buf.received + window
                self._send(sock, StreamCredit(msg.header.session, self.client_id, [(tag, buf.granted)]))

    def _on_result(self, msg: Message) -> None:
        self._last_answer = time.monotonic()
        payload: Any
        tasks, freed = self._tasks, 0
        streams = self._streams
        for (tag, err), payload in zip(msg.header.outcomes, msg.payloads):
            entry = tasks.pop(tag, None)
            if entry is None:
                continue             # answered already: a duplicate after a resend
            fut, decode_result = entry[0], entry[1]
            if fut.window is not None:   # its place in the window: given back below, all at once
                fut.window = None
                freed += 1
            if streams and tag in streams:
                self._stream_ended(streams.pop(tag), fut, decode_result, err, payload)
                continue
            if err is not None:
                _resolve(fut, exc=from_wire(err))
                continue
            count = stream_end_count(payload)
            if count is not None:    # a stream's end, and no part came here
                if count:
                    _resolve(fut, exc=Unavailable(f"the stream ended after {count} parts and none arrived here",
                                                  parts=0))
                else:
                    _resolve(fut, [])
                continue
            try:
                value = decode_result(payload)
            except BaseException as exc:  # noqa: B902 (the result class may be unknown here, or
                _resolve(fut, exc=exc)    # the caller's decoder may raise anything: it is theirs)
            else:
                _resolve(fut, value)
        if freed:
            self._window.give(freed)

    @staticmethod
    def _stream_ended(buf: StreamBuffer, fut: TaskFuture, decode_result: Callable[[Any], Any],
                      err: Optional[Dict[str, Any]], payload: Any) -> None:
        """A streaming task's answer: after its parts, the end (an empty payload), or its error.  A
        consumer of an entrypoint that returned (did not yield) gets its value as the one part."""
        if err is not None:
            exc = from_wire(err)
            buf.finish(exc)
            _resolve(fut, exc=from_wire(err))
            return
        count = stream_end_count(payload)
        if count is None and len(payload) and not buf.received:   # an entrypoint that returned
            buf.put(0, bytes(payload))
        elif count is not None and count != buf.received:
            lost = Unavailable(f"the stream ended after {count} parts and {buf.received} arrived here (its "
                               f"connection changed or the manager restarted while it ran)", parts=buf.received)
            buf.finish(lost)
            _resolve(fut, exc=_fresh(lost))
            return
        buf.finish(None)
        if not buf.collect:
            _resolve(fut, None)
            return
        try:
            _resolve(fut, decode_all(buf, decode_result))
        except BaseException as exc:  # noqa: B902 (a part's class may be unknown here)
            _resolve(fut, exc=exc)

    def _on_reply(self, sock: zmq.Socket, msg: Message) -> None:
        h: Reply = msg.header
        call = self._calls.pop(h.rid, None)
        if call is None:
            if h.rid == -1:
                log.warning("manager rejected a message: %s", (h.error or {}).get("message"))
            return
        fut = call[0]
        if fut is None:              # our own liveness ping
            if h.ok:
                self._on_ping(sock, h.result)
        elif h.ok:
            _settle(fut, (h.result, msg.payloads[0] if msg.payloads else None))
        else:
            _settle(fut, exc=from_wire(h.error))

    def _expire_calls(self) -> None:
        now = time.monotonic()
        for rid, (fut, deadline, method) in list(self._calls.items()):
            if now > deadline:
                del self._calls[rid]
                if fut is None:
                    continue
                _settle(fut, exc=Unavailable(
                    f"the manager at {self.manager} did not answer {method!r} in time; is it running?",
                    manager=self.manager, method=method))

    def _fail_all(self, exc: MeshError) -> None:
        for buf in list(self._streams.values()):
            buf.finish(_fresh(exc))
        self._streams.clear()
        for fut, *_ in list(self._calls.values()):
            if fut is not None:
                _settle(fut, exc=_fresh(exc))
        for fut, *_ in list(self._tasks.values()):
            _settle(fut, exc=_fresh(exc))
        self._calls.clear()
        self._tasks.clear()
        self._drain_out(exc)

    def _drain_out(self, exc: MeshError) -> None:
        """Fail every queued, unsent item (safe from any thread: popleft is atomic)."""
        while True:
            try:
                item = self._out.popleft()
            except IndexError:
                return
            _settle(item[1], exc=_fresh(exc))   # every item's future is its second field


__all__ = ["Connection", "DeadlineExceeded", "TaskFuture", "check_endpoint"]
