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
from typing import Any, Callable, Deque, Dict, List, Optional

import cloudpickle
import zmq

from mesh import keys, patch, transport
from mesh.errors import InvalidArgument, MeshError, TaskFailed, Unavailable, from_wire
from mesh.log import event, setup
from mesh.protocol import Cmd, Message, decode, encode, unpack

log = logging.getLogger("zeromesh.instance")

_CREATED: Dict[str, "Instance"] = {}   # module name -> the Instance it created
RESULT_FLUSH = 0.0005                  # seconds of finished results buffered into one DONE message
WRITE_TIMEOUT = 30.0                   # seconds a context write waits for the manager's answer
_NOTHING = object()


class Instance:
    def __init__(self) -> None:
        frame = sys._getframe(1)
        self._module = frame.f_globals.get("__name__", "")
        self._file = frame.f_globals.get("__file__")
        _CREATED.setdefault(self._module, self)
        self._fn: Optional[Callable[..., Any]] = None
        self._takes_arg = True
        self._req_type: Optional[type] = None
        self._sid: Optional[str] = None
        self._kind = "doc"
        self._version = 0
        self._value: Any = None          # the replica: a document (never mutated) or blob bytes
        self._blob_cache: Any = _NOTHING
        self._sock: Optional[zmq.Socket] = None
        self._backlog: Deque[Message] = collections.deque()
        self._seq = 0
        self._answers: Dict[int, Any] = {}   # seq of our own writes -> error or None once answered
        self.resyncs = 0                 # snapshots fetched after a gap (for tests and logs)
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # -- declaring the service ---------------------------------------------------
    def entrypoint(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Mark ``fn`` (sync or async, zero or one parameter) as this service's entrypoint."""
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
            self._req_type = hint if isinstance(hint, type) and hint is not object else None
        return fn

    # -- context -----------------------------------------------------------------
    def context(self) -> Any:
        """This session's context, read from the local replica (no round trip).

        Returns a private copy: change it freely, then :meth:`update_context`.
        """
        if self._kind == "doc":
            return patch.copy_document(self._value)
        return cloudpickle.loads(self._value)

    def update_context(self, value: Any) -> None:
        """Make ``value`` the session's context, shipping only the difference.

        Returns once the manager has sequenced the write, so the next task of
        this session sees it on any instance.
        """
        if self._kind == "doc" and patch.is_document(value):
            ops = patch.diff(self._value, value)
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
        if self._sock is None or self._sid is None:
            raise Unavailable("the context can only be changed inside a running task")
        self._seq += 1
        seq = self._seq
        header = {"sid": self._sid, "seq": seq, "base": self._version, "ops": ops}
        self._sock.send_multipart(encode(Cmd.CTX_WRITE, header, [] if blob is None else [blob]))
        deadline = time.monotonic() + WRITE_TIMEOUT
        while time.monotonic() < deadline:
            if not self._sock.poll(int((deadline - time.monotonic()) * 1000) + 1):
                continue
            msg = decode(self._sock.recv_multipart())
            if msg.cmd is Cmd.CTX_PATCH:
                self._apply_patch(msg)
                if msg.header["seq"] is not None:
                    self._answers[msg.header["seq"]] = None
            elif msg.cmd is Cmd.CTX_REJECT:
                self._answers[msg.header["seq"]] = msg.header["error"]
            else:
                self._backlog.append(msg)   # tasks that arrived meanwhile run after this one
            if seq in self._answers:
                error = self._answers.pop(seq)
                if error is not None:
                    raise from_wire(error)
                return
        raise Unavailable(f"the manager did not confirm a context write within {WRITE_TIMEOUT:.0f}s")

    def _apply_patch(self, msg: Message) -> None:
        """Apply one sequenced write to the replica; on a version gap, fetch a snapshot."""
        h = msg.header
        if h["sid"] != self._sid or h["version"] <= self._version:
            return  # another session's, or already in the snapshot we hold
        if h["version"] != self._version + 1:
            self._resync()
            return
        if h["ops"] is None:
            self._kind, self._value = "blob", bytes(msg.payloads[0])
        else:
            try:
                self._value = patch.apply_patch(self._value, h["ops"])
            except MeshError:
                self._resync()  # cannot apply what the manager applied: our replica is wrong
                return
            self._kind = "doc"
        self._version = h["version"]

    def _resync(self) -> None:
        """Ask for a snapshot and wait for it; everything else that arrives waits in the backlog."""
        assert self._sock is not None and self._sid is not None
        self.resyncs += 1
        self._sock.send_multipart(encode(Cmd.RESYNC, {"sid": self._sid, "have": self._version}))
        deadline = time.monotonic() + WRITE_TIMEOUT
        while time.monotonic() < deadline:
            if not self._sock.poll(int((deadline - time.monotonic()) * 1000) + 1):
                continue
            msg = decode(self._sock.recv_multipart())
            if msg.cmd is Cmd.BIND:
                self._bind(msg)
                return
            if msg.cmd is Cmd.CTX_PATCH:  # older than the snapshot, so already in it
                if msg.header["seq"] is not None:
                    self._answers[msg.header["seq"]] = None
            elif msg.cmd is Cmd.CTX_REJECT:
                self._answers[msg.header["seq"]] = msg.header["error"]
            else:
                self._backlog.append(msg)
        raise Unavailable(f"the manager did not resend the context within {WRITE_TIMEOUT:.0f}s")

    def _bind(self, msg: Message) -> None:
        h = msg.header
        self._sid = h["sid"]
        self._kind = h["kind"]
        self._version = h["version"]
        self._value = unpack(msg.payloads[0]) if self._kind == "doc" else bytes(msg.payloads[0])

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
        if self._module != "__main__" or not self._file:
            return self
        name = os.path.splitext(os.path.basename(self._file))[0]
        if not name.isidentifier():
            return self
        sys.path.insert(0, os.path.dirname(os.path.abspath(self._file)))
        try:
            module = importlib.import_module(name)
        except Exception:
            return self
        return _CREATED.get(module.__name__, self)

    def _serve(self, manager: str, iid: str, eid: str) -> None:
        key_file = os.environ.get("ZMESH_MANAGER_KEY")
        curve = (keys.load_public(key_file), *keys.ephemeral()) if key_file else None
        sock = transport.dealer(manager, linger_ms=1000, curve=curve)
        self._sock = sock
        sock.send_multipart(encode(Cmd.INST_HELLO, {"iid": iid, "eid": eid, "pid": os.getpid(),
                                                    "token": os.environ.get("ZMESH_INSTANCE_TOKEN", "")}))
        event(log, logging.INFO, "instance serving", instance=iid, manager=manager)
        done: List[List[Any]] = []
        frames: List[Any] = []
        while True:
            if self._backlog:
                msg = self._backlog.popleft()
            else:
                raw = transport.recv(sock)
                if raw is None:
                    self._flush(done, frames)   # nothing else queued: answer now
                    sock.poll()
                    continue
                try:
                    msg = decode(raw)
                except MeshError as exc:
                    event(log, logging.WARNING, "bad message from manager", error=str(exc))
                    continue
            cmd = msg.cmd
            if cmd is Cmd.TASKS:
                if msg.header[0] == self._sid and msg.header[1] > self._version:
                    self._resync()  # the task was sent after writes this replica has not seen
                started = time.monotonic()
                for (tid, attempt), payload in zip(msg.header[2], msg.payloads):
                    err, out = self._run_one(payload)
                    done.append([tid, err])
                    frames.append(out)
                    if time.monotonic() - started > RESULT_FLUSH:
                        self._flush(done, frames)
                        started = time.monotonic()
            elif cmd is Cmd.CTX_PATCH:
                self._apply_patch(msg)
            elif cmd is Cmd.BIND:
                self._flush(done, frames)
                self._bind(msg)
            elif cmd is Cmd.GONE:
                self._flush(done, frames)
                event(log, logging.INFO, "manager released this instance", reason=msg.header["reason"])
                break
        sock.close(linger=1000)

    def _flush(self, done: List[List[Any]], frames: List[Any]) -> None:
        if done:
            assert self._sock is not None
            transport.send(self._sock, encode(Cmd.DONE, done, frames), flags=0)
            done.clear()
            frames.clear()

    def _run_one(self, payload: Any) -> Any:
        """Run the entrypoint on one pickled request: (None, result bytes) or (error map, b"")."""
        assert self._fn is not None
        try:
            req = cloudpickle.loads(payload)
        except Exception as exc:
            return _failure(exc, f"could not unpickle the request: {type(exc).__name__}: {exc}"), b""
        if self._req_type is not None and not isinstance(req, self._req_type):
            return InvalidArgument(
                f"{self._fn.__name__} takes {self._req_type.__name__}, got {type(req).__name__}").to_wire(), b""
        try:
            result = self._fn(req) if self._takes_arg else self._fn()
            if inspect.isawaitable(result):
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
