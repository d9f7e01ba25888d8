"""The executor's shared object cache, served to its instances over ipc://.

Instances on this machine ask here instead of the manager (``get_object``);
the proxy asks the manager only for what its own cache lacks (its version in
``have``), and concurrent requests for one key share one fetch.  So a 50 MB
object crosses the network once per executor, and a patch arrives as a patch.
The cache's entries are replicas (:mod:`mesh.data.replica`): an answer that does
not follow on from what the proxy holds is refetched whole, never guessed at.

Every read is authorized by the manager: instances of different owners share
this cache, so the proxy asks with the asking instance's own token and answers
from a fetch only the readers that hold that token.  Readers with another token
wait for the fetch in flight to fill the cache, then ask again with theirs
(the answer is then a small "same").  A cached object still costs a round trip
to the manager; what the cache saves is the bytes.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import zmq

from mesh.data.cache import ObjectCache
from mesh.errors import InvalidArgument, MeshError, ProtocolError, Unavailable
from mesh.ops.log import event
from mesh.wire.protocol import Cmd, Message, Reply, Request, decode, encode

log = logging.getLogger("zeromesh.executor")

Waiter = Tuple[bytes, int, int, Optional[str]]  # instance identity, its rid, the version it holds, its token


class CacheProxy:
    def __init__(self, run_dir: str, max_bytes: int, ask_manager: Callable[[Any, List[Any]], None],
                 sock: Optional[zmq.Socket] = None) -> None:
        """``sock``: the ROUTER the instances connect to; bound here at ``endpoint`` unless given."""
        self.cache = ObjectCache(max_bytes)
        self.endpoint = f"ipc://{os.path.join(run_dir, 'objects.sock')}"
        if sock is None:
            sock = zmq.Context.instance().socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(self.endpoint)
        self.sock: zmq.Socket = sock
        self._ask = ask_manager
        self._rids = itertools.count(1)
        self._fetching: Dict[int, Tuple[str, Optional[str]]] = {}   # our rid at the manager -> (key, token)
        self._due: Dict[int, float] = {}              # our rid -> when to give up on its answer
        self.fetch_timeout = 30.0                     # seconds a fetch may go unanswered (plus its wait)
        self._waiters: Dict[str, List[Waiter]] = {}  # key -> readers waiting, in arrival order
        self.fetches = 0

    def stats(self) -> Dict[str, int]:
        return {**self.cache.stats, "fetches": self.fetches, "bytes": self.cache.size, "entries": len(self.cache.entries)}

    def on_instance(self) -> None:
        for _ in range(1000):
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = frames[0]
            try:
                msg = decode(frames[1:])
            except ProtocolError as exc:
                self._reply(identity, -1, error=exc.to_wire())
                continue
            if msg.cmd is not Cmd.REQUEST:
                continue
            args, rid = msg.header.args, msg.header.rid
            key, have, wait = args.get("key"), args.get("have", 0), args.get("wait")
            if msg.header.method != "get_object" or not isinstance(key, str) or not isinstance(have, int) \
                    or wait is not None and not isinstance(wait, (int, float)):
                err = InvalidArgument("the executor's object cache answers get_object {key: str, have: int, "
                                      "wait?: number} only")
                self._reply(identity, rid, error=err.to_wire())
                continue
            self._get(identity, rid, key, have, msg.header.token, wait)

    def _get(self, identity: bytes, rid: int, key: str, have: int, token: Optional[str] = None,
             wait: Any = None) -> None:
        waiting = self._waiters.setdefault(key, [])
        waiting.append((identity, rid, have, token))
        if len(waiting) == 1:
            self._fetch(key, token, wait)   # else one is in flight; this reader waits for it

    def _fetch(self, key: str, token: Optional[str], wait: Any = None) -> None:
        """Ask the manager; ``wait``: the reader's, for an object not put yet (a kept result)."""
        mrid = next(self._rids)
        self._fetching[mrid] = (key, token)
        self._due[mrid] = time.monotonic() + self.fetch_timeout + (wait if isinstance(wait, (int, float)) else 0)
        self.fetches += 1
        args = {"key": key, "have": self.cache.version(key)}
        if wait is not None:
            args["wait"] = wait
        self._ask(Request(mrid, "get_object", args, token), [])

    def on_reply(self, msg: Message) -> bool:
        """Handle the manager's answer to one of our fetches; False if it was not ours."""
        reply: Reply = msg.header
        fetch = self._fetching.pop(reply.rid, None)
        self._due.pop(reply.rid, None)
        if fetch is None:
            return False
        key, token = fetch
        everyone = self._waiters.pop(key, [])
        waiters = [w for w in everyone if w[3] == token]    # what this answer was authorized for
        others = [w for w in everyone if w[3] != token]
        try:
            self._answer(key, reply, msg, waiters)   # (on a gap, it puts these readers back and refetches)
        finally:
            if others:   # readers with other tokens ask again with theirs (the cache now holds it)
                pending = self._waiters.setdefault(key, [])
                start = not pending   # else a fetch is in flight already and they wait for it
                pending.extend(others)
                if start:
                    self._fetch(key, others[0][3])
        return True

    def _answer(self, key: str, reply: Reply, msg: Message, waiters: List[Waiter]) -> None:
        if not reply.ok:
            for identity, rid, _, _ in waiters:
                self._reply(identity, rid, error=reply.error)
            return
        header = reply.result
        try:
            entry = self.cache.apply(key, header, msg.payloads[0] if msg.payloads else None)
        except MeshError as exc:   # a malformed answer: the cache is unchanged, the readers are told
            event(log, logging.WARNING, "object answer refused", key=key, error=str(exc))
            for identity, rid, _, _ in waiters:
                self._reply(identity, rid, error=exc.to_wire())
            return
        if entry is None:   # a gap between our copy and the answer: fetch the whole object once
            self.cache.forget(key)
            for identity, rid, have, token in waiters:
                self._get(identity, rid, key, have, token)
            return
        patches = header.get("patches") if header["mode"] == "patches" else None
        for identity, rid, have, _ in waiters:
            base = {"key": key, "version": entry.version, "kind": entry.kind}
            if have == entry.version:
                self._reply(identity, rid, result={**base, "mode": "same"})
            elif patches is not None and entry.version == header["version"] == have + len(patches):
                self._reply(identity, rid, result={**base, "mode": "patches", "patches": patches})
            else:
                self._reply(identity, rid, result={**base, "mode": "full"}, blob=entry.encoded())

    def expire(self, everything: bool = False) -> None:
        """Fetches the manager will not answer (a request lost with a manager restart or a reconnect):
        their readers hear Unavailable and may ask again; with ``everything``, all of them (on reconnect)."""
        now = time.monotonic()
        for mrid in [r for r, due in self._due.items() if everything or due <= now]:
            self._due.pop(mrid, None)
            fetch = self._fetching.pop(mrid, None)
            if fetch is None:
                continue
            err = Unavailable(f"no answer from the manager for object {fetch[0]!r}", key=fetch[0]).to_wire()
            for identity, rid, _, _ in self._waiters.pop(fetch[0], []):
                self._reply(identity, rid, error=err)

    def _reply(self, identity: bytes, rid: int, result: Any = None, error: Any = None, blob: Optional[bytes] = None) -> None:
        if error is not None:
            record = Reply(rid, False, error=error)
        else:
            record = Reply(rid, True, result, blob=blob is not None)
        payloads = [] if blob is None else [blob]
        try:
            self.sock.send_multipart([identity, *encode(record, payloads)], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            pass  # the instance is gone

    def close(self) -> None:
        self.sock.close(linger=0)
