"""The client's failure modes: every one a typed error from mesh.errors, raised promptly.

Each test is one defect a new user hit (issue 10).  Every wait is bounded: a call
that could hang runs in a helper thread that the test waits on with a deadline,
so a regression fails the test instead of hanging the run.
"""
from __future__ import annotations

import ast
import concurrent.futures
import os
import pathlib
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Set, Tuple

import pytest
from conftest import tools_spec

from client import Client, Connection, Session
from client.api import Page, SessionInfo
from mesh.errors import DeadlineExceeded, InvalidArgument, MeshError, NotFound, Unavailable
from mesh.model import auth
from mesh.testing import LocalMesh, wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent
BOUND = 15.0        # seconds any single step below may take before the test fails
NOBODY = "tcp://127.0.0.1:1"   # a well-formed endpoint where no manager listens


def _within(seconds: float, fn: Callable[[], Any]) -> Tuple[str, Any]:
    """Run ``fn`` on a helper thread; ("ok", value) or ("raised", exc); fail if it takes longer."""
    done = threading.Event()
    out: Dict[str, Any] = {}

    def run() -> None:
        try:
            out["r"] = ("ok", fn())
        except BaseException as exc:  # noqa: B902 (we report whatever it was)
            out["r"] = ("raised", exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(seconds), f"still blocked after {seconds}s: the call hangs"
    return out["r"]


def _raises(seconds: float, fn: Callable[[], Any], kind: type) -> BaseException:
    status, value = _within(seconds, fn)
    assert status == "raised", f"expected {kind.__name__}, got a value: {value!r}"
    assert isinstance(value, kind), f"expected {kind.__name__}, got {type(value).__name__}: {value}"
    return value


def _wait_until(pred: Callable[[], bool], timeout: float = BOUND) -> bool:
    """Poll ``pred`` until true or ``timeout`` (bounded; each wait is on an Event, not a sleep)."""
    tick = threading.Event()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        tick.wait(0.02)
    return pred()


def _zmesh(*args: str, **kw: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, **kw)


def _one_error_line(r: subprocess.CompletedProcess, code: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {code}: "), r.stderr
    return lines[0]


# -- 1. malformed endpoints and a dead I/O thread -------------------------------------------
BAD_ENDPOINTS = ["tcp://nonsense::bad", "bogus://x", "", "tcp://", "tcp://127.0.0.1", "no-scheme"]
CONSTRUCTORS = {
    "Connection": lambda ep: Connection(ep),
    "Client": lambda ep: Client(ep),
    "Session": lambda ep: Session("echo-app", manager=ep),
}


@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS)
@pytest.mark.parametrize("make", sorted(CONSTRUCTORS))
def test_malformed_endpoint_is_invalid_argument_at_once(make, endpoint):
    # Given a malformed manager endpoint, When a client object is built with it
    started = time.monotonic()
    exc = _raises(BOUND, lambda: CONSTRUCTORS[make](endpoint), InvalidArgument)
    # Then the constructor itself fails, at once, naming the endpoint
    assert time.monotonic() - started < 5
    assert repr(endpoint) in str(exc) and exc.details["endpoint"] == endpoint
    assert isinstance(exc, ValueError), "InvalidArgument is also a ValueError for callers who catch that"


@pytest.mark.parametrize("endpoint", ["bogus://x", "tcp://nonsense::bad"])
def test_cli_with_a_malformed_endpoint_is_one_line_and_exit_2(endpoint):
    r = _zmesh("list", "-s", "--manager", endpoint)
    assert r.returncode == InvalidArgument.exit_code, r.stderr
    assert repr(endpoint) in _one_error_line(r, "invalid_argument")


def _kill_io_thread_once_busy(conn: Connection) -> None:
    """Make the I/O thread raise (as a bug would) once it has sent a ``stats`` call."""
    real = conn._receive

    def boom(sock: Any) -> None:
        if any(method == "stats" for _, _, method in list(conn._calls.values())):
            raise RuntimeError("boom: injected fault")
        real(sock)

    conn._receive = boom  # type: ignore[method-assign]


def test_a_dead_io_thread_fails_pending_and_later_calls_promptly():
    conn = Connection(NOBODY)
    try:
        task = conn.submit("some-session", b"payload", lambda b: b)      # pending: nobody answers
        _kill_io_thread_once_busy(conn)
        # When the I/O thread dies while a call (30 s timeout) is pending
        exc = _raises(BOUND, lambda: conn.call("stats", timeout=30), Unavailable)
        # Then that call fails well before its timeout, saying why
        assert "I/O thread died" in str(exc) and "boom" in str(exc)
        # and so does the pending task, and every later call and submit, at once
        status, err = _within(BOUND, lambda: task.exception(BOUND))
        assert status == "ok" and isinstance(err, Unavailable) and "boom" in str(err)
        for later in (lambda: conn.call("stats", timeout=30), lambda: conn.submit("s", b"x", lambda b: b)):
            started = time.monotonic()
            exc = _raises(BOUND, later, Unavailable)
            assert "I/O thread died" in str(exc) and time.monotonic() - started < 2
    finally:
        conn.close()


def test_a_call_nobody_answers_fails_with_unavailable_by_its_deadline():
    # the healthy case beside the test above: a live I/O thread times the call out itself
    with Connection(NOBODY) as conn:
        started = time.monotonic()
        exc = _raises(BOUND, lambda: conn.call("stats", timeout=0.5), Unavailable)
        assert "did not answer" in str(exc) and 0.4 < time.monotonic() - started < 5
        status, value = _within(BOUND, lambda: conn.call("stats", timeout=0.2))
        assert status == "raised" and "did not answer" in str(value), "the connection still works"
    # and once closed, calls fail at once
    _raises(BOUND, lambda: conn.call("stats"), Unavailable)


def test_malformed_settings_in_the_environment_are_invalid_argument(monkeypatch):
    monkeypatch.setenv("ZMESH_REQUEST_TIMEOUT", "soon")
    exc = _raises(BOUND, lambda: Connection(NOBODY), InvalidArgument)
    assert "soon" in str(exc)


def test_session_needs_a_name_or_an_id_and_a_reopen_takes_no_new_settings():
    # (a name and an id together create a session with that id: docs/flame.md, tests/test_parity.py)
    for kwargs in ({}, {"session_id": "x", "resreq": "cpu=1"}, {"session_id": "x", "max_instances": 2}):
        exc = _raises(BOUND, lambda: Session(**kwargs), InvalidArgument)
        assert isinstance(exc, ValueError)


def test_a_cancelled_task_future_does_not_kill_the_connection(mesh):
    with Session("tools") as s:
        assert s.invoke(("echo", "warm"), timeout=60) == "warm"     # an instance is up
        fut = s.submit(("sleep", 0.3))
        assert fut.cancel(), "a pending task future can be cancelled (the caller stops waiting)"
        # When its answer arrives anyway (the connection owes nothing more)
        assert _wait_until(lambda: not s._conn._tasks), "the cancelled task's answer arrived"
        # Then the connection still works
        status, value = _within(BOUND, lambda: s.invoke(("echo", "alive"), timeout=BOUND))
        assert (status, value) == ("ok", "alive")


def test_arguments_that_cannot_be_sent_are_invalid_argument_and_the_connection_lives(client):
    bad = [
        lambda: Session("tools", resreq={"cpu": object()}, connection=client.conn),   # not msgpack
        lambda: Session("tools", ctx=threading.Lock(), connection=client.conn),        # not picklable
    ]
    for make in bad:
        _raises(BOUND, make, InvalidArgument)
    with Session("tools", connection=client.conn) as s:
        _raises(BOUND, lambda: s.submit(threading.Lock()), InvalidArgument)
    status, value = _within(BOUND, client.ping)
    assert status == "ok", value


# -- 2. a Page is a sequence ----------------------------------------------------------------
def test_find_returns_a_page_that_is_a_sequence(client):
    with Session("echo-app", connection=client.conn) as s:
        page = client.find_sessions(filter={"state": "open"})
        ids = [info.id for info in page]                       # iterate
        assert s.id() in ids and len(page) == len(ids) >= 1    # len
        assert page[0].id == ids[0] and page[-1].id == ids[-1]  # index
        assert isinstance(page[:1], Page) and len(page[:1]) == 1 and page[:1].total == page.total  # slice
        assert page and not client.find_sessions(filter={"id": "no-such-session"})              # bool
        assert page.total >= len(page) and page.items == list(page)
        assert all(isinstance(i, SessionInfo) for i in page)
    assert [a.name for a in client.find_applications(sort={"by": "name"})] == sorted(
        a.name for a in client.find_applications())
    assert len(client.find_executors()) == 2


def test_list_calls_are_aliases_of_find_with_every_record(client):
    for alias, find in (("list_applications", "find_applications"), ("list_sessions", "find_sessions"),
                        ("list_executors", "find_executors")):
        doc = getattr(Client, alias).__doc__ or ""
        assert f"Alias of :meth:`{find}`" in doc
        listed = getattr(client, alias)()
        assert isinstance(listed, Page) and len(listed) == listed.total == getattr(client, find)().total
    # records still read like the dicts these calls used to return
    execs = client.list_executors()
    assert [e["id"] for e in execs] == [e.id for e in execs] == sorted(e.id for e in execs)
    assert dict(execs[0])["slots"] == execs[0].slots and execs[0].get("nope", 1) == 1
    with pytest.raises(KeyError):
        execs[0]["nope"]


def test_one_spelling_for_a_session_id_and_the_old_one_still_works(client):
    with Session("echo-app", connection=client.conn) as s:
        assert client.get_session(session_id=s.id()).id == s.id()
        assert client.get_session(sid=s.id()).id == s.id()          # the old keyword, kept hidden
        assert client.close_session(sid=s.id())["id"] == s.id()


def test_a_spec_may_be_a_path_object():
    from client.api import _spec
    assert _spec(pathlib.Path(ROOT, "examples", "echo", "echo-app.yaml")).name == "echo-app"
    with pytest.raises(InvalidArgument):
        _spec(42)


# -- 3. deadlines are DeadlineExceeded, in Python and in the CLI -------------------------------
def test_waits_that_run_out_are_deadline_exceeded(mesh):
    with Session("tools") as s:
        assert s.invoke(("echo", "warm"), timeout=60) == "warm"
        for wait in (lambda: s.map([("sleep", 2), ("echo", 1)], timeout=0.2),
                     lambda: s.submit(("sleep", 2)).result(0.2),
                     lambda: s.submit(("sleep", 2)).exception(0.2),
                     lambda: s.invoke(("sleep", 2), timeout=0.2)):
            exc = _raises(BOUND, wait, DeadlineExceeded)
            assert isinstance(exc, TimeoutError) and isinstance(exc, concurrent.futures.TimeoutError)
            assert exc.code == "deadline_exceeded"
        assert s.map([("echo", 1), ("echo", 2)], timeout=BOUND) == [1, 2]
        with pytest.raises(MeshError) as failed:           # a task's own failure is not a deadline
            s.map([("echo", 1), ("raise", 2)], timeout=BOUND)
        assert failed.value.code == "task_failed"


@pytest.mark.parametrize("count", ["1", "3"])
def test_cli_invoke_timeout_is_one_line_and_the_deadline_exit_code(mesh, count):
    r = _zmesh("invoke", "tools", "--input", '["sleep", 2]', "--timeout", "0.3", "--count", count,
               "--manager", mesh.endpoint)
    assert r.returncode == DeadlineExceeded.exit_code, r.stderr
    _one_error_line(r, "deadline_exceeded")


def test_cli_names_the_application_as_view_and_unregister_do(mesh):
    for how in (["tools"], ["-a", "tools"], ["--app", "tools"]):
        r = _zmesh("invoke", *how, "--input", '["echo", 7]', "--manager", mesh.endpoint)
        assert (r.returncode, r.stdout.strip()) == (0, "7"), r.stderr
    assert _zmesh("invoke", "--input", "1", "--manager", mesh.endpoint).returncode == 2   # no application


@pytest.mark.parametrize("raised, code", [
    (concurrent.futures.TimeoutError(), "deadline_exceeded"),
    (DeadlineExceeded("late"), "deadline_exceeded"),
    (__import__("zmq").ZMQError(__import__("errno").EHOSTUNREACH), "unavailable"),
    (NotFound("gone"), "not_found"),
])
def test_the_cli_error_wrapper_prints_one_line_and_exits_with_the_code(capsys, raised, code):
    from client.cli_common import _errors
    from mesh.errors import ERRORS

    @_errors
    def command() -> None:
        raise raised

    with pytest.raises(SystemExit) as exit_:
        command()
    assert exit_.value.code == ERRORS[code].exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {code}: ")


# -- 5. offline and online admin mistakes are the same typed error ---------------------------
MISTAKES = [("robots", "revoke", "robot-nope"), ("users", "remove", "nobody"),
            ("executor-keys", "revoke", "no-such-key")]


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda m: " ".join(m[:2]))
def test_offline_and_online_admin_mistakes_match(mesh, tmp_path, mistake):
    from mesh.data.store import Store
    db = str(tmp_path / "offline.db")
    Store(db).close()
    offline = _zmesh(*mistake, "--db", db)
    online = _zmesh(*mistake, "--manager", mesh.endpoint)
    assert offline.returncode == online.returncode == NotFound.exit_code, (offline.stderr, online.stderr)
    assert _one_error_line(offline, "not_found") == _one_error_line(online, "not_found")


