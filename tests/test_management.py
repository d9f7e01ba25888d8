"""The management API and CLI against a real manager holding hundreds of sessions and tasks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request

import pytest
from click.testing import CliRunner
from conftest import FAST, tools_spec, wait_until

from client import Client, Session
from client.api import ExecutorInfo, Page, SessionInfo, TaskInfo
from client.cli import main
from client.local import LocalMesh
from mesh import errors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def busy_mesh(tmp_path_factory):
    """300 sessions (100 closed), one session with 300 finished tasks, one with 40 queued forever."""
    port = _free_port()
    m = LocalMesh(executors=1, slots=2, env=FAST, log_dir=str(tmp_path_factory.mktemp("mgmt")),
                  manager_args=["--metrics-port", str(port)])
    m.metrics_port = port
    with m:
        with Client(m.endpoint) as c:
            c.register_application(tools_spec())
            c.register_application(tools_spec("stuck", labels={"never": "match"}))
            sessions = [Session("tools", manager=m.endpoint) for _ in range(300)]
            for s in sessions[:100]:
                s.close()
            for s in sessions[100:]:
                s._conn.close()
            work = Session("tools", manager=m.endpoint)
            futs = [work.submit(("echo", i) if i % 10 else ("raise", i)) for i in range(300)]
            for f in futs:
                f.exception(60)
            stuck = Session("stuck", manager=m.endpoint)
            queued = [stuck.submit(("echo", i)) for i in range(40)]
            m.ids = {"work": work.id(), "stuck": stuck.id(), "queued": queued}
            yield m
            work.close()
            stuck.close()


def test_find_sessions_filters_sorts_and_pages_in_the_manager(busy_mesh):
    with Client(busy_mesh.endpoint) as c:
        page = c.find_sessions(filter={"state": "closed"}, page={"limit": 30, "offset": 0},
                               sort={"by": "created_at", "order": "descending"})
        assert isinstance(page, Page) and page.total == 100 and len(page.items) == 30
        assert all(isinstance(s, SessionInfo) and s.state == "closed" for s in page.items)
        stamps = [s.created_at for s in page.items]
        assert stamps == sorted(stamps, reverse=True)
        rest = c.find_sessions(filter={"state": "closed"}, page={"limit": 100, "offset": 90},
                               sort={"by": "created_at", "order": "descending"})
        assert len(rest.items) == 10 and rest.total == 100
        opened = c.find_sessions(filter={"state": ("!", "closed"), "application": ("~", "TOOL")})
        assert opened.total == 201    # 200 open tools sessions + the working one
        newer = c.find_sessions(filter={"created_at": (">=", stamps[0])})
        assert stamps[0] in [s.created_at for s in newer.items]
        with pytest.raises(errors.InvalidArgument, match="colour"):
            c.find_sessions(filter={"colour": "blue"})
        with pytest.raises(errors.InvalidArgument, match="op"):
            c.find_sessions(filter={"state": ("like", "x")})
        with pytest.raises(errors.InvalidArgument, match="limit"):
            c.find_sessions(page={"limit": -1})


def test_the_default_page_is_fifty_as_in_the_hub_client(busy_mesh):
    with Client(busy_mesh.endpoint) as c:
        page = c.find_sessions()
        assert len(page.items) == 50 and page.total == 302   # 300 + work + stuck
        assert len(c.list_sessions()) == 302                  # the list_* aliases still read every page
    rows = json.loads(CliRunner().invoke(main, ["list", "-s", "--json", "--manager", busy_mesh.endpoint]).output)
    assert len(rows) == 50


def test_find_tasks_and_get_task(busy_mesh):
    with Client(busy_mesh.endpoint) as c:
        work = busy_mesh.ids["work"]
        failed = c.find_tasks(work, filter={"state": "failed"}, sort={"by": "id"})
        assert failed.total == 30 and all(t.error["code"] == "task_failed" for t in failed.items)
        done = c.find_tasks(work, filter={"state": "succeeded", "attempts": 1}, page={"limit": 5},
                            sort={"by": "id", "order": "descending"})
        assert done.total == 270 and len(done.items) == 5
        assert [t.id for t in done.items] == sorted((t.id for t in done.items), reverse=True)
        t = c.get_task(failed.items[0].id)
        assert isinstance(t, TaskInfo) and t.state == "failed" and "ValueError" in t.error["message"]
        assert c.get_task(10 ** 9) is None
        queued = c.find_tasks(busy_mesh.ids["stuck"], filter={"state": "pending"})
        assert queued.total == 40


def test_get_returns_none_and_executors_are_typed(busy_mesh):
    with Client(busy_mesh.endpoint) as c:
        assert c.get_session("nope") is None and c.get_application("nope") is None
        assert c.get_executor("nope") is None
        execs = c.find_executors(filter={"slots": (">=", 1)})
        assert execs.total == 1 and isinstance(execs.items[0], ExecutorInfo)
        assert c.get_executor(execs.items[0].id).slots == 2
        apps = c.find_applications(filter={"name": ("~", "stu")})
        assert [a.name for a in apps.items] == ["stuck"]


def test_cancel_a_queued_task_and_not_a_finished_one(busy_mesh):
    with Client(busy_mesh.endpoint) as c:
        queued = c.find_tasks(busy_mesh.ids["stuck"], page={"limit": 1}, sort={"by": "id"}).items[0]
        c.cancel_task(queued.id)
        with pytest.raises(errors.Cancelled):
            busy_mesh.ids["queued"][0].result(30)
        assert c.get_task(queued.id).state == "cancelled"
        with pytest.raises(errors.FailedPrecondition):
            c.cancel_task(queued.id)


def test_metrics_over_the_api_and_http(busy_mesh):
    with Client(busy_mesh.endpoint) as c:
        text = c.metrics()
    assert 'zeromesh_tasks_total{state="succeeded"}' in text
    assert "zeromesh_task_latency_seconds_bucket" in text and "zeromesh_executor_up" in text
    with urllib.request.urlopen(f"http://127.0.0.1:{busy_mesh.metrics_port}/metrics", timeout=10) as r:
        body = r.read().decode()
    assert r.status == 200 and "# TYPE zeromesh_task_latency_seconds histogram" in body


def test_cli_list_filter_sort_limit_json_through_click(busy_mesh):
    runner = CliRunner()
    r = runner.invoke(main, ["list", "-s", "--filter", "state=closed", "--sort", "-created_at", "--limit", "20",
                             "--json", "--manager", busy_mesh.endpoint])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert len(rows) == 20 and {x["state"] for x in rows} == {"closed"}
    r = runner.invoke(main, ["list", "-t", busy_mesh.ids["work"], "--filter", "state=failed", "--manager",
                             busy_mesh.endpoint])
    assert r.exit_code == 0 and "tasks (30 of 30)" not in r.output and "task_failed" in r.output


def _zmesh(*args, env=None):
    return subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_cli_as_a_subprocess_view_top_invoke_completion(busy_mesh):
    env = {**os.environ, "ZMESH_MANAGER": busy_mesh.endpoint}
    with Client(busy_mesh.endpoint) as c:
        tid = c.find_tasks(busy_mesh.ids["work"], page={"limit": 1}).items[0].id
    v = _zmesh("view", "-t", str(tid), "--json", env=env)
    assert v.returncode == 0 and json.loads(v.stdout)["id"] == tid
    top = _zmesh("top", "--once", env=env)
    assert top.returncode == 0 and "executors" in top.stdout and "open sessions" in top.stdout
    inv = _zmesh("invoke", "tools", "--input", '["echo", {"a": 1}]', env=env)
    assert inv.returncode == 0 and json.loads(inv.stdout) == {"a": 1}
    many = _zmesh("invoke", "tools", "--input", '["echo", 7]', "--count", "50", "--json", env=env)
    assert many.returncode == 0 and many.stdout.split() == ["7"] * 50
    assert "invoke" not in many.stderr, "no progress bar when not on a terminal"
    bad = _zmesh("invoke", "tools", "--input", "{oops", env=env)
    assert bad.returncode == errors.InvalidArgument.exit_code and "JSON" in bad.stderr
    comp = _zmesh("completion", "bash")
    assert comp.returncode == 0 and "_ZMESH_COMPLETE" in comp.stdout
    missing = _zmesh("view", "-t", "999999999", env=env)
    assert missing.returncode == errors.NotFound.exit_code


def test_sighup_reloads_an_executors_labels_from_its_config_file(tmp_path):
    import signal
    m = LocalMesh(executors=0, env=FAST, log_dir=str(tmp_path))
    with m:
        cfg = tmp_path / "executor.yaml"
        cfg.write_text(f"manager: {m.endpoint}\nslots: 1\nname: hup\ninsecure: true\nlabels: {{zone: a}}\n")
        p = subprocess.Popen([sys.executable, "-m", "client.cli", "executor", "--config", str(cfg)],
                             env={**os.environ, **FAST}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with m.client() as c:
                hup = wait_until(lambda: c.get_executor("hup"), timeout=20, what="executor hup to join")
                assert hup.labels == {"zone": "a"}
                cfg.write_text(cfg.read_text().replace("zone: a", "zone: b"))
                p.send_signal(signal.SIGHUP)
                wait_until(lambda: c.get_executor("hup").labels == {"zone": "b"}, timeout=15,
                           what="the reloaded labels")
                assert p.poll() is None, "SIGHUP reloads; it does not stop the executor"
        finally:
            LocalMesh.end(p)
