"""SQLite (WAL) persistence for what must survive a manager restart.

The manager owns one :class:`Store` and calls it from a single writer thread
(:class:`Writer`), so the event loop never blocks on disk.  Task and context
changes reach the store in batches (group commit every ``flush_interval``);
registry and session changes are written one by one and awaited before the
manager replies, because a user acts on those replies.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from mesh.data.batch import OBJECT_PREFIX, Batch, SavedState

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, app TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,
    closed_at REAL, resreq TEXT NOT NULL, owner TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS snapshots (
    session TEXT PRIMARY KEY, version INTEGER NOT NULL, kind TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS patches (
    session TEXT NOT NULL, version INTEGER NOT NULL, ops BLOB, blob BLOB,
    PRIMARY KEY (session, version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY, session TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
    created_at REAL NOT NULL, finished_at REAL, input BLOB, output BLOB, error TEXT,
    client TEXT NOT NULL DEFAULT '', tag INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS tasks_by_session ON tasks (session, id);
DROP INDEX IF EXISTS tasks_by_client;
CREATE INDEX IF NOT EXISTS tasks_answered ON tasks (client, tag) WHERE output IS NOT NULL OR error IS NOT NULL;
CREATE TABLE IF NOT EXISTS executor_keys (
    public TEXT PRIMARY KEY, name TEXT NOT NULL, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, secret TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS robots (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, secret TEXT NOT NULL, created_at REAL NOT NULL,
    revoked_at REAL);
CREATE TABLE IF NOT EXISTS tokens (
    digest TEXT PRIMARY KEY, principal TEXT NOT NULL, kind TEXT NOT NULL, role TEXT NOT NULL,
    expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    key TEXT PRIMARY KEY, session TEXT, expires_at REAL);
"""
SCHEMA_VERSION = "1"


