"""The instance guard: a small supervisor between the executor and one service process, so
that an instance's whole process tree ends with it (docs/reliability.md, "What survives what").

    executor ── guard (this file: a child subreaper; PR_SET_PDEATHSIG=SIGTERM from the executor)
                  └── service (its own process group; PR_SET_PDEATHSIG=SIGKILL from the guard)
                        └── whatever it starts: plain children, its group, setsid()'d sessions

Why a process of its own: PR_SET_PDEATHSIG reaches only the process that asked for it, and a
SIGKILLed executor can do nothing at all.  The guard is a child subreaper
(PR_SET_CHILD_SUBREAPER): a descendant whose parent dies is re-parented to the guard instead of
init, whatever it did (setsid(), a double fork), so "every process whose parent chain leads to
the guard" is the service's whole tree, and walking /proc by parent PID finds all of it.
The guard SIGKILLs that tree when

* its service exits (by itself, crashed, or stopped by the executor: whatever the service left
  running when it exited goes with it), or
* its executor dies, SIGKILL included: the kernel then sends the guard SIGTERM (PDEATHSIG),
  which, unlike SIGKILL, it can catch,

and then exits the way its service did (the same exit code, or killed by the same signal), so
the executor reports the same ``Exited`` code as without a guard.  It writes nothing to the
instance's output.  Signals the guard is sent while its executor lives (SIGTERM from ``_stop``,
SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) go on to the service's process group.

Run as a script by path with ``python -I -S`` (standard library only, so that an application's
PYTHONPATH or site-packages cannot break it, and it starts in about 20 ms)::

    python -I -S guard.py PARENT_PID STATUS_FD -- COMMAND [ARG...]

PARENT_PID is the executor's PID (if the guard's parent is already another process, the
executor died before the guard could ask for PDEATHSIG, and it starts nothing).  STATUS_FD is
the write end of a pipe: if COMMAND cannot be executed, the reason (strerror) is written there
and the guard exits with code 127, so that the executor reports "cannot start ..." as before.

The executor also imports :func:`kill_tree` from here, for its SIGKILL after ``stop_grace``.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:     # annotations only: importing typing would cost every instance start ~5 ms
    from typing import Dict, List, NoReturn, Optional

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

CANNOT_EXECUTE = 127  # the guard's exit code when the service's command cannot be executed
SWEEP_TIMEOUT = 5.0   # seconds the guard spends ending its tree before it exits regardless
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

_libc: Optional[ctypes.CDLL]
try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not glibc Linux: no guard there (see executor.daemon)
    _libc = None


def available() -> bool:
    """Whether this system has what the guard needs (Linux: prctl, /proc)."""
    return _libc is not None and sys.platform.startswith("linux") and os.path.isdir("/proc/self")


def _prctl(option: int, value: int) -> bool:
    return _libc is not None and _libc.prctl(option, value, 0, 0, 0) == 0


def descendants(root: int) -> Dict[int, int]:
    """Live processes below ``root`` (not ``root`` itself) as ``{pid: parent pid}``, from /proc.

    Zombies are left out: they are dead, and a zombie has no children (the kernel re-parents
    them when it exits).  A snapshot: a process forked after the scan is found by the next one.
    """
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue          # gone meanwhile
        if fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: Dict[int, int] = {}
    todo = [root]
    while todo:               # ends: parent links form a tree, each PID is visited once
        parent = todo.pop()
        for pid in children.get(parent, ()):
            if pid not in found:
                found[pid] = parent
                todo.append(pid)
    return found


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _signal(pid: int, parent: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` if it is still the child of ``parent`` seen in the scan.

    With a pidfd the process is pinned first, so a PID reused since the scan is not hit.
    """
    try:
        if hasattr(os, "pidfd_open"):
            fd = os.pidfd_open(pid)
            try:
                if _parent_of(pid) == parent:
                    signal.pidfd_send_signal(fd, sig)
            finally:
                os.close(fd)
        elif _parent_of(pid) == parent:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    except OSError:       # pidfd_open unsupported by this kernel (< 5.3)
        if _parent_of(pid) == parent:
            try:
                os.kill(pid, sig)
            except OSError:
                pass


def kill_tree(root: int) -> bool:
    """SIGKILL every live descendant of ``root``; if there is none, ``root`` itself.

    One pass; call it again until ``root`` has exited.  The descendants go first so that
    ``root``, when it is a guard, is there to adopt and sweep whatever they fork meanwhile, and
    exits on its own the way its service did (killed by SIGKILL).  Returns whether any process
    was signalled.
    """
    below = descendants(root)
    for pid, parent in below.items():
        _signal(pid, parent, signal.SIGKILL)
    if not below:
        try:
            os.kill(root, signal.SIGKILL)
        except ProcessLookupError:
            return False
    return True


