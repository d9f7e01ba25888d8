"""The core's state and the few helpers every rule module shares.

Plain data only: dicts of the records in :mod:`mesh.model.records`, the pending store
batch, counters.  Rule modules (tasks, members, contexts, control) are mixins
over this class; :class:`mesh.core.Core` puts them together.
"""
from __future__ import annotations

import collections
import itertools
import logging
import secrets
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from mesh.core.effects import Call, Effects, Send
from mesh.data.batch import Batch
from mesh.data.objects import Objects
from mesh.errors import MeshError, PermissionDenied, ResourceExhausted, Unauthenticated
from mesh.model import auth
from mesh.model.records import App, Executor, Instance, Lease, Session, Task
from mesh.ops.config import Settings
from mesh.ops.log import event
from mesh.ops.metrics import Histogram
from mesh.wire.protocol import Gone, Result

log = logging.getLogger("zeromesh.manager")

FLOW_PEER = b"\x00flows"   # the submitter of flow tasks (mesh/core/flows.py): its answers never reach a socket
FN_PEER = b"\x00functions"  # the submitter of function batches (mesh/core/functions.py): the same
# (ZeroMQ's own identities are 5 bytes, a 0 then a 32-bit number: these 6+ byte names never collide)
ENGINE_PEERS = frozenset({FLOW_PEER, FN_PEER})

STATS = ("messages_in", "bytes_in", "protocol_errors", "tasks_submitted", "tasks_finished", "tasks_retried",
         "tasks_resent", "late_answers_dropped", "send_failures", "auth_denied", "requests", "store_pauses",
         "bytes_out", "resyncs", "submits_deferred", "parts", "handshakes_refused")


