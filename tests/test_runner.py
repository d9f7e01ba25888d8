"""The runner (issue 13): functions, classes and objects of the working directory run on the mesh.

Every test runs from a temporary working directory holding a small module (``shapes.py``), so the
package is built, shipped and unpacked for real; the functions and classes defined here travel by
value (executors cannot import this test module), those of ``shapes`` by reference.
"""
from __future__ import annotations

import logging
import os
import pathlib
import signal
import threading
import time
from typing import Iterator

import pytest
from conftest import wait_until

from client import Runner, SessionContext, get_object
from client import objects as client_objects
from client import runner_package
from client.objects import ObjectRef
from client.runner import ObjectFuture
from mesh.errors import AlreadyExists, NotFound, TaskFailed

SHAPES = "def area(w, h=2):\n    return w * h\n"


def sum_func(a: int, b: int) -> int:
    return a + b


class Calculator:
    def multiply(self, a, b):
        return a * b


class Counter:
    def __init__(self):
        self.count = 0

    def add(self, v):
        self.count += v
        return self.count

    def get_count(self):
        return self.count


class Log:
    def __init__(self):
        self.items = []

    def append(self, v):
        self.items.append(v)
        return len(self.items)

    def all(self):
        return list(self.items)


class Tally(Counter):
    def pid(self):
        return os.getpid()

    def boom(self):
        raise ValueError(f"boom at {self.count}")


def greet(name, greeting="hello", *, punct="!"):
    return f"{greeting} {name}{punct}"


def fail(x):
    raise KeyError(f"no such key {x}")


def unpicklable():
    return threading.Lock()


def where(i):
    time.sleep(0.002)
    return os.environ["ZMESH_EXECUTOR_ID"], os.getpid(), i


def total(xs, extra=0):
    return sum(xs) + extra


