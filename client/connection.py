"""One DEALER connection to the manager, shared safely by many threads.

ZeroMQ sockets are not thread-safe, so one I/O thread owns the socket.  Caller
threads append to a queue and wake the I/O thread through a pipe (at most one
wake-up byte per batch).  The I/O thread drains the queue into as few messages
as possible (all submits of one session go out as one SUBMIT), drains every
received message per wake-up, and resolves ``concurrent.futures.Future``s.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import os
import secrets
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import zmq

from mesh import keys, transport
from mesh.config import Settings, default_manager
from mesh.errors import (DeadlineExceeded, MeshError, ProtocolError, ResourceExhausted, Unauthenticated,
                         Unavailable, from_wire)
from mesh.protocol import Cmd, Message, decode, encode

from . import auth as client_auth

log = logging.getLogger("zeromesh.client")

MAX_BATCH = 1024  # tasks per SUBMIT message


class Connection:
    def __init__(self, manager: Optional[str] = None, settings: Optional[Settings] = None,
                 manager_key: Optional[str] = None, auth: Optional[client_auth.Auth] = None,
                 token: Optional[str] = None) -> None:
        """``manager_key``: the manager's public key file (default ``$ZMESH_MANAGER_KEY``) for a secured
        mesh; this connection then uses a fresh CURVE keypair of its own.  ``auth``: credentials
        (see client.auth), exchanged for a token that this connection renews by itself."""
        self.manager = manager or default_manager()
        self.auth = auth or client_auth.from_env()
        self._token = token or os.environ.get("ZMESH_TOKEN") or (
            None if self.auth else client_auth.stored_token(self.manager))
        self._renew_at: Optional[float] = None       # when to log in again (half the token's life)
        self._auth_lock = threading.Lock()
        self.settings = settings or Settings.load()
        key_file = manager_key or os.environ.get("ZMESH_MANAGER_KEY")
        self._curve = (keys.load_public(key_file), *keys.ephemeral()) if key_file else None
        self._out: Deque[Tuple[Any, ...]] = collections.deque()
        # rid -> (future, deadline, method); no future for our own liveness pings
        self._calls: Dict[int, Tuple[Optional[concurrent.futures.Future], float, str]] = {}
        # tag -> (future, decoder, session id, payload): the payload is kept until the answer
        # arrives, so the task can be resent to a manager that restarted (docs/reliability.md)
        self._tasks: Dict[int, Tuple[concurrent.futures.Future, Callable[[bytes], Any], str, Any]] = {}
        self.client_id = secrets.token_hex(8)
        self._window = threading.BoundedSemaphore(self.settings.max_inflight)
        self._boot: Optional[str] = None
        self._last_ping = 0.0
        self._last_answer = time.monotonic()
        self._rids = itertools.count(1)
        self._tags = itertools.count(1)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._closed = False
        self._ctx: zmq.Context = zmq.Context.instance()
        self._thread = threading.Thread(target=self._io, name="zmesh-io", daemon=True)
        self._started = threading.Event()
        self._thread.start()
        self._started.wait(5)

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

    def _call(self, method: str, args: Optional[Dict[str, Any]], blob: Optional[Any],
              timeout: Optional[float]) -> Tuple[Any, Optional[bytes]]:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        limit = self.settings.request_timeout if timeout is None else timeout
        self._push(("call", method, args or {}, fut, time.monotonic() + limit, blob))
        return fut.result()

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

    def submit(self, sid: str, payload: bytes, decode_result: Callable[[bytes], Any]) -> concurrent.futures.Future:
        """Queue one task.  Blocks while ``max_inflight`` tasks of this connection await answers:
        a client that submits faster than the mesh drains is slowed, not dropped."""
        if len(payload) > self.settings.max_message_size:
            raise ResourceExhausted(
                f"request of {len(payload)} bytes exceeds max_message_size ({self.settings.max_message_size})",
                limit="max_message_size", size=len(payload))
        self._ensure_token()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._window.acquire()
        fut.add_done_callback(lambda _: self._window.release())
        self._push(("task", sid, payload, fut, decode_result))
        return fut

    def _push(self, item: Tuple[Any, ...]) -> None:
        if self._closed:
            raise Unavailable("this connection is closed")
        self._out.append(item)
        if not self._wake_pending:
            with self._wake_lock:
                if not self._wake_pending:
                    self._wake_pending = True
                    os.write(self._wake_w, b"x")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- I/O thread ---------------------------------------------------------------------
    def _io(self) -> None:
        sock = transport.dealer(self.manager, ctx=self._ctx, curve=self._curve)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        self._started.set()
        try:
            while not self._closed:
                poller.poll(timeout=100 if (self._calls or self._tasks) else 500)
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
        finally:
            sock.close(linger=0)
            self._fail_all(Unavailable("the connection to the manager was closed"))

    def _send_queued(self, sock: zmq.Socket) -> None:
        out = self._out
        batches: Dict[str, Tuple[List[int], List[Any]]] = {}
        while out:
            item = out.popleft()
            if item[0] == "task":
                _, sid, payload, fut, decode_result = item
                tag = next(self._tags)
                self._tasks[tag] = (fut, decode_result, sid, payload)
                tags, frames = batches.setdefault(sid, ([], []))
                tags.append(tag)
                frames.append(payload)
                if len(tags) >= MAX_BATCH:
                    self._send(sock, Cmd.SUBMIT, self._submit_header(sid, tags, False), frames)
                    del batches[sid]
            else:
                _, method, args, fut, deadline, blob = item
                rid = next(self._rids)
                self._calls[rid] = (fut, deadline, method)
                header = {"rid": rid, "method": method, "args": args}
                if self._token and method != "login":
                    header["token"] = self._token
                if blob is None:
                    self._send(sock, Cmd.REQUEST, header)
                else:
                    header["blob"] = True
                    self._send(sock, Cmd.REQUEST, header, [blob])
        for sid, (tags, frames) in batches.items():
            self._send(sock, Cmd.SUBMIT, self._submit_header(sid, tags, False), frames)

    def _submit_header(self, sid: str, tags: List[int], resend: bool) -> List[Any]:
        header: List[Any] = [sid, tags, self.client_id, resend]
        if self._token:
            header.append(self._token)
        return header

    def _ping(self, sock: zmq.Socket) -> None:
        """While answers are owed, ask the manager who it is: a new boot id means it restarted."""
        self._last_ping = time.monotonic()
        rid = next(self._rids)
        self._calls[rid] = (None, self._last_ping + self.settings.request_timeout, "ping")
        self._send(sock, Cmd.REQUEST, {"rid": rid, "method": "ping", "args": {}})

    def _on_ping(self, sock: zmq.Socket, result: Any) -> None:
        boot = result.get("boot") if isinstance(result, dict) else None
        if self._boot is not None and boot != self._boot and self._tasks:
            self._resend(sock, "the manager restarted")
        self._boot = boot

    def _resend(self, sock: zmq.Socket, why: str) -> None:
        """Send every unanswered task again, flagged as a resend: the manager re-attaches it,
        answers it from its database, or (if it never got it) runs it.  Idempotent."""
        log.warning("%s; resending %d unanswered tasks", why, len(self._tasks))
        self._last_answer = time.monotonic()
        batches: Dict[str, Tuple[List[int], List[Any]]] = {}
        for tag, (_, _, sid, payload) in self._tasks.items():
            tags, frames = batches.setdefault(sid, ([], []))
            tags.append(tag)
            frames.append(payload)
        for sid, (tags, frames) in batches.items():
            for i in range(0, len(tags), MAX_BATCH):
                self._send(sock, Cmd.SUBMIT, self._submit_header(sid, tags[i:i + MAX_BATCH], True),
                           frames[i:i + MAX_BATCH])

    def _send(self, sock: zmq.Socket, cmd: Cmd, header: Any, payloads: List[Any] = ()) -> None:  # type: ignore[assignment]
        transport.send(sock, encode(cmd, header, payloads), flags=0)

    def _receive(self, sock: zmq.Socket) -> None:
        for _ in range(10000):
            frames = transport.recv(sock)
            if frames is None:
                return
            try:
                msg = decode(frames)
            except ProtocolError as exc:
                log.warning("bad message from manager: %s", exc)
                continue
            if msg.cmd is Cmd.RESULT:
                self._on_result(msg)
            elif msg.cmd is Cmd.REPLY:
                self._on_reply(sock, msg)

    def _on_result(self, msg: Message) -> None:
        self._last_answer = time.monotonic()
        payload: Any
        for (tag, err), payload in zip(msg.header[1], msg.payloads):
            entry = self._tasks.pop(tag, None)
            if entry is None:
                continue             # answered already: a duplicate after a resend
            fut, decode_result = entry[0], entry[1]
            if err is not None:
                fut.set_exception(from_wire(err))
                continue
            try:
                fut.set_result(decode_result(payload))
            except Exception as exc:  # the result class may be unknown here
                fut.set_exception(exc)

    def _on_reply(self, sock: zmq.Socket, msg: Message) -> None:
        h = msg.header
        call = self._calls.pop(h["rid"], None)
        if call is None:
            if h["rid"] == -1:
                log.warning("manager rejected a message: %s", (h.get("error") or {}).get("message"))
            return
        fut = call[0]
        if fut is None:              # our own liveness ping
            if h["ok"]:
                self._on_ping(sock, h.get("result"))
        elif h["ok"]:
            fut.set_result((h.get("result"), msg.payloads[0] if msg.payloads else None))
        else:
            fut.set_exception(from_wire(h.get("error")))

    def _expire_calls(self) -> None:
        now = time.monotonic()
        for rid, (fut, deadline, method) in list(self._calls.items()):
            if now > deadline:
                del self._calls[rid]
                if fut is None:
                    continue
                fut.set_exception(Unavailable(
                    f"the manager at {self.manager} did not answer {method!r} in time; is it running?",
                    manager=self.manager, method=method))

    def _fail_all(self, exc: MeshError) -> None:
        for fut, *_ in list(self._calls.values()):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        for fut, *_ in list(self._tasks.values()):
            if not fut.done():
                fut.set_exception(exc)
        self._calls.clear()
        self._tasks.clear()
        while self._out:
            item = self._out.popleft()
            fut = item[3]
            if not fut.done():
                fut.set_exception(exc)


__all__ = ["Connection", "DeadlineExceeded"]