class Base:
    """State shared by the rule mixins; ``out`` collects the effects of the event being handled."""

    def __init__(self, settings: Settings, secured: bool) -> None:
        self.settings = settings
        self.secured = secured                     # CURVE + tokens; otherwise every peer is admin
        self.apps: Dict[str, App] = {}
        self.sessions: Dict[str, Session] = {}
        self.creating: Set[str] = set()            # session ids taken by a create not yet on disk
        self.results_pruned_at = 0.0               # when expire_results last ran (mesh/core/tasks.py)
        self.executors: Dict[str, Executor] = {}
        self.instances: Dict[str, Instance] = {}
        self.peers: Dict[bytes, Any] = {}          # ROUTER identity -> Executor | Instance
        self.tasks: Dict[int, Task] = {}
        self.by_tag: Dict[Tuple[str, int], int] = {}   # (client id, tag) -> task id, for resends
        self.boot = secrets.token_hex(8)                 # changes at every start: clients resend when it does
        self.objects = Objects()
        self.latency = Histogram()                       # seconds from submit to answer
        self.batch = Batch()                             # changes for the next group commit
        # ids of tasks not yet written, oldest first: a task is recorded once it finishes, or once
        # it has waited record_after seconds (a younger one is covered by its client's resend)
        self.young: Deque[int] = collections.deque()
        self.stats: Dict[str, int] = dict.fromkeys(STATS, 0)
        self.tokens = auth.Tokens({})
        self.logins = auth.LoginLimits(settings.login_failures, settings.login_window)
        self.caller = ""                           # the CURVE key (or identity) of the request being handled
        self.waiting: Set[str] = set()             # sessions with tasks no instance has credit for
        self.start_failures: Dict[str, int] = {}   # app -> instances that died before hello, in a row
        self.start_backoff: Dict[str, float] = {}  # app -> no launch before this time (it keeps failing)
        self.start_streak: Dict[str, int] = {}     # app -> start failures in a row, for the backoff
        self.deadlines: List[Tuple[float, int, int]] = []   # heap of (due, task id, run): task timeouts
        self._runs = itertools.count(1)            # numbers each start of a task's timeout clock
        self.closing: Dict[str, float] = {}        # closed session -> when its still running tasks are stopped
        self.leases: Dict[str, Lease] = {}         # what clients hold while they renew (mesh/core/leases.py)
        # get_object calls waiting for a kept result to be put: key -> [(peer, rid, Waiting)]
        self.object_waiters: Dict[str, List[Tuple[bytes, int, Any]]] = {}
        self.admitting: Set[bytes] = set()         # executors whose key is being checked
        self.plan_wanted = False                   # run the scheduler at the end of this round
        self.endpoint = ""                         # what ping reports; set by the loop
        self.now = 0.0                             # the clock of the event being handled
        self.out: Effects = []
        self.methods: Dict[str, Callable[..., Any]] = {}   # control methods by name
        self.store_backlog = 0                     # commits waiting for the writer thread, as last seen
        self.backlogged = False                    # the store is behind: busy sessions' tasks wait
        # SUBMITs held back while backlogged, in arrival order: (peer, record, payloads)
        self.deferred: Deque[Tuple[bytes, Any, Sequence[Any]]] = collections.deque()
        self.deferred_tasks = 0                    # tasks in those SUBMITs (bounded by max_pending)
        self._next_tid: Iterator[int] = itertools.count(1)
        self.tids_reserved = 0                     # ids up to this one are reserved on disk
        self._iids = itertools.count(1)
        self.iids_reserved = 0                     # instance numbers up to this one are reserved on disk
        self.flow_inbox: List[Tuple[Any, List[Any]]] = []   # answers sent to FLOW_PEER, not yet taken
        self.fn_inbox: List[Tuple[Any, List[Any]]] = []     # ... and to FN_PEER
        # watched contexts (get_context {have, wait}): their recent writes, until when, who waits
        self.ctx_logs: Dict[str, Deque[Tuple[int, Any, Any]]] = {}
        self.ctx_watched: Dict[str, float] = {}
        self.ctx_waiters: Dict[str, List[Tuple[bytes, int, int, float]]] = {}

    # -- effects ------------------------------------------------------------------
    def send(self, peer: bytes, record: Any, payloads: Sequence[Any] = (), after_commit: bool = False,
             if_lost: Optional[Callable[[], None]] = None) -> None:
        if peer in ENGINE_PEERS:   # an answer to an engine of ours: taken with the effects (take)
            if record.__class__ is Result:
                (self.flow_inbox if peer == FLOW_PEER else self.fn_inbox).append((record, list(payloads)))
            return
        self.out.append(Send(peer, record, payloads, after_commit, if_lost))

    def call(self, call: Call) -> None:
        self.out.append(call)

    def take(self) -> Effects:
        while self.flow_inbox or self.fn_inbox:   # answers for the engines first: they may submit more
            try:
                if self.flow_inbox:
                    self.flow_answers()
                if self.fn_inbox:
                    self.fn_answers()
            except Exception:   # a bug must not stop the loop for everyone else
                log.exception("engine answers failed")
        out, self.out = self.out, []
        return out

    def take_batch(self, now: Optional[float] = None) -> Batch:
        """The changes since the last group commit, for the writer thread, with the rows of open
        tasks that have waited ``record_after`` seconds by ``now`` (every open task without ``now``)."""
        young, tasks, rows = self.young, self.tasks, self.batch.tasks
        cutoff = None if now is None else now - self.settings.record_after
        keep_max = self.settings.persist_input_max
        while young:
            t = tasks.get(young[0])
            if t is not None and not t.recorded:
                if cutoff is not None and t.created_at > cutoff:
                    break
                t.recorded = True
                payload = t.payload if len(t.payload) <= keep_max else None
                rows[t.id] = Batch.task_row(t.id, t.sid, t.created_at, payload, t.cid, t.tag)
            young.popleft()
        batch, self.batch = self.batch, Batch()
        return batch

    def finish_record(self, t: Task, state: str, error: Optional[str]) -> None:
        """Task ``t`` ended: its record, written once if it was still young."""
        self.batch.finish_task(t, state, self.now, error)

    def plan_soon(self) -> None:
        self.plan_wanted = True

    def gone(self, peer: bytes, reason: str, fatal: bool = False) -> None:
        self.send(peer, Gone(reason, fatal))

    # -- limits on what one message may make the loop do --------------------------------
    def check_patch_size(self, ops: Optional[List[Any]]) -> None:
        """One patch is applied on the event loop in one go: bounded by ``max_patch_ops``."""
        if ops is not None and len(ops) > self.settings.max_patch_ops:
            raise ResourceExhausted(f"a patch of {len(ops)} ops; max_patch_ops is {self.settings.max_patch_ops} "
                                    "(split it, or write the whole value)", limit="max_patch_ops", size=len(ops))

    def check_object_size(self, blob: bytes) -> None:
        if len(blob) > self.settings.max_object_size:
            raise ResourceExhausted(f"an object of {len(blob)} bytes; max_object_size is "
                                    f"{self.settings.max_object_size}", limit="max_object_size", size=len(blob))

    # -- who is asking ---------------------------------------------------------------
    def principal(self, token: Optional[str], method: str) -> auth.Principal:
        """Who sent the message being handled, and whether they may call ``method`` (raises if not)."""
        if not self.secured:
            return auth.INSECURE
        if auth.required_role(method) == "public":
            return auth.INSECURE if method == "ping" else auth.Principal("anonymous", "viewer", "anonymous")
        who = self.tokens.principal(token)
        auth.authorize(who, method)
        return who

    def denied(self, peer: bytes, method: str, exc: MeshError, key: Optional[str] = None) -> None:
        self.stats["auth_denied"] += 1
        event(log, logging.WARNING, "denied", method=method, code=exc.code, reason=str(exc),
              peer=peer.hex()[:16], key=key)

    def may_submit(self, token: Optional[str], owner: Optional[str]) -> None:
        """Raises Unauthenticated / PermissionDenied unless the token's holder may submit to ``owner``'s
        session (``owner`` None: a session that does not exist, checked for the token only)."""
        who = self.principal(token, "submit")
        if owner is not None and not who.may_touch(owner):
            raise PermissionDenied(f"this session belongs to {owner!r}")


    # -- rules one mixin defines and others call (see mesh.core.Core for the composition) --
    def dispatch(self, s: Session) -> None:
        raise NotImplementedError

    def enqueue(self, peer: bytes, s: Session, tags: Sequence[int], cid: str, payloads: Sequence[Any],
                timeout: Optional[float] = None, on: Optional[Instance] = None) -> None:
        raise NotImplementedError

    def fail_tasks(self, tasks: List[Task], error: MeshError, state: str = "failed") -> None:
        raise NotImplementedError

    def requeue(self, inst: Instance, reason: str) -> None:
        raise NotImplementedError

    def start_failed(self, app: str, reason: str) -> None:
        raise NotImplementedError

    def interrupt(self, t: Task, error: MeshError, state: str, retry: bool) -> None:
        raise NotImplementedError

    def close_session(self, s: Session, why: str) -> None:
        raise NotImplementedError

    def close_and_record(self, s: Session, why: str) -> None:
        raise NotImplementedError

    def open_engine_session(self, sid: str, app_name: str, owner: str) -> Session:
        raise NotImplementedError

    def wait_for_object(self, peer: bytes, rid: int, waiting: Any) -> None:
        raise NotImplementedError

    def object_reply(self, key: str, have: int, who: auth.Principal) -> Any:
        raise NotImplementedError

    def answer(self, peer: bytes, rid: int, method: str, step: Callable[[], Any]) -> None:
        raise NotImplementedError

    def reply(self, peer: bytes, rid: int, result: Any = None, error: Optional[MeshError] = None,
              after_commit: bool = False) -> None:
        raise NotImplementedError

    def keep_answer(self, t: Task, err: Optional[Dict[str, Any]], payload: Any) -> None:
        raise NotImplementedError

    def flow_answers(self) -> None:
        raise NotImplementedError

    def wait_for_run(self, peer: bytes, rid: int, waiting: Any) -> None:
        raise NotImplementedError

    def fn_answers(self) -> None:
        raise NotImplementedError

    def watch_session(self, sid: str) -> None:
        raise NotImplementedError

    def context_since(self, s: Session, have: int) -> Dict[str, Any]:
        raise NotImplementedError

    def wait_for_context(self, peer: bytes, rid: int, waiting: Any) -> None:
        raise NotImplementedError

    def wait_for_call(self, peer: bytes, rid: int, waiting: Any) -> None:
        raise NotImplementedError

    def wait_for_egress(self, peer: bytes, rid: int, waiting: Any) -> None:
        raise NotImplementedError

    def learn_functions(self, app: str, types: Optional[List[str]]) -> None:
        raise NotImplementedError

    def persist_object(self, obj: Any, ops: Optional[List[Any]] = None) -> None:
        raise NotImplementedError

    def attach(self, lid: Optional[str], who: auth.Principal) -> Optional[Lease]:
        raise NotImplementedError

    def save_lease(self, lease: Lease) -> None:
        raise NotImplementedError

    def stop_instance(self, inst: Instance) -> None:
        raise NotImplementedError

    def bind(self, inst: Instance, s: Optional[Session], keep_draining: bool = False) -> None:
        raise NotImplementedError

    def drain_executor(self, ex: Executor) -> None:
        raise NotImplementedError

    def revoked_executor_keys(self, public: List[str]) -> None:
        raise NotImplementedError

    def apply_context_write(self, s: Session, ops: Optional[List[Any]], blob: Optional[bytes],
                            writer: Optional[Instance] = None, seq: Optional[int] = None) -> int:
        raise NotImplementedError

    def delete_objects(self, keys: List[str]) -> None:
        raise NotImplementedError


AUTH_ERRORS = (Unauthenticated, PermissionDenied)
