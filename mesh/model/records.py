"""The manager's in-memory records and their public (wire/CLI) views.

States are plain strings so that they read the same in SQLite, on the wire and
in ``--json`` output.
"""
from __future__ import annotations

import collections
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from mesh.data.context import Document
from mesh.model.resources import Resources
from mesh.model.spec import AppSpec

# Session states
OPEN = "open"        # accepts tasks
CLOSED = "closed"    # accepts nothing; pending tasks were cancelled

# Task states
PENDING = "pending"      # queued in the manager
RUNNING = "running"      # sent to an instance (attempt counted)
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

# Executor states
ALIVE = "alive"          # heartbeating
DRAINING = "draining"    # takes no new instances
LOST = "lost"            # missed its heartbeats; evicted


@dataclass
class App:
    spec: AppSpec
    created_at: float
    owner: str = ""                    # a temporary application's user ("" for the admin's registry)
    lease: Optional[str] = None        # a temporary application lives as long as this lease

    def view(self) -> Dict[str, Any]:
        d = self.spec.to_dict()
        return {"name": self.spec.name, "command": self.spec.command, "arguments": list(self.spec.arguments),
                "working_directory": self.spec.working_directory, "labels": dict(self.spec.labels),
                "description": self.spec.description, "version": self.spec.version,
                "created_at": self.created_at, "spec": d,
                "owner": self.owner, "lease": self.lease}


@dataclass
class Lease:
    """Resources a client holds only while it renews (mesh/core/leases.py)."""
    id: str
    owner: str
    ttl: float
    expires_at: float
    apps: Set[str] = field(default_factory=set)
    sessions: Set[str] = field(default_factory=set)
    objects: Set[str] = field(default_factory=set)

    def view(self) -> Dict[str, Any]:
        return {"id": self.id, "ttl": self.ttl, "expires_at": self.expires_at, "owner": self.owner,
                "applications": sorted(self.apps), "sessions": sorted(self.sessions), "objects": len(self.objects)}

    def row(self) -> Tuple[str, str, float, float, Dict[str, List[str]]]:
        """What the store keeps: (id, owner, ttl, expires_at, members)."""
        return (self.id, self.owner, self.ttl, self.expires_at,
                {"apps": sorted(self.apps), "sessions": sorted(self.sessions), "objects": sorted(self.objects)})


class Task:
    """One unit of work.  ``__slots__``: the manager may hold 100,000s of these."""

    __slots__ = ("id", "sid", "client", "cid", "tag", "payload", "attempt", "state", "instance", "created_at",
                 "recorded", "timeout", "run", "keep", "parts", "upto")

    def __init__(self, tid: int, sid: str, client: bytes, tag: int, payload: Any, attempt: int = 0,
                 cid: str = "", created_at: Optional[float] = None) -> None:
        self.id = tid
        self.sid = sid
        self.client = client     # the submitter's current ROUTER identity (changes when it reconnects)
        self.cid = cid           # the submitter's stable client id; (cid, tag) names the task for resends
        self.tag = tag
        self.payload = payload
        self.attempt = attempt
        self.state = PENDING
        self.instance: Optional[str] = None
        self.created_at = time.time() if created_at is None else created_at
        self.recorded = False    # its row is in the store's ``tasks`` table (it outlived record_after)
        self.timeout: Optional[float] = None   # seconds one attempt may run on an instance
        self.run = 0             # which start of its timeout clock is current (stale heap entries differ)
        self.keep: Optional[str] = None   # also store its answer as this object (mesh/core/results.py)
        self.parts = 0           # stream parts the client got (a re-run from the start skips these)
        self.upto = 0            # the client takes parts below this seq (0: the stream_window)


