"""The executor daemon: one per machine.  Advertises capabilities, launches
and supervises service instances, reports their exits.

Instances talk to the manager directly over their own DEALER sockets (tasks do
not pass through this process); the daemon only owns their lifecycle.  It is a
plain blocking loop: a poller on the manager socket with a short timeout, in
which it also reaps child processes.
"""
from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import zmq

from mesh.errors import InvalidArgument, ProtocolError
from mesh.model.spec import RUNNER_HASH_ENV, AppSpec
from mesh.ops import keys, sdnotify
from mesh.ops.config import Settings
from mesh.ops.log import event
from mesh.ops.process import die_with_parent
from mesh.wire import transport
from mesh.wire.protocol import Cmd, Drain, ExecHello, Exited, Heartbeat, decode, encode

from . import guard
from .cache_proxy import CacheProxy
from .cgroups import InstanceCgroups
from .capabilities import detect

log = logging.getLogger("zeromesh.executor")

STDERR_TAIL = 2000  # bytes of a crashed instance's stderr reported to the manager
GUARD_SCRIPT = os.path.abspath(guard.__file__)
UNGUARDED_ENV = "ZMESH_TEST_UNGUARDED"
"""Tests only (the negative control of tests/test_process_tree.py): set to 1, the executor starts
services directly, as before the guard, and a killed executor leaves their descendants running."""


@dataclass
class Child:
    iid: str
    app: str
    proc: subprocess.Popen
    log_path: str
    guarded: bool = True     # proc is a guard (executor/guard.py) whose child is the service
    status_fd: int = -1      # read end of the guard's pipe: why the service could not start
    command: str = ""        # app.command and app.working_directory, for "cannot start ..."
    cwd: str = ""
    stopping: bool = False
    kill_at: float = 0.0
    reason: str = ""
    package: str = ""        # a runner instance's package hash (its unpacked directory in runner/)

    def start_error(self) -> str:
        """What the guard said when the service could not be executed ("" if it could)."""
        if self.status_fd < 0:
            return ""
        try:
            return os.read(self.status_fd, 4096).decode("utf-8", "replace")
        except OSError:
            return ""
        finally:
            os.close(self.status_fd)
            self.status_fd = -1


