"""What Flame and FLAME Hub users reach for first, through the client and the CLI on a real mesh:
resreq as a string, caller-chosen session ids, versioned applications, the long flags, the
filter shorthand, results after the fact (the rules themselves: test_parity_core.py)."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
import yaml
from click.testing import CliRunner
from conftest import FAST, tools_spec, wait_until

from client import AsyncSession, Client, FilterOperator, Session
from client.cli import main
from client.local import LocalMesh
from mesh import errors

RETENTION = 3.0


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    env = {**FAST, "ZMESH_RESULT_RETENTION": str(RETENTION)}
    with LocalMesh(executors=1, slots=2, env=env, log_dir=str(tmp_path_factory.mktemp("parity"))) as m:
        with Client(m.endpoint) as c:
            c.register_application(tools_spec())
        yield m


def _cli(m, *args):
    r = CliRunner().invoke(main, [*args, "--manager", m.endpoint])
    assert r.exit_code == 0, r.output
    return r.output


def test_a_session_takes_resreq_as_flames_string(parity):
    with Session("tools", resreq="cpu=0.5,mem=64m,gpu=0", manager=parity.endpoint) as s:
        assert s.info()["resreq"] == {"cpu": 0.5, "memory": 64 * 1024 ** 2, "gpu": 0}
        assert s.invoke(("echo", 1), timeout=60) == 1
    with pytest.raises(errors.InvalidArgument, match="disk"):   # checked before anything is sent
        Session("tools", resreq="cpu=1,disk=2g", manager=parity.endpoint)


def test_a_session_named_by_the_caller(parity):
    # Given a session created with the caller's id
    with Session("tools", session_id="nightly-2026-12-01", manager=parity.endpoint) as s:
        assert s.id() == "nightly-2026-12-01" and s.invoke(("echo", "hi"), timeout=60) == "hi"
        # Then taking the id again is AlreadyExists, and session_id alone still reopens it
        with pytest.raises(errors.AlreadyExists):
            Session("tools", session_id="nightly-2026-12-01", manager=parity.endpoint)
        again = Session(session_id="nightly-2026-12-01", manager=parity.endpoint)
        assert again.invoke(("echo", 2), timeout=60) == 2
        again.detach()

    async def in_asyncio():
        async with AsyncSession("tools", session_id="nightly-async", manager=parity.endpoint) as a:
            return a.id(), await a.invoke(("echo", 3), timeout=60)

    assert asyncio.run(in_asyncio()) == ("nightly-async", 3)


def test_results_after_the_fact_while_open_and_for_the_retention_after(parity):
    with Client(parity.endpoint) as c:
        s = Session("tools", manager=parity.endpoint)
        assert s.invoke(("echo", {"answer": 42}), timeout=60) == {"answer": 42}
        [task] = c.find_tasks(s.id()).items
        # Given a finished task: its result is there while the session is open
        got = c.get_task(task.id)
        assert got.has_result and got.result == {"answer": 42}
        assert '"answer": 42' in _cli(parity, "view", "-t", str(task.id))
        assert json.loads(_cli(parity, "view", "-t", str(task.id), "--json"))["result"] == {"answer": 42}
        # and after the session closed, for result_retention seconds
        s.close()
        closed = time.monotonic()
        assert c.get_task(task.id).result == {"answer": 42}
        # then the record stays and the result goes
        wait_until(lambda: not c.get_task(task.id).has_result, 30, what="the result to expire")
        assert time.monotonic() - closed >= RETENTION - 0.5
        assert c.get_task(task.id).state == "succeeded" and c.get_task(task.id).result is None


def test_versioned_applications_and_flmctls_long_flags(parity, tmp_path):
    spec = tools_spec("versioned")
    path = tmp_path / "versioned.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert "version 1" in _cli(parity, "register", "-f", str(path))
    with Client(parity.endpoint) as c:
        first = Session("versioned", manager=parity.endpoint)
        # When the application is updated (the API, then the CLI)
        assert c.update_application(spec)["version"] == 2
        assert "to version 3" in _cli(parity, "update", "-f", str(path))
        second = Session("versioned", manager=parity.endpoint)
        # Then it lists with its version, and each session with the version it was opened on
        apps = json.loads(_cli(parity, "list", "--application", "--json"))
        assert {a["name"]: a["version"] for a in apps}["versioned"] == 3
        assert "version" in _cli(parity, "list", "-a")
        rows = {r["id"]: r["version"] for r in json.loads(_cli(parity, "list", "--session", "--json"))}
        assert rows[first.id()] == 1 and rows[second.id()] == 3
        assert c.get_session(first.id()).version == 1
        assert "version: 3" in _cli(parity, "view", "--session", second.id()).replace("  ", "")
        assert json.loads(_cli(parity, "list", "--executor", "--json"))[0]["state"] == "alive"
        assert "versioned" in _cli(parity, "view", "--application", "versioned")
        # and the filter shorthand finds them as the Hub client would
        found = c.find_sessions(filter={"application": "~VERSION", "state": "!closed", "created_at": ">2026-01-01"})
        assert {x.id for x in found} == {first.id(), second.id()}
        assert c.find_sessions(filter={"application": (FilterOperator.eq, "versioned"),
                                       "created_at": "<2000-01-01"}).total == 0
        first.close()
        second.close()