def test_auth_executor_key_functions_raise_not_found(tmp_path):
    from mesh.data.store import Store
    store = Store(str(tmp_path / "m.db"))
    try:
        auth.add_executor_key(store, "PUBLICKEY", "m1")
        assert [k["name"] for k in auth.list_executor_keys(store)] == ["m1"]
        auth.revoke_executor_key(store, "m1")
        with pytest.raises(NotFound) as exc:
            auth.revoke_executor_key(store, "m1")
        assert exc.value.details == {"key": "m1"}
    finally:
        store.close()


# -- 6. no import cycle inside the client package -------------------------------------------
def _client_imports() -> Dict[str, Set[str]]:
    """client module -> client modules it imports (module level or inside functions)."""
    package = ROOT / "client"
    modules = {p.stem for p in package.glob("*.py")}
    graph: Dict[str, Set[str]] = {}
    for path in package.glob("*.py"):
        edges: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: List[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:                                   # from .x import y / from . import x
                    targets = [node.module] if node.module else [a.name for a in node.names]
                elif node.level == 0 and node.module and node.module.split(".")[0] == "client":
                    parts = node.module.split(".")
                    targets = [parts[1]] if len(parts) > 1 else ["__init__"]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] if "." in a.name else "__init__"
                           for a in node.names if a.name.split(".")[0] == "client"]
            edges.update(t.split(".")[0] for t in targets if t.split(".")[0] in modules)
        edges.discard(path.stem)
        graph[path.stem] = edges
    return graph


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle in ``graph`` as a path [a, b, ..., a], or [] if there is none."""
    state: Dict[str, int] = {}          # 1 = on the current path, 2 = done
    path: List[str] = []

    def visit(n: str) -> List[str]:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def test_the_cycle_finder_finds_cycles():
    # negative control: the shape client/cli.py and its sub-modules had before
    assert _cycle({"cli": {"cli_manage", "api"}, "cli_manage": {"cli"}, "api": set()}) == [
        "cli", "cli_manage", "cli"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_client_package_has_no_import_cycle():
    graph = _client_imports()
    assert {"cli", "cli_common", "cli_manage", "cli_security", "api", "connection"} <= set(graph)
    assert "cli_common" in graph["cli_manage"] and "cli" not in graph["cli_manage"], graph
    assert _cycle(graph) == [], f"import cycle: {' -> '.join(_cycle(graph))}"


def test_submit_waits_for_room_in_the_window(mesh: Any) -> None:
    # Given a connection that may have one task awaiting its answer
    import threading
    import time as _time

    from client.connection import Connection
    from mesh.ops.config import Settings
    with Connection(mesh.endpoint, settings=Settings.load(max_inflight=1)) as conn, \
            Session("tools", connection=conn) as s:
        answered: List[float] = []
        first = s.submit(("sleep", 0.5))
        first.add_done_callback(lambda _: answered.append(_time.monotonic()))
        # When a second task is submitted from another thread
        returned: List[float] = []
        def second() -> None:
            s.submit(("echo", 2))
            returned.append(_time.monotonic())   # once submit has returned

        t = threading.Thread(target=second)
        t.start()
        t.join(30)
        # Then its submit returned only once the first task's answer had freed the place
        assert answered and returned and returned[0] >= answered[0]
        assert first.result(30) > 0 and conn._window.used <= 1   # a pid: the sleep ran


def test_invoke_answers_in_the_callers_thread_and_hands_long_tasks_over(mesh: Any) -> None:
    import threading

    from client.connection import SYNC_BUDGET
    with Session("tools", manager=mesh.endpoint) as s:
        conn = s._conn
        # Given a quick task: answered on the direct socket, its place in the window given back
        assert s.invoke(("echo", "quick"), timeout=30) == "quick"
        assert conn._direct is not None and conn._window.used == 0 and not conn._tasks
        # When a task outlives the direct budget, the I/O thread takes it over and answers it
        pid = s.invoke(("sleep", SYNC_BUDGET + 0.3), timeout=30)
        assert isinstance(pid, int) and conn._window.used == 0
        # When the caller's timeout ends first: DeadlineExceeded, and the place comes back with the answer
        with pytest.raises(DeadlineExceeded):
            s.invoke(("sleep", 0.4), timeout=0.1)
        wait_until(lambda: conn._window.used == 0, timeout=10, what="the late answer to free its place")
        # And two threads invoking at once are both answered (one directly, one through the I/O thread)
        out: List[Any] = []
        threads = [threading.Thread(target=lambda i=i: out.append(s.invoke(("echo", i), timeout=30)))
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(out) == [0, 1]


def test_invoke_survives_a_manager_restart_in_the_middle(tmp_path: Any) -> None:
    import os as _os
    import signal as _signal
    import threading

    from mesh.testing import FAST as _FAST
    with LocalMesh(executors=1, slots=1, env=dict(_FAST), log_dir=str(tmp_path)) as m:
        with Client(m.endpoint) as c:
            c.register_application(tools_spec())
        with Session("tools", manager=m.endpoint) as s:
            assert s.invoke(("echo", 1), timeout=30) == 1
            # Given an invoke running on the direct socket
            out: List[Any] = []
            t = threading.Thread(target=lambda: out.append(s.invoke(("sleep", 0.5), timeout=60)))
            t.start()
            wait_until(lambda: s._conn._window.used == 1, timeout=10, what="the invoke to be in flight")
            # When the manager is killed and restarted meanwhile
            _os.kill(m.manager.pid, _signal.SIGKILL)
            m.manager.wait(10)
            m.start_manager()
            # Then the invoke still returns its answer
            t.join(60)
            assert len(out) == 1 and isinstance(out[0], int)


def test_an_invoke_that_runs_out_names_the_callers_timeout_not_what_was_left_of_it(mesh):
    with Session("tools") as s:
        with pytest.raises(DeadlineExceeded, match=r"no answer within 1.5s"):
            s.invoke(("sleep", 5), timeout=1.5)   # longer than the direct path's budget: the I/O thread's wait