# -- the guard process -----------------------------------------------------------------------

class _Guard:
    def __init__(self, parent: int) -> None:
        self.parent = parent
        self.service: Optional[int] = None
        self.status: Optional[int] = None      # the service's wait status once it has exited
        self.pending: Optional[int] = None     # a signal that came before the service was started

    def _reap(self) -> bool:
        """Reap every child that has ended (the service, or an orphan re-parented to us);
        False once there are no children left at all."""
        for _ in range(100_000):
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.service:
                self.status = status
        return True

    def sweep(self) -> None:
        """SIGKILL everything below us until nothing is left (bounded by SWEEP_TIMEOUT).

        Every descendant is ours to reap in the end (we are their subreaper), so "no children
        left" means the whole tree is gone."""
        me = os.getpid()
        deadline = time.monotonic() + SWEEP_TIMEOUT
        while True:
            for pid, parent in descendants(me).items():
                _signal(pid, parent, signal.SIGKILL)
            if not self._reap() or time.monotonic() > deadline:
                return
            time.sleep(0.005)

    def on_signal(self, sig: int, _frame: object) -> None:
        if os.getppid() != self.parent:
            # PDEATHSIG: the executor is gone; end the tree and go (nobody waits for our status)
            self.sweep()
            os._exit(128 + sig)
        if self.service is None:
            self.pending = sig        # delivered as soon as the service exists
            return
        if self.status is not None:
            return                    # the service was reaped: its PID may be someone else's now
        try:
            os.killpg(self.service, sig)
        except ProcessLookupError:    # forked, not yet in its own group: the service alone
            try:
                os.kill(self.service, sig)
            except ProcessLookupError:
                pass
        except PermissionError:
            pass

    def run(self, command: List[str], status_fd: int) -> int:
        for sig in FORWARDED:
            signal.signal(sig, self.on_signal)
        if not _prctl(PR_SET_CHILD_SUBREAPER, 1) or os.getppid() != self.parent:
            os.close(status_fd)
            return 1     # no subreaper (not Linux?), or the executor died before we were set up
        os.set_inheritable(status_fd, False)       # not the service's
        error = self.spawn(command)
        if error:
            os.write(status_fd, error.encode("utf-8", "replace")[:1000])
            os.close(status_fd)
            return CANNOT_EXECUTE
        os.close(status_fd)
        if self.pending is not None:
            self.on_signal(self.pending, None)
        while self.status is None:
            try:
                pid, status = os.waitpid(-1, 0)   # the service, or an orphan re-parented to us
            except ChildProcessError:
                return 1                          # cannot happen while the service lives
            if pid == self.service:
                self.status = status
        self.sweep()
        return _exit_like(self.status)

    def spawn(self, command: List[str]) -> str:
        """Fork and execute the service; returns why it could not be executed, or "".

        Plain fork and exec rather than subprocess: the guard starts in a few milliseconds
        (every instance start pays for it).  Our signals are blocked across the fork, so none
        runs the guard's handler in the service before its exec."""
        me = os.getpid()
        ready_r, ready_w = os.pipe()        # close-on-exec: EOF with nothing written = executed
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        pid = os.fork()
        if pid == 0:                        # the service, before exec
            try:
                os.close(ready_r)
                os.setpgrp()
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != me:
                    os._exit(1)             # the guard was SIGKILLed before PDEATHSIG was set
                for sig in FORWARDED:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
                os.execvp(command[0], command)
            except OSError as exc:
                os.write(ready_w, (exc.strerror or str(exc)).encode("utf-8", "replace"))
            finally:
                os._exit(CANNOT_EXECUTE)
        self.service = pid
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        os.close(ready_w)
        chunks = []
        for _ in range(1000):               # until EOF: exec succeeded or the child wrote why not
            try:
                chunk = os.read(ready_r, 4096)
            except InterruptedError:        # a handler raised nothing: PEP 475 retries; kept safe
                continue
            if not chunk:
                break
            chunks.append(chunk)
        os.close(ready_r)
        if not chunks:
            return ""
        os.waitpid(pid, 0)
        self.service = None
        return b"".join(chunks).decode("utf-8", "replace")


def _exit_like(status: int) -> int:
    """Exit as a process with wait status ``status`` did: the same code, or the same signal."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return code
    sig = -code
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # the service's crash, not a core of ours
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    return 128 + sig      # a signal whose default is to be ignored


def main(argv: List[str]) -> NoReturn:
    if len(argv) < 4 or argv[2] != "--":
        sys.stderr.write("usage: guard.py PARENT_PID STATUS_FD -- COMMAND [ARG...]\n")
        sys.exit(2)
    sys.exit(_Guard(int(argv[0])).run(argv[3:], int(argv[1])))


if __name__ == "__main__":
    main(sys.argv[1:])
