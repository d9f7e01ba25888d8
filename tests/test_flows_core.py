"""The flow engine without a socket: the manager's core drives a run; we play executor and instance.

Given / When / Then over :class:`test_core.Mesh` (one core, a real SQLite store in memory, a
clock).  The flow service's answers are built here as the instance builds them: the pickled
msgpack envelope ``[kind, started, ended, executor, data]``.
"""
from __future__ import annotations

import pickle
from typing import Any, Dict, List, Optional, Tuple

import cloudpickle
import pytest

from client.flows import Flow, Parameter, mapped
from mesh.errors import InvalidArgument
from mesh.model import flows as model
from mesh.wire.pickled import unwrap_bytes, wrap_bytes
from mesh.wire.protocol import Done, Tasks, pack, unpack
from test_core import Mesh


def answer(value: Any, kind: str = "blob", started: float = 1.0, ended: float = 2.0) -> bytes:
    data = pack(value) if kind == "doc" else cloudpickle.dumps(value)
    return pickle.dumps(pack([kind, started, ended, "e1", data]), protocol=pickle.HIGHEST_PROTOCOL)


def chain() -> Flow:
    f = Flow("sim")

    @f.task
    def prepare(config: dict) -> dict:
        return config

    @f.task(retries=1)
    def run(prepared: dict, steps: int) -> dict:
        return prepared

    with f:
        run(prepare(Parameter("config")), Parameter("steps", default=3))
    return f


def fan(n: int = 3) -> Flow:
    f = Flow("fan")

    @f.task
    def work(i: int) -> int:
        return i

    @f.task
    def total(*parts: int) -> int:
        return sum(parts)

    with f:
        total(*[work(i) for i in range(n)])
    return f


def slow(retries: int = 0) -> Flow:
    """One task that never answers (the test does not), with a 5 s timeout."""
    f = Flow("slow")

    @f.task(timeout=5, retries=retries)
    def hang() -> None:
        return None

    with f:
        hang()
    return f


class FlowMesh:
    """A core with one executor whose instances we start and answer for."""

    def __init__(self, m: Mesh, slots: int = 4) -> None:
        self.m = m
        self.ex = m.executor(slots=slots)
        self.instances: List[bytes] = []

    def register(self, flow: Flow) -> Dict[str, Any]:
        return self.m.ok("register_flow", flow=flow.document())

    def start(self, flows: List[str], **args: Any) -> Dict[str, Any]:
        params = {f: {k: cloudpickle.dumps(v) for k, v in p.items()} for f, p in args.pop("parameters", {}).items()}
        return self.m.ok("run_flow", flows=flows, parameters=params, **args)

    def serve(self) -> List[Tuple[bytes, int, Dict[str, Any]]]:
        """Start launched instances; every task sent to them not yet answered: (instance, id, request)."""
        from mesh.wire.protocol import Launch
        while any(isinstance(s.record, Launch) and s.record.iid not in self.m._started for s in self.m.sent):
            self.instances.append(self.m.instance(self.ex)[1])
        out = []
        for s in self.m.sent:
            if s.peer in self.instances and isinstance(s.record, Tasks):
                for (tid, _), payload in zip(s.record.items, s.payloads):
                    if tid in self.m.core.tasks:
                        out.append((s.peer, tid, unpack(unwrap_bytes(bytes(payload)))))
        return out

    def reply(self, inst: bytes, tid: int, payload: bytes = b"", err: Optional[Dict[str, Any]] = None) -> None:
        self.m.msg(inst, Done([(tid, err)]), [payload if err is None else b""])

    def run(self, rid: str) -> Dict[str, Any]:
        return self.m.ok("get_flow_run", id=rid)


@pytest.fixture
def fm() -> FlowMesh:
    return FlowMesh(Mesh())


