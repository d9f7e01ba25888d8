"""SQLite (WAL) persistence for what must survive a manager restart.

The manager owns one :class:`Store` and calls it from a single writer thread
(:class:`Writer`), so the event loop never blocks on disk.  Task, context and
object changes reach the store in batches (:class:`mesh.data.batch.Batch`, one
transaction each: group commit); registry and session changes are written one
by one and awaited before the manager replies.  Every multi-statement change
runs in one transaction (:meth:`Store.tx`).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import os
import sqlite3
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from mesh.data.batch import OBJECT_PREFIX, Batch, SavedState
from mesh.errors import AlreadyExists
from mesh.wire.protocol import pack, unpack

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, app TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,
    closed_at REAL, resreq TEXT NOT NULL, owner TEXT NOT NULL DEFAULT '', max_instances INTEGER, version INTEGER);
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
CREATE TABLE IF NOT EXISTS task_log (
    session TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL, records BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS task_log_by_session ON task_log (session, first);
CREATE INDEX IF NOT EXISTS task_log_by_last ON task_log (last);
CREATE TABLE IF NOT EXISTS answers (
    client TEXT NOT NULL, tag INTEGER NOT NULL, id INTEGER NOT NULL, state TEXT NOT NULL, output BLOB, error TEXT,
    PRIMARY KEY (client, tag, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY, session TEXT NOT NULL, output BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS results_by_session ON results (session);
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
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, ttl REAL NOT NULL, expires_at REAL NOT NULL, members BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS flows (
    name TEXT NOT NULL, version INTEGER NOT NULL, owner TEXT NOT NULL, created_at REAL NOT NULL, doc BLOB NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS flow_runs (
    id TEXT PRIMARY KEY, flows TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL, owner TEXT NOT NULL,
    header BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS flow_runs_by_state ON flow_runs (state);
CREATE TABLE IF NOT EXISTS flow_tasks (
    run TEXT NOT NULL, name TEXT NOT NULL, record BLOB NOT NULL, PRIMARY KEY (run, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS flow_schedules (id TEXT PRIMARY KEY, schedule BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS fn_types (type TEXT PRIMARY KEY, app TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fn_state (
    type TEXT NOT NULL, id TEXT NOT NULL, state BLOB NOT NULL, called_at REAL NOT NULL,
    PRIMARY KEY (type, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fn_inbox (
    mid TEXT PRIMARY KEY, seq INTEGER NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL, caller BLOB,
    message BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS fn_delayed (
    token TEXT PRIMARY KEY, due REAL NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL, caller BLOB,
    message BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS fn_egress (
    typename TEXT NOT NULL, offset INTEGER NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (typename, offset)) WITHOUT ROWID;
"""
SCHEMA_VERSION = "2"
# Tasks: ``tasks`` holds the records of open tasks (queued or running for longer than record_after,
# with their requests) and of tasks lost in a restart; a finished task's record moves to
# ``task_log``, one row per session per group commit (a msgpack list of LOG_FIELDS), so a commit
# of thousands of finished tasks writes a handful of rows.  ``answers`` keeps what a resending
# client may still need: undelivered outputs and errors, by (client id, tag).
LOG_FIELDS = ("id", "state", "attempts", "created_at", "finished_at", "error", "client", "tag")


