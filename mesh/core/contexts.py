"""Context and object rules: the manager is the sequencer of every versioned document.

A session's context (docs/context.md) and each cached object is a
:class:`~mesh.data.context.Document`.  A write is applied atomically, gets the next
version, is logged in the batch (a patch, or a snapshot every
``snapshot_every`` writes) and only then announced: every CTX_PATCH and every
write acknowledgement is an ``after_commit`` send, so a version a peer has
been told about survives a manager crash.  Replicas apply patches in version
order and ask for a snapshot (RESYNC, answered with BIND) on a gap.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Dict, List, Optional, Sequence

from mesh.core.base import Base, log
from mesh.data.batch import OBJECT_PREFIX
from mesh.data.objects import StoredObject
from mesh.errors import Conflict, FailedPrecondition, MeshError, NotFound
from mesh.model.records import Instance, Session
from mesh.ops.log import event
from mesh.wire.protocol import CtxPatch, CtxReject, CtxWrite, Resync, pack


WATCH_LOG = 256     # writes of a watched context kept for its watchers (past that they get the whole value)
WATCH_IDLE = 60.0   # seconds a context stays watched after the last watch call


class ContextRules(Base):
    def apply_context_write(self, s: Session, ops: Optional[List[Any]], blob: Optional[bytes],
                            writer: Optional[Instance] = None, seq: Optional[int] = None) -> int:
        """Sequence one write: apply, log, broadcast to every replica in version order.

        Counts the write's bytes in ``s.bytes_in`` and failed ``test`` ops in ``s.conflicts``.
        """
        self.check_patch_size(ops)
        packed = pack(ops) if ops is not None else None
        s.bytes_in += len(packed) if packed is not None else len(blob or b"")
        try:
            version = s.context.apply(ops, blob, self.settings.max_context_size, len(packed or b""))
        except MeshError as exc:
            if exc.code == Conflict.code:
                s.conflicts += 1
            raise
        self.batch.patches.append((s.id, version, packed, blob))
        log_ = self.ctx_logs.get(s.id)
        if log_ is not None:   # someone watches this context: keep the write, wake who waits
            log_.append((version, ops, None))   # a whole new value is not kept: its watchers get the context
            for peer, rid, have, _ in self.ctx_waiters.pop(s.id, []):
                self.reply(peer, rid, result=self.context_since(s, have), after_commit=True)
        s.patches_since_snapshot += 1
        if s.patches_since_snapshot >= self.settings.snapshot_every:
            self.snapshot(s)
        payloads = [] if ops is not None else [blob]
        for inst in s.instances:
            if inst.identity is not None:
                mine = inst is writer
                self.send(inst.identity, CtxPatch(s.id, version, ops, seq if mine else None), payloads,
                          after_commit=True)
        return version

    # -- watchers (get_context {have, wait}: the client's watch_context) -----------------------
    def watch_session(self, sid: str) -> None:
        """Keep the recent writes of ``sid`` (up to WATCH_LOG) while someone watches it."""
        if sid not in self.ctx_logs:
            self.ctx_logs[sid] = collections.deque(maxlen=WATCH_LOG)
        self.ctx_watched[sid] = self.now + WATCH_IDLE

    def context_since(self, s: Session, have: int) -> Dict[str, Any]:
        """The writes after version ``have`` if they are all kept and none replaced the whole value;
        else the whole context."""
        doc = s.context
        log_ = self.ctx_logs.get(s.id) or ()
        since = [(v, ops) for v, ops, blob in log_ if v > have]
        if have <= doc.version and (have == doc.version or since and since[0][0] == have + 1
                                    and len(since) == doc.version - have
                                    and all(ops is not None for _, ops in since)):
            return {"mode": "patches", "version": doc.version, "patches": [[v, ops] for v, ops in since]}
        return {"mode": "full", "kind": doc.kind, "version": doc.version, "data": doc.encoded()}

    def wait_for_context(self, peer: bytes, rid: int, waiting: Any) -> None:
        self.ctx_waiters.setdefault(waiting.session, []).append((peer, rid, waiting.have, waiting.deadline))

    def expire_context_watches(self) -> None:
        for sid, waiters in list(self.ctx_waiters.items()):
            s = self.sessions.get(sid)
            keep = []
            for peer, rid, have, deadline in waiters:
                if deadline <= self.now or s is None:
                    if s is None:
                        self.reply(peer, rid, error=NotFound(f"session {sid!r} does not exist", session=sid))
                    else:
                        self.reply(peer, rid, result=self.context_since(s, have))
                else:
                    keep.append((peer, rid, have, deadline))
            if keep:
                self.ctx_waiters[sid] = keep
            else:
                del self.ctx_waiters[sid]
        for sid, until in list(self.ctx_watched.items()):
            if until <= self.now and sid not in self.ctx_waiters:
                del self.ctx_watched[sid]
                self.ctx_logs.pop(sid, None)

    def snapshot(self, s: Session) -> None:
        s.patches_since_snapshot = 0
        self.batch.snapshots.append((s.id, s.context.version, s.context.kind, s.context.encoded()))

    def on_ctx_write(self, peer: bytes, rec: CtxWrite, payloads: Sequence[Any]) -> None:
        inst = self.peers.get(peer)
        s = self.sessions.get(rec.session)
        if not isinstance(inst, Instance) or s is None or inst.session is not s:
            err = FailedPrecondition(f"instance is not bound to session {rec.session!r}", session=rec.session)
            self.send(peer, CtxReject(rec.session, rec.seq, err.to_wire()))
            return
        try:
            blob = bytes(payloads[0]) if payloads else None
            self.apply_context_write(s, rec.ops, blob, writer=inst, seq=rec.seq)
        except MeshError as exc:
            self.send(peer, CtxReject(s.id, rec.seq, exc.to_wire()))

    def on_resync(self, peer: bytes, rec: Resync) -> None:
        """A replica saw a version gap: send it a fresh snapshot (the Clone pattern's repair)."""
        inst = self.peers.get(peer)
        if not isinstance(inst, Instance):
            self.gone(peer, "unknown instance")
            return
        s = inst.session
        self.stats["resyncs"] += 1
        event(log, logging.INFO, "replica resync", instance=inst.id, session=rec.session, have=rec.have,
              version=s.context.version if s else None)
        self.bind(inst, s, keep_draining=True)

    # -- objects ----------------------------------------------------------------------
    def persist_object(self, obj: StoredObject, ops: Optional[List[Any]] = None) -> None:
        """Log a patch, or snapshot the object (new, replaced, or every ``snapshot_every`` patches)."""
        doc = obj.doc
        if ops is not None and doc.version % self.settings.snapshot_every:
            self.batch.patches.append((OBJECT_PREFIX + obj.key, doc.version, pack(ops), None))
        else:
            self.batch.objects.append(obj.row())
            self.batch.snapshots.append((OBJECT_PREFIX + obj.key, doc.version, doc.kind, doc.encoded()))

    def delete_objects(self, keys: List[str]) -> None:
        for key in keys:
            self.objects.items.pop(key, None)
            self.batch.deleted_objects.append(key)
            for lease in self.leases.values():   # (few leases: one per runner)
                if key in lease.objects:
                    lease.objects.discard(key)
                    self.save_lease(lease)

    def expire_objects(self) -> None:
        expired = self.objects.expired(self.now)
        if expired:
            self.delete_objects(expired)
