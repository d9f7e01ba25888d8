"""``zmesh flow``: list, view, run, cancel, runs, schedules, unschedule against a real mesh.

Flows are registered from this process with client.flows (this module's functions travel by
value); the commands run through click's CliRunner and, for exit codes and the one-line error
of a real process, as ``python -m client.cli`` subprocesses.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from conftest import FAST, wait_until

from client import Client
from client.cli import main
from client.flows import Flow, Parameter, mapped
from client.local import LocalMesh
from mesh import errors

NAP_LIMIT = 30.0   # the long task's own bound, in case a cancel never reaches it


# -- the flows' functions (module level: shipped by value) ----------------------------------
def double(x):
    return 2 * x


def describe(value, label):
    return {"label": label, "value": value}


def add_one(v):
    return v + 1


def plus_hundred(v):
    return v + 100


def echo(v):
    return v


def as_set(v):
    return {v, "x"}


def explode(why):
    raise ValueError(why)


def nap(seconds):
    time.sleep(min(float(seconds), NAP_LIMIT))
    return seconds


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = LocalMesh(executors=1, slots=2, env=FAST, log_dir=str(tmp_path_factory.mktemp("cli-flows")))
    with m:
        with m.client() as c:
            sim = Flow("cli-sim", client=c)
            with sim:
                d = sim.task(double)(Parameter("x"))
                sim.task(describe)(d, Parameter("label", default="plain"))
            ana = Flow("cli-ana", client=c)
            with ana:
                ana.task(add_one)(mapped("cli-sim", "double"))
            late = Flow("cli-late", client=c)     # its parameter is mapped when it runs (--map)
            with late:
                late.task(plus_hundred)(Parameter("v"))
            single = Flow("cli-echo", client=c)
            with single:
                single.task(echo)(Parameter("v"))
            odd = Flow("cli-sim-odd", client=c)   # a name that holds another flow's name
            with odd:
                odd.task(as_set)(Parameter("v", default=1))
            boom = Flow("cli-boom", client=c)
            with boom:
                boom.task(explode)(Parameter("why"))
            slow = Flow("cli-slow", client=c)
            with slow:
                slow.task(nap)(Parameter("seconds"))
            for f in (sim, ana, late, single, odd, boom, slow):
                f.register()
        yield m


def _cli(mesh, *args):
    """One command through click, against the mesh: (exit code, stdout, stderr).  Tables as wide
    as they need (rich reads COLUMNS)."""
    r = CliRunner().invoke(main, ["flow", *args, "--manager", mesh.endpoint], env={"COLUMNS": "250"})
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def _ok(mesh, *args):
    code, out, err = _cli(mesh, *args)
    assert code == 0, (args, out, err)
    return out


def _json(mesh, *args):
    return json.loads(_ok(mesh, *args, "--json"))


def _zmesh(mesh, *args):
    """The same as a real process: its exit code and its one-line error."""
    return subprocess.run([sys.executable, "-m", "client.cli", "flow", *args],
                          env={**os.environ, "ZMESH_MANAGER": mesh.endpoint}, capture_output=True, text=True,
                          timeout=60)


def _one_error_line(stderr, code):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {code}: "), stderr
    return lines[0]


# -- registered flows ----------------------------------------------------------------------
def test_list_shows_registered_flows(mesh):
    rows = {r["name"]: r for r in _json(mesh, "list")}
    assert {"cli-sim", "cli-ana", "cli-echo", "cli-boom", "cli-slow"} <= set(rows)
    assert rows["cli-sim"]["version"] == 1 and rows["cli-sim"]["tasks"] == 2
    assert rows["cli-sim"]["parameters"] == ["label", "x"] and rows["cli-sim"]["owner"]
    table = _ok(mesh, "list")
    assert "cli-sim" in table and "label,x" in table
    assert [r["name"] for r in _json(mesh, "list", "--filter", "name~cli-sim", "--sort", "-name")] == [
        "cli-sim-odd", "cli-sim"]


def test_view_a_flow_its_parameters_and_what_each_task_needs(mesh):
    out = _ok(mesh, "view", "cli-sim")
    assert "x (required)" in out and "label (has a default)" in out
    describe_row = next(line for line in out.splitlines() if "describe" in line)
    assert "double" in describe_row and "function" in describe_row
    ana = _json(mesh, "view", "cli-ana")
    assert ana["version"] == 1 and ana["tasks"][0]["needs"] == ["cli-sim/double"] and ana["parameters"] == {}


# -- runs --------------------------------------------------------------------------------------
def test_run_waits_and_prints_a_result_as_json(mesh):
    assert json.loads(_ok(mesh, "run", "cli-sim", "--param", "x=21", "--result", "double")) == 42
    got = json.loads(_ok(mesh, "run", "cli-sim", "--param", "x=2", "--param", "label=hello",
                         "--result", "describe", "--json"))
    assert got == {"label": "hello", "value": 4}
    view = _json(mesh, "run", "cli-sim", "--parameters", '{"x": 3}', "--run-name", "cli-nightly",
                 "--wait", "--timeout", "60")
    assert view["state"] == "succeeded" and view["name"] == "cli-nightly"
    assert set(view["tasks"]) == {"cli-sim/double", "cli-sim/describe"}
    assert all(t["state"] == "succeeded" and t["attempts"] == 1 for t in view["tasks"].values())
    line = _ok(mesh, "run", "cli-sim", "--param", "x=1", "--wait")
    assert line.startswith("run ") and ": succeeded in " in line


def test_a_param_that_is_not_json_is_a_string_and_results_print_leniently(mesh):
    assert json.loads(_ok(mesh, "run", "cli-echo", "--param", "v={oops", "--result", "echo")) == "{oops"
    assert json.loads(_ok(mesh, "run", "cli-echo", "--param", "v=alice", "--result", "echo")) == "alice"
    assert json.loads(_ok(mesh, "run", "cli-echo", "--param", 'v={"a": [1, 2]}', "--result", "echo")) == {
        "a": [1, 2]}
    shown = _ok(mesh, "run", "cli-sim-odd", "--param", "v=7", "--result", "as_set").strip()
    assert shown in ("{7, 'x'}", "{'x', 7}"), "a value JSON cannot hold prints as its repr"
    assert json.loads(_ok(mesh, "run", "cli-sim-odd", "--param", "v=7", "--result", "as_set", "--json")) == shown
    assert _ok(mesh, "run", "cli-sim-odd", "--result", "as_set").strip() in ("{1, 'x'}", "{'x', 1}"), "the default"


def test_two_flows_run_as_one_with_a_mapped_parameter(mesh):
    out = _ok(mesh, "run", "cli-sim", "cli-ana", "--param", "cli-sim.x=5", "--result", "cli-ana/add_one")
    assert json.loads(out) == 11
    assert json.loads(_ok(mesh, "run", "cli-sim", "cli-ana", "--parameters", '{"cli-sim": {"x": 1}}',
                          "--result", "add_one")) == 3, "a task name unique in the run needs no flow"
    view = _json(mesh, "run", "cli-ana", "cli-sim", "--param", "cli-sim.x=2", "--wait")
    assert view["state"] == "succeeded" and set(view["tasks"]) == {
        "cli-sim/double", "cli-sim/describe", "cli-ana/add_one"}
    # a parameter mapped when the flows run (LUME-services' mapped_parameters)
    assert json.loads(_ok(mesh, "run", "cli-sim", "cli-late", "--param", "cli-sim.x=4",
                          "--map", "cli-late.v=cli-sim/double", "--result", "plus_hundred")) == 108
    code, _, err = _cli(mesh, "run", "cli-sim", "cli-ana", "--param", "x=5")
    assert code == errors.InvalidArgument.exit_code and "FLOW.PARAM" in err


def test_a_failed_run_exits_with_the_tasks_error_and_view_run_shows_it(mesh):
    p = _zmesh(mesh, "run", "cli-boom", "--param", "why=kaput", "--wait", "--json")
    assert p.returncode == errors.TaskFailed.exit_code
    line = _one_error_line(p.stderr, "task_failed")
    assert "cli-boom/explode" in line and "ValueError: kaput" in line
    view = json.loads(p.stdout)
    assert view["state"] == "failed" and view["error"]["task"] == "cli-boom/explode"
    out = _ok(mesh, "view", "--run", view["id"])
    assert "failed" in out and "ValueError: kaput" in out and "Traceback" not in out
    full = _json(mesh, "view", "--run", view["id"])
    task = full["tasks"]["cli-boom/explode"]
    assert task["state"] == "failed" and task["attempts"] == 1
    assert task["error"]["details"]["type"] == "ValueError" and "Traceback" in task["error"]["details"]["traceback"]


def test_view_run_shows_each_tasks_state_attempts_times_and_executor(mesh):
    view = _json(mesh, "run", "cli-sim", "--param", "x=9", "--wait")
    out = _ok(mesh, "view", "--run", view["id"])
    assert view["id"] in out and "succeeded" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert {"double", "describe"} <= set(rows), out
    for name in ("double", "describe"):
        assert "succeeded" in rows[name] and view["tasks"][f"cli-sim/{name}"]["executor"] in rows[name]
    again = _json(mesh, "view", "--run", view["id"])
    assert again["tasks"]["cli-sim/double"]["started_at"] <= again["tasks"]["cli-sim/double"]["ended_at"]


def test_runs_filters_sorts_and_pages(mesh):
    _ok(mesh, "run", "cli-sim", "--param", "x=1", "--wait")
    _ok(mesh, "run", "cli-sim", "cli-ana", "--param", "cli-sim.x=1", "--wait")
    _ok(mesh, "run", "cli-sim-odd", "--wait")
    _zmesh(mesh, "run", "cli-boom", "--param", "why=again", "--wait")
    of_sim = _json(mesh, "runs", "--flow", "cli-sim")
    assert of_sim and all("cli-sim" in r["flows"].split(",") for r in of_sim), "exact flow, not a substring"
    assert any(r["flows"] == "cli-sim,cli-ana" for r in of_sim) and any(r["flows"] == "cli-sim" for r in of_sim)
    assert all(r["flows"] == "cli-sim-odd" for r in _json(mesh, "runs", "--flow", "cli-sim-odd"))
    failed = _json(mesh, "runs", "--state", "failed")
    assert failed and {r["state"] for r in failed} == {"failed"} and any(r["flows"] == "cli-boom" for r in failed)
    newest = _json(mesh, "runs", "--sort", "created_at", "--desc", "--limit", "2")
    assert len(newest) == 2 and newest[0]["created_at"] >= newest[1]["created_at"]
    assert newest[0]["flows"] == "cli-boom"
    everything = _json(mesh, "runs", "--limit", "10000")
    assert [r["id"] for r in _json(mesh, "runs", "--offset", "1", "--limit", "2")] == [
        r["id"] for r in everything[1:3]]
    assert _json(mesh, "runs", "--owner", "nobody-at-all") == []
    assert len(_json(mesh, "runs", "--owner", everything[0]["owner"], "--flow", "cli-sim", "--limit", "1")) == 1
    table = _ok(mesh, "runs", "--flow", "cli-sim", "--limit", "1")
    assert f"flow runs (1 of {len(of_sim)})" in table
    code, _, err = _cli(mesh, "runs", "--state", "sleeping")
    assert code == errors.InvalidArgument.exit_code and "--state" in err


def test_cancel_a_long_running_run(mesh):
    p = _zmesh(mesh, "run", "cli-slow", "--param", f"seconds={NAP_LIMIT}", "--wait", "--timeout", "0.5")
    assert p.returncode == errors.DeadlineExceeded.exit_code, p.stderr
    line = _one_error_line(p.stderr, "deadline_exceeded")
    assert "goes on" in line
    with Client(mesh.endpoint) as c:
        running = wait_until(lambda: c.find_flow_runs(filter={"flows": "cli-slow", "state": "running"}).items,
                             timeout=30, what="the slow run to be running")
        run_id = running[0]["id"]
        assert run_id in line
        wait_until(lambda: c.get_flow_run(run_id)["tasks"]["cli-slow/nap"]["state"] == "running", timeout=30,
                   what="the nap task to start")
        try:
            assert _ok(mesh, "cancel", run_id).strip() == f"cancelled run {run_id}"
        finally:
            if c.get_flow_run(run_id)["state"] not in ("succeeded", "failed", "cancelled"):
                c.cancel_flow_run(run_id)
        view = c.get_flow_run(run_id)
    assert view["state"] == "cancelled" and view["tasks"]["cli-slow/nap"]["state"] == "cancelled"
    assert view["ended_at"] is not None
    assert "had already ended: cancelled" in _ok(mesh, "cancel", run_id)
    assert _json(mesh, "cancel", run_id)["state"] == "cancelled"
    code, _, err = _cli(mesh, "cancel", "0123456789abcdef")
    assert code == errors.NotFound.exit_code and err.startswith("error: not_found: ")


def test_labels_go_with_the_run_and_a_queued_task_is_cancelled_too(mesh):
    view = _json(mesh, "run", "cli-echo", "--param", "v=1", "--label", "zone=nowhere")
    assert view["labels"] == {"zone": "nowhere"} and view["state"] == "running"
    with Client(mesh.endpoint) as c:
        wait_until(lambda: c.get_flow_run(view["id"])["tasks"]["cli-echo/echo"]["state"] == "running", timeout=30,
                   what="the echo task to be queued")
    p = _zmesh(mesh, "run", "cli-echo", "--param", "v=1", "--label", "zone=nowhere", "--wait", "--timeout", "0.3")
    assert p.returncode == errors.DeadlineExceeded.exit_code
    stuck = _json(mesh, "runs", "--flow", "cli-echo", "--state", "running")
    assert view["id"] in {r["id"] for r in stuck} and len(stuck) == 2, "no executor has zone=nowhere"
    for r in stuck:
        assert _json(mesh, "cancel", r["id"])["state"] == "cancelled"
    assert _json(mesh, "runs", "--flow", "cli-echo", "--state", "running") == []
    echo_task = _json(mesh, "view", "--run", view["id"])["tasks"]["cli-echo/echo"]
    assert echo_task["state"] == "cancelled" and echo_task["error"]["code"] == "cancelled"


def test_schedules_and_unschedule_with_a_cron(mesh):
    view = _json(mesh, "run", "cli-sim", "--param", "x=1", "--schedule", "0 0 1 1 *")
    assert view["state"] == "scheduled" and view["schedule"]
    sid = view["schedule"]
    found = {s["id"]: s for s in _json(mesh, "schedules")}
    assert found[sid]["cron"] == "0 0 1 1 *" and found[sid]["active"] is True and found[sid]["flows"] == "cli-sim"
    assert found[sid]["next_at"] > time.time()
    table = _ok(mesh, "schedules")
    assert sid in table and "0 0 1 1 *" in table
    assert _ok(mesh, "unschedule", sid).strip() == f"unscheduled {sid}"
    after = {s["id"]: s for s in _json(mesh, "schedules")}
    assert after[sid]["active"] is False
    assert _json(mesh, "view", "--run", view["id"])["state"] == "cancelled", "its waiting run goes too"
    code, _, err = _cli(mesh, "unschedule", "no-such-schedule")
    assert code == errors.NotFound.exit_code and err.startswith("error: not_found: ")


def test_run_at_a_time_iso_or_epoch(mesh):
    view = _json(mesh, "run", "cli-sim", "--param", "x=1", "--at", "2099-01-01T00:00:00Z")
    expected = datetime.datetime(2099, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
    assert view["state"] == "scheduled" and view["scheduled_start_time"] == expected
    assert f"cancelled run {view['id']}" in _ok(mesh, "cancel", view["id"])
    at = time.time() + 3600
    later = _json(mesh, "run", "cli-sim", "--param", "x=1", "--at", str(at))
    assert later["state"] == "scheduled" and abs(later["scheduled_start_time"] - at) < 1e-3
    out = _ok(mesh, "cancel", later["id"])
    assert "cancelled" in out
    now = _json(mesh, "run", "cli-sim", "--param", "x=1", "--at", "2001-01-01T00:00:00", "--wait")
    assert now["state"] == "succeeded", "a time that has passed starts at once"


def test_bad_input_is_one_line_with_the_errors_exit_code(mesh):
    p = _zmesh(mesh, "run", "no-such-flow", "--wait")
    assert p.returncode == errors.NotFound.exit_code and "no-such-flow" in _one_error_line(p.stderr, "not_found")
    p = _zmesh(mesh, "run", "cli-sim", "--param", "x=1", "--schedule", "every tuesday")
    assert p.returncode == errors.InvalidArgument.exit_code
    assert "every tuesday" in _one_error_line(p.stderr, "invalid_argument")
    p = _zmesh(mesh, "run", "cli-sim", "--param", "x=1", "--at", "next tuesday")
    assert p.returncode == errors.InvalidArgument.exit_code and "--at" in _one_error_line(p.stderr, "invalid_argument")
    p = _zmesh(mesh, "view", "no-such-flow")
    assert p.returncode == errors.NotFound.exit_code and _one_error_line(p.stderr, "not_found")
    for args, code, word in [
        (("view", "--run", "0123456789abcdef"), errors.NotFound, "0123456789abcdef"),
        (("run", "cli-sim", "--parameters", "{bad"), errors.InvalidArgument, "--parameters"),
        (("run", "cli-sim", "--parameters", "[1]"), errors.InvalidArgument, "--parameters"),
        (("run", "cli-sim"), errors.InvalidArgument, "'x'"),                      # required, not given
        (("run", "cli-sim", "--param", "y=1", "--param", "x=1"), errors.InvalidArgument, "'y'"),
        (("run", "cli-sim", "--param", "x=1", "--result", "nothing"), errors.NotFound, "nothing"),
        (("run", "cli-sim", "cli-sim"), errors.InvalidArgument, "once"),
        (("run", "cli-echo", "--param", "v=1", "--at", "-5"), errors.InvalidArgument, "--at"),
    ]:
        got, out, err = _cli(mesh, *args)
        assert got == code.exit_code, (args, out, err)
        assert err.startswith(f"error: {code.code}: ") and word in err and len(err.strip().splitlines()) == 1, err
    got, _, err = _cli(mesh, "view")
    assert got == 2 and "NAME" in err, "neither a flow nor a run: a usage error"
