"""A test service that starts processes of its own, for tests/test_process_tree.py.

("spawn", None) starts four long sleeps and returns their PIDs, one for each way a process can
sit below an instance:

* ``child``: a plain child, in the service's process group;
* ``orphan``: a grandchild in the service's process group whose parent has exited (a double fork);
* ``session``: a child that called setsid() (``start_new_session=True``), in a session of its own;
* ``daemon``: a setsid() grandchild whose parent has exited (how daemons detach).

("ignore_term", None) makes the service ignore SIGTERM, so that only SIGKILL stops it.
"""
import os
import signal
import subprocess
import sys

from executor import Instance

ins = Instance()
SLEEP = ["sleep", "300"]
kept = []     # the Popen objects of our direct children (not garbage-collected while we run)


def _detached(new_session):
    """Start a sleep through an intermediate process that exits at once; return the sleep's PID."""
    code = ("import subprocess, sys; p = subprocess.Popen(%r, start_new_session=%r, stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL); print(p.pid)" % (SLEEP, new_session))
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, check=True, timeout=30).stdout
    return int(out)


@ins.entrypoint
def tree(req):
    op, _ = req
    if op == "spawn":
        child = subprocess.Popen(SLEEP, stdout=subprocess.DEVNULL)
        session = subprocess.Popen(SLEEP, stdout=subprocess.DEVNULL, start_new_session=True)
        kept.extend([child, session])
        return {"service": os.getpid(), "child": child.pid, "orphan": _detached(False),
                "session": session.pid, "daemon": _detached(True)}
    if op == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return os.getpid()
    raise KeyError(op)


if __name__ == "__main__":
    ins.run()