def _create_private(path: str) -> None:
    """Make the database file 0600 (and its directory 0700 if this makes it), whatever the umask.

    It holds password hashes and token digests.  SQLite creates the ``-wal`` and ``-shm`` files
    with the database file's mode, so creating that one first, private, makes all three private.
    An existing file of ours that others can read is tightened."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)      # makedirs' mode is filtered by the umask
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except FileExistsError:
        pass
    st = os.stat(path)
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.chmod(path, 0o600)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.chmod(path + suffix, 0o600)


class ManagerLock:
    """An exclusive lock a running manager holds on its database for its whole life (``flock`` on
    ``<db>.lock``, which holds the manager's PID).  The kernel releases it when the process ends,
    however it ends.  A second manager on the same database refuses to start, and the offline tools
    (``zmesh users ... --db``) refuse to change identities under a running manager, which would not
    see the change (a removed user's tokens would stay valid)."""

    def __init__(self, db: str) -> None:
        self.path = db + ".lock"
        self._fd: Optional[int] = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def holder(self) -> Optional[int]:
        """The PID of the manager holding the lock, or None if none does (tries and releases it)."""
        if not os.path.exists(self.path):
            return None
        if self.acquire():
            self.release()
            return None
        try:
            with open(self.path) as f:
                return int(f.read().strip() or 0) or -1
        except (OSError, ValueError):
            return -1

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Store:
    def __init__(self, path: str) -> None:
        if path != ":memory:":
            _create_private(path)
        self.path = path
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        with self.tx():
            self._migrate()

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[None]:
        """One transaction: everything inside commits together or not at all.

        The connection runs in autocommit mode (``isolation_level=None``), where ``with db:``
        opens no transaction; this does (``BEGIN IMMEDIATE``).  Nested uses join the outer one."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _migrate(self) -> None:
        """Bring an older database to SCHEMA_VERSION (the tables themselves are created by SCHEMA)."""
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is not None and row[0] == "1":
            # v1 kept the answers a resending client may ask for in its task rows
            self.db.execute("INSERT OR IGNORE INTO answers SELECT client, tag, id, state, output, error FROM tasks "
                            "WHERE state NOT IN ('pending', 'running', 'lost') "
                            "AND (output IS NOT NULL OR error IS NOT NULL)")
        if "max_instances" not in [r[1] for r in self.db.execute("PRAGMA table_info(sessions)")]:
            self.db.execute("ALTER TABLE sessions ADD COLUMN max_instances INTEGER")   # (added in schema 2)
        if "version" not in [r[1] for r in self.db.execute("PRAGMA table_info(sessions)")]:
            self.db.execute("ALTER TABLE sessions ADD COLUMN version INTEGER")   # the application's version it ran
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))

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
                    closed_at: Optional[float], resreq: Dict[str, Any], owner: str = "",
                    max_instances: Optional[int] = None, version: Optional[int] = None) -> None:
        self.db.execute(
            "INSERT INTO sessions (id, app, state, created_at, closed_at, resreq, owner, max_instances, version) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "state=excluded.state, closed_at=excluded.closed_at",
            (sid, app, state, created_at, closed_at, json.dumps(resreq), owner, max_instances, version),
        )

    def load_sessions(self) -> List[Dict[str, Any]]:
        cur = self.db.execute("SELECT id, app, state, created_at, closed_at, resreq, owner, max_instances, version "
                              "FROM sessions")
        return [
            {"id": r[0], "app": r[1], "state": r[2], "created_at": r[3], "closed_at": r[4],
             "resreq": json.loads(r[5]), "owner": r[6], "max_instances": r[7], "version": r[8]}
            for r in cur.fetchall()
        ]

    def create_session(self, sid: str, app: str, created_at: float, resreq: Dict[str, Any], owner: str,
                       kind: str, context: bytes, max_instances: Optional[int] = None, unique: bool = False,
                       version: Optional[int] = None) -> None:
        """A new session and its first context snapshot, in one transaction.  With ``unique`` (an id the
        caller chose), ``AlreadyExists`` if a session of that id was ever written (a closed one is not in
        the manager's memory after a restart, and its id is not reused)."""
        with self.tx():
            if unique and self.db.execute("SELECT 1 FROM sessions WHERE id=?", (sid,)).fetchone() is not None:
                raise AlreadyExists(f"session {sid!r} already exists and is closed (session ids are not reused)",
                                    session=sid)
            self.put_session(sid, app, "open", created_at, None, resreq, owner, max_instances, version)
            self.db.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?)", (sid, 0, kind, context))

    def close_session(self, sid: str, closed_at: float) -> None:
        """Closed: no longer restored after a restart, and its context is dropped (task records stay)."""
        with self.tx():
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
        leases = [(r[0], r[1], r[2], r[3], unpack(r[4]))
                  for r in self.db.execute("SELECT id, owner, ttl, expires_at, members FROM leases")]
        return SavedState(self.load_apps(), sessions, contexts, objects, self.load_unfinished_tasks(),
                          self.max_task_id(), self.live_tokens(), leases, self.load_flows(), self.load_functions(),
                          self.max_instance_id())

    # -- flows (mesh/core/flows.py) ------------------------------------------------------------
    # the programming models' tables, written from Batch.rows: table -> (columns, key columns)
    ROW_TABLES = {"flows": (5, ("name", "version")), "flow_runs": (6, ("id",)), "flow_tasks": (3, ("run", "name")),
                  "flow_schedules": (2, ("id",)), "fn_types": (2, ("type",)), "fn_state": (4, ("type", "id")),
                  "fn_inbox": (6, ("mid",)), "fn_delayed": (6, ("token",)), "fn_egress": (5, ("typename", "offset"))}

    def load_flows(self) -> Dict[str, Any]:
        """Every flow version, the unfinished runs with their tasks, every schedule."""
        runs = []
        for (header,) in self.db.execute("SELECT header FROM flow_runs WHERE state IN ('scheduled', 'pending', "
                                         "'running')"):
            h = unpack(header)
            runs.append((h, self._flow_tasks(h["id"])))
        return {"flows": self.db.execute("SELECT name, version, owner, created_at, doc FROM flows").fetchall(),
                "runs": runs, "schedules": self.db.execute("SELECT id, schedule FROM flow_schedules").fetchall()}

    def _flow_tasks(self, rid: str) -> Dict[str, Dict[str, Any]]:
        return {name: unpack(rec) for name, rec in
                self.db.execute("SELECT name, record FROM flow_tasks WHERE run=?", (rid,))}

    def flow_run(self, rid: str) -> Optional[Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]]:
        row = self.db.execute("SELECT header FROM flow_runs WHERE id=?", (rid,)).fetchone()
        return None if row is None else (unpack(row[0]), self._flow_tasks(rid))

    def load_functions(self) -> Dict[str, Any]:
        """Routes, every address's state, the inbox in arrival order, delayed messages, egress heads."""
        db = self.db
        return {"types": db.execute("SELECT type, app FROM fn_types").fetchall(),
                "state": db.execute("SELECT type, id, state, called_at FROM fn_state").fetchall(),
                "inbox": db.execute("SELECT mid, seq, type, id, caller, message FROM fn_inbox ORDER BY seq").fetchall(),
                "delayed": db.execute("SELECT token, due, type, id, caller, message FROM fn_delayed").fetchall(),
                "egress": db.execute("SELECT typename, max(offset) FROM fn_egress GROUP BY typename").fetchall()}

    def egress(self, typename: str, offset: int, limit: int) -> List[Tuple[int, float, str, bytes]]:
        return self.db.execute("SELECT offset, at, kind, record FROM fn_egress WHERE typename=? AND offset>=? "
                               "ORDER BY offset LIMIT ?", (typename, offset, limit)).fetchall()

    def flow_run_headers(self) -> List[Dict[str, Any]]:
        return [unpack(r[0]) for r in self.db.execute("SELECT header FROM flow_runs ORDER BY created_at")]

    def live_tokens(self) -> List[Tuple[str, str, str, str, float]]:
        """Unexpired login tokens: (digest, principal, kind, role, expires_at)."""
        return self.db.execute("SELECT digest, principal, kind, role, expires_at FROM tokens WHERE expires_at > ?",
                               (time.time(),)).fetchall()

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

    def remove_executor_key(self, public_or_name: str) -> List[str]:
        """Remove the keys with this public key or name; the public keys removed."""
        removed = [r[0] for r in self.db.execute("SELECT public FROM executor_keys WHERE public=? OR name=?",
                                                 (public_or_name, public_or_name))]
        self.db.execute("DELETE FROM executor_keys WHERE public=? OR name=?", (public_or_name, public_or_name))
        return removed

    def executor_keys(self) -> List[Dict[str, Any]]:
        rows = self.db.execute("SELECT public, name, added_at FROM executor_keys ORDER BY name").fetchall()
        return [{"public": r[0], "name": r[1], "added_at": r[2]} for r in rows]

    # users, robots and login tokens: the rules are in mesh/model/auth.py, the SQL here
    def user(self, name: str) -> Optional[Tuple[str, str]]:
        """(role, secret hash) of a user, or None."""
        return self.db.execute("SELECT role, secret FROM users WHERE name=?", (name,)).fetchone()

    def insert_user(self, name: str, role: str, secret_hash: str, now: float) -> None:
        self.db.execute("INSERT INTO users VALUES (?, ?, ?, ?)", (name, role, secret_hash, now))

    def delete_user(self, name: str) -> int:
        """Removes the user and its tokens; how many users matched (0 or 1)."""
        n = self.db.execute("DELETE FROM users WHERE name=?", (name,)).rowcount
        self.db.execute("DELETE FROM tokens WHERE principal=? AND kind='user'", (name,))
        return n

    def users(self) -> List[Dict[str, Any]]:
        rows = self.db.execute("SELECT name, role, created_at FROM users ORDER BY name").fetchall()
        return [{"name": r[0], "role": r[1], "created_at": r[2]} for r in rows]

    def robot(self, rid: str) -> Optional[Tuple[str, str, Optional[float]]]:
        """(role, secret hash, revoked_at) of a robot, or None."""
        return self.db.execute("SELECT role, secret, revoked_at FROM robots WHERE id=?", (rid,)).fetchone()

    def insert_robot(self, rid: str, name: str, role: str, secret_hash: str, now: float) -> None:
        self.db.execute("INSERT INTO robots VALUES (?, ?, ?, ?, ?, NULL)", (rid, name, role, secret_hash, now))

    def revoke_robot(self, rid: str, now: float) -> int:
        """Marks a live robot revoked and drops its tokens; how many robots matched (0 or 1)."""
        n = self.db.execute("UPDATE robots SET revoked_at=? WHERE id=? AND revoked_at IS NULL", (now, rid)).rowcount
        self.db.execute("DELETE FROM tokens WHERE principal=? AND kind='robot'", (rid,))
        return n

    def robots(self) -> List[Dict[str, Any]]:
        rows = self.db.execute("SELECT id, name, role, created_at, revoked_at FROM robots ORDER BY created_at")
        return [{"id": r[0], "name": r[1], "role": r[2], "created_at": r[3], "revoked_at": r[4]} for r in rows]

    def save_token(self, token_digest: str, principal: str, kind: str, role: str, expires_at: float) -> None:
        """One login token (as its digest), dropping expired ones on the way."""
        with self.tx():
            self.db.execute("DELETE FROM tokens WHERE expires_at < ?", (time.time(),))
            self.db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?)", (token_digest, principal, kind, role,
                                                                          expires_at))

    def executor_key_allowed(self, public: str) -> bool:
        return self.db.execute("SELECT 1 FROM executor_keys WHERE public=?", (public,)).fetchone() is not None

    # -- tasks ----------------------------------------------------------------
    def mark_lost(self, tids: List[int]) -> None:
        with self.tx():
            self.db.executemany("UPDATE tasks SET state='lost' WHERE id=?", [(t,) for t in tids])

    def load_unfinished_tasks(self) -> List[Tuple[int, str, int, Optional[bytes], str, int]]:
        return self.db.execute(
            "SELECT id, session, attempts, input, client, tag FROM tasks WHERE state IN ('pending', 'running') "
            "ORDER BY id").fetchall()

    def find_by_tags(self, client: str, tags: List[int]) -> Dict[int, Tuple[str, Optional[bytes], Optional[str]]]:
        """A resending client's tasks that this database can answer: tag -> (state, output, error)."""
        out: Dict[int, Tuple[str, Optional[bytes], Optional[str]]] = {}
        for i in range(0, len(tags), 500):
            chunk = tags[i:i + 500]
            rows = self.db.execute(
                f"SELECT tag, state, output, error FROM answers WHERE client=? AND tag IN ({','.join('?' * len(chunk))}) "
                "ORDER BY id",   # the newest answer of a tag wins
                (client, *chunk)).fetchall()
            out.update({r[0]: (r[1], r[2], r[3]) for r in rows})
        return out

    def max_task_id(self) -> int:
        """The highest task id ever handed out, or reserved to be (ids are never reused: one a
        client saw in a listing must not name another task after a restart)."""
        return self.db.execute(
            "SELECT MAX(COALESCE((SELECT MAX(id) FROM tasks), 0), COALESCE((SELECT MAX(last) FROM task_log), 0), "
            "COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key='task_ids_reserved'), 0))").fetchone()[0]

    def max_instance_id(self) -> int:
        """The highest instance number reserved (instance ids ``EXECUTOR.N`` are never reused: a
        reused one would overwrite its log file on the executor and mix two instances' lines)."""
        row = self.db.execute("SELECT value FROM meta WHERE key='instance_ids_reserved'").fetchone()
        return int(row[0]) if row else 0

    _OPEN_COLUMNS = "SELECT id, session, state, attempts, created_at, finished_at, error FROM tasks "

    @staticmethod
    def _task_record(r: Sequence[Any]) -> Dict[str, Any]:
        return {"id": r[0], "session": r[1], "state": r[2], "attempts": r[3], "created_at": r[4],
                "finished_at": r[5], "error": json.loads(r[6]) if r[6] else None}

    @classmethod
    def _logged(cls, sid: str, records: bytes) -> List[Dict[str, Any]]:
        return [cls._task_record((r[0], sid, r[1], r[2], r[3], r[4], r[5])) for r in unpack(records)]

    def get_task(self, tid: int) -> Optional[Dict[str, Any]]:
        r = self.db.execute(self._OPEN_COLUMNS + "WHERE id=?", (tid,)).fetchone()
        if r is not None:
            return self._task_record(r)
        for sid, records in self.db.execute("SELECT session, records FROM task_log WHERE last >= ? AND first <= ?",
                                            (tid, tid)):
            for rec in self._logged(sid, records):
                if rec["id"] == tid:
                    return rec
        return None

    def task_result(self, tid: int) -> Optional[bytes]:
        """A finished task's pickled result, while it is kept (``Settings.result_retention``)."""
        row = self.db.execute("SELECT output FROM results WHERE id=?", (tid,)).fetchone()
        return None if row is None else bytes(row[0])

    def prune_results(self, closed_before: float) -> int:
        """Drop the results of sessions closed before ``closed_before``; how many went."""
        return self.db.execute("DELETE FROM results WHERE session IN (SELECT id FROM sessions WHERE state='closed' "
                               "AND closed_at < ?)", (closed_before,)).rowcount

    def task_rows(self, sid: str) -> List[Dict[str, Any]]:
        """Every task record of a session, without payloads (for find_tasks), by id."""
        rows = [self._task_record(r) for r in self.db.execute(self._OPEN_COLUMNS + "WHERE session=?", (sid,))]
        for (records,) in self.db.execute("SELECT records FROM task_log WHERE session=? ORDER BY first", (sid,)):
            rows += self._logged(sid, records)
        return sorted(rows, key=lambda r: r["id"])

    def write(self, batch: Batch) -> None:
        """One group commit: every change the core collected since the last."""
        with self.tx():
            if batch.tasks:
                self.db.executemany("INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                    batch.tasks.values())
            if batch.finished:
                self._log(self._close_open(batch.finished))
            if batch.logged:
                self._log_records(batch.logged)
            if batch.answers:
                self.db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)", batch.answers)
            if batch.results:
                self.db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", batch.results)
            if batch.task_ids_reserved is not None:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('task_ids_reserved', ?)",
                                (str(batch.task_ids_reserved),))
            if batch.instance_ids_reserved is not None:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('instance_ids_reserved', ?)",
                                (str(batch.instance_ids_reserved),))
            if batch.patches:
                self.db.executemany("INSERT OR REPLACE INTO patches VALUES (?, ?, ?, ?)", batch.patches)
            for sid, version, kind, data in batch.snapshots:
                self.db.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?)", (sid, version, kind, data))
                self.db.execute("DELETE FROM patches WHERE session=? AND version<=?", (sid, version))
            if batch.objects:
                self.db.executemany("INSERT OR REPLACE INTO objects VALUES (?, ?, ?)", batch.objects)
            for lid, lease in batch.leases.items():
                if lease is None:
                    self.db.execute("DELETE FROM leases WHERE id=?", (lid,))
                else:
                    self.db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?)", (*lease[:4], pack(lease[4])))
            if batch.rows:
                self._write_rows(batch.rows)
            for key in batch.deleted_objects:
                self.db.execute("DELETE FROM objects WHERE key=?", (key,))
                self.db.execute("DELETE FROM snapshots WHERE session=?", (OBJECT_PREFIX + key,))
                self.db.execute("DELETE FROM patches WHERE session=?", (OBJECT_PREFIX + key,))


    def _write_rows(self, rows: Dict[Tuple[str, Any], Optional[Tuple[Any, ...]]]) -> None:
        """Batch.rows, grouped per table into one INSERT OR REPLACE and one DELETE each (the keys are
        distinct, so the order between a key's write and another key's deletion does not matter)."""
        writes: Dict[str, List[Tuple[Any, ...]]] = {}
        deletes: Dict[str, List[Tuple[Any, ...]]] = {}
        for (table, key), row in rows.items():
            if row is None:
                deletes.setdefault(table, []).append(key if isinstance(key, tuple) else (key,))
            else:
                writes.setdefault(table, []).append(row)
        for table, keys in deletes.items():
            cols = self.ROW_TABLES[table][1]
            self.db.executemany(f"DELETE FROM {table} WHERE {' AND '.join(c + '=?' for c in cols)}", keys)
        for table, many in writes.items():
            width = self.ROW_TABLES[table][0]
            self.db.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({', '.join('?' * width)})", many)

    def _log_records(self, by_session: Dict[str, List[List[Any]]]) -> None:
        """One task_log row per session: its finished tasks' records
        ``[id, state, attempts, created_at, finished_at, error, client id, tag]``, msgpack'd."""
        self.db.executemany("INSERT INTO task_log VALUES (?, ?, ?, ?)",
                            [(sid, min(r[0] for r in recs), max(r[0] for r in recs), pack(recs))
                             for sid, recs in by_session.items()])

    def _close_open(self, finished: List[Tuple[str, int, float, Optional[str], int]]) -> List[List[Any]]:
        """Tasks written open earlier that have ended: their rows leave ``tasks`` for the log."""
        ids = [f[4] for f in finished]
        rows: Dict[int, List[Any]] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            rows.update({r[0]: list(r) for r in self.db.execute(f"SELECT * FROM tasks WHERE id IN ({marks})", chunk)})
            self.db.execute(f"DELETE FROM tasks WHERE id IN ({marks})", chunk)
        for state, attempts, when, error, tid in finished:
            row = rows.get(tid)
            if row is not None:
                row[2], row[3], row[5], row[6], row[8] = state, max(row[3], attempts), when, None, error
        return list(rows.values())

    def _log(self, rows: List[List[Any]]) -> None:
        """Finished tasks that were written open: one task_log row per session, and their answers
        where one may be asked for."""
        by_session: Dict[str, List[List[Any]]] = {}
        for row in rows:
            by_session.setdefault(row[1], []).append([row[0], row[2], row[3], row[4], row[5], row[8], row[9], row[10]])
        self._log_records(by_session)
        kept = [(row[9], row[10], row[0], row[2], row[7], row[8]) for row in rows
                if row[7] is not None or row[8] is not None]
        if kept:
            self.db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)", kept)


