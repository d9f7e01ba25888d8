"""Sockets and liveness: how every zeromesh peer sets up its ZeroMQ sockets.

One place for socket options, so the manager, executors, instances and
clients agree on them (docs/protocol.md, "Sockets" and "Heartbeats").
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, cast

import zmq

RECONNECT_IVL_MS = 100       # first reconnect attempt after a lost connection
RECONNECT_IVL_MAX_MS = 2000  # reconnect backoff ceiling


def router(bind: str, max_message_size: int, send_hwm: int = 0, ctx: Optional[zmq.Context] = None,
           curve: Optional[Tuple[bytes, bytes]] = None) -> zmq.Socket:
    """The manager's socket.

    ROUTER_MANDATORY: a send to a vanished peer, or to one whose queue is at
    ``send_hwm`` messages (a peer that stopped reading), fails at once instead
    of being dropped silently or growing memory; the manager keeps what it
    could not deliver.  Receives are not capped: input is bounded by the
    clients' windows and the manager's queue limits.
    """
    s = (ctx or zmq.Context.instance()).socket(zmq.ROUTER)
    s.setsockopt(zmq.ROUTER_MANDATORY, 1)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    s.setsockopt(zmq.SNDHWM, send_hwm)
    s.setsockopt(zmq.RCVHWM, 0)
    if curve is not None:   # (public, secret): CURVE server; the ZAP handler decides who may connect
        s.setsockopt(zmq.CURVE_SERVER, 1)
        s.setsockopt(zmq.CURVE_PUBLICKEY, curve[0])
        s.setsockopt(zmq.CURVE_SECRETKEY, curve[1])
        s.setsockopt(zmq.ZAP_DOMAIN, b"zeromesh")
    s.bind(bind)
    return s


def dealer(endpoint: str, linger_ms: int = 0, ctx: Optional[zmq.Context] = None,
           curve: Optional[Tuple[bytes, bytes, bytes]] = None) -> zmq.Socket:
    """A peer's socket to the manager; reconnects by itself with capped backoff.

    ``curve`` = (manager's public key, our public key, our secret key) encrypts
    the connection and authenticates the manager: with the wrong manager key
    the handshake fails and nothing is ever delivered.  Raises ``zmq.ZMQError``
    (and closes the socket) when ``endpoint`` cannot be connected to.
    """
    s = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
    if curve is not None:
        s.setsockopt(zmq.CURVE_SERVERKEY, curve[0])
        s.setsockopt(zmq.CURVE_PUBLICKEY, curve[1])
        s.setsockopt(zmq.CURVE_SECRETKEY, curve[2])
    s.setsockopt(zmq.LINGER, linger_ms)
    s.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    try:
        s.connect(endpoint)
    except zmq.ZMQError:
        s.close(linger=0)   # a malformed endpoint must not leave a socket behind
        raise
    return s


# Plain ints: pyzmq's enum flags cost an enum operation per frame on the hot path.
SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
RCVMORE = int(zmq.RCVMORE)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)


def send(sock: zmq.Socket, frames: Sequence[Any], flags: int = NOBLOCK) -> None:
    """send_multipart without the per-frame type checks and enum arithmetic."""
    more = SNDMORE | flags
    last = len(frames) - 1
    for i, f in enumerate(frames):
        sock.send(f, more if i < last else flags, copy=len(f) < COPY_THRESHOLD)


def recv(sock: zmq.Socket, copied: int = 3) -> Optional[List[Any]]:
    """One whole message if one is waiting, else None (no exception on the common empty case).

    The first ``copied`` frames (routing and header frames, all small) arrive
    as bytes; payload frames after them arrive as ``zmq.Frame`` without a
    copy, so a 10 MiB payload is never copied by a peer that only forwards it.
    """
    if not cast(int, sock.getsockopt(EVENTS)) & POLLIN:
        return None
    frames: List[Any] = [sock.recv(NOBLOCK)]
    while sock.getsockopt(RCVMORE):
        frames.append(sock.recv(NOBLOCK, copy=len(frames) < copied))
    return frames


COPY_THRESHOLD = 65536  # larger frames are sent zero-copy (pyzmq keeps a reference until sent)


class Liveness:
    """Paranoid-Pirate style bookkeeping: any traffic counts, silence is measured."""

    def __init__(self, interval: float, liveness: int) -> None:
        self.interval = interval
        self.liveness = liveness
        self.last_heard = self.last_sent = time.monotonic()

    def heard(self) -> None:
        self.last_heard = time.monotonic()

    def sent(self) -> None:
        self.last_sent = time.monotonic()

    def should_ping(self) -> bool:
        return time.monotonic() - self.last_sent >= self.interval

    def silent_for(self) -> float:
        return time.monotonic() - self.last_heard

    def dead(self) -> bool:
        return self.silent_for() > self.interval * self.liveness


HANDSHAKE_FAILED = {
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "no_detail",   # the peer closed: e.g. it could not decrypt our HELLO
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "protocol",     # malformed or undecryptable CURVE commands
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "auth",             # the ZAP handler said no
}


def rejected_message(endpoint: str) -> str:
    """What a client or an executor says when the manager refuses its CURVE handshake."""
    return (f"the manager at {endpoint} rejected our CURVE handshake: check the manager's public key "
            "(--manager-key / ZMESH_MANAGER_KEY / manager_key:), it must be the manager's NAME.key")


class HandshakeWatch:
    """ZeroMQ's socket monitor, reduced to what an operator needs: did a CURVE handshake fail?

    Without it a wrong manager key looks like a manager that is not running (nothing is ever
    delivered, nothing is logged).  ``poll()`` drains the monitor without blocking and returns
    the events seen as ``(kind, value, address)``; ``sock`` may be added to a ``zmq.Poller``.
    On the listening side ``ACCEPTED`` carries the new connection's file descriptor, from which
    the peer's address is read (:meth:`peer`)."""

    def __init__(self, sock: zmq.Socket, accepting: bool = False) -> None:
        events = 0
        for e in HANDSHAKE_FAILED:
            events |= e
        events |= int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        if accepting:
            events |= int(zmq.EVENT_ACCEPTED) | int(zmq.EVENT_DISCONNECTED)
        self.sock = sock.get_monitor_socket(events=events)
        self._owner = sock
        self._peers: Dict[int, str] = {}   # fd -> "host:port", from ACCEPTED, until DISCONNECTED

    def poll(self) -> List[Tuple[str, int, str]]:
        from zmq.utils.monitor import parse_monitor_message
        out: List[Tuple[str, int, str]] = []
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            except zmq.ZMQError:
                return out
            msg = parse_monitor_message(frames)
            event, value = int(msg["event"]), int(msg["value"])
            if event == zmq.EVENT_ACCEPTED:
                self._peers[value] = _peer_address(value)
                continue
            if event == zmq.EVENT_DISCONNECTED:
                out.append(("disconnected", value, self._peers.pop(value, "") or ""))
                continue
            kind = "succeeded" if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else HANDSHAKE_FAILED.get(event, "other")
            out.append((kind, value, msg["endpoint"].decode(errors="replace")))

    def close(self) -> None:
        try:
            self._owner.disable_monitor()
        except zmq.ZMQError:
            pass
        self.sock.close(linger=0)


def _peer_address(fd: int) -> str:
    """``host:port`` of the TCP peer on ``fd`` (read from a duplicate; the original is left alone)."""
    import socket as pysocket
    try:
        s = pysocket.socket(fileno=os.dup(fd))    # the family is read from the descriptor
    except OSError:
        return ""
    try:
        peer = s.getpeername()
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
    except OSError:
        return ""
    finally:
        s.close()
