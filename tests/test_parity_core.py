"""What Flame and FLAME Hub users reach for first, on the core without a socket (Given / When / Then):
resreq as a string, caller-chosen session ids, versioned applications, the filter shorthand and
its default page, results kept after the fact.  The client and CLI paths are in test_parity.py."""
from __future__ import annotations

import sqlite3
from typing import Any, List, Tuple

import pytest

from mesh.core import Core, query
from mesh.core.query import DEFAULT_LIMIT, FilterOperator, find
from mesh.data.store import Store
from mesh.errors import InvalidArgument
from mesh.model.resources import Resources
from mesh.model.spec import AppSpec, parse_spec
from mesh.wire.protocol import Done, Reply, Tasks
from test_core import ECHO, Mesh, running

GiB = 1024 ** 3


# -- resreq as Flame writes it -------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("cpu=2,mem=4g,gpu=0", Resources(2.0, 4 * GiB, 0)),
    ("cpu=0.5, memory=512m", Resources(0.5, 512 * 1024 ** 2, 0)),
    ("gpu=1", Resources(0, 0, 1)),
    ("", Resources()),
])
def test_resources_from_flames_string(text: str, expected: Resources) -> None:
    assert Resources.from_string(text) == expected
    assert Resources.parse(text) == expected            # wherever a request is taken
    assert Resources.parse({"mem": "4g"}).memory == 4 * GiB   # mem is memory in the mapping too


@pytest.mark.parametrize("text,needle", [
    ("cpu", "key=value"), ("cpu=2,cpu=3", "twice"), ("mem=1g,memory=2g", "twice"), ("disk=3", "disk"),
    ("cpu=x", "cpu"), ("gpu=1.5", "gpu"), ("mem=-1g", "memory"),
])
def test_a_bad_resreq_string_names_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        Resources.from_string(text)


def test_a_session_takes_resreq_as_a_string() -> None:
    mesh = Mesh()
    mesh.ok("register_application", spec=ECHO)
    s = mesh.ok("create_session", application="echo", resreq="cpu=2,mem=4g,gpu=0")
    assert s["resreq"] == {"cpu": 2.0, "memory": 4 * GiB, "gpu": 0}


# -- a session named by the caller --------------------------------------------------------------
def test_a_session_is_created_with_the_callers_id_and_the_id_is_never_reused(tmp_path: Any) -> None:
    m = Mesh()
    m.store = Store(str(tmp_path / "m.db"))
    m.ok("register_application", spec=ECHO)
    # Given a session created with the caller's id
    assert m.ok("create_session", application="echo", id="nightly-2026-12-01")["id"] == "nightly-2026-12-01"
    # Then the id taken by an open session is AlreadyExists, saying how to reopen it
    err = m.request("create_session", application="echo", id="nightly-2026-12-01").error
    assert err["code"] == "already_exists" and "Session(session_id=" in err["message"]
    # and an id that is no id is InvalidArgument
    assert m.request("create_session", application="echo", id="no spaces/").error["code"] == "invalid_argument"
    # When it closes and the manager restarts (a closed session is not in its memory any more)
    m.ok("close_session", id="nightly-2026-12-01")
    m.commit()
    m.core = Core(m.settings, secured=False)
    m.core.restore(m.store.load_state())
    assert "nightly-2026-12-01" not in m.core.sessions
    # Then its id is still not handed out again
    err = m.request("create_session", application="echo", id="nightly-2026-12-01").error
    assert err["code"] == "already_exists" and "not reused" in err["message"]


# -- versioned applications -------------------------------------------------------------------
def test_metadata_version_is_parsed_and_round_trips() -> None:
    s = parse_spec("metadata: {name: a, version: 3}\nspec: {command: run}\n")
    assert s.version == 3 and AppSpec.from_dict(s.to_dict()) == s
    assert parse_spec("metadata: {name: a}\nspec: {command: run}\n").version == 1
    with pytest.raises(InvalidArgument, match="metadata.version"):
        parse_spec("metadata: {name: a, version: 0}\nspec: {command: run}\n")


def test_an_update_bumps_the_version_and_sessions_record_the_one_they_ran() -> None:
    mesh = Mesh()
    # Given echo registered (version 1) and a session of it
    assert mesh.ok("register_application", spec=ECHO)["version"] == 1
    mesh.ok("create_session", application="echo", id="old")
    # When it is replaced twice, the second time with a version of its own
    assert mesh.ok("register_application", spec=ECHO, replace=True)["version"] == 2
    seven = {"metadata": {**ECHO["metadata"], "version": 7}, "spec": ECHO["spec"]}
    assert mesh.ok("register_application", spec=seven, replace=True)["version"] == 7
    mesh.ok("create_session", application="echo", id="new")
    # Then each session says which version it was opened on, listed and after a restart
    assert mesh.ok("get_session", id="old")["version"] == 1 and mesh.ok("get_session", id="new")["version"] == 7
    found = mesh.ok("find_sessions", filter={"version": 7})
    assert [s["id"] for s in found["items"]] == ["new"]
    assert mesh.ok("find_applications", filter={"version": ">5"})["total"] == 1
    mesh.commit()
    assert {r["id"]: r["version"] for r in mesh.store.load_sessions()} == {"old": 1, "new": 7}