def lower_thread_priority(increment: int) -> bool:
    """Raise the calling thread's nice value by ``increment`` (Linux, where nice is per thread);
    False where that is not possible (another OS, or a refusal), which changes nothing else.

    Used for the writer thread (``Settings.writer_nice``): SQLite releases the GIL around every
    statement step, and a writer that is scheduled as soon as it is runnable takes the GIL each
    time the event loop releases it (every socket send), so the loop waits for the GIL and for
    a CPU again; on two cores that wait was most of another client's latency under a flood.  At
    a lower priority the writer mostly runs when the loop is idle or the interpreter forces a
    switch (``sys.getswitchinterval``); when it falls behind, store backpressure (``backlog_admit``)
    holds back the busy sessions' new tasks, so the client that floods pays for it."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + increment, 19))
    except (OSError, AttributeError):
        return False
    return True


class Writer:
    """Runs every store call on one thread, so SQLite never blocks the event loop.

    ``nice``: how much lower than the loop's the writer thread's CPU priority is (see
    :func:`lower_thread_priority`); 0 leaves it equal."""

    def __init__(self, store: Store, nice: int = 0) -> None:
        self.store = store
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="zmesh-store",
                                                           initializer=lower_thread_priority, initargs=(nice,))

    def submit(self, fn: Callable[..., Any], *args: Any) -> "concurrent.futures.Future[Any]":
        return self._pool.submit(fn, *args)

    def backlog(self) -> int:
        """Calls waiting for the writer thread (a slow disk shows here first)."""
        return self._pool._work_queue.qsize()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.store.close()
