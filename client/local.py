"""A mesh on this machine: a manager and executors as real child processes.

The daemons die with the process (the thread, in fact) that started them, so a
killed test run or benchmark leaves nothing behind.

Used by ``zmesh up``, the examples and the end-to-end tests.  Ports are picked
by the manager (``tcp://127.0.0.1:*``) and read back from its ready file, so
parallel meshes never collide.  Every process is ended by its PID.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from mesh.errors import Unavailable
from mesh.process import die_with_parent


def _cli(*args: str) -> List[str]:
    return [sys.executable, "-m", "client.cli", *args]


class LocalMesh:
    def __init__(self, executors: int = 2, slots: int = 2, db: Optional[str] = None,
                 bind: str = "tcp://127.0.0.1:*", env: Optional[Dict[str, str]] = None,
                 labels: Optional[List[Dict[str, str]]] = None, log_dir: Optional[str] = None,
                 manager_args: Sequence[str] = (), secure: bool = False) -> None:
        """``secure``: CURVE keys for the manager and each executor (allow-listed) and an ``admin``
        user, all made offline in a temporary directory; ``manager_key`` and ``admin`` then let
        clients in.  Otherwise the mesh is ``--insecure`` (loopback, everyone admin)."""
        self.n_executors = executors
        self.slots = slots
        self.dir = tempfile.mkdtemp(prefix="zmesh-local-")
        self.db = db or os.path.join(self.dir, "manager.db")
        self.bind = bind
        self.env = {**os.environ, **(env or {})}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.env["PYTHONPATH"] = root + os.pathsep + self.env.get("PYTHONPATH", "")
        self.labels = labels or []
        self.log_dir = log_dir or self.dir
        self.secure = secure
        self.manager_key: Optional[str] = None
        self.admin: Any = None
        if secure:
            self._make_keys()
        self.manager_args = list(manager_args)
        self.manager: Optional[subprocess.Popen] = None
        self.executors: List[subprocess.Popen] = []
        self.endpoint = ""

    def _spawn(self, name: str, args: List[str], prefix: Sequence[str] = ()) -> subprocess.Popen:
        log = open(os.path.join(self.log_dir, f"{name}.log"), "ab")
        try:
            return subprocess.Popen([*prefix, *_cli(*args)], env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, preexec_fn=die_with_parent(signal.SIGTERM))
        finally:
            log.close()

    def _make_keys(self) -> None:
        from mesh import auth, keys
        from mesh.store import Store

        from .auth import PasswordAuth
        self.keys_dir = os.path.join(self.dir, "keys")
        self.manager_key, self._manager_secret = keys.generate(self.keys_dir, "manager")
        password = secrets.token_urlsafe(12)
        store = Store(self.db)
        try:
            auth.add_user(store, "admin", "admin", password)
        finally:
            store.close()
        self.admin = PasswordAuth("admin", password)

    def _manager_security(self) -> List[str]:
        return ["--curve-secret", self._manager_secret] if self.secure else ["--insecure"]

    def _executor_security(self, name: str) -> List[str]:
        if not self.secure:
            return ["--insecure"]
        from mesh import keys
        from mesh.store import Store
        public, secret = keys.generate(self.keys_dir, name)
        store = Store(self.db)   # offline, as an operator would with `zmesh executor-keys add --db`
        try:
            store.add_executor_key(keys.load_public(public).decode(), name, time.time())
        finally:
            store.close()
        return ["--manager-key", str(self.manager_key), "--curve-secret", secret]

    def client(self) -> Any:
        """A management client with admin rights on this mesh."""
        from .api import Client
        return Client(self.endpoint, manager_key=self.manager_key, auth=self.admin)

    def start_manager(self, timeout: float = 20.0) -> str:
        ready = os.path.join(self.dir, "manager.endpoint")
        if os.path.exists(ready):
            os.unlink(ready)
        self.manager = self._spawn("manager", ["manager", "--bind", self.bind, "--db", self.db,
                                               "--endpoint-file", ready, *self._manager_security(),
                                               *self.manager_args])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(ready):
                with open(ready) as f:
                    self.endpoint = f.read().strip()
                self.bind = self.endpoint  # a restart binds the same port
                return self.endpoint
            if self.manager.poll() is not None:
                break
            time.sleep(0.02)
        raise Unavailable(f"manager did not start; see {self.log_dir}/manager.log")

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
        with self.client() as c:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if sum(1 for e in c.list_executors() if e["state"] == "alive") >= count:
                    return
                time.sleep(0.05)
        raise Unavailable(f"{count} executors did not join in {timeout}s; see {self.log_dir}")

    def start(self) -> "LocalMesh":
        self.start_manager()
        for _ in range(self.n_executors):
            self.add_executor()
        self.wait_executors(self.n_executors)
        return self

    @staticmethod
    def end(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """End one child by its PID: ``sig`` first, SIGKILL if it lingers."""
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

    def stop(self) -> None:
        for p in self.executors:
            self.end(p)
        self.end(self.manager)

    def __enter__(self) -> "LocalMesh":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
