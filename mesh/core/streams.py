"""Stream rules: parts of an entrypoint that yields, from its instance to its client, with credit.

An instance runs a generator entrypoint and sends each part as PARTS ``(task id, seq)``; the
manager forwards it at once to the task's client as STREAM ``(tag, seq)`` and keeps nothing:
**flow control is end to end**.  The client grants credit (STREAM_CREDIT: parts below ``upto``)
as it consumes, the manager passes it to the instance (CREDIT), and the instance never runs its
generator more than ``stream_window`` parts past what the consumer has taken, so neither the
manager nor the client buffers without bound.  ``upto`` -1 cancels: a queued task is dropped; a
running one's generator is closed (CREDIT -1) and it answers ``cancelled``, its instance free.

The end of a stream is the task's ordinary answer, with an empty payload (the parts were the
result); an error after some parts is the task's error, after them.  If the instance dies
mid-stream, :meth:`mesh.core.tasks.TaskRules.requeue` runs a ``restartable`` entrypoint again from
the start (the parts the client has are dropped here, by seq) and fails any other with
``Unavailable`` saying how many parts were delivered: never a duplicated or missing part without
an error (docs/streaming.md).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from mesh.core.base import ENGINE_PEERS, Base
from mesh.errors import Cancelled
from mesh.model.records import PENDING, RUNNING, Instance
from mesh.wire.protocol import Credit, Parts, Stream, StreamCredit


class StreamRules(Base):
    def on_parts(self, peer: bytes, rec: Parts, payloads: Sequence[Any]) -> None:
        inst = self.peers.get(peer)
        if not isinstance(inst, Instance):
            self.gone(peer, "unknown instance")
            return
        out: Dict[Tuple[bytes, str], Tuple[List[Tuple[int, int]], List[Any]]] = {}
        tasks = self.tasks
        for (tid, seq), payload in zip(rec.items, payloads):
            t = tasks.get(tid)
            if t is None or t.instance != inst.id or t.state != RUNNING or seq > t.parts:
                continue   # a late part of a task taken away, or out of order (never from our SDK)
            if seq == 0 and t.upto:   # a run that started after the client gave credit, or cancelled
                self.send(peer, Credit([(tid, -1 if t.upto < 0 else max(t.upto, t.parts + 1))]))
            if t.upto < 0:
                continue   # cancelled: its parts go nowhere
            if seq < t.parts:
                continue   # a restartable stream run again: the client has this one
            t.parts = seq + 1
            if t.client and t.client not in ENGINE_PEERS:
                items, frames = out.setdefault((t.client, t.sid), ([], []))
                items.append((t.tag, seq))
                frames.append(payload)
        self.stats["parts"] += len(rec.items)
        for (client, sid), (items, frames) in out.items():
            self.send(client, Stream(sid, items), frames)

    def on_stream_credit(self, peer: bytes, rec: StreamCredit) -> None:
        """Credit (or a cancel) for the client's own streams: only the connection that submitted a
        task (its current ROUTER identity) may steer it."""
        per_instance: Dict[bytes, List[Tuple[int, int]]] = {}
        for tag, upto in rec.items:
            tid = self.by_tag.get((rec.cid, tag))
            t = self.tasks.get(tid) if tid is not None else None
            if t is None or t.client != peer or t.sid != rec.session:
                continue
            if upto < 0:
                self.cancel_stream(t)
                continue
            if upto <= t.upto or t.upto < 0:   # not more, or cancelled already
                continue
            t.upto = upto
            inst = self.instances.get(t.instance) if t.state == RUNNING and t.instance else None
            if inst is not None and inst.identity is not None:
                per_instance.setdefault(inst.identity, []).append((t.id, upto))
        for identity, items in per_instance.items():
            self.send(identity, Credit(items))

    def cancel_stream(self, t: Any) -> None:
        t.upto = -1   # sticks: a first part or a late credit never restarts it
        why = Cancelled(f"task {t.id}: the caller stopped the stream after {t.parts} parts", task=t.id,
                        parts=t.parts)
        if t.state == PENDING:
            s = self.sessions.get(t.sid)
            if s is not None and t.id in s.pending:
                s.pending.remove(t.id)
            self.fail_tasks([t], why, "cancelled")
        elif t.state == RUNNING:
            inst = self.instances.get(t.instance) if t.instance else None
            if inst is not None and inst.identity is not None:
                self.send(inst.identity, Credit([(t.id, -1)]))   # it closes the generator and answers
