"""An instance's whole process tree ends with it (executor/guard.py; docs/reliability.md,
"What survives what: process trees").

The service (tests/apps/tree_service.py) starts a plain child, an orphaned grandchild in its
process group, a setsid() child and a setsid() daemon; then the executor is SIGKILLed, or the
instance stopped, and every one of them must be gone.  The negative control runs the same
scenario with the guard off (ZMESH_TEST_UNGUARDED=1, a switch only tests use): the setsid()
processes then outlive the killed executor.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import HERE, tools_spec, wait_until

from client import Client, Session
from client.local import LocalMesh
from executor import guard
from mesh import errors

KINDS = ("child", "orphan", "session", "daemon")
SESSION_KINDS = ("session", "daemon")    # what PR_SET_PDEATHSIG plus a process group cannot reach

pytestmark = pytest.mark.skipif(not guard.available(), reason="the guard needs Linux (prctl, /proc)")


def tree_spec(name: str = "tree") -> dict:
    return {"metadata": {"name": name},
            "spec": {"working_directory": os.path.join(HERE, "apps"), "command": sys.executable,
                     "arguments": ["tree_service.py"], "max_retries": 0}}


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _end(pids) -> None:
    """Clean-up: SIGKILL each PID the service reported that is still running (by PID, never by name)."""
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def tree_mesh(tmp_path, request):
    """One executor with one slot (so the instance is on it) and the tree app registered;
    ``request.param`` False turns the guard off (the negative control), a dict is extra environment."""
    param = getattr(request, "param", True)
    env = param if isinstance(param, dict) else {} if param else {"ZMESH_TEST_UNGUARDED": "1"}
    from mesh.testing import FAST
    with LocalMesh(executors=1, slots=1, env={**FAST, **env}, log_dir=str(tmp_path)) as m:
        with Client(m.endpoint) as c:
            c.register_application(tree_spec())
        yield m


@pytest.mark.parametrize("tree_mesh", [True, False], ids=["guarded", "unguarded-negative-control"],
                         indirect=True)
def test_executor_sigkill_ends_the_instance_tree(tree_mesh):
    m = tree_mesh
    guarded = m.env.get("ZMESH_TEST_UNGUARDED") != "1"
    pids: dict = {}
    try:
        # Given an instance that has started processes of every kind
        with Session("tree", manager=m.endpoint) as s:
            pids = s.invoke(("spawn", None), timeout=60)
            assert all(_alive(pids[k]) for k in ("service", *KINDS)), pids
            # When its executor is killed with SIGKILL (it can do nothing about it)
            LocalMesh.end(m.executors[0], signal.SIGKILL)
        # Then the service dies in any case (PR_SET_PDEATHSIG) ...
        wait_until(lambda: not _alive(pids["service"]), timeout=10, what="the service to die with its executor")
        if guarded:
            # ... and with the guard, every process below it too
            wait_until(lambda: not [k for k in KINDS if _alive(pids[k])], timeout=10,
                       what="every descendant of the instance to be gone")
        else:
            # ... without it, setsid() descendants survive (the protection is what makes the difference)
            survivors = [k for k in SESSION_KINDS if _alive(pids[k])]
            assert survivors == list(SESSION_KINDS), f"expected setsid() processes to survive: {pids}"
    finally:
        _end(pids.get(k, 0) for k in ("service", *KINDS) if pids.get(k))


@pytest.mark.parametrize("tree_mesh", [{}, {"ZMESH_TEST_NO_CGROUPS": "1"}], ids=["cgroups-if-any", "guard-alone"],
                         indirect=True)
@pytest.mark.parametrize("ignores_sigterm", [False, True], ids=["exits-on-sigterm", "ignores-sigterm"])
def test_stopped_instance_takes_its_tree_with_it(tree_mesh, ignores_sigterm):
    m = tree_mesh
    pids: dict = {}
    try:
        # Given an instance that has started processes of every kind (and maybe ignores SIGTERM)
        with Session("tree", manager=m.endpoint) as s:
            if ignores_sigterm:
                s.invoke(("ignore_term", None), timeout=60)
            pids = s.invoke(("spawn", None), timeout=60)
            assert all(_alive(pids[k]) for k in ("service", *KINDS)), pids
        # When the executor stops it (a drain stops idle instances: SIGTERM, SIGKILL after stop_grace)
        with Client(m.endpoint) as c:
            c.drain_executor("exec-0")
        # Then the service and everything below it are gone, and the executor lives on
        wait_until(lambda: not [k for k in ("service", *KINDS) if _alive(pids[k])], timeout=15,
                   what="the stopped instance and its descendants to be gone")
        assert m.executors[0].poll() is None
    finally:
        _end(pids.get(k, 0) for k in ("service", *KINDS) if pids.get(k))


def _instance_cgroups(executor_pid: int) -> str:
    """The executor's directory of instance cgroups (executor/cgroups.py), or skip the test."""
    from executor import cgroups
    root = cgroups._cgroup2_root()
    with open(f"/proc/{executor_pid}/cgroup") as f:
        own = next((line[3:].strip() for line in f if line.startswith("0::")), None)
    parent = os.path.join(root or "/nonexistent", (own or "").lstrip("/"))
    found = [n for n in (os.listdir(parent) if os.path.isdir(parent) else ()) if n.endswith(f".{executor_pid}")]
    if not found:
        pytest.skip("this executor has no instance cgroups here (no writable cgroup2, or Linux < 5.14)")
    return os.path.join(parent, found[0])