@pytest.fixture(autouse=True)
def workdir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pathlib.Path]:
    """A working directory holding a small module, as the runner packages it; and the object
    API's shared connection closed after each test (see tests/test_objects.py)."""
    (tmp_path / "shapes.py").write_text(SHAPES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    with client_objects._lock:
        for conn in client_objects._conns.values():
            conn.close()
        client_objects._conns.clear()


def test_the_issue_example(mesh):
    import shapes
    with Runner("my-job") as rr:
        s = rr.service(sum_func)
        f = s(1, 3)
        assert isinstance(f, ObjectFuture)
        assert f.get(60) == 4
        f.wait(60)
        ref = f.ref()
        assert isinstance(ref, ObjectRef) and get_object(ref) == 4
        c = rr.service(Calculator)
        assert c.multiply(2, 3).get(60) == 6
        k = rr.service(Counter())
        k.add(10).wait(60)
        assert k.add(k.get_count()).get(60) == 20
        f1, f2 = s(2, 3), s(b=5, a=5)
        assert rr.get([f1, f2], 60) == [5, 10]
        rr.wait([f1, f2], 60)
        assert [get_object(r) for r in rr.ref([f1, f2])] == [5, 10]
        futs = [s(i, i) for i in range(5)]
        assert sorted(x.get() for x in rr.select(futs, timeout=60)) == [0, 2, 4, 6, 8]
        big = rr.put_object(list(range(1000)))
        assert isinstance(big, ObjectRef)
        assert rr.service(total)(big, extra=1).get(60) == sum(range(1000)) + 1, "an ObjectRef is read remotely"
        assert rr.service(shapes.area)(3).get(60) == 6, "a module of the package travels by reference"


def test_keyword_arguments_and_defaults(mesh):
    with Runner("rr-kwargs") as rr:
        g = rr.service(greet)
        assert g("ann").get(60) == "hello ann!"
        assert g("bob", greeting="hi", punct="?").get(60) == "hi bob?"
        assert g(name="cy", punct=".").get(60) == "hello cy."


def test_a_remote_exception_comes_back_as_task_failed_with_its_type(mesh):
    with Runner("rr-fail") as rr:
        with pytest.raises(TaskFailed) as exc:
            rr.service(fail)("k1").get(60)
    assert exc.value.remote_type == "KeyError"
    assert "no such key k1" in str(exc.value) and "fail" in exc.value.remote_traceback
    with Runner("rr-fail-object") as rr:           # an object's method raising: the object carries on
        t = rr.service(Tally())
        assert t.add(3).get(60) == 3
        with pytest.raises(TaskFailed) as exc:
            t.boom().get(60)
        assert exc.value.remote_type == "ValueError" and "boom at 3" in str(exc.value)
        assert t.add(1).get(60) == 4


def test_an_unpicklable_result_is_a_clear_error_promptly(mesh):
    with Runner("rr-unpicklable") as rr:
        t0 = time.monotonic()
        with pytest.raises(TaskFailed) as exc:
            rr.service(unpicklable)().get(60)
        assert time.monotonic() - t0 < 30
    assert "cannot be pickled" in str(exc.value)
    assert exc.value.remote_type == "TypeError"


def test_a_thousand_calls_complete_and_use_both_executors(mesh):
    with Runner("rr-map") as rr:
        w = rr.service(where)
        futs = [w(i) for i in range(1000)]
        out = rr.get(futs, timeout=120)
    assert [i for _, _, i in out] == list(range(1000))
    assert len({e for e, _, _ in out}) == 2, "both executors ran calls"


def test_a_stateful_object_applies_its_calls_in_order(mesh):
    with Runner("rr-order") as rr:
        log = rr.service(Log())
        futs = [log.append(i) for i in range(200)]
        assert rr.get(futs, timeout=60) == list(range(1, 201))
        assert log.all().get(60) == list(range(200))


def test_an_object_keeps_its_state_when_its_instance_is_lost(mesh):
    # Given an object service with some state, and the pid of its one instance
    with Runner("rr-survive") as rr:
        t = rr.service(Tally())
        assert [f.get(60) for f in [t.add(5), t.add(2)]] == [5, 7]
        pid = t.pid().get(60)
        # When that instance dies (the scheduler may also stop an idle one to free its slot)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10, what="the instance to exit")
        # Then the next call runs on a new instance that starts from the last checkpoint
        assert t.add(1).get(60) == 8
        assert t.pid().get(60) != pid


def test_a_fixed_function_service_runs_on_one_instance(mesh):
    with Runner("rr-fixed") as rr:
        w = rr.service(where, autoscale=False)
        pids = {pid for _, pid, _ in rr.get([w(i) for i in range(50)], timeout=60)}
    assert len(pids) == 1


def test_fail_if_exists_and_a_reused_application_stays_registered(mesh, client):
    with Runner("rr-exists") as first:
        with pytest.raises(AlreadyExists):
            Runner("rr-exists", fail_if_exists=True)
        with Runner("rr-exists") as second:        # reuses it
            assert not second.registered
            assert second.service(sum_func)(1, 1).get(60) == 2
        assert client.get_application("rr-exists") is not None, "the reusing runner left it registered"
        assert first.service(sum_func)(2, 2).get(60) == 4
    assert client.get_application("rr-exists") is None, "the registering runner unregistered it"


def test_close_is_idempotent_and_leaves_nothing_behind(mesh, client):
    rr = Runner("rr-close")                       # without ``with``
    s = rr.service(sum_func)
    k = rr.service(Counter())
    assert s(1, 2).get(60) == 3 and k.add(1).get(60) == 1
    mine = rr.put_object({"x": 1})
    package = rr.package
    assert package is not None and get_object(mine) == {"x": 1}
    sessions = [str(s._session.id), str(k._session.id)]
    apps = [a.name for a in client.list_applications() if a.name.startswith("rr-close")]
    assert apps == ["rr-close"], apps             # one application: the object's bound is its session's
    rr.close()
    rr.close()                                    # idempotent
    assert [a.name for a in client.list_applications() if a.name.startswith("rr-close")] == []
    assert all(client.get_session(sid).state == "closed" for sid in sessions)
    for ref in (package, mine):
        with pytest.raises(NotFound):
            get_object(ref)


def test_session_context_names_the_session(mesh):
    def named(x):
        return x
    named._session_context = SessionContext(session_id="rr-ctx-session-1")
    bad_ctx = Calculator()
    bad_ctx._session_context = {"session_id": "nope"}
    with Runner("rr-ctx") as rr:
        svc = rr.service(named)
        assert svc._session.id == "rr-ctx-session-1" and svc._session.id() == "rr-ctx-session-1"
        assert svc(7).get(60) == 7
        generated = rr.service(sum_func)
        assert generated._session.id.startswith("rr-ctx")
        other = rr.service(bad_ctx)                # ignored, with a warning
        assert other._session.id.startswith("rr-ctx") and other._session.id != "nope"


def test_a_session_context_of_another_type_is_ignored_with_a_warning(mesh, caplog):
    def f(x):
        return x
    f._session_context = "not a context"
    with caplog.at_level(logging.WARNING, logger="zeromesh.runner"), Runner("rr-warn") as rr:
        assert rr.service(f)(1).get(60) == 1
    assert "_session_context" in caplog.text


@pytest.mark.parametrize("kwargs,words", [
    ({"session_id": 42}, "must be a string"),
    ({"session_id": ""}, "cannot be empty"),
    ({"session_id": "x" * 129}, "too long"),
    ({"application_name": 3}, "must be a string"),
])
def test_session_context_validation(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SessionContext(**kwargs)
    assert SessionContext(session_id="x" * 128).session_id == "x" * 128


def test_an_object_service_is_always_fixed_and_a_class_service_is_not_callable(mesh):
    with Runner("rr-kinds") as rr:
        with pytest.raises(ValueError, match="always fixed"):
            rr.service(Counter(), autoscale=True)
        c = rr.service(Calculator)
        with pytest.raises(TypeError):
            c(2, 3)
        with pytest.raises(TypeError):
            rr.service(Counter())(1)
        with pytest.raises(AttributeError):
            c.divide


def test_the_package_leaves_out_vcs_venvs_caches_and_ignored_files(tmp_path):
    root = tmp_path / "proj"
    for rel in ("a.py", "pkg/b.py", ".git/HEAD", "env1/pyvenv.cfg", "env1/lib/x.py", ".venv/y.py", "venv/z.py",
                "pkg/__pycache__/b.cpython.pyc", "c.pyc", "data/big.bin", "notes.tmp", "keep/me.txt"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)
    (root / ".zmeshignore").write_text("# comment\ndata\n*.tmp\n")
    assert runner_package.files(str(root), excludes=["keep"]) == ["a.py", os.path.join("pkg", "b.py")]
    data, digest = runner_package.build(str(root))
    assert runner_package.build(str(root)) == (data, digest), "the same files give the same archive"
    base = tmp_path / "cache"
    path = runner_package.unpack(data, digest, str(base))
    assert path == str(base / digest) and (base / digest / "pkg" / "b.py").read_text() == "pkg/b.py"
    assert runner_package.unpack(b"", digest, str(base)) == path, "a second unpack reuses the directory"
    assert sorted(os.listdir(base)) == [digest], "no temporary directory left behind"


CRASHING_CLIENT = """
import os, sys, time
from client import Runner

def double(x):
    return 2 * x

rr = Runner("crashed-job", lease_ttl=2.0)
s = rr.service(double)
k = rr.service(dict())   # a fixed service: its own temporary application
assert s(21).get(60) == 42
print(rr.lease, rr.package.key, s._session.id, flush=True)
time.sleep(3600)         # killed here, before it can close anything
"""


def test_a_killed_client_leaves_nothing_registered_once_its_lease_runs_out(mesh, client, workdir):
    import subprocess
    import sys
    # Given a client process with a runner: an application, sessions and a package in the mesh
    (workdir / "crash.py").write_text(CRASHING_CLIENT)
    proc = subprocess.Popen([sys.executable, "crash.py"], cwd=str(workdir), stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "ZMESH_MANAGER": mesh.endpoint})
    try:
        line = proc.stdout.readline()   # bounded: the process prints or dies
        assert line, "the client did not start its runner"
        lease, package, sid = line.split()
        names = [a.name for a in client.find_applications()]
        assert "crashed-job" in names
        # When the client is killed (it cannot close anything)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()
    # Then, once its lease runs out, nothing of it is left
    def cleaned() -> bool:
        return not [a.name for a in client.find_applications() if a.name.startswith("crashed-job")]
    wait_until(cleaned, 30, interval=0.2, what="the killed runner's applications to be unregistered")
    assert client.get_session(sid).state == "closed"
    with pytest.raises(NotFound):
        client.conn.call_blob("get_object", {"key": package, "have": 0})


def slow_value(x, delay):
    time.sleep(delay)
    return {"x": x, "pid": os.getpid(), "executor": os.environ["ZMESH_EXECUTOR_ID"]}


def consume(v):
    return v["x"] * 10, os.getpid()


def test_an_object_future_argument_is_resolved_on_the_executor_not_through_the_client(mesh, client):
    with Runner("chain-job") as rr:
        produce = rr.service(slow_value)
        use = rr.service(consume)
        # Given a call still running, passed as the argument of another call
        first = produce(7, 1.0)
        second = use(first)
        # Then the second call gets its value on its executor, and the client never waited for it:
        # the first call's answer was kept by the manager for the second
        third = use(first)   # the same pending future to a second call: one kept answer serves both
        assert not first.done(), "the dependent calls were sent while the first still ran"
        assert second.get(60)[0] == 70 and third.get(60)[0] == 70 and first.get(60)["x"] == 7
        # And a failed argument fails the call that needed it
        bad = rr.service(fail)("k")
        with pytest.raises(TaskFailed):
            use(bad).get(60)


def inner(x):
    return x * 10, os.getpid()


def outer(x):
    from client import Runner as NestedRunner
    with NestedRunner("rec-job") as nested:   # inside a runner service: the same application and session
        value, pid = nested.service(inner)(x).get(60)
        assert nested.nested_session is not None
        return value + 1, pid, os.getpid()


def test_code_in_a_runner_service_opens_a_runner_and_calls_services_from_there(mesh, client):
    with Runner("rec-job") as rr:
        svc = rr.service(outer)
        # Given a service whose code opens a Runner itself (Flame's RecursiveService)
        value, inner_pid, outer_pid = svc(4).get(120)
        # Then the nested call ran on another instance of the same session, and came back through it
        assert value == 41 and inner_pid != outer_pid
        # And the nested runner left the session to the outer one: it still serves
        assert svc(1).get(120)[0] == 11
        assert client.get_session(str(svc._session.id)).state == "open"
    assert client.get_application("rec-job") is None, "the outer runner owns the lifecycle"


def _wheel(directory: pathlib.Path, name: str, version: str, source: str) -> pathlib.Path:
    """A minimal pure-Python wheel, built by hand (no build tools, no network)."""
    import base64
    import hashlib
    import zipfile
    path = directory / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": source,
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: zeromesh-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for fname, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{fname},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    with zipfile.ZipFile(path, "w") as zf:
        for fname, text in files.items():
            zf.writestr(fname, text)
        zf.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


def uses_dependency(x):
    import zmesh_dep_probe
    return zmesh_dep_probe.triple(x), zmesh_dep_probe.__file__


def test_dependencies_are_installed_once_per_set_on_the_executors(mesh, tmp_path_factory, monkeypatch):
    # Given a wheel the executors can install offline (pip finds it in a local directory)
    wheels = tmp_path_factory.mktemp("wheels")
    _wheel(wheels, "zmesh_dep_probe", "1.0", "def triple(x):\n    return 3 * x\n")
    with Runner("deps-job", dependencies=[str(next(wheels.iterdir()))]) as rr:
        # When a service imports it
        value, where = rr.service(uses_dependency)(14).get(180)
        # Then it was installed into the executor's runner directory, keyed by the dependency set
        assert value == 42 and "/runner/deps-" in where
        again = rr.service(uses_dependency)(1).get(60)[1]   # (on either executor: each installs the set once)
        assert again.split("/runner/")[1] == where.split("/runner/")[1], "the same set, the same directory name"
    with pytest.raises(TaskFailed, match="installing the runner's dependencies"):   # a clear error, not a hang
        with Runner("deps-bad", dependencies=[str(wheels / "nope-0.1-py3-none-any.whl")]) as rr:
            rr.service(uses_dependency)(1).get(180)


def package_dir(x):
    return os.getcwd()   # the runner service works in the unpacked package


def test_the_unpacked_package_is_removed_from_the_executors_once_the_runner_closes(mesh, client):
    with Runner("sweep-job") as rr:
        svc = rr.service(package_dir)
        where = {svc(i).get(60) for i in range(20)}
        assert all(os.path.isdir(p) and "/runner/" in p for p in where)
    wait_until(lambda: not any(os.path.exists(p) for p in where), 30, interval=0.1,
               what="the executors to remove the closed runner's unpacked package")


class Hoard:
    def __init__(self):
        self.items = []

    def add(self, n):
        self.items.append("x" * n)
        return len(self.items)


def test_a_call_whose_checkpoint_cannot_be_written_is_not_answered_as_done(tmp_path, workdir):
    from client.local import LocalMesh
    from conftest import FAST
    from mesh.errors import ResourceExhausted
    # Given a mesh whose objects may hold at most 64 KiB, and an object service that grows
    env = {**FAST, "ZMESH_MAX_OBJECT_SIZE": str(64 * 1024)}
    with LocalMesh(executors=1, slots=2, env=env, log_dir=str(tmp_path)) as m:
        with Runner("hoard-job", manager=m.endpoint) as rr:
            h = rr.service(Hoard())
            assert h.add(20_000).get(60) == 1
            # When a call makes the object too large to checkpoint
            with pytest.raises(ResourceExhausted):
                h.add(100_000).get(60)
            # Then that call did not count: the object is as the last checkpoint left it
            assert h.add(10).get(60) == 2
