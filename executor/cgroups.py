"""One cgroup (v2) per instance, when the executor may make them: the kernel's own list of an
instance's processes, which nothing below it can leave (docs/reliability.md, "What survives
what: process trees").

The guard (executor/guard.py) already ends an instance's tree whenever the guard itself lives
to see it go.  A cgroup also covers what a guard cannot: the guard SIGKILLed on its own, and
a whole executor killed while its guards were stopped or wedged.  Layout::

    <the executor's cgroup>/zmesh-<executor id>.<executor pid>/<instance id>/

An instance's guard joins its cgroup before it executes (so everything it ever starts is in
it); when the instance has exited, or is killed after ``stop_grace``, the executor writes
``1`` to its ``cgroup.kill`` (Linux >= 5.14) and removes it.  On start, an executor removes
the ``zmesh-*.<pid>`` directories beside its own whose executor is no longer running, killing
what is left in them: after a ``kill -9``, the next executor on the machine sweeps up.

Used only when it works: a cgroup2 file system, ``cgroup.kill``, and a writable cgroup for
the executor (root, or a systemd unit with ``Delegate=yes`` and ``ProtectControlGroups=no``).
The shipped unit has neither: systemd's own cgroup for the unit does the job there.
"""
from __future__ import annotations

import logging
import os
import re
from typing import List, Optional

from mesh.ops.log import event

log = logging.getLogger("zeromesh.executor")

DISABLE_ENV = "ZMESH_TEST_NO_CGROUPS"
"""Tests only (the negative controls of tests/test_process_tree.py): set to 1, no cgroups."""

_LEFTOVER = re.compile(r"^zmesh-.+\.(\d+)$")


def _cgroup2_root() -> Optional[str]:
    """Where the cgroup2 file system is mounted, from /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        pass
    return None


def _own_cgroup() -> Optional[str]:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def _write(path: str, text: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        return True
    except OSError:
        return False


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class InstanceCgroups:
    """The executor's directory of instance cgroups.  :meth:`detect` returns None where
    cgroups cannot be used; every other failure is logged and the guard carries on alone."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.dying: List[str] = []      # killed cgroups not yet empty enough to remove

    @classmethod
    def detect(cls, executor_id: str) -> Optional["InstanceCgroups"]:
        if os.environ.get(DISABLE_ENV) == "1":
            return None
        root, own = _cgroup2_root(), _own_cgroup()
        if root is None or own is None:
            return None
        parent = os.path.join(root, own.lstrip("/"))
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", executor_id)
        base = os.path.join(parent, f"zmesh-{name}.{os.getpid()}")
        try:
            os.mkdir(base)
        except FileExistsError:
            pass
        except OSError:
            return None                  # read-only (ProtectControlGroups=) or not ours: no cgroups
        if not os.path.exists(os.path.join(base, "cgroup.kill")):    # Linux < 5.14
            os.rmdir(base)
            return None
        groups = cls(base)
        groups.sweep_leftovers(parent)
        return groups

    def sweep_leftovers(self, parent: str) -> None:
        """Kill and remove the instance cgroups of executors that are no longer running."""
        try:
            names = os.listdir(parent)
        except OSError:
            return
        for name in names:
            m = _LEFTOVER.match(name)
            path = os.path.join(parent, name)
            if m is None or path == self.base or _running(int(m.group(1))) or not os.path.isdir(path):
                continue
            killed = 0
            try:
                children = os.listdir(path)
            except OSError:   # another executor swept it at the same moment
                continue
            for child in children:
                if os.path.isdir(os.path.join(path, child)):
                    killed += self.kill_path(os.path.join(path, child))
                    self.dying.append(os.path.join(path, child))
            self.dying.append(path)
            event(log, logging.WARNING, "swept instance cgroups of a dead executor", cgroup=name, killed=killed)
        self.collect()

    def path(self, iid: str) -> Optional[str]:
        """Make the instance's cgroup; returns its cgroup.procs (written by the guard's preexec),
        or None if it cannot be made (cgroup.max.descendants, say: the guard still works)."""
        path = os.path.join(self.base, iid)
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except OSError as exc:
            event(log, logging.WARNING, "cannot make an instance cgroup", cgroup=path, error=str(exc))
            return None
        return os.path.join(path, "cgroup.procs")

    @staticmethod
    def kill_path(path: str) -> int:
        """SIGKILL every process in the cgroup at ``path``; returns how many there were."""
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                n = len(f.read().split())
        except OSError:
            return 0
        if n:
            _write(os.path.join(path, "cgroup.kill"), "1")
        return n

    def kill(self, iid: str) -> None:
        self.kill_path(os.path.join(self.base, iid))

    def release(self, iid: str) -> None:
        """The instance has exited: kill whatever is left in its cgroup and remove it."""
        path = os.path.join(self.base, iid)
        self.kill_path(path)
        self.dying.append(path)
        self.collect()

    def collect(self) -> None:
        """Remove the killed cgroups that have emptied (a cgroup with processes cannot be removed)."""
        left: List[str] = []
        for path in self.dying:       # children were added before their parents
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(path)
        self.dying = left

    def close(self) -> None:
        """The executor is exiting: remove its directory (its instances have been stopped)."""
        for iid in os.listdir(self.base) if os.path.isdir(self.base) else ():
            if os.path.isdir(os.path.join(self.base, iid)):
                self.release(iid)
        self.dying.append(self.base)
        self.collect()