@dataclass
class Session:
    id: str
    app: str
    resreq: Resources
    created_at: float
    context: Document
    state: str = OPEN
    owner: str = ""
    closed_at: Optional[float] = None
    pending: Deque[int] = field(default_factory=collections.deque)
    running: int = 0
    instances: List["Instance"] = field(default_factory=list)
    rr: int = 0                        # round-robin start for dispatch
    counts: Dict[str, int] = field(default_factory=lambda: collections.Counter())
    bytes_in: int = 0
    conflicts: int = 0
    patches_since_snapshot: int = 0
    deferred: int = 0                  # tasks held back (in SUBMITs) while the store is behind
    max_instances: Optional[int] = None   # at most this many instances (and the app's own bound)
    hint: int = 0                      # instances wanted with no task queued (a functions session's probe)
    version: Optional[int] = None      # the version of its application it was opened on (None: older records)

    def view(self) -> Dict[str, Any]:
        return {"id": self.id, "application": self.app, "state": self.state, "created_at": self.created_at,
                "closed_at": self.closed_at, "resreq": self.resreq.to_dict(), "pending": len(self.pending),
                "running": self.running, "succeeded": self.counts[SUCCEEDED], "failed": self.counts[FAILED],
                "cancelled": self.counts[CANCELLED], "instances": len(self.instances),
                "context_version": self.context.version, "context_kind": self.context.kind,
                "bytes_in": self.bytes_in, "conflicts": self.conflicts, "max_instances": self.max_instances,
                "version": self.version}


@dataclass
class Executor:
    id: str
    identity: bytes
    caps: Dict[str, Any]
    slots: int
    capacity: Resources
    labels: Dict[str, str]
    last_seen: float
    joined_at: float
    state: str = ALIVE
    used_slots: int = 0
    allocated: Resources = field(default_factory=Resources)
    instances: Set[str] = field(default_factory=set)
    cache: Dict[str, Any] = field(default_factory=dict)   # the executor's object-cache counters
    key: str = ""                      # its CURVE public key (secured mesh): revoking it disconnects it

    def view(self) -> Dict[str, Any]:
        return {"id": self.id, "state": self.state, "cache": dict(self.cache), "slots": self.slots, "used_slots": self.used_slots,
                "instances": len(self.instances), "hostname": self.caps.get("hostname"),
                "cpu": self.capacity.cpu, "memory": self.capacity.memory, "gpu": self.capacity.gpu,
                "cpu_used": self.allocated.cpu, "memory_used": self.allocated.memory, "gpu_used": self.allocated.gpu,
                "labels": dict(self.labels), "python": self.caps.get("python"),
                "last_seen": self.last_seen, "joined_at": self.joined_at, "capabilities": dict(self.caps)}


@dataclass
class Instance:
    id: str
    executor: str
    app: str
    resreq: Resources
    prefetch: int
    session: Optional[Session] = None
    identity: Optional[bytes] = None   # set by INST_HELLO; None while starting
    # tasks sent and not answered, in the order sent: the instance runs them in that order, one at a
    # time, so the first is the one running (a dict: ordered, with set-like membership and removal)
    inflight: Dict[int, None] = field(default_factory=dict)
    draining: bool = False
    stopping: bool = False
    launched_at: float = 0.0
    idle_since: float = 0.0
    pid: int = 0
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))   # proves INST_HELLO came from our launch
    busy_since: float = 0.0
    last_done: float = 0.0
    task_time: float = -1.0            # EWMA of seconds per task; < 0 until the first answer
    owner: str = ""                    # whose session it was started for: it serves only them, for life
    stream: Optional[str] = None       # its entrypoint yields: "stream" or "restartable" (docs/streaming.md)

    def credit_limit(self, queue_target: float) -> int:
        """Tasks to keep queued here: ``queue_target`` seconds of work, 1..prefetch.

        Fast tasks fill the whole prefetch window (throughput); slow tasks get
        one at a time, so a burst spreads over every instance instead of
        queueing behind the first one (balance).
        """
        if self.task_time < 0 or self.stream:   # a stream never waits behind another on one instance
            return 1
        if self.task_time <= 0:
            return self.prefetch
        return max(1, min(self.prefetch, int(queue_target / self.task_time)))

    def observe(self, now: float, n: int) -> None:
        """Fold ``n`` answers arriving at ``now`` into the per-task time estimate."""
        start = max(self.last_done, self.busy_since)
        self.last_done = now
        per = max(0.0, now - start) / max(1, n)
        self.task_time = per if self.task_time < 0 else 0.8 * self.task_time + 0.2 * per

    @property
    def ready(self) -> bool:
        return self.identity is not None