def test_an_older_database_gains_the_sessions_version_column(tmp_path: Any) -> None:
    # Given a database written before sessions had a version
    db = str(tmp_path / "old.db")
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, app TEXT NOT NULL, state TEXT NOT NULL, "
                 "created_at REAL NOT NULL, closed_at REAL, resreq TEXT NOT NULL, owner TEXT NOT NULL DEFAULT '', "
                 "max_instances INTEGER)")
    conn.execute("INSERT INTO sessions VALUES ('s', 'echo', 'open', 1.0, NULL, '{}', '', NULL)")
    conn.commit()
    conn.close()
    # When the store opens it, then the old row reads with no version and new rows keep theirs
    store = Store(db)
    store.create_session("t", "echo", 2.0, {}, "", "doc", b"\x80", version=4)
    assert {r["id"]: r["version"] for r in store.load_sessions()} == {"s": None, "t": 4}


# -- the Hub client's filter shorthand ----------------------------------------------------------
ROWS = [{"name": "echo-app", "state": "open", "created_at": 1767225600.0 + 5, "pending": 3},   # 2026-01-01 + 5 s
        {"name": "other", "state": "closed", "created_at": 1000.0, "pending": 10}]
FIELDS = ["name", "state", "created_at", "pending"]


@pytest.mark.parametrize("filt,names", [
    ({"name": "~ECHO"}, ["echo-app"]),                        # like
    ({"state": "!closed"}, ["echo-app"]),                     # not
    ({"created_at": ">2026-01-01"}, ["echo-app"]),            # ISO date against an epoch field
    ({"created_at": "<2026-01-01T00:00:00+00:00"}, ["other"]),
    ({"created_at": ">=2026-01-01T00:00:05"}, ["echo-app"]),
    ({"pending": "<=3"}, ["echo-app"]),
    ({"name": (FilterOperator.like, "oth")}, ["other"]),      # the enum in the tuple form
    ({"name": ("~", "oth")}, ["other"]),                      # the tuple form as before
    ({"name": "=~echo"}, []),                                 # = quotes a value that starts with an op
    ({"state": "open"}, ["echo-app"]),                        # a plain string is equality
])
def test_the_filter_shorthand(filt: Any, names: List[str]) -> None:
    assert [r["name"] for r in find(ROWS, FIELDS, filt)["items"]] == names


def test_filter_operator_names_the_ops_as_the_hub_client_does() -> None:
    assert {op.name: op.value for op in FilterOperator} == {
        "eq": "=", "neq": "!", "like": "~", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
    assert set(query.OPS) == {op.value for op in FilterOperator}


def test_the_default_page_is_fifty() -> None:
    rows = [{"name": f"a{i:03}"} for i in range(120)]
    page = find(rows, ["name"])
    assert DEFAULT_LIMIT == 50 and len(page["items"]) == 50 and page["total"] == 120


# -- results after the fact ------------------------------------------------------------------------
def _get_task(m: Mesh, tid: int) -> Tuple[Reply, List[Any]]:
    sends = m.msg(b"client", _request(m, "get_task", id=tid))
    [send] = [s for s in sends if isinstance(s.record, Reply)]
    assert send.record.ok, send.record.error
    return send.record, list(send.payloads)


def _request(m: Mesh, method: str, **args: Any) -> Any:
    from mesh.wire.protocol import Request
    return Request(next(m.rids), method, args, None, False)


def _one_done(m: Mesh) -> int:
    iid, inst = running(m, 1)
    [tasks] = m.to(inst, Tasks)
    tid = tasks.items[0][0]
    m.msg(inst, Done([(tid, None)]), [b"PICKLED-RESULT"])
    return tid


def test_a_result_is_kept_while_the_session_is_open_and_for_the_retention_after() -> None:
    m = Mesh(result_retention=100.0)
    # Given a task that succeeded
    tid = _one_done(m)
    # Then get_task gives its result, the bytes the instance sent (the manager does not unpickle)
    reply, blobs = _get_task(m, tid)
    assert reply.result["has_result"] and [bytes(b) for b in blobs] == [b"PICKLED-RESULT"]
    # When its session closes, it is still there within the retention
    m.ok("close_session", id="s1")
    m.tick(99.0)
    assert _get_task(m, tid)[0].result["has_result"]
    # and past it, the record stays but the result is gone, from the database too
    m.tick(2.0)
    reply, blobs = _get_task(m, tid)
    assert reply.result["state"] == "succeeded" and not reply.result["has_result"] and blobs == []
    m.tick(20.0)
    assert m.store.task_result(tid) is None


def test_a_result_over_result_max_size_is_delivered_but_not_kept() -> None:
    m = Mesh(result_max_size=8)
    tid = _one_done(m)              # a 14-byte result
    assert any(bytes(p) == b"PICKLED-RESULT" for s in m.sent if s.peer == b"client" for p in s.payloads)
    reply, blobs = _get_task(m, tid)
    assert not reply.result["has_result"] and m.store.task_result(tid) is None


def test_without_retention_no_result_is_written() -> None:
    # the negative control: result_retention 0 keeps nothing, so get_task has no result to give
    m = Mesh(result_retention=0.0)
    tid = _one_done(m)
    reply, blobs = _get_task(m, tid)
    assert not reply.result["has_result"] and blobs == [] and m.store.task_result(tid) is None
