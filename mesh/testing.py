"""Testing kit: a real mesh on this machine, bounded waits, fast settings, socket tracking.

Public API (documented in docs/testing.md)::

    LocalMesh            a manager and executors as real processes on random loopback ports
    wait_until(pred)     poll a predicate, bounded in count and time; DeadlineExceeded says what
    FAST                 ZMESH_* values that shrink every timer and limit for tests
    fast_settings()      the same as a mesh.ops.config.Settings
    SocketTracker        records every zmq socket created while it is active
    end_process(proc)    end one child by its PID: a signal, then SIGKILL if it lingers

and, when pytest is installed, fixtures (``pytest_plugins = ["mesh.testing"]`` in a
top-level conftest.py, or ``from mesh.testing import local_mesh, zmq_sockets``)::

    local_mesh           a module-scoped LocalMesh, 2 executors x 2 slots, FAST settings
    local_mesh_factory   start meshes of any shape inside one test; all stopped after it
    zmq_sockets          fails a test that leaves zmq sockets open (closed with linger=0)

The mesh package never imports ``client``: LocalMesh starts ``python -m client.cli``
as a subprocess and learns that its executors joined from their systemd readiness
notifications (READY=1, see mesh.ops.sdnotify), not from a client call.
``client.local.LocalMesh`` adds ``client()`` and ``admin`` on top of this class.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, TypeVar

import zmq

from mesh.errors import DeadlineExceeded, Unavailable
from mesh.ops.config import Settings
from mesh.ops.process import die_with_parent

__all__ = ["LocalMesh", "wait_until", "FAST", "fast_settings", "SocketTracker", "end_process"]

T = TypeVar("T")

# -- settings ----------------------------------------------------------------------------------

FAST: Mapping[str, str] = types.MappingProxyType({
    # liveness: a silent peer is dead after 0.2 s x 10 = 2 s (production: 3 s)
    "ZMESH_HEARTBEAT_INTERVAL": "0.2",
    "ZMESH_LIVENESS": "10",
    "ZMESH_FLUSH_INTERVAL": "0.02",          # already short: a group commit every 20 ms
    "ZMESH_RECORD_AFTER": "0.1",             # tasks written after 100 ms in memory (default 0.5 s)
    "ZMESH_BIND_GRACE": "0.5",               # idle instances move between sessions sooner
    "ZMESH_IDLE_TIMEOUT": "5",               # unbound instances stop after 5 s, not 60 s
    "ZMESH_PERSIST_INPUT_MAX": str(64 * 1024),
    "ZMESH_MAX_STORE_BACKLOG": "64",
    "ZMESH_MAX_MESSAGE_SIZE": str(128 * 1024 * 1024),   # room for a 50 MiB object in one message
    "ZMESH_LOGIN_FAILURES": "5",
    "ZMESH_LOGIN_WINDOW": "10",
    "ZMESH_TOKEN_TTL": "60",                 # tokens renew within a long test
    "ZMESH_MAX_CONTEXT_SIZE": str(16 * 1024 * 1024),
    "ZMESH_MAX_PATCH_OPS": "5000",
    "ZMESH_MAX_OBJECT_SIZE": str(64 * 1024 * 1024),   # a 50 MiB object fits
    "ZMESH_BACKLOG_ADMIT": "64",
    "ZMESH_SEND_HWM": "10000",
    "ZMESH_RESEND_AFTER": "30",              # a client asks again after 30 s without answers
    "ZMESH_MAX_INFLIGHT": "100000",
    "ZMESH_MAX_PENDING": "100000",
    "ZMESH_REQUEST_TIMEOUT": "10",
    "ZMESH_SNAPSHOT_EVERY": "50",            # snapshots of the context patch log happen in tests
    "ZMESH_INSTANCE_START_TIMEOUT": "15",    # python start-up on a loaded 2-core machine fits
    "ZMESH_DRAIN_GRACE": "10",
    "ZMESH_CLOSE_GRACE": "2",
    "ZMESH_RESULT_RETENTION": "60",          # results of closed sessions go after a minute (production: 1 h)
    "ZMESH_RESULT_MAX_SIZE": str(1024 * 1024),
    "ZMESH_MAX_LEASE_TTL": "600",
    "ZMESH_START_FAILURES": "3",
    "ZMESH_START_BACKOFF": "0.05",            # relaunch after 50 ms, doubling (production: 250 ms)
    "ZMESH_START_BACKOFF_MAX": "2",
    "ZMESH_INSTANCE_WRITE_TIMEOUT": "10",
    "ZMESH_STOP_GRACE": "2",                 # SIGTERM, then SIGKILL after 2 s (production: 5 s)
    "ZMESH_CACHE_BYTES": str(256 * 1024 * 1024),
    "ZMESH_LOG_LEVEL": "INFO",
})
"""ZMESH_* values for tests: every timer of :class:`mesh.ops.config.Settings` shrunk so that a test
waiting on an event waits seconds, not minutes; every limit set to a value a laptop-sized test
passes under.  Not set: ``prefetch`` and ``queue_target`` (scheduling policy, not a wait or a
bound), ``metrics_host``, ``writer_nice`` (a priority) and ``unsafe_ack_before_commit`` (a negative control's switch).  Merge it: ``LocalMesh(env={**FAST, "ZMESH_SEND_HWM": "20"})``."""

NOT_SHRUNK = frozenset({"prefetch", "queue_target", "metrics_host", "unsafe_ack_before_commit", "writer_nice",
                        "stream_window"})   # windows and switches, not timers or limits to shrink


def fast_settings(**overrides: Any) -> Settings:
    """:data:`FAST` as a Settings object (for code under test that takes ``settings=``)."""
    return Settings.load(FAST, **overrides)


# -- waiting -----------------------------------------------------------------------------------

def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               what: Optional[str] = None) -> T:
    """Call ``predicate`` until it returns something truthy, and return that value.

    Bounded twice: at most ``timeout / interval + 2`` calls (one every ``interval``, and one
    at the deadline), and no call starts after ``timeout`` seconds.  On timeout raises :class:`mesh.errors.DeadlineExceeded` naming what
    was awaited (``what``, else the predicate's name) and the last value it returned.
    Exceptions from the predicate propagate: a failure is not a reason to keep waiting.
    """
    if timeout < 0 or interval <= 0:
        raise ValueError("wait_until needs timeout >= 0 and interval > 0")
    name = what or getattr(predicate, "__qualname__", None) or repr(predicate)
    deadline = time.monotonic() + timeout
    last: Any = None
    for _ in range(int(timeout / interval) + 2):
        last = predicate()
        if last:
            return last
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(interval, left))
    raise DeadlineExceeded(f"waited {timeout:g}s for {name}; last value: {last!r}", what=name,
                           timeout=timeout, last=repr(last)[:200])


