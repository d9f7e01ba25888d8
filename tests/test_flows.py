"""Flows on a real mesh: a flow of flows on two executors, failure, a manager kill -9 mid-run,
a scheduled run across a restart.  Real processes; every wait bounded.

Task functions live in this module: executors cannot import it, so they travel by value.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import FAST, ECHO_YAML, wait_until

from client import Client
from client.flows import Flow, FlowOfFlows, FlowRun, Parameter, load_file, mapped
from client.local import LocalMesh
from mesh.errors import InvalidArgument, TaskFailed

BARRIER_WAIT = 30.0   # seconds a scan task waits for its sibling to start (it proves they overlap)


def barrier(directory: str, me: int, others: int) -> bool:
    """Say we started, then wait (bounded) until ``others`` siblings did too."""
    open(os.path.join(directory, f"started-{me}"), "w").close()
    deadline = time.monotonic() + BARRIER_WAIT
    while time.monotonic() < deadline:
        if len([f for f in os.listdir(directory) if f.startswith("started-")]) >= others + 1:
            return True
        time.sleep(0.01)
    return False


def constant_flow(name: str, client: Client, task: str, value: str) -> Flow:
    """Flow ``name`` of one task, ``task``, that returns ``value``."""
    f = Flow(name, client=client)

    def body() -> str:
        return value

    with f:
        f.task(body, name=task)()
    return f


def build_flows(client: Client, directory: str):
    sim = Flow("simulate", client=client)

    @sim.task
    def prepare(config: dict) -> dict:
        return {"n": config["n"]}

    @sim.task
    def scan(prepared: dict, k: int, directory: str) -> dict:
        met = barrier(directory, k, 1)
        return {"k": k, "value": prepared["n"] * k, "overlapped": met}

    @sim.task(retries=1)
    def collect(*points: dict) -> dict:
        return {"values": [p["value"] for p in points], "metrics": {"loss": [0.5, 0.25], "met": all(
            p["overlapped"] for p in points)}}

    with sim:
        p = prepare(Parameter("config"))
        collect(*[scan(p, k, Parameter("directory")) for k in (1, 2)])

    analyze = Flow("analyze", client=client)

    @analyze.task
    def summarize(result: dict) -> str:
        return f"sum={sum(result['values'])}"

    @analyze.task
    def from_file(path: str) -> list:
        return load_file(path)["values"]

    @analyze.task
    def compare(loss: float, factor: int = 2) -> float:
        return loss * factor

    with analyze:
        summarize(mapped("simulate", "collect"))
        from_file(mapped("simulate", "collect", as_="file"))
        compare(mapped("simulate", "collect", as_="db", attribute="metrics", attribute_index=["loss", 1]))
    return sim, analyze


def failing_flow(name: str, client: Client) -> Flow:
    """first -> explode -> after, where explode raises ValueError("cannot use 2") for x = 1."""
    f = Flow(name, client=client)

    @f.task
    def first(x: int) -> int:
        return x + 1

    @f.task
    def explode(y: int) -> int:
        raise ValueError(f"cannot use {y}")

    @f.task
    def after(z: int) -> int:
        return z

    with f:
        after(explode(first(Parameter("x"))))
    return f


@pytest.fixture
def mesh(tmp_path):
    m = LocalMesh(executors=2, slots=1, env=FAST, log_dir=str(tmp_path))
    with m:
        yield m


def test_a_flow_of_flows_maps_raw_file_and_db_and_runs_independent_tasks_together(mesh, tmp_path):
    with Client(mesh.endpoint) as c:
        sim, analyze = build_flows(c, str(tmp_path))
        assert sim.register() == "simulate:1" and analyze.register() == "analyze:1"
        pipeline = FlowOfFlows("sim-and-analyze", ["simulate", "analyze"], client=c)
        pipeline.validate()
        pr = pipeline.run(parameters={"simulate": {"config": {"n": 4}, "directory": str(tmp_path)}},
                          run_name="scan-1")
        assert pr.wait(timeout=120) == "succeeded", pr.info()
        assert pr.result("analyze", "summarize") == "sum=12"
        assert pr.result("analyze", "from_file") == [4, 8]
        assert pr.result("analyze", "compare") == 0.5
        assert pr.result("simulate", "collect")["metrics"]["met"] is True   # each scan saw the other start
        # the two scans overlapped in time, by the times their executors recorded
        tasks = pr.tasks()
        a, b = tasks["simulate/scan"], tasks["simulate/scan-2"]
        assert a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]
        assert a["executor"] != b["executor"]   # one slot each: two executors
        assert set(pr.task_states().values()) == {"succeeded"}
        # the run is a record: found by the usual filters, its results readable after it ended
        runs = c.find_flow_runs(filter={"name": "scan-1"})
        assert [r["state"] for r in runs] == ["succeeded"]
        assert FlowRun(pr.id, client=c).result("analyze", "summarize") == "sum=12"


def test_run_and_return_and_a_failing_task_names_itself_with_its_remote_traceback(mesh):
    with Client(mesh.endpoint) as c:
        f = failing_flow("failing", c)
        with pytest.raises(TaskFailed) as info:
            f.run_and_return({"x": 1}, timeout=60)
        err = info.value
        assert "explode" in str(err) and "cannot use 2" in str(err)
        assert err.details["type"] == "ValueError" and "in explode" in err.details["traceback"]
        [run] = c.find_flow_runs(filter={"flows": "failing"})
        states = FlowRun(run["id"], client=c).task_states()
        assert states == {"first": "succeeded", "explode": "failed", "after": "skipped"}


def test_a_registered_application_is_a_task(mesh):
    with Client(mesh.endpoint) as c:
        c.register_application(ECHO_YAML)
        f = Flow("greet", client=c)
        echo = f.app_task("echo-app")

        @f.task
        def request(text: str) -> dict:
            return {"text": text}   # the application builds its EchoRequest from the fields

        with f:
            echo(request(Parameter("text")))
        assert f.run_and_return({"text": "hi"}, timeout=60).text == "HI"


def test_validate_names_what_is_wrong_before_anything_runs(mesh):
    with Client(mesh.endpoint) as c:
        sim, analyze = build_flows(c, "/nonexistent")
        sim.register()
        with pytest.raises(InvalidArgument, match="'simulate', which is not part of this run"):
            FlowOfFlows("only-analyze", [analyze], client=c).validate()
        broken = Flow("broken", client=c)

        @broken.task
        def use(r: dict) -> dict:
            return r

        with broken:
            use(mapped("simulate", "no-such-task"))
        with pytest.raises(InvalidArgument, match="maps simulate/no-such-task"):
            FlowOfFlows("p", ["simulate", broken], client=c).validate()
        with pytest.raises(InvalidArgument, match="needs parameter 'config'"):
            FlowOfFlows("p", ["simulate", analyze], client=c).validate({"simulate": {"directory": "/x"}})
        assert c.find_flow_runs().total == 0   # nothing ran


def test_yaml_composition(mesh, tmp_path):
    with Client(mesh.endpoint) as c:
        sim, analyze = build_flows(c, str(tmp_path))
        sim.register()
        analyze.register()
        path = tmp_path / "pipeline.yaml"
        path.write_text("name: from-yaml\nflows:\n  - simulate\n  - analyze\n")
        pipeline = FlowOfFlows.from_yaml(str(path), client=c)
        assert pipeline.name == "from-yaml" and pipeline.flows == ["simulate", "analyze"]
        pipeline.validate()


def test_a_manager_kill_mid_run_resumes_without_running_succeeded_tasks_again(tmp_path):
    log = tmp_path / "ran.log"
    gate = tmp_path / "go"
    with LocalMesh(executors=1, slots=1, env=FAST, log_dir=str(tmp_path)) as m:
        with Client(m.endpoint) as c:
            f = Flow("durable", client=c)

            @f.task
            def first(path: str) -> int:
                with open(path, "a") as out:
                    out.write("first\n")
                return 1

            @f.task
            def second(x: int, path: str, gate: str) -> int:
                with open(path, "a") as out:
                    out.write("second\n")
                deadline = time.monotonic() + 60
                while not os.path.exists(gate) and time.monotonic() < deadline:
                    time.sleep(0.02)
                return x + 1

            with f:
                second(first(str(log)), str(log), str(gate))
            fr = f.run()
            wait_until(lambda: log.exists() and "second" in log.read_text(), timeout=60,
                       what="the second task to start")
        LocalMesh.end(m.manager, signal.SIGKILL)
        m.start_manager()
        gate.touch()
        with Client(m.endpoint) as c:
            run = FlowRun(fr.id, client=c)
            assert run.wait(timeout=90) == "succeeded", run.info()
            assert run.result("second") == 2
            assert log.read_text().count("first") == 1   # succeeded before the kill: never again
            assert run.tasks()["first"]["attempts"] == 1


def test_a_scheduled_run_starts_no_earlier_than_its_time_across_a_manager_restart(tmp_path):
    with LocalMesh(executors=1, slots=1, env=FAST, log_dir=str(tmp_path)) as m:
        with Client(m.endpoint) as c:
            f = Flow("later", client=c)

            @f.task
            def stamp() -> float:
                return time.time()

            with f:
                stamp()
            when = time.time() + 4
            fr = f.run(scheduled_start_time=when)
            assert fr.state == "scheduled"
        LocalMesh.end(m.manager, signal.SIGKILL)
        m.start_manager()
        with Client(m.endpoint) as c:
            run = FlowRun(fr.id, client=c)
            assert run.wait(timeout=60) == "succeeded"
            assert run.result("stamp") >= when
            assert run.info()["started_at"] >= when


def test_labels_choose_the_executors_a_flow_runs_on(tmp_path):
    with LocalMesh(executors=2, slots=1, env=FAST, log_dir=str(tmp_path),
                   labels=[{"zone": "a"}, {"zone": "b"}]) as m:
        with Client(m.endpoint) as c:
            zone_of = {e.id: e.labels["zone"] for e in c.list_executors()}
            f = Flow("zoned", labels={"zone": "b"}, client=c)

            @f.task
            def where() -> str:
                return os.environ["ZMESH_EXECUTOR_ID"]

            with f:
                where()
            assert zone_of[f.run_and_return(timeout=60)] == "b"
            # a run's labels replace the flow's
            fr = f.run(labels={"zone": "a"})
            assert fr.wait(timeout=60) == "succeeded" and zone_of[fr.result("where")] == "a"


def test_users_see_and_change_only_their_own_flows_and_runs(tmp_path):
    from client.auth import PasswordAuth
    from mesh.errors import NotFound, PermissionDenied
    with LocalMesh(executors=1, slots=1, env=FAST, secure=True, log_dir=str(tmp_path)) as m:
        with m.client() as admin:
            admin.add_user("ann", "user", "ann-password-1")
            admin.add_user("bob", "user", "bob-password-1")

        def client(user: str) -> Client:
            return Client(m.endpoint, manager_key=m.manager_key, auth=PasswordAuth(user, f"{user}-password-1"))

        with client("ann") as ann, client("bob") as bob:
            f = constant_flow("anns", ann, "secret", "ann's")
            fr = f.run()
            assert fr.wait(timeout=60) == "succeeded" and fr.result("secret") == "ann's"
            # bob may run a registered flow, but not replace it, and never sees ann's runs
            theirs = constant_flow("anns", bob, "other", "bob's")
            with pytest.raises(PermissionDenied, match="belongs to 'ann'"):
                theirs.register()
            with pytest.raises(NotFound):
                FlowRun(fr.id, client=bob).info()
            with pytest.raises(NotFound):
                bob.cancel_flow_run(fr.id)
            assert bob.find_flow_runs().total == 0 and ann.find_flow_runs().total == 1
