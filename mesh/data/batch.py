"""What the manager's core hands to the store: plain data, no I/O.

:class:`Batch` collects the changes of one group commit (the core fills it,
the writer thread writes it with :meth:`mesh.data.store.Store.write`);
:class:`SavedState` is what a restarting core is rebuilt from
(:meth:`mesh.data.store.Store.load_state`, :meth:`mesh.core.Core.restore`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

OBJECT_PREFIX = "obj/"  # objects share the snapshot and patch tables with contexts, under this prefix


@dataclass
class Batch:
    """Changes collected by the core between two group commits."""

    # open task rows to write: tasks that have waited record_after seconds (or every open task at shutdown)
    tasks: Dict[int, List[Any]] = field(default_factory=dict)
    # tasks written open earlier that have ended since: (state, attempts, finished_at, error, id)
    finished: List[Tuple[str, int, float, Optional[str], int]] = field(default_factory=list)
    # tasks that ended young (never written open), by session: their task_log records
    # [id, state, attempts, created_at, finished_at, error, client id, tag]
    logged: Dict[str, List[List[Any]]] = field(default_factory=dict)
    patches: List[Tuple[str, int, Optional[bytes], Optional[bytes]]] = field(default_factory=list)
    snapshots: List[Tuple[str, int, str, bytes]] = field(default_factory=list)
    objects: List[Tuple[str, Optional[str], Optional[float]]] = field(default_factory=list)
    deleted_objects: List[str] = field(default_factory=list)
    # answers kept for a client's resend: (client id, tag, task id, state, output, error)
    answers: List[Tuple[str, int, int, str, Optional[bytes], Optional[str]]] = field(default_factory=list)
    # results kept for get_task (Settings.result_retention): (task id, session id, pickled output)
    results: List[Tuple[int, str, Any]] = field(default_factory=list)
    # task ids handed out up to here (and beyond) are reserved on disk: never handed out twice
    task_ids_reserved: Optional[int] = None
    # instance ids (EXECUTOR.N) up to here are reserved on disk: a restart never hands one out again
    instance_ids_reserved: Optional[int] = None
    # leases to write (id -> (id, owner, ttl, expires_at, members)) or delete (None)
    leases: Dict[str, Optional[Tuple[str, str, float, float, Dict[str, List[str]]]]] = field(default_factory=dict)
    # rows of the programming models' tables (flows, functions: Store.ROW_TABLES): (table, key) -> the
    # row to write, or None to delete the row with that key; the last change of a key wins
    rows: Dict[Tuple[str, Any], Optional[Tuple[Any, ...]]] = field(default_factory=dict)

    @staticmethod
    def task_row(tid: int, sid: str, created_at: float, payload: Any, client: str, tag: int) -> List[Any]:
        """A new task's row (columns of the ``tasks`` table).  ``payload`` None: the request is not
        kept (too large; the client resends it if need be)."""
        return [tid, sid, "pending", 0, created_at, None, payload, None, None, client, tag]

    def finish_task(self, t: Any, state: str, when: float, error: Optional[str]) -> None:
        """Task ``t`` (a :class:`mesh.model.records.Task`) ended: close its open row, or log it
        directly if it was never written; a failure's error is kept for the client's resend."""
        if t.recorded:
            self.finished.append((state, t.attempt, when, error, t.id))
            return
        log = self.logged.get(t.sid)
        if log is None:
            log = self.logged[t.sid] = []
        log.append([t.id, state, t.attempt, t.created_at, when, error, t.cid, t.tag])
        if error is not None:
            self.answers.append((t.cid, t.tag, t.id, state, None, error))

    def keep_output(self, tid: int, output: Any, client: str, tag: int) -> None:
        """A result that could not be delivered is kept for the client to collect by resending."""
        self.answers.append((client, tag, tid, "succeeded", output, None))

    def __bool__(self) -> bool:
        return bool(self.tasks or self.finished or self.logged or self.patches or self.snapshots or self.objects
                    or self.deleted_objects or self.answers or self.results or self.leases or self.rows
                    or self.task_ids_reserved is not None or self.instance_ids_reserved is not None)


Context = Tuple[str, int, bytes, List[Tuple[int, Optional[bytes], Optional[bytes]]]]  # kind, version, snapshot, patches


@dataclass
class SavedState:
    """Everything a restarting manager rebuilds its memory from (read once, at start)."""

    apps: List[Tuple[str, Dict[str, Any], float]]
    sessions: List[Dict[str, Any]]                 # open sessions only
    contexts: Dict[str, Context]                   # by session id
    objects: List[Tuple[str, Optional[str], Optional[float], Context]]
    unfinished: List[Tuple[int, str, int, Optional[bytes], str, int]]
    max_task_id: int
    tokens: List[Tuple[str, str, str, str, float]]  # live login tokens: digest, principal, kind, role, expires
    leases: List[Tuple[str, str, float, float, Dict[str, List[str]]]] = field(default_factory=list)
    # flows: {"flows": rows, "runs": [(header, {task: record})] unfinished, "schedules": rows}
    flows: Dict[str, Any] = field(default_factory=dict)
    # functions (mesh/core/functions.py): see Store.load_functions
    functions: Dict[str, Any] = field(default_factory=dict)
    # the instance number reserved last (Batch.instance_ids_reserved): the next start counts on from it
    max_instance_id: int = 0
