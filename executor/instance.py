"""The service SDK: ``Instance`` turns a Python function into a mesh service.

A service module creates ``ins = Instance()`` at import and decorates one
function with ``@ins.entrypoint``.  Construction is inert, so clients can
import the module for its request/response classes; only :meth:`Instance.run`
(called under ``if __name__ == "__main__"`` by the process an executor starts)
connects to the manager.  An instance serves one task at a time; concurrency
comes from running many instances.
"""
from __future__ import annotations

import asyncio
import collections
import importlib
import inspect
import logging
import os
import pickle
import sys
import time
import traceback
import typing
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

import cloudpickle
import zmq

from mesh.data import patch
from mesh.data.replica import DOC, Replica
from mesh.errors import Cancelled, Internal, InvalidArgument, MeshError, TaskFailed, Unavailable, from_wire
from mesh.ops import keys
from mesh.ops.config import Settings
from mesh.ops.log import event, setup
from mesh.wire import transport
from mesh.wire.protocol import (Bind, Cmd, CtxPatch, CtxWrite, Done, InstHello, Message, Outcome, Parts, Resync,
                                decode, encode, stream_end)

log = logging.getLogger("zeromesh.instance")

_CREATED: Dict[str, "Instance"] = {}   # module name -> the Instance it created
RESULT_FLUSH = 0.0005                  # seconds of finished results buffered into one DONE message
_WAITING = object()                    # a write's answer that has not arrived