def test_a_task_starts_only_when_the_results_it_takes_exist(fm: FlowMesh) -> None:
    # Given the flow prepare -> run, registered and started
    fm.register(chain())
    rid = fm.start(["sim"], parameters={"sim": {"config": {"n": 4}}})["id"]
    # Then only prepare was sent, with its parameter
    [(inst, tid, req)] = fm.serve()
    assert req["task"] == "sim/prepare" and cloudpickle.loads(req["args"][0][1]) == {"n": 4}
    # When prepare answers
    fm.reply(inst, tid, answer({"n": 4}))
    # Then run is sent, taking prepare's result by key and steps' default
    [(inst, tid2, req2)] = fm.serve()
    assert req2["task"] == "sim/run"
    how, value = req2["args"][0]   # a small result travels inside the request
    assert how == "value" and cloudpickle.loads(value) == {"n": 4}
    assert cloudpickle.loads(req2["args"][1][1]) == 3
    fm.reply(inst, tid2, answer({"done": True}, started=5.0, ended=6.5))
    # Then the run succeeded, with the executor's times, and its result is an object anyone with the key reads
    view = fm.run(rid)
    assert view["state"] == "succeeded"
    assert (view["tasks"]["sim/run"]["started_at"], view["tasks"]["sim/run"]["ended_at"]) == (5.0, 6.5)
    got = fm.m.ok("get_object", key=view["tasks"]["sim/run"]["result"])
    assert got["kind"] == "blob"
    # and its session closed with it
    assert all(s.state == "closed" for s in fm.m.core.sessions.values() if s.id.startswith("flow-" + rid))


def test_independent_tasks_are_sent_together_and_the_fan_in_waits_for_all(fm: FlowMesh) -> None:
    fm.register(fan(3))
    rid = fm.start(["fan"])["id"]
    sent = fm.serve()
    assert sorted(r["task"] for _, _, r in sent) == ["fan/work", "fan/work-2", "fan/work-3"]
    for inst, tid, req in sent[:2]:
        fm.reply(inst, tid, answer(1))
    assert all(r["task"] != "fan/total" for _, _, r in fm.serve())
    inst, tid, _ = fm.serve()[0]
    fm.reply(inst, tid, answer(1))
    [(inst, tid, req)] = fm.serve()
    assert req["task"] == "fan/total" and len(req["args"]) == 3
    fm.reply(inst, tid, answer(3))
    assert fm.run(rid)["state"] == "succeeded"


def test_a_failed_task_is_retried_then_skips_its_dependents_and_fails_the_run(fm: FlowMesh) -> None:
    fm.register(chain())
    rid = fm.start(["sim"], parameters={"sim": {"config": {}}})["id"]
    [(inst, tid, _)] = fm.serve()
    fm.reply(inst, tid, answer({}))
    failure = {"code": "task_failed", "message": "ValueError: bad", "details": {"type": "ValueError"}}
    # run has retries=1: its first failure runs it again
    [(inst, tid, _)] = fm.serve()
    fm.reply(inst, tid, err=failure)
    view = fm.run(rid)
    assert view["tasks"]["sim/run"]["state"] == "running" and view["tasks"]["sim/run"]["attempts"] == 2
    [(inst, tid, _)] = fm.serve()
    fm.reply(inst, tid, err=failure)
    view = fm.run(rid)
    assert view["state"] == "failed"
    assert view["tasks"]["sim/run"]["state"] == "failed" and view["tasks"]["sim/run"]["attempts"] == 2
    assert view["error"]["task"] == "sim/run" and view["error"]["details"]["type"] == "ValueError"


def test_a_failure_skips_only_what_is_downstream(fm: FlowMesh) -> None:
    f = Flow("two")

    @f.task
    def a() -> int:
        return 1

    @f.task
    def b(x: int) -> int:
        return x

    @f.task
    def c() -> int:
        return 2

    with f:
        b(a())
        c()
    fm.register(f)
    rid = fm.start(["two"])["id"]
    sent = {r["task"]: (inst, tid) for inst, tid, r in fm.serve()}
    fm.reply(*sent["two/a"], err={"code": "task_failed", "message": "boom", "details": {}})
    fm.reply(*sent["two/c"], payload=answer(2))
    states = {k: v["state"] for k, v in fm.run(rid)["tasks"].items()}
    assert states == {"two/a": "failed", "two/b": "skipped", "two/c": "succeeded"}
    assert fm.run(rid)["state"] == "failed"


def test_cancel_stops_what_has_not_finished(fm: FlowMesh) -> None:
    fm.register(fan(2))
    rid = fm.start(["fan"])["id"]
    sent = fm.serve()
    view = fm.m.ok("cancel_flow_run", id=rid)
    assert view["state"] == "cancelled"
    assert {v["state"] for v in view["tasks"].values()} == {"cancelled"}
    # a late answer changes nothing
    inst, tid, _ = sent[0]
    fm.reply(inst, tid, answer(1))
    assert fm.run(rid)["tasks"]["fan/work"]["state"] == "cancelled"