@pytest.mark.parametrize("tree_mesh", [{}, {"ZMESH_TEST_NO_CGROUPS": "1"}], ids=["cgroups", "no-cgroups-negative-control"],
                         indirect=True)
def test_sigkilled_guard_leaves_nothing_in_its_cgroup(tree_mesh):
    m = tree_mesh
    with_cgroups = m.env.get("ZMESH_TEST_NO_CGROUPS") != "1"
    if with_cgroups:
        _instance_cgroups(m.executors[0].pid)
    pids: dict = {}
    try:
        # Given an instance that has started processes of every kind
        with Session("tree", manager=m.endpoint) as s:
            pids = s.invoke(("spawn", None), timeout=60)
            with open(f"/proc/{pids['service']}/stat") as f:
                guard_pid = int(f.read().rsplit(")", 1)[1].split()[1])
            assert guard_pid != m.executors[0].pid, "the service runs under a guard"
            # When its guard alone is SIGKILLed (the one process of the tree that cannot clean up)
            os.kill(guard_pid, signal.SIGKILL)
            wait_until(lambda: not _alive(pids["service"]), timeout=10, what="the service to die with its guard")
        if with_cgroups:
            # Then the executor kills what is left in the instance's cgroup
            wait_until(lambda: not [k for k in KINDS if _alive(pids[k])], timeout=10,
                       what="every descendant of the instance to be gone")
        else:
            # (without a cgroup, nothing is left to reach the setsid() processes)
            assert [k for k in SESSION_KINDS if _alive(pids[k])] == list(SESSION_KINDS), pids
    finally:
        _end(pids.get(k, 0) for k in ("service", *KINDS) if pids.get(k))


@pytest.mark.parametrize("tree_mesh", [{"ZMESH_TEST_UNGUARDED": "1"}], ids=["unguarded"], indirect=True)
def test_next_executor_sweeps_the_cgroups_of_a_killed_one(tree_mesh):
    m = tree_mesh
    old = _instance_cgroups(m.executors[0].pid)
    pids: dict = {}
    try:
        # Given an unguarded instance's tree left running by an executor killed with SIGKILL
        with Session("tree", manager=m.endpoint) as s:
            pids = s.invoke(("spawn", None), timeout=60)
            LocalMesh.end(m.executors[0], signal.SIGKILL)
        wait_until(lambda: not _alive(pids["service"]), timeout=10, what="the service to die with its executor")
        assert all(_alive(pids[k]) for k in SESSION_KINDS), pids
        # When the next executor starts on this machine (as systemd's Restart= would)
        m.add_executor(name="exec-1")
        m.wait_executors(1)
        # Then it kills what the dead one left in its cgroups, and removes them
        wait_until(lambda: not [k for k in KINDS if _alive(pids[k])] and not os.path.exists(old), timeout=10,
                   what="the dead executor's instance cgroups to be swept")
    finally:
        _end(pids.get(k, 0) for k in ("service", *KINDS) if pids.get(k))


def test_crash_is_reported_with_the_service_exit_code_and_output(tree_mesh):
    # Given a guarded instance whose service exits with code 3
    with Client(tree_mesh.endpoint) as c:
        c.register_application(tools_spec("crashy", max_retries=0))
    # When a task makes it crash, Then the reason is the service's own code, as without a guard
    with Session("crashy", manager=tree_mesh.endpoint) as s:
        with pytest.raises(errors.TaskFailed, match="exited with code 3"):
            s.invoke(("crash", None), timeout=60)


# -- the guard alone: exit status and start errors as the executor sees them -------------------

def _guarded(*command: str) -> tuple:
    """Run COMMAND under the guard as the executor does; returns (exit code, start error)."""
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", guard.__file__, str(os.getpid()), str(write_fd), "--",
                                 *command], pass_fds=(write_fd,))
        os.close(write_fd)
        code = proc.wait(30)
        return code, os.read(read_fd, 4096).decode()
    finally:
        os.close(read_fd)


@pytest.mark.parametrize("script, code", [("exit 0", 0), ("exit 7", 7), ("kill -9 $$", -9), ("kill -TERM $$", -15),
                                          ("kill -SEGV $$", -11)])
def test_guard_exits_the_way_its_service_did(script, code):
    assert _guarded("sh", "-c", script) == (code, "")


def test_guard_reports_a_command_that_cannot_be_executed():
    assert _guarded("/nonexistent/python", "x.py") == (guard.CANNOT_EXECUTE, "No such file or directory")


def test_guard_sweeps_what_its_service_leaves_behind():
    # Given a service that starts a setsid() sleep and exits at once (echoing the sleep's PID)
    read_fd, write_fd = os.pipe()
    out_r, out_w = os.pipe()
    pid = 0
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", guard.__file__, str(os.getpid()), str(write_fd), "--",
                                 "sh", "-c", "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $!"],
                                pass_fds=(write_fd,), stdout=out_w)
        os.close(write_fd)
        os.close(out_w)
        out_w = -1
        # When the service exits, Then the guard exits with its code once the sleep is gone
        assert proc.wait(30) == 0
        with os.fdopen(out_r) as f:
            out_r = -1
            pid = int(f.read())
        assert not _alive(pid)
    finally:
        for fd in (read_fd, out_r, out_w):
            if fd >= 0:
                os.close(fd)
        _end([pid] if pid else [])