# -- processes ---------------------------------------------------------------------------------

def end_process(proc: Any, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """End one process by its PID: ``sig`` first, SIGKILL if it is still there after ``timeout``.

    ``proc`` is a subprocess.Popen (or anything with ``pid``, ``poll()`` and ``wait(timeout)``).
    """
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
    except ProcessLookupError:
        pass


def _cli(*args: str) -> List[str]:
    return [sys.executable, "-m", "client.cli", *args]


class _Readiness:
    """systemd's notification protocol, received: which PIDs said READY=1.

    A unix datagram socket with SO_PASSCRED, so that the kernel stamps every datagram
    with its sender's PID (as systemd itself learns which process is ready).
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "notify.sock")
        if len(self.path) > 100:     # sun_path holds 108 bytes; a long $TMPDIR would not fit
            self.path = os.path.join(tempfile.mkdtemp(prefix="zmn-", dir="/tmp"), "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | getattr(socket, "SOCK_CLOEXEC", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.ready: Set[int] = set()
        self._creds = struct.Struct("iII")    # struct ucred: pid, uid, gid

    def drain(self) -> Set[int]:
        """Read every waiting datagram; return the PIDs that have said READY=1 so far."""
        for _ in range(100_000):     # more than a socket buffer holds
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(self._creds.size))
            except (BlockingIOError, InterruptedError):
                return self.ready
            except OSError:
                return self.ready
            if b"READY=1" not in data.split(b"\n"):
                continue
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    self.ready.add(self._creds.unpack(payload[:self._creds.size])[0])
        return self.ready

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class LocalMesh:
    """A mesh on this machine: a manager and executors as real child processes.

    Ports are picked by the manager (``tcp://127.0.0.1:*``) and read back from its ready
    file, so parallel meshes never collide.  Every process is ended by its PID (:meth:`stop`),
    and the daemons die with the thread that started them (PR_SET_PDEATHSIG), so a killed
    test run leaves nothing behind.  Logs: ``manager.log`` and ``executor-N.log`` in
    ``log_dir`` (default: the mesh's temporary directory, then kept after :meth:`stop`;
    with a ``log_dir`` and no ``db``, stop() removes the temporary directory).

    ``secure``: CURVE keys for the manager and each executor (allow-listed) and an ``admin``
    user, all made offline in a temporary directory; ``manager_key``, ``admin_user`` and
    ``admin_password`` then let clients in.  Otherwise the mesh is ``--insecure``
    (loopback, everyone admin).
    """

    def __init__(self, executors: int = 2, slots: int = 2, db: Optional[str] = None,
                 bind: str = "tcp://127.0.0.1:*", env: Optional[Mapping[str, str]] = None,
                 labels: Optional[List[Dict[str, str]]] = None, log_dir: Optional[str] = None,
                 manager_args: Sequence[str] = (), secure: bool = False) -> None:
        self.n_executors = executors
        self.slots = slots
        self.dir = tempfile.mkdtemp(prefix="zmesh-local-")
        self.db = db or os.path.join(self.dir, "manager.db")
        # the temporary directory goes with stop() unless it holds what the caller will want to read
        self._remove_dir = log_dir is not None and db is None
        self.bind = bind
        self.env: Dict[str, str] = {**os.environ, **(env or {})}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.env["PYTHONPATH"] = root + os.pathsep + self.env.get("PYTHONPATH", "")
        self.labels = labels or []
        self.log_dir = log_dir or self.dir
        self.secure = secure
        self.manager_key: Optional[str] = None
        self.admin_user: Optional[str] = None
        self.admin_password: Optional[str] = None
        self._manager_secret = ""
        if secure:
            self._make_keys()
        self.manager_args = list(manager_args)
        self.manager: Optional[subprocess.Popen] = None
        self.executors: List[subprocess.Popen] = []
        self.endpoint = ""
        self._readiness: Optional[_Readiness] = None

    # -- processes -------------------------------------------------------------------
    def _spawn(self, name: str, args: List[str], prefix: Sequence[str] = ()) -> subprocess.Popen:
        if self._readiness is None:
            self._readiness = _Readiness(self.dir)
        env = {**self.env, "NOTIFY_SOCKET": self._readiness.path}
        for k in ("WATCHDOG_USEC", "WATCHDOG_PID"):   # our own unit's watchdog is not theirs
            env.pop(k, None)
        log = open(os.path.join(self.log_dir, f"{name}.log"), "ab")
        try:
            return subprocess.Popen([*prefix, *_cli(*args)], env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, preexec_fn=die_with_parent(signal.SIGTERM))
        finally:
            log.close()

    def _make_keys(self) -> None:
        from mesh.data.store import Store
        from mesh.model import auth
        from mesh.ops import keys
        self.keys_dir = os.path.join(self.dir, "keys")
        self.manager_key, self._manager_secret = keys.generate(self.keys_dir, "manager")
        password = secrets.token_urlsafe(12)
        store = Store(self.db)
        try:
            auth.add_user(store, "admin", "admin", password)
        finally:
            store.close()
        self.admin_user, self.admin_password = "admin", password

    def _manager_security(self) -> List[str]:
        return ["--curve-secret", self._manager_secret] if self.secure else ["--insecure"]

    def _executor_security(self, name: str) -> List[str]:
        if not self.secure:
            return ["--insecure"]
        from mesh.data.store import Store
        from mesh.ops import keys
        public, secret = keys.generate(self.keys_dir, name)
        store = Store(self.db)   # offline, as an operator would with `zmesh executor-keys add --db`
        try:
            store.add_executor_key(keys.load_public(public).decode(), name, time.time())
        finally:
            store.close()
        return ["--manager-key", str(self.manager_key), "--curve-secret", secret]

    def start_manager(self, timeout: float = 20.0) -> str:
        """Start (or restart, on the same port) the manager; returns its endpoint."""
        ready = os.path.join(self.dir, "manager.endpoint")
        if os.path.exists(ready):
            os.unlink(ready)
        manager = self.manager = self._spawn("manager", ["manager", "--bind", self.bind, "--db", self.db,
                                                         "--endpoint-file", ready, *self._manager_security(),
                                                         *self.manager_args])

        def endpoint() -> str:
            if os.path.exists(ready):
                with open(ready) as f:
                    return f.read().strip()
            if manager.poll() is not None:
                raise Unavailable(f"the manager exited with code {manager.returncode}; "
                                  f"see {self.log_dir}/manager.log")
            return ""

        try:
            self.endpoint = wait_until(endpoint, timeout, interval=0.02, what="the manager's endpoint file")
        except DeadlineExceeded:
            raise Unavailable(f"manager did not start in {timeout:g}s; see {self.log_dir}/manager.log") from None
        self.bind = self.endpoint  # a restart binds the same port
        return self.endpoint

    def add_executor(self, slots: Optional[int] = None, labels: Optional[Dict[str, str]] = None,
                     name: Optional[str] = None, prefix: Sequence[str] = ()) -> subprocess.Popen:
        """Start one more executor; ``prefix`` wraps its command (e.g. ``ip netns exec NS``),
        which must exec the executor so that its PID is the executor's."""
        i = len(self.executors)
        name = name or f"exec-{i}"
        args = ["executor", "--manager", self.endpoint, "--slots", str(slots or self.slots),
                "--name", name, *self._executor_security(name)]
        for k, v in (labels or (self.labels[i] if i < len(self.labels) else {})).items():
            args += ["--label", f"{k}={v}"]
        p = self._spawn(f"executor-{i}", args, prefix)
        self.executors.append(p)
        return p

    def wait_executors(self, count: int, timeout: float = 20.0) -> None:
        """Wait until ``count`` running executors started by this mesh have joined the manager.

        An executor says READY=1 once the manager welcomed it (mesh.ops.sdnotify); a rejoin after
        a manager restart is not a new READY, so wait on the manager's own list for that.
        """
        assert self._readiness is not None, "start the manager first"
        readiness = self._readiness

        def exited() -> str:
            return ", ".join(f"executor-{i} (code {p.returncode})" for i, p in enumerate(self.executors)
                             if p.poll() is not None)

        def joined() -> bool:
            running = [p for p in self.executors if p.poll() is None]
            if len(running) < count:
                raise Unavailable(f"{count} executors cannot join: exited {exited()}; see {self.log_dir}")
            pids = readiness.drain()
            return sum(1 for p in running if p.pid in pids) >= count

        try:
            wait_until(joined, timeout, interval=0.02, what=f"{count} executors to join")
        except DeadlineExceeded:
            raise Unavailable(f"{count} executors did not join in {timeout:g}s; see {self.log_dir}") from None

    def pids(self) -> List[int]:
        """The PIDs of every daemon this mesh started (manager first), running or not."""
        return [p.pid for p in ([self.manager] if self.manager else []) + self.executors]

    def start(self) -> "LocalMesh":
        self.start_manager()
        for _ in range(self.n_executors):
            self.add_executor()
        self.wait_executors(self.n_executors)
        return self

    end = staticmethod(end_process)

    def stop(self) -> None:
        """End every executor, then the manager, each by its PID."""
        for p in self.executors:
            end_process(p)
        end_process(self.manager)
        if self._readiness is not None:
            self._readiness.close()
            self._readiness = None
        if self._remove_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalMesh":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- socket tracking ---------------------------------------------------------------------------

class SocketTracker:
    """Records every zmq socket created (any context, any thread) between start() and stop().

    It wraps ``zmq.Context.socket`` while active; :meth:`open_sockets` lists the recorded
    sockets not yet closed, and :meth:`close_all` closes them with linger=0.  Sockets made
    by instantiating ``zmq.Socket(ctx, type)`` directly are not seen.
    """

    def __init__(self) -> None:
        self.sockets: List[Tuple[zmq.Socket, str]] = []
        self._lock = threading.Lock()
        self._original: Any = None
        self._wrapper: Any = None

    def start(self) -> "SocketTracker":
        if self._wrapper is not None:
            raise RuntimeError("this SocketTracker is already started")
        original = self._original = zmq.Context.socket
        tracker = self

        def socket(ctx: zmq.Context, socket_type: int, *args: Any, **kwargs: Any) -> Any:
            s = original(ctx, socket_type, *args, **kwargs)
            if _made_by_pyzmq_gc():
                return s      # pyzmq's own zero-copy garbage collector: it lives as long as the context
            where = _caller()
            with tracker._lock:
                tracker.sockets.append((s, f"{_type_name(socket_type)} from {where}"))
            return s

        setattr(zmq.Context, "socket", socket)
        self._wrapper = socket
        return self

    def stop(self) -> None:
        """Stop recording.  Trackers nest (an outer one records what an inner one does) and
        must be stopped in the reverse order of their start."""
        if self._wrapper is None:
            return
        if zmq.Context.socket is not self._wrapper:
            raise RuntimeError("SocketTrackers must be stopped in the reverse order of their start")
        setattr(zmq.Context, "socket", self._original)
        self._wrapper = None

    def open_sockets(self) -> List[str]:
        with self._lock:
            return [where for s, where in self.sockets if not s.closed]

    def close_all(self) -> None:
        with self._lock:
            for s, _ in self.sockets:
                if not s.closed:
                    s.close(linger=0)

    def __enter__(self) -> "SocketTracker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_PYZMQ_GC = os.path.join("zmq", "utils", "garbage.py")


def _made_by_pyzmq_gc() -> bool:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == __file__:   # nested trackers
        frame = frame.f_back   # type: ignore[assignment]
    return frame is not None and frame.f_code.co_filename.endswith(_PYZMQ_GC)


def _caller() -> str:
    """Where a socket was made: the innermost frames outside pyzmq and this module."""
    frames = [f for f in traceback.extract_stack(sys._getframe(2), limit=12)
              if f.filename != __file__ and not any(f"{os.sep}{pkg}{os.sep}" in f.filename
                                                    for pkg in ("zmq", "_pytest", "pluggy"))]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames[-3:]))