def test_db_mapping_hands_the_picked_value_and_file_mapping_the_key(fm: FlowMesh) -> None:
    sim = Flow("simulate")

    @sim.task
    def run() -> dict:
        return {}

    with sim:
        run()
    an = Flow("analyze")

    @an.task
    def compare(loss: float, path: str) -> float:
        return loss

    with an:
        compare(mapped("simulate", "run", as_="db", attribute="metrics", attribute_index=["loss", 1]),
                mapped("simulate", "run", as_="file"))
    fm.register(sim)
    fm.register(an)
    rid = fm.start(["simulate", "analyze"])["id"]
    [(inst, tid, req)] = fm.serve()
    assert req["record"] is True   # it is read as a record downstream, so it answers one
    fm.reply(inst, tid, answer({"metrics": {"loss": [0.5, 0.25]}}, kind="doc"))
    [(inst, tid, req)] = fm.serve()
    key = fm.run(rid)["tasks"]["simulate/run"]["result"]
    assert req["args"] == [["plain", 0.25], ["file", key]]


def test_a_db_mapping_of_a_result_that_is_not_a_record_fails_the_task_saying_so(fm: FlowMesh) -> None:
    sim = Flow("simulate")

    @sim.task
    def run() -> list:
        return []

    with sim:
        run()
    an = Flow("analyze")

    @an.task
    def compare(loss: float) -> float:
        return loss

    with an:
        compare(mapped("simulate", "run", as_="db", attribute="metrics"))
    fm.register(sim)
    fm.register(an)
    rid = fm.start(["simulate", "analyze"])["id"]
    [(inst, tid, _)] = fm.serve()
    fm.reply(inst, tid, answer([1, 2]))   # a list: kept as a pickled blob, no record
    view = fm.run(rid)
    assert view["state"] == "failed"
    assert "cannot be mapped as db" in view["tasks"]["analyze/compare"]["error"]["message"]


def test_a_restart_resumes_the_run_without_running_succeeded_tasks_again(fm: FlowMesh) -> None:
    # Given prepare succeeded and run is running when the manager dies
    fm.register(chain())
    rid = fm.start(["sim"], parameters={"sim": {"config": {"n": 1}}})["id"]
    [(inst, tid, _)] = fm.serve()
    fm.reply(inst, tid, answer({"n": 1}))
    fm.serve()
    fm.m.store.write(fm.m.core.take_batch(fm.m.now))   # what was committed before the kill
    # When a new core restores from the store
    m2 = Mesh()
    m2.store = fm.m.store
    m2.run(m2.core.restore(fm.m.store.load_state(), m2.now))
    fm2 = FlowMesh(m2)
    sent = fm2.serve()
    # Then only run is sent again (its young task died with the manager), not prepare
    assert [r["task"] for _, _, r in sent] == ["sim/run"]
    inst, tid, _ = sent[0]
    fm2.reply(inst, tid, answer({"ok": 1}))
    view = fm2.run(rid)
    assert view["state"] == "succeeded" and view["tasks"]["sim/prepare"]["attempts"] == 1


def test_a_scheduled_run_starts_no_earlier_than_its_time_also_after_a_restart(fm: FlowMesh) -> None:
    fm.register(fan(1))
    when = fm.m.now + 60
    rid = fm.start(["fan"], scheduled_start_time=when)["id"]
    assert fm.run(rid)["state"] == "scheduled" and fm.serve() == []
    fm.m.commit()
    m2 = Mesh()
    m2.store = fm.m.store
    m2.now = fm.m.now + 30
    m2.run(m2.core.restore(fm.m.store.load_state(), m2.now))
    m2.tick(29)
    assert m2.ok("get_flow_run", id=rid)["state"] == "scheduled" and not m2.core.tasks
    m2.tick(1.5)
    view = m2.ok("get_flow_run", id=rid)
    assert view["state"] == "running" and view["started_at"] >= when
    assert len(FlowMesh(m2).serve()) == 1


def test_a_cron_schedule_creates_one_run_per_due_time(fm: FlowMesh) -> None:
    fm.register(fan(1))
    fm.m.now = 1_800_000_000.0 - 1   # one second before a five-minute boundary
    first = fm.start(["fan"], schedule="*/5 * * * *")
    assert first["state"] == "scheduled" and first["scheduled_start_time"] == 1_800_000_000.0
    fm.m.tick(2)
    assert fm.run(first["id"])["state"] == "running"
    fm.m.tick(300)
    runs = fm.m.ok("find_flow_runs", filter={"schedule": first["schedule"]})
    assert runs["total"] == 2
    [sched] = fm.m.ok("find_flow_schedules")["items"]
    fm.m.ok("cancel_flow_schedule", id=sched["id"])
    fm.m.tick(600)
    assert fm.m.ok("find_flow_runs", filter={"schedule": first["schedule"]})["total"] == 2