class ExecutorDaemon:
    def __init__(self, manager: str, slots: int, labels: Optional[Dict[str, str]] = None,
                 name: Optional[str] = None, settings: Optional[Settings] = None,
                 run_dir: Optional[str] = None, manager_key: Optional[str] = None,
                 curve_secret: Optional[str] = None, insecure: bool = False) -> None:
        if insecure == bool(manager_key and curve_secret):
            raise InvalidArgument("start the executor with --manager-key FILE and --curve-secret FILE (a secured "
                                  "mesh; see docs/security.md) or with --insecure (plain TCP)")
        self.manager_key = manager_key
        self.curve = None if insecure else (keys.load_public(str(manager_key)), *keys.load_secret(str(curve_secret)))
        self.manager = manager
        self.slots = slots
        self.labels = dict(labels or {})
        self.id = name or f"{socket.gethostname()}-{secrets.token_hex(2)}"
        self.settings = settings or Settings.load()
        # systemd's RuntimeDirectory= is systemd's to remove; one we make is ours (removed at a clean stop)
        self.own_run_dir = run_dir is None
        self.run_dir = run_dir or tempfile.mkdtemp(prefix=f"zmesh-executor-{self.id}-")
        self.children: Dict[str, Child] = {}
        # every instance runs under a guard (executor/guard.py), unless a test turns it off
        self.guarded = guard.available() and os.environ.get(UNGUARDED_ENV) != "1"
        self.cgroups: Optional[InstanceCgroups] = None    # one cgroup per instance, where allowed (run())
        self._running = True
        self.refused: Optional[str] = None   # why the manager refused us, if it did
        self.grace = self.settings.drain_grace
        self._drain_deadline: Optional[float] = None
        self._drain_sent = False
        self._joined = False
        self._reload_requested = False
        self.on_reload: Optional[Callable[[], None]] = None   # SIGHUP (systemctl reload)
        self.sock: Optional[zmq.Socket] = None
        self.watch: Optional[transport.HandshakeWatch] = None
        self.cache = CacheProxy(self.run_dir, self.settings.cache_bytes, self._send)
        self.live = transport.Liveness(self.settings.heartbeat_interval, self.settings.liveness)

    # -- connection --------------------------------------------------------
    def _connect(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = transport.dealer(self.manager, curve=self.curve)
        if self.curve is not None:   # a wrong manager key fails the handshake: said at once (run())
            self.watch = transport.HandshakeWatch(self.sock)
        self.cache.expire(everything=True)   # what was asked on the old connection is not answered
        self.live = transport.Liveness(self.live.interval, self.live.liveness)
        self._send(ExecHello(self.id, detect(self.slots, self.labels)))

    def _send(self, record: Any, payloads: Sequence[Any] = ()) -> None:
        assert self.sock is not None
        try:
            self.sock.send_multipart(encode(record, payloads), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected yet; the heartbeat/hello cycle covers it
        self.live.sent()

    # -- instances ---------------------------------------------------------
    def _launch(self, iid: str, app: AppSpec, token: str) -> None:
        env = dict(os.environ)
        env.update(app.environments)
        env.update({"ZMESH_MANAGER": self.manager, "ZMESH_INSTANCE_ID": iid, "ZMESH_EXECUTOR_ID": self.id,
                    "ZMESH_APP": app.name, "ZMESH_OBJECT_CACHE": self.cache.endpoint,
                    "ZMESH_INSTANCE_TOKEN": token, "ZMESH_TOKEN": token,
                    "ZMESH_RUN_DIR": self.run_dir})   # e.g. where runner packages are unpacked, once per machine
        if self.manager_key:   # instances connect with fresh keys of their own; the token proves who they are
            env["ZMESH_MANAGER_KEY"] = os.path.abspath(self.manager_key)
        # The executor's own Python environment comes first on PATH, so `command: python3` finds zeromesh.
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        log_path = os.path.join(self.run_dir, f"{iid}.log")
        command = [app.command, *app.arguments]
        guarded = self.guarded
        read_fd, write_fd = os.pipe() if guarded else (-1, -1)
        if guarded:   # the guard (executor/guard.py) ends the service's whole tree with it
            command = [sys.executable, "-I", "-S", GUARD_SCRIPT, str(os.getpid()), str(write_fd), "--", *command]
        # PDEATHSIG: SIGTERM lets a guard sweep its tree; an unguarded service just dies
        preexec = die_with_parent(signal.SIGTERM if guarded else signal.SIGKILL, own_group=True)
        procs = self.cgroups.path(iid) if self.cgroups is not None else None
        if procs is not None:
            preexec = _joining(procs, preexec)
        try:
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(command, cwd=app.working_directory or None, env=env,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        pass_fds=(write_fd,) if guarded else (), preexec_fn=preexec)
        except OSError as exc:
            if guarded:
                os.close(read_fd)
            if self.cgroups is not None:
                self.cgroups.release(iid)
            where = f" in {app.working_directory}" if app.working_directory else ""
            self._send(Exited(iid, -1, f"cannot start {app.command!r}{where}: {exc.strerror or exc}"))
            return
        finally:
            if guarded:
                os.close(write_fd)
        self.children[iid] = Child(iid, app.name, proc, log_path, guarded, read_fd, app.command,
                                   app.working_directory or "", package=app.environments.get(RUNNER_HASH_ENV, ""))
        event(log, logging.INFO, "instance started", instance=iid, app=app.name, pid=proc.pid, guarded=guarded)

    def _sweep_packages(self) -> None:
        """Remove the runner packages unpacked here that no instance uses any more (their runner
        closed or its lease ended: its instances were stopped).  An instance holds a shared lock on
        each package it uses (``<hash>.lock``, client/runner_service.py); a package whose lock can
        be taken exclusively is nobody's.  Dependency sets (``deps-*``) stay: a cache shared by runners."""
        root = os.path.join(self.run_dir, "runner")
        try:
            names = os.listdir(root)
        except OSError:
            return
        for name in names:
            path = os.path.join(root, name)
            if name.startswith(("deps-", ".")) or name.endswith(".lock") or not os.path.isdir(path):
                continue
            try:
                fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue   # an instance uses it
            else:
                shutil.rmtree(path, ignore_errors=True)   # (the lock file stays: an instance may be opening it)
            finally:
                os.close(fd)

    def _stop(self, iid: str, grace: Optional[float] = None, reason: str = "stopped") -> None:
        child = self.children.get(iid)
        if child is None:
            self._send(Exited(iid, 0, reason))
            return
        child.stopping = True
        child.reason = reason
        child.kill_at = time.monotonic() + (self.settings.stop_grace if grace is None else grace)
        try:
            os.killpg(child.proc.pid, signal.SIGTERM)   # a guard passes it on to its service's group
        except ProcessLookupError:
            pass

    def _kill(self, child: Child) -> None:
        """SIGKILL the instance's whole tree: its cgroup if it has one, and through its guard (one
        pass of guard.kill_tree; the reap loop repeats it until the guard exits), else its group."""
        if self.cgroups is not None:
            self.cgroups.kill(child.iid)
        if child.guarded:
            guard.kill_tree(child.proc.pid)
        else:
            try:
                os.killpg(child.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        now = time.monotonic()
        if self.cgroups is not None and self.cgroups.dying:
            self.cgroups.collect()
        for iid, child in list(self.children.items()):
            code = child.proc.poll()
            if code is None:
                if child.stopping and now >= child.kill_at:
                    self._kill(child)
                    child.kill_at = now + 0.5   # again in half a second if it is still there (D state)
                continue
            del self.children[iid]
            if self.cgroups is not None:    # whatever the instance left behind (its guard SIGKILLed, say)
                self.cgroups.release(iid)
            if child.package:
                self._sweep_packages()
            error = child.start_error()
            if error and code == guard.CANNOT_EXECUTE:   # what Popen would have raised without a guard
                where = f" in {child.cwd}" if child.cwd else ""
                code, reason = -1, f"cannot start {child.command!r}{where}: {error}"
            elif child.stopping:
                reason = child.reason
            else:
                reason = f"instance exited with code {code}" + _tail(child.log_path)
                event(log, logging.WARNING, "instance crashed", instance=iid, code=code)
            self._send(Exited(iid, code, reason))

    def _stop_all(self, grace: float, reason: str) -> None:
        for iid in list(self.children):
            self._stop(iid, grace, reason)
        deadline = time.monotonic() + grace + 1.0
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.02)
        for child in self.children.values():
            self._kill(child)    # a guard left alive sweeps its tree when this executor exits (PDEATHSIG)

    # -- main loop -----------------------------------------------------------
    def _on_message(self, frames: List[bytes]) -> None:
        msg = decode(frames)
        self.live.heard()
        h = msg.header
        if msg.cmd is Cmd.WELCOME:
            self.live.interval = h.heartbeat_ms / 1000.0
            self.live.liveness = h.liveness
            event(log, logging.INFO, "joined manager", executor=self.id, manager=self.manager)
            line = f"joined {self.manager} as {self.id}, {self.slots} slots"
            if self._joined:
                sdnotify.status(line)       # a rejoin after the manager restarted
            else:
                sdnotify.ready(line)
            self._joined = True
        elif msg.cmd is Cmd.LAUNCH:
            try:
                app = AppSpec.from_dict(h.app)
            except Exception as exc:
                self._send(Exited(h.iid, -1, f"bad application spec: {exc}"))
                return
            self._launch(h.iid, app, h.token)
        elif msg.cmd is Cmd.STOP:
            self._stop(h.iid)
        elif msg.cmd is Cmd.GONE and h.fatal:
            event(log, logging.ERROR, "the manager refused this executor", reason=h.reason)
            self.refused = h.reason
            self.stop()
        elif msg.cmd is Cmd.GONE:
            event(log, logging.WARNING, "manager does not know us; rejoining", reason=h.reason)
            self._stop_all(grace=self.settings.stop_grace, reason="the manager forgot this executor")
            self._connect()
        elif msg.cmd is Cmd.HEARTBEAT:
            pass
        elif msg.cmd is Cmd.REPLY and self.cache.on_reply(msg):
            pass
        else:
            raise ProtocolError(f"{msg.cmd.name} is not sent to executors")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.drain())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "_reload_requested", True))
        sdnotify.status(f"waiting for the manager at {self.manager}")
        self.cgroups = InstanceCgroups.detect(self.id)
        ping_every = sdnotify.watchdog_interval()
        next_ping = 0.0
        self._connect()
        event(log, logging.INFO, "executor started", executor=self.id, manager=self.manager, slots=self.slots,
              run_dir=self.run_dir)
        poller = zmq.Poller()
        while self._running:
            assert self.sock is not None
            poller.register(self.sock, zmq.POLLIN)
            poller.register(self.cache.sock, zmq.POLLIN)
            ready = dict(poller.poll(timeout=50))
            poller.unregister(self.sock)
            poller.unregister(self.cache.sock)
            if self.cache.sock in ready:
                self.cache.on_instance()
            if self.watch is not None and self._handshake_rejected():
                break
            self.cache.expire()
            if self.sock in ready:
                for _ in range(1000):
                    try:
                        frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self._on_message(frames)
                    except ProtocolError as exc:
                        event(log, logging.WARNING, "bad message from manager", error=str(exc))
            self._reap()
            if ping_every is not None and time.monotonic() >= next_ping:
                sdnotify.watchdog()     # from the loop itself: a stuck loop gets restarted
                next_ping = time.monotonic() + ping_every
            if self._reload_requested:
                self._reload()
            if self._drain_deadline is not None:
                if not self._drain_sent:
                    sdnotify.stopping()
                    sdnotify.status(f"draining: {len(self.children)} instances, up to {self.grace:g}s")
                    self._send(Drain())
                    self._drain_sent = True
                    event(log, logging.INFO, "draining", executor=self.id, instances=len(self.children),
                          grace_s=self.grace)
                if not self.children or time.monotonic() > self._drain_deadline:
                    break
            if self.live.should_ping():
                self._send(Heartbeat(self.labels, self.cache.stats()))
            if self.live.dead():
                event(log, logging.WARNING, "manager silent; reconnecting", silent_s=round(self.live.silent_for(), 1))
                sdnotify.status(f"the manager at {self.manager} went silent; reconnecting")
                self._stop_all(grace=self.settings.stop_grace, reason="the manager went silent")
                self._connect()
        if not self._drain_sent:        # SIGINT: no drain
            sdnotify.stopping()
        self._stop_all(grace=self.settings.stop_grace, reason="the executor is shutting down")
        if self.cgroups is not None:
            self.cgroups.close()
        if self.watch is not None:
            self.watch.close()
        if self.sock is not None:
            self.sock.close(linger=0)
        self.cache.close()
        if self.own_run_dir:   # instance logs and unpacked runner packages go with it
            shutil.rmtree(self.run_dir, ignore_errors=True)
        event(log, logging.INFO, "executor stopped", executor=self.id,
              **({"removed_run_dir": self.run_dir} if self.own_run_dir else {}))
        return 3 if self.refused else 0

    def stop(self) -> None:
        self._running = False

    def _handshake_rejected(self) -> bool:
        """The manager refused our CURVE handshake: nothing we send will ever arrive, and retrying
        changes nothing until the configuration does.  Say why and exit 3 (a refusal), which the
        unit does not restart (RestartPreventExitStatus=3)."""
        assert self.watch is not None
        failed = [kind for kind, _, _ in self.watch.poll() if kind in transport.HANDSHAKE_FAILED.values()]
        if not failed:
            return False
        self.refused = transport.rejected_message(self.manager)
        event(log, logging.ERROR, self.refused, executor=self.id, manager_key=self.manager_key, reason=failed[0])
        sdnotify.status(self.refused)
        return True

    def _reload(self) -> None:
        self._reload_requested = False
        sdnotify.reload(self.on_reload, log, executor=self.id)
        self._send(Heartbeat(self.labels, self.cache.stats()))  # new labels now

    def drain(self) -> None:
        """SIGTERM: take no new work, let running tasks finish for ``grace`` seconds, then exit 0."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.grace


def _joining(procs: str, preexec: Callable[[], None]) -> Callable[[], None]:
    """``preexec`` and, first, move the child into the cgroup whose cgroup.procs is ``procs`` (it
    runs in the child before exec, so everything the instance ever starts is in that cgroup).
    A failure leaves the child where it is: the guard still covers it."""

    def run() -> None:
        try:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        except OSError:
            pass
        preexec()

    return run


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - STDERR_TAIL))
            text = f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f"; output ends with:\n{text}" if text else ""
