"""The session manager's event loop: one asyncio (uvloop) process, one ROUTER socket.

This module only moves bytes.  Every decision is made by :class:`mesh.core.Core`
(sans-I/O); the loop receives, decodes, hands each message to the core and
performs the effects it returns, in order (:mod:`mesh.core.effects`):

* sends go out at once, except those that must wait for a commit
  (``after_commit``) and anything queued behind them for the same peer;
* the core's store batch goes to the writer thread once per round (group
  commit), and at once when a send waits for it;
* calls run on the writer thread (store) or a worker thread (CPU) and come
  back to the core on the loop.

Each wake-up drains every message already queued (up to ``DRAIN_BATCH``).
When the disk falls ``max_store_backlog`` commits behind, the core holds back
new tasks of busy sessions until it catches up (everything else is still read
and answered, heartbeats first among them), so memory stays bounded and one
flooding client slows only itself.  systemd notification,
SIGHUP reload and the optional HTTP ``/metrics`` endpoint live here too.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import signal
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, cast

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from mesh.core import CPU, Call, Core, Effects, Send
from mesh.data.store import ManagerLock, Store, Writer
from mesh.errors import FailedPrecondition, InvalidArgument, ProtocolError
from mesh.model.records import ALIVE, OPEN
from mesh.ops import keys, sdnotify
from mesh.ops.config import Settings
from mesh.ops.log import event
from mesh.wire import transport
from mesh.wire.protocol import decode, encode

log = logging.getLogger("zeromesh.manager")

DRAIN_BATCH = 4096  # messages handled per wake-up before timers get a turn
HANDSHAKE_LOG_EVERY = 60.0  # seconds between log lines about one host failing the CURVE handshake


class Manager:
    def __init__(self, bind: str, db: str, settings: Optional[Settings] = None, curve_secret: Optional[str] = None,
                 insecure: bool = False) -> None:
        if bool(curve_secret) == bool(insecure):
            raise InvalidArgument("start the manager with --curve-secret FILE (encrypted and authenticated; "
                                  "see docs/security.md) or with --insecure (plain TCP, every peer is admin)")
        self.curve = keys.load_secret(curve_secret) if curve_secret else None
        self.settings = settings or Settings.load()
        self.bind_addr = bind
        self.lock = ManagerLock(db)
        if db != ":memory:" and not self.lock.acquire():
            raise FailedPrecondition(f"another manager (pid {self.lock.holder()}) is running on {db}; "
                                     "one database serves one manager", path=db)
        self.store = Store(db)
        self.writer = Writer(self.store, nice=self.settings.writer_nice)
        self.cpu = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="zmesh-cpu")
        self.core = Core(self.settings, secured=self.curve is not None)
        self._restored = self.core.restore(self.store.load_state(), time.time())
        # sends waiting for a commit, in order: (commit future or None while the batch is open, sends)
        self._holds: Deque[Tuple[Optional["concurrent.futures.Future[Any]"], List[Send]]] = collections.deque()
        self._last_commit: Optional["concurrent.futures.Future[Any]"] = None   # the newest group commit
        self._held_peers: Dict[bytes, int] = collections.Counter()
        self._hold_acks = not self.settings.unsafe_ack_before_commit   # the durability rule (see Settings)
        if not self._hold_acks:
            log.warning("unsafe_ack_before_commit is on: acknowledged writes are lost on a crash (tests only)")
        self._closing = False
        self._round_pending = False
        self.endpoint = ""
        self.on_reload: Optional[Callable[[], None]] = None   # SIGHUP (systemctl reload)

    # -- socket plumbing -----------------------------------------------------
    def _open_socket(self) -> None:
        if self.curve is not None:
            # ZAP: any CURVE key may connect (clients use fresh keys and prove who they are with
            # credentials); the key becomes the frames' User-Id, which executors are checked by.
            self.auth = ThreadAuthenticator(zmq.Context.instance(), log=logging.getLogger("zeromesh.zap"))
            self.auth.start()
            self.auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        else:
            event(log, logging.WARNING, "INSECURE: plain TCP, no authentication, every peer acts as admin; "
                  "use --curve-secret on a network you do not own")
        self.sock = transport.router(self.bind_addr, self.settings.max_message_size, self.settings.send_hwm,
                                     curve=self.curve)
        self.endpoint = self.core.endpoint = cast(bytes, self.sock.getsockopt(zmq.LAST_ENDPOINT)).decode()
        # a peer with the wrong manager key fails the CURVE handshake before any handler: log it here
        self.handshakes = transport.HandshakeWatch(self.sock, accepting=True) if self.curve is not None else None
        self._hs_failed: List[str] = []               # failures not yet matched to a disconnected peer
        self._hs_logged: Dict[str, float] = {}        # host -> when last logged (a retrying peer: once a minute)

    def _on_handshake_events(self) -> None:
        """Log each peer whose CURVE handshake failed (the address comes with its disconnect)."""
        assert self.handshakes is not None
        for kind, _, where in self.handshakes.poll():
            if kind in transport.HANDSHAKE_FAILED.values():
                self.core.stats["handshakes_refused"] += 1
                self._hs_failed.append(kind)
            elif kind == "disconnected" and self._hs_failed:
                reason = self._hs_failed.pop(0)
                host = where.rsplit(":", 1)[0]
                now = time.monotonic()
                if now - self._hs_logged.get(host, -HANDSHAKE_LOG_EVERY) >= HANDSHAKE_LOG_EVERY:
                    self._hs_logged[host] = now
                    event(log, logging.WARNING, "refused a CURVE handshake: the peer does not have this "
                          "manager's public key", peer=where or "unknown", reason=reason, endpoint=self.endpoint,
                          refused_so_far=self.core.stats["handshakes_refused"])

    def _on_readable(self) -> None:
        if self._closing:
            return
        sock, recv, core, perform = self.sock, transport.recv, self.core, self._perform
        copied = 1 if self.curve is not None else 4
        stats = core.stats
        for _ in range(DRAIN_BATCH):
            try:
                # identity + 3 header frames as bytes, payloads zero-copy; when secured, the
                # signature frame stays a Frame too, for its User-Id (the peer's CURVE key)
                frames = recv(sock, copied)
            except zmq.ZMQError:
                break
            if frames is None:
                break
            stats["bytes_in"] += sum(len(f) for f in frames)
            peer = frames[0]
            try:
                msg = decode(frames[1:])
            except ProtocolError as exc:
                perform(core.bad_message(peer, exc))
                continue
            key = str(frames[1].get("User-Id")) if copied == 1 and isinstance(frames[1], zmq.Frame) else None
            perform(core.handle(peer, msg, time.time(), key))
        else:
            self.loop.call_soon(self._on_readable)  # more queued: give timers a turn first
        self._end_round(sent=False)   # the last recv above already looked after every send

    # -- effects -------------------------------------------------------------
    def _perform(self, effects: Effects) -> None:
        for eff in effects:
            if eff.__class__ is Send:
                send = cast(Send, eff)
                if send.after_commit and self._hold_acks and (self.core.batch or not self._committed()) \
                        or self._held_peers.get(send.peer):
                    self._hold(send)
                else:
                    self._send(send)
            else:
                self._call(cast(Call, eff))

    def _send(self, send: Send) -> None:
        try:
            transport.send(self.sock, [send.peer, *encode(send.record, send.payloads)])
        except zmq.ZMQError as exc:  # EHOSTUNREACH (peer gone) or EAGAIN (its queue is full)
            event(log, logging.DEBUG, "send failed", record=type(send.record).__name__, error=exc.strerror)
            self._perform(self.core.lost(send, time.time()))

    def _committed(self) -> bool:
        """Has every batch handed to the writer so far committed?"""
        return self._last_commit is None or self._last_commit.done()

    def _hold(self, send: Send) -> None:
        """Keep ``send`` until the batch open now has committed (the durability rule)."""
        if not self._holds or self._holds[-1][0] is not None:
            self._holds.append((None, []))
        self._holds[-1][1].append(send)
        self._held_peers[send.peer] += 1

    def _committed_one(self, fut: "concurrent.futures.Future[Any]") -> None:
        """A group commit ended: a failure stops the manager (nothing it acknowledges may be
        missing from disk); otherwise the sends that waited for it go out."""
        if fut.exception() is not None:
            event(log, logging.CRITICAL, "a group commit failed; stopping rather than acknowledge what is "
                  "not on disk", error=repr(fut.exception()))
            self._holds.clear()
            self._held_peers.clear()
            self.stop()
            return
        self._release()

    def _release(self) -> None:
        """Send what waited for commits that have finished, oldest first."""
        while self._holds and self._holds[0][0] is not None and self._holds[0][0].done():
            _, sends = self._holds.popleft()
            for send in sends:
                self._held_peers[send.peer] -= 1
                if not self._held_peers[send.peer]:
                    del self._held_peers[send.peer]
                self._send(send)
        self._wake()

    def _call(self, call: Call) -> None:
        if call.where == CPU:
            fut = self.cpu.submit(call.fn, *call.args)
        else:
            self._flush()   # the call reads what the core wrote before it
            fut = self.writer.submit(call.fn, self.store, *call.args)
        fut.add_done_callback(lambda f: self.loop.call_soon_threadsafe(self._completed, call, f))

    def _completed(self, call: Call, fut: "concurrent.futures.Future[Any]") -> None:
        if self._closing:
            return   # the final commit has been taken: nothing more is decided
        exc = fut.exception()
        effects = self.core.complete(call, time.time(), None if exc else fut.result(), exc)
        self._perform(effects)
        self._end_round()

    def _end_round(self, sent: bool = True) -> None:
        """After handling something: placement if wanted, then commit at once if a send waits for it.

        ``sent``: messages went out since the socket was last found empty, so look again (its FD
        is edge-triggered: a send can make input readable without waking the loop)."""
        effects = self.core.end_round(time.time())
        self._perform(effects)
        if self._holds and self._holds[-1][0] is None:
            self._flush()
        if sent or effects:
            self._wake()

    def _wake(self) -> None:
        """Re-check the socket after sending outside the reader (its FD is edge-triggered)."""
        if not self._round_pending and not self._closing:
            self._round_pending = True
            self.loop.call_soon(self._woken)

    def _woken(self) -> None:
        self._round_pending = False
        self._on_readable_quiet()

    def _on_readable_quiet(self) -> None:
        if cast(int, self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._on_readable()

    # -- group commit ------------------------------------------------------------
    def _flush(self) -> None:
        """Hand the core's batch to the writer thread (one group commit).

        Sends held for this batch are released when it has committed.  The core learns
        whether the disk is ``max_store_backlog`` commits behind (it then holds back busy
        sessions' new tasks) or has caught up to half that (it takes them again).
        """
        backlog = self.core.store_backlog = self.writer.backlog()   # what stats report
        limit = self.settings.max_store_backlog
        behind = backlog >= limit or (self.core.backlogged and backlog > limit // 2)
        if behind != self.core.backlogged or self.core.deferred and not behind:
            if behind:
                self.core.stats["store_pauses"] += 1
            self._perform(self.core.store_behind(behind, time.time()))
        open_hold = bool(self._holds) and self._holds[-1][0] is None
        batch = self.core.take_batch(time.time())
        if not batch and not open_hold:
            return
        fut = self._last_commit = self.writer.submit(self.store.write, batch)
        if open_hold:
            self._holds[-1] = (fut, self._holds[-1][1])
        fut.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self._committed_one, fut))

    def _flush_timer(self) -> None:
        self._flush()
        if not self._closing:
            self.loop.call_later(self.settings.flush_interval, self._flush_timer)

    def _tick(self) -> None:
        self._perform(self.core.tick(time.time()))
        self._end_round()
        if not self._closing:
            self.loop.call_later(min(self.settings.heartbeat_interval, 0.5), self._tick)

    # -- lifecycle --------------------------------------------------------------------
    async def serve(self, ready_file: Optional[str] = None, metrics_port: Optional[int] = None) -> None:
        self.loop = asyncio.get_running_loop()
        self._open_socket()
        if metrics_port is not None:
            host = self.settings.metrics_host
            self._metrics_server = await asyncio.start_server(self._serve_metrics, host, metrics_port)
            event(log, logging.INFO, "metrics over HTTP", url=f"http://{host}:{metrics_port}/metrics")
        self._stopped = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.loop.add_signal_handler(sig, self._stopped.set)
            except (NotImplementedError, RuntimeError):
                pass
        try:  # without a handler SIGHUP (systemctl reload) would kill the manager
            self.loop.add_signal_handler(signal.SIGHUP, self._reload)
        except (NotImplementedError, RuntimeError, AttributeError):
            pass
        self._fd = cast(int, self.sock.getsockopt(zmq.FD))
        self.loop.add_reader(self._fd, self._on_readable)
        if self.handshakes is not None:
            self._hs_fd = cast(int, self.handshakes.sock.getsockopt(zmq.FD))
            self.loop.add_reader(self._hs_fd, self._on_handshake_events)
            self.loop.call_soon(self._on_handshake_events)
        self._perform(self._restored)
        self.loop.call_soon(self._tick)
        self.loop.call_soon(self._flush_timer)
        self.loop.call_soon(self._on_readable)
        event(log, logging.INFO, "manager serving", endpoint=self.endpoint, db=self.store.path,
              sessions=len(self.core.sessions), apps=len(self.core.apps), pending=len(self.core.tasks))
        if ready_file:
            tmp = ready_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(self.endpoint)
            os.replace(tmp, ready_file)
        sdnotify.ready(self.status_line())
        self.loop.call_soon(self._sd_tick)
        await self._stopped.wait()
        sdnotify.stopping()
        await self.shutdown()

    def status_line(self) -> str:
        """One line for ``systemctl status`` (STATUS=)."""
        c = self.core
        running = sum(s.running for s in c.sessions.values())
        open_ = sum(1 for s in c.sessions.values() if s.state == OPEN)
        alive = sum(1 for e in c.executors.values() if e.state == ALIVE)
        return (f"serving {self.endpoint}: {open_} sessions, {len(c.tasks)} tasks in flight "
                f"({running} running), {alive} executors, {len(c.instances)} instances")

    def _sd_tick(self) -> None:
        """WATCHDOG=1 from the event loop itself (a stuck loop stops pinging) and STATUS= every 5 s."""
        if self._closing:
            return
        sdnotify.watchdog()
        sdnotify.status(self.status_line())
        self.loop.call_later(min(sdnotify.watchdog_interval() or 5.0, 5.0), self._sd_tick)

    def _reload(self) -> None:
        sdnotify.reload(self.on_reload, log, self.status_line())

    def stop(self) -> None:
        self._stopped.set()

    def metrics_text(self) -> str:
        self.core.now, self.core.store_backlog = time.time(), self.writer.backlog()
        return self.core.metrics_text()

    async def _serve_metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A minimal HTTP/1.0 answer to GET /metrics (Prometheus scrapes need no more)."""
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            path = request.split()[1] if len(request.split()) > 1 else b""
            if path.split(b"?")[0] == b"/metrics":
                body, status = self.metrics_text().encode(), b"200 OK"
            else:
                body, status = b"not found; try /metrics\n", b"404 Not Found"
            writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def shutdown(self) -> None:
        self._closing = True
        self.loop.remove_reader(self._fd)
        if self.handshakes is not None:
            self.loop.remove_reader(self._hs_fd)
            self.handshakes.close()
        for s in self.core.sessions.values():
            if s.state == OPEN:
                self.core.snapshot(s)
        final = self.writer.submit(self.store.write, self.core.take_batch())
        if self._holds and self._holds[-1][0] is None:
            self._holds[-1] = (final, self._holds[-1][1])
        await asyncio.wrap_future(final)   # the writer is FIFO: every earlier commit has ended too
        self._release()   # acknowledgements of what is now on disk still go out
        self.writer.close()
        self.lock.release()
        self.cpu.shutdown(wait=False)
        self.sock.close(linger=500)   # half a second to deliver them
        event(log, logging.INFO, "manager stopped")


def run(bind: str, db: str, settings: Optional[Settings] = None, ready_file: Optional[str] = None,
        on_reload: Optional[Callable[[], None]] = None, metrics_port: Optional[int] = None,
        curve_secret: Optional[str] = None, insecure: bool = False) -> None:
    """Run a manager in the foreground until SIGINT/SIGTERM, on uvloop where it is installed.

    Under systemd (``Type=notify``) it sends READY=1 once serving, WATCHDOG=1 and
    STATUS= from the loop, STOPPING=1 on shutdown; SIGHUP calls ``on_reload``.
    """
    manager = Manager(bind, db, settings, curve_secret=curve_secret, insecure=insecure)
    manager.on_reload = on_reload
    try:
        import uvloop
    except ImportError:  # uvloop is optional where it does not build (e.g. Windows)
        asyncio.run(manager.serve(ready_file, metrics_port))
    else:
        uvloop.run(manager.serve(ready_file, metrics_port))