class Instance:
    def __init__(self) -> None:
        frame = sys._getframe(1)
        self._module = frame.f_globals.get("__name__", "")
        self._file = frame.f_globals.get("__file__")
        _CREATED.setdefault(self._module, self)
        self._fn: Optional[Callable[..., Any]] = None
        self._takes_arg = True
        self._req_type: Optional[type] = None
        self._req_types: Tuple[type, ...] = ()   # what isinstance accepts for it
        self._hooks: List[Callable[[], None]] = []   # before_answer
        self._sid: Optional[str] = None
        self._replica = Replica()        # this session's context (mesh.data.replica: in order, gap -> snapshot)
        self._resyncing = False          # a RESYNC is out; the BIND that answers it has not arrived
        self._sock: Optional[zmq.Socket] = None
        self._work: Deque[Message] = collections.deque()   # TASKS, and BINDs queued behind them, in arrival order
        self._binds_queued = 0                              # BINDs in _work
        self._released: Optional[str] = None               # the reason of the manager's GONE, once received
        self._seq = 0
        self._answers: Dict[int, Any] = {}   # seq of our own writes awaiting an answer -> _WAITING, None or error
        self._done: List[Outcome] = []       # finished tasks not yet reported: (tid, error|None) ...
        self._frames: List[Any] = []         # ... and their result frames
        self._write_timeout = Settings().instance_write_timeout
        self._handlers: Dict[Cmd, Callable[[Message], None]] = {
            Cmd.TASKS: self._work.append,
            Cmd.CTX_PATCH: self._on_ctx_patch,
            Cmd.CTX_REJECT: self._on_ctx_reject,
            Cmd.BIND: self._on_bind,
            Cmd.GONE: self._on_gone,
            Cmd.CREDIT: self._on_credit,
        }                                    # WELCOME, HEARTBEAT: traffic is liveness, nothing to do
        self.resyncs = 0                 # snapshots fetched after a gap (for tests and logs)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.functions: Optional[List[str]] = None   # stateful function types served (executor/functions.py)
        self._credit: Dict[int, int] = {}            # streaming task -> parts it may send (seq below this)
        self._stopped: Set[int] = set()              # streams stopped before they started
        self._stream_window = Settings().stream_window
        self._restartable = False                    # @entrypoint(restartable=True): see docs/streaming.md

    @property
    def _version(self) -> int:
        """The context version this replica holds."""
        return self._replica.version

    # -- declaring the service ---------------------------------------------------
    def entrypoint(self, fn: Optional[Callable[..., Any]] = None, *, restartable: bool = False) -> Any:
        """Mark ``fn`` (sync or async, zero or one parameter) as this service's entrypoint:
        ``@ins.entrypoint`` or ``@ins.entrypoint(restartable=True)``.  A generator (sync or async)
        streams its parts (docs/streaming.md); ``restartable``: after a crash it may run again from
        the start on another instance, the consumer skipping the parts it has (they must be
        deterministic)."""
        if fn is None:
            return lambda f: self.entrypoint(f, restartable=restartable)
        self._restartable = restartable
        if self._fn is not None:
            raise InvalidArgument(f"an instance has one entrypoint; {self._fn.__name__} is already set")
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(params) > 1:
            raise InvalidArgument(f"entrypoint {fn.__name__} must take zero or one parameter, not {len(params)}")
        self._fn = fn
        self._takes_arg = bool(params)
        if params:
            try:
                hint = typing.get_type_hints(fn).get(params[0].name)
            except Exception:
                hint = None
            # (typing.Any is a class since Python 3.11, and isinstance() refuses it)
            self._req_type = hint if isinstance(hint, type) and hint not in (object, typing.Any) else None
            # the numeric tower (PEP 484): an int is fine where a float (or complex) is declared
            self._req_types = (
                () if self._req_type is None else _NUMERIC.get(self._req_type, (self._req_type,)))
        return fn

    # -- context -----------------------------------------------------------------
    def context(self) -> Any:
        """This session's context, read from the local replica (no round trip).

        Returns a private copy: change it freely, then :meth:`update_context`.
        """
        if self._replica.kind == DOC:
            return patch.copy_document(self._replica.value)
        return cloudpickle.loads(self._replica.value)

    def update_context(self, value: Any) -> None:
        """Make ``value`` the session's context, shipping only the difference.

        Returns once the manager has sequenced the write, so the next task of
        this session sees it on any instance.
        """
        if self._replica.kind == DOC and patch.is_document(value):
            ops = patch.diff(self._replica.value, value)
            if ops:
                self._write(ops, None)
        elif patch.is_document(value):
            self._write([{"op": "replace", "path": "", "value": value}], None)
        else:
            self._write(None, cloudpickle.dumps(value))

    def patch_context(self, ops: List[Dict[str, Any]]) -> None:
        """Apply JSON-patch ops (plus ``incr``) to the context; raises Conflict if a ``test`` fails."""
        patch.validate_ops(ops)
        self._write(list(ops), None)

    def session_id(self) -> Optional[str]:
        return self._sid

    def _write(self, ops: Optional[List[Any]], blob: Optional[bytes]) -> None:
        """Send one write to the sequencer and wait (``instance_write_timeout``) until it is
        answered and this replica includes it.  Raises what the manager rejected it with, or
        Unavailable when no answer comes (the manager may still have sequenced it)."""
        if self._sock is None or self._sid is None:
            raise Unavailable("the context can only be changed inside a running task")
        self._seq += 1
        seq = self._seq
        self._answers[seq] = _WAITING
        self._sock.send_multipart(encode(CtxWrite(self._sid, seq, ops), [] if blob is None else [blob]))

        def settled() -> bool:
            answer = self._answers[seq]
            return ((answer is not _WAITING and (answer is not None or not self._resyncing))
                    or self._released is not None)

        try:
            self._pump(settled, time.monotonic() + self._write_timeout)
        finally:
            answer = self._answers.pop(seq)   # an answer arriving later finds no one waiting: dropped
        if answer is _WAITING:
            if self._released is not None:
                raise Unavailable(f"the manager released this instance ({self._released}) "
                                  "before it confirmed the context write")
            raise Unavailable(f"the manager did not confirm a context write within {self._write_timeout:g}s "
                              "(instance_write_timeout)", timeout=self._write_timeout)
        if answer is not None:
            raise from_wire(answer)
        if self._resyncing:
            raise Unavailable(f"the context write was sequenced, but the manager did not resend the context "
                              f"this replica asked for within {self._write_timeout:g}s", sequenced=True)

    # -- the replica: every handler of a context message ------------------------------
    def _on_ctx_patch(self, msg: Message) -> None:
        self._apply_patch(msg)
        seq = msg.header.seq
        if seq is not None and self._answers.get(seq) is _WAITING:
            self._answers[seq] = None

    def _on_ctx_reject(self, msg: Message) -> None:
        seq = msg.header.seq
        if self._answers.get(seq) is _WAITING:
            self._answers[seq] = msg.header.error or Internal("rejected without a reason").to_wire()

    def _apply_patch(self, msg: Message) -> None:
        """Apply one sequenced write to the replica; on a version gap, ask for a snapshot."""
        h: CtxPatch = msg.header
        if h.session != self._sid:
            return  # another session's: this instance has moved on
        blob = msg.payloads[0] if h.ops is None and msg.payloads else None
        if self._replica.receive(h.version, h.ops, blob).needs_snapshot:
            self._request_snapshot()

    def _request_snapshot(self) -> None:
        """Send RESYNC once per gap; the BIND that answers it clears ``_resyncing``."""
        if self._resyncing:
            return
        assert self._sock is not None
        self._resyncing = True
        self.resyncs += 1
        assert self._sid is not None
        self._sock.send_multipart(encode(Resync(self._sid, self._replica.version)))

    def _on_bind(self, msg: Message) -> None:
        sid = msg.header.session
        if sid is not None and sid == self._sid and not self._binds_queued:
            self._bind(msg)          # a snapshot of our session (a resync's answer): take it now
        else:
            self._work.append(msg)   # another session: it starts after the work that came before it
            self._binds_queued += 1  # (and any BIND after it waits too: BINDs keep their order)
            self._resyncing = False  # no snapshot of the session we leave will come

    def _bind(self, msg: Message) -> None:
        """Take the manager's snapshot: of our session (a resync), or of the session we now serve."""
        h: Bind = msg.header
        data = msg.payloads[0] if msg.payloads else b""
        if h.session is not None and h.session == self._sid:
            self._replica.restore(h.kind, h.version, data)   # STALE (and kept) if we hold it already
        else:
            self._flush()   # the last session's results go out before the next session's work
            self._sid = h.session
            self._replica = Replica.from_wire(h.kind, data, h.version)
        self._resyncing = False

    def _on_gone(self, msg: Message) -> None:
        self._released = str(msg.header.reason or "no reason given")
        event(log, logging.INFO, "manager released this instance", reason=self._released)

    # -- receiving ---------------------------------------------------------------------
    def _pump(self, until: Callable[[], bool], deadline: Optional[float] = None) -> bool:
        """Receive and handle messages until ``until()`` holds (True) or ``deadline`` passes (False).

        The instance's only receive loop: waiting for work, for a write's answer and for a
        snapshot all run here, so a message is handled by the one handler of its kind
        (``_handlers``) whatever the instance was waiting for when it arrived.  Tasks are
        queued, never run from inside a wait: an instance runs one task at a time.
        Finished results are flushed whenever nothing is waiting to be read.
        """
        sock = self._sock
        assert sock is not None
        while not until():
            raw = transport.recv(sock)
            if raw is None:
                self._flush()   # nothing else queued: answer now
                if deadline is None:
                    sock.poll()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    sock.poll(int(left * 1000) + 1)
                continue
            try:
                msg = decode(raw)
            except MeshError as exc:
                event(log, logging.WARNING, "bad message from manager", error=str(exc))
                continue
            handler = self._handlers.get(msg.cmd)
            if handler is not None:
                handler(msg)
        return True

    def _catch_up(self, version: int) -> None:
        """Make the replica hold ``version`` (a task was dispatched after writes it has not seen)."""
        if self._replica.version >= version:
            return
        self._request_snapshot()
        caught_up = self._pump(lambda: not self._resyncing or self._released is not None,
                               time.monotonic() + self._write_timeout)
        if not caught_up:
            raise Unavailable(f"the manager did not resend the context within {self._write_timeout:g}s "
                              "(instance_write_timeout)", timeout=self._write_timeout)

    # -- running -------------------------------------------------------------------
    def run(self) -> None:
        """Serve tasks until the manager or the executor says stop.  Needs the
        ZMESH_* environment an executor sets; outside one it explains and exits."""
        target = self._canonical()
        if target is not self:
            return target.run()
        if target._fn is None:
            raise SystemExit("zeromesh: no @entrypoint was declared before run()")
        manager = os.environ.get("ZMESH_MANAGER")
        iid = os.environ.get("ZMESH_INSTANCE_ID")
        if not manager or not iid:
            raise SystemExit("zeromesh: this service runs under an executor "
                             "(register it with `zmesh register -f app.yaml`, then call it with client.Session)")
        setup()
        self._serve(manager, iid, os.environ.get("ZMESH_EXECUTOR_ID", ""))

    def _canonical(self) -> "Instance":
        """When the service file runs as ``__main__``, serve from the module imported by
        its file name instead, so request and response classes pickle by reference
        (``echo_service.EchoResponse``) exactly as the client knows them."""
        module = main_as_module(self._module, self._file)
        return self if module is None else _CREATED.get(module.__name__, self)

    def _serve(self, manager: str, iid: str, eid: str) -> None:
        key_file = os.environ.get("ZMESH_MANAGER_KEY")
        curve = (keys.load_public(key_file), *keys.ephemeral()) if key_file else None
        self._write_timeout = Settings.load().instance_write_timeout
        sock = transport.dealer(manager, linger_ms=1000, curve=curve)
        self._sock = sock
        self._stream_window = Settings.load().stream_window
        stream = None
        if self._fn is not None and (inspect.isgeneratorfunction(self._fn) or inspect.isasyncgenfunction(self._fn)):
            stream = "restartable" if self._restartable else "stream"
        sock.send_multipart(encode(InstHello(iid, eid, os.getpid(), os.environ.get("ZMESH_INSTANCE_TOKEN", ""),
                                             self.functions, stream)))
        event(log, logging.INFO, "instance serving", instance=iid, manager=manager)
        try:
            self._main()
        finally:
            sock.close(linger=1000)

    def _main(self) -> None:
        """Run queued work in arrival order until the manager releases this instance."""
        while self._released is None:
            if not self._work:
                self._pump(lambda: bool(self._work) or self._released is not None)
                continue
            msg = self._work.popleft()
            if msg.cmd is Cmd.BIND:
                self._binds_queued -= 1
                self._bind(msg)
            else:
                self._run_tasks(msg)
        self._flush()

    def _run_tasks(self, msg: Message) -> None:
        """Run one TASKS batch, reporting results at least every RESULT_FLUSH seconds.

        A batch sent after writes this replica has not seen waits for a snapshot
        first (read your writes); if none comes in time, Unavailable ends the
        instance and the manager retries its tasks elsewhere.
        """
        sid, version, items = msg.header.session, msg.header.version, msg.header.items
        if sid == self._sid:
            self._catch_up(version)
        started = time.monotonic()
        for (tid, _attempt), payload in zip(items, msg.payloads):
            if self._released is not None:
                return   # the manager no longer counts on these results
            err, out = self._run_one(payload, tid)
            self._done.append((tid, err))
            self._frames.append(out)
            if time.monotonic() - started > RESULT_FLUSH:
                self._flush()
                started = time.monotonic()

    # -- streaming (docs/streaming.md) ------------------------------------------------------
    def _on_credit(self, msg: Message) -> None:
        for tid, upto in msg.header.items:
            if tid in self._credit:
                if self._credit[tid] >= 0:   # a stop stays a stop
                    self._credit[tid] = -1 if upto < 0 else max(self._credit[tid], upto)
            elif upto < 0:   # stopped before it started (queued here behind another task)
                self._stopped.add(tid)

    def _stream(self, tid: int, gen: Any) -> Any:
        """Send each part as it is made, never more than the consumer's credit ahead; the end is
        an answer carrying the part count.  Credit -1 (the caller broke off) closes the generator
        (its ``finally`` runs) and answers ``cancelled``; an exception after some parts is raised to
        :meth:`_run_one`, which answers it like any task's."""
        sock = self._sock
        assert sock is not None
        credits = self._credit
        credits[tid] = -1 if tid in self._stopped else self._stream_window or sys.maxsize   # 0: no flow control
        self._stopped.discard(tid)
        seq = 0
        agen = inspect.isasyncgen(gen)
        if agen and self._loop is None:
            self._loop = asyncio.new_event_loop()
        try:
            while True:
                self._pump(lambda: True if credits[tid] < 0 else False, deadline=0.0)   # a stop, now
                while 0 <= credits[tid] <= seq and self._released is None:   # the consumer is behind
                    self._pump(lambda: credits[tid] < 0 or credits[tid] > seq or self._released is not None)
                if credits[tid] < 0 or self._released is not None:
                    self._close_generator(gen, agen)
                    return Cancelled(f"task {tid}: the caller stopped the stream after {seq} parts",
                                     parts=seq).to_wire(), b""
                try:
                    part = self._loop.run_until_complete(gen.__anext__()) if agen and self._loop else next(gen)
                except (StopIteration, StopAsyncIteration):
                    return None, stream_end(seq)   # the client checks it got every part
                transport.send(sock, encode(Parts([(tid, seq)]), [_dumps(part)]), flags=0)
                seq += 1
        finally:   # an error of the generator is answered by _run_one, which called this
            credits.pop(tid, None)

    def _close_generator(self, gen: Any, agen: bool) -> None:
        try:
            if agen and self._loop is not None:
                self._loop.run_until_complete(gen.aclose())
            else:
                gen.close()
        except Exception as exc:   # its finally raised: the stream is over anyway
            event(log, logging.WARNING, "a stream's generator raised while closing", error=repr(exc))

    def before_answer(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` before each batch of answers leaves this instance (the runner's object
        services write one checkpoint per batch there).  If it raises, every answer of the batch
        is replaced by that error: nothing is answered that the hook could not make durable."""
        self._hooks.append(hook)

    def _flush(self) -> None:
        if self._done:
            assert self._sock is not None
            for hook in self._hooks:
                try:
                    hook()
                except BaseException as exc:  # noqa: B902 - the batch fails, the instance lives on
                    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                        raise
                    err = exc.to_wire() if isinstance(exc, MeshError) else _failure(exc)
                    self._done = [(tid, err) for tid, _ in self._done]
                    self._frames = [b""] * len(self._done)
                    break
            transport.send(self._sock, encode(Done(self._done), self._frames), flags=0)
            self._done = []
            self._frames = []

    def _run_one(self, payload: Any, tid: int = 0) -> Any:
        """Run the entrypoint on one pickled request: (None, result bytes) or (error map, b"").
        An entrypoint that yields streams its parts (:meth:`_stream`) and answers an empty result."""
        assert self._fn is not None
        try:
            req = cloudpickle.loads(payload)
        except Exception as exc:
            return _failure(exc, f"could not unpickle the request: {type(exc).__name__}: {exc}"), b""
        if self._req_type is not None and not isinstance(req, self._req_types):
            if not isinstance(req, dict):
                return InvalidArgument(
                    f"{self._fn.__name__} takes {self._req_type.__name__}, got {type(req).__name__}").to_wire(), b""
            try:   # a JSON object (zmesh invoke --input, any client): built into the declared type
                req = _build(self._req_type, req, self._fn.__name__)
            except InvalidArgument as exc:
                return exc.to_wire(), b""
        try:
            result = self._fn(req) if self._takes_arg else self._fn()
            if inspect.isgenerator(result) or inspect.isasyncgen(result):
                return self._stream(tid, result)
            if result is not None and inspect.isawaitable(result):
                if self._loop is None:
                    self._loop = asyncio.new_event_loop()
                result = self._loop.run_until_complete(result)
            return None, _dumps(result)
        except MeshError as exc:
            return exc.to_wire(), b""
        except BaseException as exc:  # noqa: B902 - the task failed, the instance lives on
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return _failure(exc), b""


def main_as_module(module: str, file: Optional[str]) -> Any:
    """The service file that runs as ``__main__``, imported again under its file name (so that its
    classes pickle by reference as clients know them), or None if it is not ``__main__`` or cannot be."""
    if module != "__main__" or not file:
        return None
    name = os.path.splitext(os.path.basename(file))[0]
    if not name.isidentifier():
        return None
    sys.path.insert(0, os.path.dirname(os.path.abspath(file)))
    try:
        return importlib.import_module(name)
    except Exception:
        return None


_NUMERIC = {float: (float, int), complex: (complex, float, int)}


def _build(typ: type, fields: Dict[str, Any], fn: str) -> Any:
    """``typ(**fields)`` for a request sent as a JSON object, with an error naming the field that is
    missing or unknown (a dataclass, a NamedTuple or any class whose constructor takes keywords)."""
    try:
        params = inspect.signature(typ).parameters
    except (TypeError, ValueError):
        raise InvalidArgument(f"{fn} takes {typ.__name__}, which cannot be built from a JSON object") from None
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in fields if k not in names) if not takes_any else []
    missing = [n for n in names if params[n].default is params[n].empty and n not in fields]
    if unknown or missing:
        what = "; ".join(x for x in (f"unknown field(s) {', '.join(unknown)}" if unknown else "",
                                     f"missing field(s) {', '.join(missing)}" if missing else "") if x)
        raise InvalidArgument(f"{fn} takes {typ.__name__} ({', '.join(names)}): {what}", type=typ.__name__,
                              unknown=unknown, missing=missing)
    try:
        return typ(**fields)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{fn} takes {typ.__name__}: {exc}", type=typ.__name__) from None


def _dumps(result: Any) -> bytes:
    """Plain pickle when it can (4x faster); cloudpickle for lambdas, local classes and the like."""
    try:
        return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return cloudpickle.dumps(result)


def _failure(exc: BaseException, message: Optional[str] = None) -> Dict[str, Any]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return TaskFailed(message or f"{type(exc).__name__}: {exc}", type=type(exc).__name__,
                      traceback=tb[-8000:]).to_wire()