@pytest.mark.parametrize("flows,params,says", [
    (["analyze"], {}, "'simulate', which is not part of this run"),
    (["simulate", "analyze"], {}, "needs parameter 'config'"),
])
def test_a_run_that_cannot_run_is_refused_naming_why(fm: FlowMesh, flows: List[str], params: Dict[str, Any],
                                                     says: str) -> None:
    sim = Flow("simulate")

    @sim.task
    def run(config: dict) -> dict:
        return config

    with sim:
        run(Parameter("config"))
    an = Flow("analyze")

    @an.task
    def summarize(r: dict) -> str:
        return str(r)

    with an:
        summarize(mapped("simulate", "run"))
    fm.register(sim)
    fm.register(an)
    reply = fm.m.request("run_flow", flows=flows, parameters=params)
    assert not reply.ok and reply.error["code"] == InvalidArgument.code and says in reply.error["message"]
    assert fm.m.ok("find_flow_runs")["total"] == 0


# -- the model, pure -------------------------------------------------------------------------------

def test_a_cycle_between_flows_is_named() -> None:
    def doc(name: str, other: str) -> Dict[str, Any]:
        return {"name": name, "functions": [b"f"], "tasks": [
            {"name": "t", "fn": 0, "args": [{"mapped": other, "task": "t", "as": "raw"}]}]}
    with pytest.raises(InvalidArgument, match="cycle: a -> b -> a|cycle: b -> a -> b"):
        model.compose({"a": model.check_flow(doc("a", "b")), "b": model.check_flow(doc("b", "a"))}, {})


def test_a_mapped_task_missing_from_its_flow_is_named() -> None:
    a = {"name": "a", "functions": [b"f"], "tasks": [{"name": "t", "fn": 0}]}
    b = {"name": "b", "functions": [b"f"], "tasks": [{"name": "u", "fn": 0,
                                                       "args": [{"mapped": "a", "task": "nope", "as": "raw"}]}]}
    with pytest.raises(InvalidArgument, match="maps a/nope, which is not a task of flow 'a'"):
        model.compose({"a": model.check_flow(a), "b": model.check_flow(b)}, {})


def test_pick_says_where_it_stopped() -> None:
    assert model.pick({"m": {"loss": [1, 2]}}, "m", ["loss", 1]) == 2
    with pytest.raises(InvalidArgument, match="no index 'x'"):
        model.pick({"m": {"loss": 1}}, "m", ["x"])
    with pytest.raises(InvalidArgument, match="no attribute 'q'"):
        model.pick({"m": 1}, "q", [])


def test_the_manager_reads_only_a_pickled_bytes_value() -> None:
    for data in (b"", b"abc", b"x" * 300, b"y" * 70_000):
        for proto in range(3, pickle.HIGHEST_PROTOCOL + 1):
            assert unwrap_bytes(pickle.dumps(data, protocol=proto)) == data
        assert pickle.loads(wrap_bytes(data)) == data
    for other in ("abc", (b"a",), [b"a"], {"a": b"b"}, 1):
        assert unwrap_bytes(pickle.dumps(other)) is None
    assert unwrap_bytes(pickle.dumps(b"abc")[:-1]) is None   # truncated


def test_cron_next_fire_and_bad_cron() -> None:
    assert model.next_fire("*/5 * * * *", 1_800_000_000.0 - 1) == 1_800_000_000.0
    with pytest.raises(InvalidArgument, match="not a cron expression"):
        model.check_schedule("every tuesday")


# -- what a review found (each failed before its fix) ------------------------------------------------

def test_the_flow_service_names_are_reserved() -> None:
    m = Mesh(secured=True)
    from mesh.model.auth import Principal
    m.core.tokens.add("tok-bob", Principal("bob", "user", "user"), float("inf"))
    lid = m.request("create_lease", token="tok-bob", ttl=30).result["id"]
    spec = {"metadata": {"name": "zmesh-flow"}, "spec": {"command": "python3", "arguments": ["/home/bob/steal.py"]}}
    for method, extra in (("register_temporary_application", {"lease": lid}), ("register_application", {})):
        r = m.request(method, token="tok-bob", spec=spec, **extra)
        assert not r.ok and r.error["code"] in ("invalid_argument", "permission_denied")
    m.core.tokens.add("tok-root", Principal("root", "admin", "user"), float("inf"))
    r = m.request("register_application", token="tok-root", spec=spec)
    assert not r.ok and "reserved" in r.error["message"]