def _type_name(socket_type: int) -> str:
    try:
        return zmq.SocketType(socket_type).name
    except ValueError:
        return str(socket_type)


# -- pytest fixtures (only when pytest is installed: it is not a runtime dependency) ----------

try:
    import pytest
except ImportError:  # pragma: no cover - zeromesh runs without pytest
    pass
else:
    @pytest.fixture
    def zmq_sockets() -> Iterator[SocketTracker]:
        """Fails the test if a zmq socket it created is still open when it ends.

        Sockets the client library closes from its I/O thread get a moment (bounded) to close.
        The leftovers are closed with linger=0 and the test fails with "open sockets remain: ...".
        """
        tracker = SocketTracker().start()
        try:
            yield tracker
        finally:
            tracker.stop()
        try:
            wait_until(lambda: not tracker.open_sockets(), timeout=1.0, interval=0.02, what="sockets to close")
            return
        except DeadlineExceeded:
            remaining = tracker.open_sockets()
            tracker.close_all()
        pytest.fail(f"open sockets remain: {'; '.join(remaining)}", pytrace=False)

    @pytest.fixture(scope="module")
    def local_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
        """A mesh for the tests of one module: 2 executors x 2 slots, FAST settings, insecure,
        logs under pytest's temporary directory.  Register your application on ``.endpoint``."""
        with LocalMesh(executors=2, slots=2, env=FAST, log_dir=str(tmp_path_factory.mktemp("mesh"))) as m:
            yield m

    @pytest.fixture
    def local_mesh_factory(tmp_path: Any) -> Iterator[Callable[..., LocalMesh]]:
        """``start(**kwargs)`` starts a LocalMesh (FAST settings merged into ``env``) and returns
        it; every mesh started is stopped, by PID, when the test ends."""
        started: List[LocalMesh] = []

        def start(**kwargs: Any) -> LocalMesh:
            kwargs["env"] = {**FAST, **(kwargs.get("env") or {})}
            kwargs.setdefault("log_dir", str(tmp_path))
            m = LocalMesh(**kwargs)
            started.append(m)
            return m.start()

        try:
            yield start
        finally:
            for m in started:
                m.stop()
