"""Child processes that cannot outlive their parent.

An executor's instances, and the daemons a local mesh or a benchmark starts,
must not keep serving after whoever started them died (kill -9 included):
Linux's PR_SET_PDEATHSIG sends them a signal when the parent thread exits.

It reaches that one process only, not what it starts (a child in its process
group, a setsid()'d one): an executor's instances get their whole tree ended by
a guard process in between, executor/guard.py (docs/reliability.md, "What
survives what: process trees").
"""
from __future__ import annotations

import ctypes
import os
import signal
from typing import Callable, Optional

PR_SET_PDEATHSIG = 1

_libc: Optional[ctypes.CDLL]
try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not glibc Linux: children simply outlive their parent there
    _libc = None


def die_with_parent(sig: int = signal.SIGTERM, own_group: bool = False) -> Callable[[], None]:
    """A ``preexec_fn`` for subprocess.Popen: ``sig`` reaches the child when its parent dies.

    ``own_group`` also puts the child in its own process group, so that it and
    everything it starts can be stopped together with ``os.killpg``.
    """

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(PR_SET_PDEATHSIG, sig)
        if own_group:
            os.setpgrp()

    return preexec