@pytest.mark.parametrize("frame", [
    b"\x80\x04\x95" + bytes(8) + b"C",                                  # cut right after its opcode
    pickle.dumps(pack(["doc", 1.0, 2.0, "e1", b"\xc1 not msgpack"])),   # a record that is not a document
    pickle.dumps("not bytes"),
])
def test_an_answer_that_cannot_be_used_fails_its_task_instead_of_hanging_the_run(fm: FlowMesh, frame: bytes) -> None:
    fm.register(fan(1))
    rid = fm.start(["fan"])["id"]
    [(inst, tid, _)] = fm.serve()
    fm.reply(inst, tid, frame)
    view = fm.run(rid)
    assert view["state"] == "failed" and view["tasks"]["fan/work"]["state"] == "failed"


def test_a_timed_out_task_runs_as_often_as_its_retries_say(fm: FlowMesh) -> None:
    fm.register(slow(retries=1))
    rid = fm.start(["slow"])["id"]
    from mesh.wire.protocol import Heartbeat
    dispatched: List[int] = []
    for _ in range(30):   # 30 s, heartbeating, never answering
        dispatched += [tid for _, tid, _ in fm.serve() if tid not in dispatched]
        fm.m.msg(fm.ex, Heartbeat())
        fm.m.tick(1)
    view = fm.run(rid)
    assert view["state"] == "failed" and view["tasks"]["slow/hang"]["attempts"] == 2
    assert len(dispatched) == 2   # one run and one retry: the core does not retry flow tasks on its own
    assert view["tasks"]["slow/hang"]["error"]["code"] == "deadline_exceeded"


def test_a_restored_task_keeps_its_timeout(fm: FlowMesh) -> None:
    fm.register(slow())
    rid = fm.start(["slow"])["id"]
    fm.serve()
    fm.m.commit()   # the open task is written, as at a shutdown
    m2 = Mesh()
    m2.store = fm.m.store
    m2.run(m2.core.restore(fm.m.store.load_state(), m2.now))
    tid = m2.ok("get_flow_run", id=rid)["tasks"]["slow/hang"]["task_id"]
    assert m2.core.tasks[tid].timeout == 5


def test_a_cron_schedule_whose_time_passed_during_a_restart_fires_once(fm: FlowMesh) -> None:
    fm.register(fan(1))
    fm.m.now = 1_800_000_000.0 - 1
    first = fm.start(["fan"], schedule="*/5 * * * *")
    fm.m.commit()
    m2 = Mesh()
    m2.store = fm.m.store
    m2.now = 1_800_000_000.0 + 12 * 60   # down across three due times
    m2.run(m2.core.restore(fm.m.store.load_state(), m2.now))
    m2.tick(0)
    m2.tick(1)
    assert m2.ok("find_flow_runs", filter={"schedule": first["schedule"]})["total"] == 1


def test_another_user_runs_a_flow_unchanged_but_cannot_change_it() -> None:
    m = Mesh(secured=True)
    from mesh.model.auth import Principal
    for who in ("ann", "bob"):
        m.core.tokens.add(f"tok-{who}", Principal(who, "user", "user"), float("inf"))
    doc = chain().document()
    assert m.request("register_flow", token="tok-bob", flow=doc).ok
    assert m.request("register_flow", token="tok-ann", flow=doc).ok   # what Flow.run does first
    changed = {**doc, "labels": {"zone": "x"}}
    r = m.request("register_flow", token="tok-ann", flow=changed)
    assert not r.ok and r.error["code"] == "permission_denied"
    # and ann sees bob's flow without his pickled code
    got = m.request("get_flow", token="tok-ann", name="sim", document=True).result["document"]
    assert set(got["functions"]) == {b""}


def test_a_task_no_executor_can_take_fails_saying_which_labels(fm: FlowMesh) -> None:
    f = Flow("mars", labels={"zone": "mars"})

    @f.task
    def go() -> None:
        return None

    with f:
        go()
    fm.register(f)
    rid = fm.start(["mars"])["id"]
    from mesh.wire.protocol import Heartbeat
    for _ in range(40):
        fm.m.msg(fm.ex, Heartbeat())
        fm.m.tick(1)
    view = fm.run(rid)
    assert view["state"] == "failed" and "no executor has the labels {'zone': 'mars'}" in \
        view["tasks"]["mars/go"]["error"]["message"]


def test_cancelling_an_unknown_run_is_not_found(fm: FlowMesh) -> None:
    r = fm.m.request("cancel_flow_run", id="no-such-run")
    assert not r.ok and r.error["code"] == "not_found"