class Store:
    def __init__(self, path: str) -> None:
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))

    def close(self) -> None:
        self.db.close()

    # -- registry -------------------------------------------------------------
    def put_app(self, name: str, spec: Dict[str, Any], created_at: float) -> None:
        self.db.execute(
            "INSERT INTO apps VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET spec=excluded.spec",
            (name, json.dumps(spec), created_at),
        )

    def delete_app(self, name: str) -> None:
        self.db.execute("DELETE FROM apps WHERE name=?", (name,))

    def load_apps(self) -> List[Tuple[str, Dict[str, Any], float]]:
        rows = self.db.execute("SELECT name, spec, created_at FROM apps").fetchall()
        return [(n, json.loads(s), c) for n, s, c in rows]

    # -- sessions -------------------------------------------------------------
    def put_session(self, sid: str, app: str, state: str, created_at: float,
                    closed_at: Optional[float], resreq: Dict[str, Any], owner: str = "") -> None:
        self.db.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "state=excluded.state, closed_at=excluded.closed_at",
            (sid, app, state, created_at, closed_at, json.dumps(resreq), owner),
        )

    def load_sessions(self) -> List[Dict[str, Any]]:
        cur = self.db.execute("SELECT id, app, state, created_at, closed_at, resreq, owner FROM sessions")
        return [
            {"id": r[0], "app": r[1], "state": r[2], "created_at": r[3], "closed_at": r[4],
             "resreq": json.loads(r[5]), "owner": r[6]}
            for r in cur.fetchall()
        ]

    def create_session(self, sid: str, app: str, created_at: float, resreq: Dict[str, Any], owner: str,
                       kind: str, context: bytes) -> None:
        """A new session and its first context snapshot, in one transaction."""
        with self.db:
            self.put_session(sid, app, "open", created_at, None, resreq, owner)
            self.db.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?)", (sid, 0, kind, context))

    def close_session(self, sid: str, closed_at: float) -> None:
        """Closed: no longer restored after a restart, and its context is dropped (task records stay)."""
        with self.db:
            self.db.execute("UPDATE sessions SET state='closed', closed_at=? WHERE id=?", (closed_at, sid))
            self.db.execute("DELETE FROM patches WHERE session=?", (sid,))
            self.db.execute("DELETE FROM snapshots WHERE session=?", (sid,))

    def load_state(self) -> SavedState:
        """What a restarting manager needs, read in one go (see :meth:`Core.restore`)."""
        sessions = [r for r in self.load_sessions() if r["state"] == "open"]
        contexts = {}
        for r in sessions:
            ctx = self.load_context(r["id"])
            if ctx is not None:
                contexts[r["id"]] = ctx
        objects = []
        for key, sid, expires_at in self.load_objects():
            ctx = self.load_context(OBJECT_PREFIX + key)
            if ctx is not None:
                objects.append((key, sid, expires_at, ctx))
        return SavedState(self.load_apps(), sessions, contexts, objects, self.load_unfinished_tasks(),
                          self.max_task_id(), self.live_tokens())

    def live_tokens(self) -> List[Tuple[str, str, str, str, float]]:
        """Unexpired login tokens: (digest, principal, kind, role, expires_at)."""
        return self.db.execute("SELECT digest, principal, kind, role, expires_at FROM tokens WHERE expires_at > ?",
                               (time.time(),)).fetchall()

    def drop_context(self, sid: str) -> None:
        """A closed session's context is no longer needed; its task records stay."""
        with self.db:
            self.db.execute("DELETE FROM patches WHERE session=?", (sid,))
            self.db.execute("DELETE FROM snapshots WHERE session=?", (sid,))

    # -- contexts -------------------------------------------------------------
    def load_context(self, sid: str) -> Optional[Tuple[str, int, bytes, List[Tuple[int, Optional[bytes], Optional[bytes]]]]]:
        """The newest snapshot and the patches logged after it, in version order."""
        snap = self.db.execute("SELECT version, kind, data FROM snapshots WHERE session=?", (sid,)).fetchone()
        if snap is None:
            return None
        patches = self.db.execute(
            "SELECT version, ops, blob FROM patches WHERE session=? AND version>? ORDER BY version",
            (sid, snap[0]),
        ).fetchall()
        return snap[1], snap[0], snap[2], patches

    def load_objects(self) -> List[Tuple[str, Optional[str], Optional[float]]]:
        return self.db.execute("SELECT key, session, expires_at FROM objects").fetchall()

    # -- security (see mesh/model/auth.py) --------------------------------------------
    def add_executor_key(self, public: str, name: str, now: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO executor_keys VALUES (?, ?, ?)", (public, name, now))

    def remove_executor_key(self, public_or_name: str) -> int:
        return self.db.execute("DELETE FROM executor_keys WHERE public=? OR name=?",
                               (public_or_name, public_or_name)).rowcount

    def executor_keys(self) -> List[Dict[str, Any]]:
        rows = self.db.execute("SELECT public, name, added_at FROM executor_keys ORDER BY name").fetchall()
        return [{"public": r[0], "name": r[1], "added_at": r[2]} for r in rows]

    def executor_key_allowed(self, public: str) -> bool:
        return self.db.execute("SELECT 1 FROM executor_keys WHERE public=?", (public,)).fetchone() is not None

    # -- tasks ----------------------------------------------------------------
    def mark_lost(self, tids: List[int]) -> None:
        with self.db:
            self.db.executemany("UPDATE tasks SET state='lost' WHERE id=?", [(t,) for t in tids])

    def load_unfinished_tasks(self) -> List[Tuple[int, str, int, Optional[bytes], str, int]]:
        return self.db.execute(
            "SELECT id, session, attempts, input, client, tag FROM tasks WHERE state IN ('pending', 'running') "
            "ORDER BY id").fetchall()

    def find_by_tags(self, client: str, tags: List[int]) -> Dict[int, Tuple[str, Optional[bytes], Optional[str]]]:
        """A resending client's tasks that this database can answer: tag -> (state, output, error).

        Only records holding an answer (an undelivered output, or an error) are looked up, through a
        partial index that every other task record skips (one B-tree less per task written)."""
        out: Dict[int, Tuple[str, Optional[bytes], Optional[str]]] = {}
        for i in range(0, len(tags), 500):
            chunk = tags[i:i + 500]
            rows = self.db.execute(
                f"SELECT tag, state, output, error FROM tasks WHERE client=? AND tag IN ({','.join('?' * len(chunk))}) "
                "AND (output IS NOT NULL OR error IS NOT NULL) ORDER BY id",   # the newest answer of a tag wins
                (client, *chunk)).fetchall()
            out.update({r[0]: (r[1], r[2], r[3]) for r in rows})
        return out

    def max_task_id(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(id), 0) FROM tasks").fetchone()[0]

    def get_output(self, tid: int) -> Optional[bytes]:
        r = self.db.execute("SELECT output FROM tasks WHERE id=?", (tid,)).fetchone()
        return r[0] if r else None

    _TASK_COLUMNS = "SELECT id, session, state, attempts, created_at, finished_at, error FROM tasks "

    @staticmethod
    def _task_record(r: Tuple[Any, ...]) -> Dict[str, Any]:
        return {"id": r[0], "session": r[1], "state": r[2], "attempts": r[3], "created_at": r[4],
                "finished_at": r[5], "error": json.loads(r[6]) if r[6] else None}

    def get_task(self, tid: int) -> Optional[Dict[str, Any]]:
        r = self.db.execute(self._TASK_COLUMNS + "WHERE id=?", (tid,)).fetchone()
        return None if r is None else self._task_record(r)

    def task_rows(self, sid: str) -> List[Dict[str, Any]]:
        """Every task record of a session, without payloads (for find_tasks)."""
        rows = self.db.execute(self._TASK_COLUMNS + "WHERE session=? ORDER BY id", (sid,)).fetchall()
        return [self._task_record(r) for r in rows]

    def task_counts(self, sid: str) -> Dict[str, int]:
        rows = self.db.execute("SELECT state, COUNT(*) FROM tasks WHERE session=? GROUP BY state", (sid,))
        return dict(rows.fetchall())

    def write(self, batch: Batch) -> None:
        """One group commit: every change the event loop collected since the last."""
        with self.db:
            if batch.tasks:
                self.db.executemany("INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                    batch.tasks.values())
            if batch.finished:
                self.db.executemany(
                    "UPDATE tasks SET state=?, attempts=MAX(attempts, ?), finished_at=?, "
                    "output=COALESCE(?, output), error=COALESCE(?, error), input=NULL WHERE id=?", batch.finished)
            if batch.patches:
                self.db.executemany("INSERT OR REPLACE INTO patches VALUES (?, ?, ?, ?)", batch.patches)
            for sid, version, kind, data in batch.snapshots:
                self.db.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?)", (sid, version, kind, data))
                self.db.execute("DELETE FROM patches WHERE session=? AND version<=?", (sid, version))
            if batch.objects:
                self.db.executemany("INSERT OR REPLACE INTO objects VALUES (?, ?, ?)", batch.objects)
            for key in batch.deleted_objects:
                self.db.execute("DELETE FROM objects WHERE key=?", (key,))
                self.db.execute("DELETE FROM snapshots WHERE session=?", (OBJECT_PREFIX + key,))
                self.db.execute("DELETE FROM patches WHERE session=?", (OBJECT_PREFIX + key,))


class Writer:
    """Runs every store call on one thread, so SQLite never blocks the event loop."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="zmesh-store")
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> "concurrent.futures.Future[Any]":
        return self._pool.submit(fn, *args)

    def backlog(self) -> int:
        """Calls waiting for the writer thread (a slow disk shows here first)."""
        return self._pool._work_queue.qsize()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.store.close()
