"""Placement policy (mesh.core.scheduler.plan): plain data in, actions out; no sockets.

Each test reads Given (the views) / When (plan) / Then (the actions).
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Dict, List, Optional

import pytest

from mesh.core.scheduler import Drain, ExecutorView, InstanceView, Launch, Rebind, SessionView, Stop, fits, plan
from mesh.model.resources import Resources

GIB = 1024 ** 3


# -- builders ----------------------------------------------------------------------------------

def executor(id: str, slots: int = 4, used: int = 0, cpu: float = 64, memory: int = 256 * GIB, gpu: int = 8,
             allocated: Optional[Resources] = None, labels: Optional[Dict[str, str]] = None,
             draining: bool = False) -> ExecutorView:
    return ExecutorView(id, slots, used, Resources(cpu, memory, gpu), allocated or Resources(),
                        dict(labels or {}), draining)


def session(id: str, app: str = "app", demand: int = 1, resreq: Optional[Resources] = None,
            labels: Optional[Dict[str, str]] = None, max_instances: Optional[int] = None,
            created_at: float = 0.0, owner: str = "") -> SessionView:
    return SessionView(id, app, demand, resreq or Resources(), dict(labels or {}), max_instances, created_at, owner)


def instance(id: str, executor: str = "e1", app: str = "app", session: Optional[str] = None,
             resreq: Optional[Resources] = None, ready: bool = True, busy: bool = False,
             draining: bool = False, stopping: bool = False, idle_since: float = 100.0,
             owner: str = "") -> InstanceView:
    return InstanceView(id, executor, app, session, resreq or Resources(), ready, busy, draining, stopping,
                        idle_since, owner)


def launches(actions: List[object]) -> List[Launch]:
    return [a for a in actions if isinstance(a, Launch)]


def of(kind: type, actions: List[object]) -> List[object]:
    return [a for a in actions if isinstance(a, kind)]


NOW = 100.0


# -- rule 1/3: launches up to demand on fitting executors -----------------------------------------

def test_session_with_demand_gets_launches_up_to_its_demand() -> None:
    # Given one executor with 4 free slots and a session with 3 tasks
    execs = [executor("e1", slots=4)]
    # When planning
    actions = plan([session("s1", demand=3)], execs, [], now=NOW)
    # Then the session gets exactly 3 launches on that executor, and nothing else happens
    assert actions == [Launch("s1", "e1")] * 3


def test_session_without_demand_gets_nothing() -> None:
    assert plan([session("s1", demand=0)], [executor("e1")], [], now=NOW) == []


def test_launches_stop_at_free_slots() -> None:
    # Given 2 executors with 1 free slot each and a session with much more work
    execs = [executor("e1", slots=2, used=1), executor("e2", slots=3, used=2)]
    # When planning
    actions = plan([session("s1", demand=10)], execs, [], now=NOW)
    # Then exactly one launch per free slot
    assert Counter(launches(actions)) == Counter({Launch("s1", "e1"): 1, Launch("s1", "e2"): 1})


def test_existing_instances_count_towards_demand() -> None:
    # Given a session with demand 3 that already owns 2 instances
    insts = [instance("i1", session="s1", busy=True), instance("i2", session="s1", busy=True)]
    actions = plan([session("s1", demand=3)], [executor("e1", slots=4, used=2)], insts, now=NOW)
    # Then only one more is launched
    assert actions == [Launch("s1", "e1")]


def test_not_ready_instances_still_count_as_owned() -> None:
    insts = [instance("i1", session="s1", ready=False)]
    actions = plan([session("s1", demand=1)], [executor("e1", slots=4, used=1)], insts, now=NOW)
    assert actions == []


# -- labels -----------------------------------------------------------------------------------------

def test_labels_must_match() -> None:
    # Given executors in two zones, one without the label at all
    execs = [executor("a", labels={"zone": "a", "gpu": "yes"}), executor("b", labels={"zone": "b"}),
             executor("c", labels={})]
    # When a session asks for zone b
    actions = plan([session("s1", demand=3, labels={"zone": "b"})], execs, [], now=NOW)
    # Then every launch goes to the zone-b executor
    assert actions == [Launch("s1", "b")] * 3


def test_no_executor_with_matching_labels_means_no_launch() -> None:
    execs = [executor("a", labels={"zone": "a"}), executor("b", labels={})]
    assert plan([session("s1", demand=2, labels={"zone": "c"})], execs, [], now=NOW) == []


def test_label_subset_matches() -> None:
    # Given an executor with more labels than the session asks for, it still matches
    execs = [executor("a", labels={"zone": "a", "disk": "ssd"})]
    assert plan([session("s1", labels={"disk": "ssd"})], execs, [], now=NOW) == [Launch("s1", "a")]


# -- resources ------------------------------------------------------------------------------------

@pytest.mark.parametrize("resreq,capacity,allocated", [
    (Resources(cpu=2), Resources(cpu=4, memory=GIB, gpu=1), Resources(cpu=3)),
    (Resources(memory=2 * GIB), Resources(cpu=4, memory=4 * GIB, gpu=1), Resources(memory=3 * GIB)),
    (Resources(gpu=1), Resources(cpu=4, memory=GIB, gpu=1), Resources(gpu=1)),
    (Resources(gpu=1), Resources(cpu=4, memory=GIB, gpu=0), Resources()),
], ids=["cpu", "memory", "gpu", "no-gpu"])
def test_resreq_must_fit_free_capacity(resreq: Resources, capacity: Resources, allocated: Resources) -> None:
    # Given an executor with free slots but not enough free resource of one kind
    ex = ExecutorView("e1", slots=4, used_slots=1, capacity=capacity, allocated=allocated)
    s = session("s1", resreq=resreq)
    # Then it does not fit and nothing is launched
    assert not fits(s, ex)
    assert plan([s], [ex], [], now=NOW) == []


def test_resreq_goes_to_the_executor_where_it_fits() -> None:
    small = ExecutorView("small", slots=8, capacity=Resources(cpu=1, memory=GIB))
    big = ExecutorView("big", slots=1, capacity=Resources(cpu=8, memory=16 * GIB, gpu=1))
    actions = plan([session("s1", demand=2, resreq=Resources(cpu=2, memory=GIB, gpu=1))], [small, big], [],
                   now=NOW)
    assert actions == [Launch("s1", "big")]


def test_allocations_accumulate_across_sessions_within_one_plan() -> None:
    # Given a 3-cpu executor with plenty of slots and two sessions needing 2 cpu each
    ex = ExecutorView("e1", slots=4, capacity=Resources(cpu=3))
    older = session("old", resreq=Resources(cpu=2), created_at=1.0)
    newer = session("new", resreq=Resources(cpu=2), created_at=2.0)
    # When planning
    actions = plan([newer, older], [ex], [], now=NOW)
    # Then only one instance fits, and it goes to the older session
    assert actions == [Launch("old", "e1")]


def test_allocations_accumulate_within_one_session() -> None:
    ex = ExecutorView("e1", slots=8, capacity=Resources(cpu=2.5, memory=10 * GIB))
    actions = plan([session("s1", demand=5, resreq=Resources(cpu=1, memory=GIB))], [ex], [], now=NOW)
    assert actions == [Launch("s1", "e1")] * 2


def test_fractional_cpu_fills_exactly() -> None:
    ex = ExecutorView("e1", slots=8, capacity=Resources(cpu=0.3))
    actions = plan([session("s1", demand=5, resreq=Resources(cpu=0.1))], [ex], [], now=NOW)
    assert actions == [Launch("s1", "e1")] * 3


# -- max_instances ----------------------------------------------------------------------------------

def test_max_instances_caps_launches() -> None:
    actions = plan([session("s1", demand=5, max_instances=2)], [executor("e1", slots=8)], [], now=NOW)
    assert actions == [Launch("s1", "e1")] * 2


def test_max_instances_counts_existing_instances() -> None:
    insts = [instance("i1", session="s1", busy=True)]
    actions = plan([session("s1", demand=5, max_instances=2)], [executor("e1", slots=8, used=1)], insts, now=NOW)
    assert actions == [Launch("s1", "e1")]


def test_max_instances_reached_means_nothing() -> None:
    insts = [instance("i1", session="s1", busy=True), instance("i2", session="s1", busy=True)]
    actions = plan([session("s1", demand=5, max_instances=2)], [executor("e1", slots=8, used=2)], insts, now=NOW)
    assert actions == []


# -- spreading --------------------------------------------------------------------------------------

def test_launch_goes_to_the_executor_with_most_free_slots() -> None:
    execs = [executor("e1", slots=4, used=3), executor("e2", slots=4, used=0), executor("e3", slots=8, used=6)]
    assert plan([session("s1")], execs, [], now=NOW) == [Launch("s1", "e2")]


def test_launches_spread_evenly() -> None:
    # Given executors with 4, 2 and 2 free slots and 5 tasks
    execs = [executor("a", slots=4), executor("b", slots=4, used=2), executor("c", slots=2)]
    actions = plan([session("s1", demand=5)], execs, [], now=NOW)
    # Then each launch took a slot where most were free: the remaining free slots are level
    assert len(actions) == 5
    placed = Counter(a.executor for a in launches(actions))
    free_after = {"a": 4 - placed["a"], "b": 2 - placed["b"], "c": 2 - placed["c"]}
    assert max(free_after.values()) - min(free_after.values()) <= 1
    assert placed["a"] >= 2


# -- rule 2: reuse before launch ------------------------------------------------------------------

def test_idle_unbound_instance_of_same_app_is_rebound() -> None:
    # Given an idle unbound instance of the app and free slots
    insts = [instance("i1", app="echo", session=None)]
    execs = [executor("e1", slots=4, used=1)]
    # When a session of that app has one task
    actions = plan([session("s1", app="echo")], execs, insts, now=NOW)
    # Then the instance is rebound rather than a new one launched
    assert actions == [Rebind("i1", "s1")]


def test_idle_instance_of_session_without_demand_is_rebound() -> None:
    insts = [instance("i1", app="echo", session="done")]
    sessions = [session("done", app="echo", demand=0), session("s1", app="echo", demand=1)]
    actions = plan(sessions, [executor("e1", slots=4, used=1)], insts, now=NOW)
    assert actions == [Rebind("i1", "s1")]


def test_idle_instance_of_unknown_session_is_rebound() -> None:
    insts = [instance("i1", app="echo", session="closed-and-gone")]
    actions = plan([session("s1", app="echo")], [executor("e1", slots=4, used=1)], insts, now=NOW)
    assert actions == [Rebind("i1", "s1")]


def test_rebind_then_launch_for_the_rest() -> None:
    insts = [instance("i1", app="echo")]
    actions = plan([session("s1", app="echo", demand=3)], [executor("e1", slots=4, used=1)], insts, now=NOW)
    assert Counter(actions) == Counter({Rebind("i1", "s1"): 1, Launch("s1", "e1"): 2})


@pytest.mark.parametrize("inst", [
    instance("i1", app="other"),
    instance("i1", app="echo", busy=True),
    instance("i1", app="echo", ready=False),
    instance("i1", app="echo", stopping=True),
    instance("i1", app="echo", resreq=Resources(cpu=1)),
    instance("i1", app="echo", session="busy-session"),
], ids=["other-app", "busy", "not-ready", "stopping", "other-resreq", "bound-to-session-with-work"])
def test_unsuitable_instances_are_not_rebound(inst: InstanceView) -> None:
    sessions = [session("s1", app="echo"), session("busy-session", app="echo", demand=1, created_at=-1)]
    actions = plan(sessions, [executor("e1", slots=8, used=1)], [inst], now=NOW)
    assert not [a for a in actions if isinstance(a, Rebind) and a.session == "s1"]
    assert Launch("s1", "e1") in actions


def test_idle_instance_on_non_matching_executor_is_not_rebound() -> None:
    insts = [instance("i1", executor="a", app="echo")]
    execs = [executor("a", labels={"zone": "a"}, used=1), executor("b", labels={"zone": "b"})]
    actions = plan([session("s1", app="echo", labels={"zone": "b"})], execs, insts, now=NOW)
    assert actions == [Launch("s1", "b")]


def test_idle_instance_on_unlisted_executor_does_not_break_planning() -> None:
    # Given an idle instance whose executor is not (or no longer) in the executor views
    insts = [instance("i1", executor="gone", app="echo")]
    # When a session of that app wants work and another executor has room
    actions = plan([session("s1", app="echo")], [executor("e1")], insts, now=NOW)
    # Then plan does not crash, and the session gets a launch on a known executor
    assert Launch("s1", "e1") in actions
    assert Rebind("i1", "s1") not in actions


# -- rule 4: reclaim a slot from another app ----------------------------------------------------

def test_idle_instance_of_other_app_is_stopped_when_no_slot_is_free() -> None:
    # Given a full executor hosting only an idle, fresh instance of another app
    insts = [instance("i1", app="other", idle_since=NOW)]
    execs = [executor("e1", slots=1, used=1)]
    # When a session of a different app wants one instance
    actions = plan([session("s1", app="echo")], execs, insts, now=NOW)
    # Then that instance is stopped to free its slot (and nothing is launched yet)
    assert actions == [Stop("i1")]


def test_idle_instance_of_other_app_is_kept_when_a_slot_is_free() -> None:
    insts = [instance("i1", app="other", idle_since=NOW)]
    actions = plan([session("s1", app="echo")], [executor("e1", slots=2, used=1)], insts, now=NOW)
    assert actions == [Launch("s1", "e1")]


def test_busy_instance_of_other_app_is_not_stopped() -> None:
    insts = [instance("i1", app="other", session="s0", busy=True)]
    sessions = [session("s0", app="other", demand=1), session("s1", app="echo", demand=1)]
    actions = plan(sessions, [executor("e1", slots=1, used=1)], insts, now=NOW)
    assert Stop("i1") not in actions


def test_one_stop_per_missing_slot() -> None:
    insts = [instance(f"i{k}", app="other", idle_since=NOW) for k in range(4)]
    actions = plan([session("s1", app="echo", demand=2)], [executor("e1", slots=4, used=4)], insts, now=NOW)
    assert len(of(Stop, actions)) == 2 and not launches(actions)


# -- rule 5: fairness under contention ----------------------------------------------------------

def _contended(with_starving: bool) -> List[object]:
    # Given 4 slots all held by session "rich" (demand 10), ...
    insts = [instance(f"r{k}", session="rich", busy=True, idle_since=float(k)) for k in range(4)]
    sessions = [session("rich", demand=10, created_at=1.0)]
    if with_starving:
        # ... and session "poor" (demand 5) with no instance at all
        sessions.append(session("poor", demand=5, created_at=2.0))
    return plan(sessions, [executor("e1", slots=4, used=4)], insts, now=NOW)


def test_starving_session_causes_a_drain_of_the_rich_session() -> None:
    actions = _contended(with_starving=True)
    drains = of(Drain, actions)
    # Then one of rich's instances is drained (share is 4 // 2 = 2, rich holds 4)
    assert len(drains) >= 1
    assert all(d.instance.startswith("r") for d in drains)
    assert not launches(actions)


def test_no_drain_without_a_starving_session() -> None:
    # Negative control: the same contended scenario minus the starving session
    assert _contended(with_starving=False) == []


def test_no_drain_when_the_starving_session_is_served_in_the_same_plan() -> None:
    # Given "rich" holds 3 of 4 slots (share is 4 // 2 = 2), one slot is free, and
    # "poor" has a single task and no instance
    insts = [instance(f"r{k}", session="rich", busy=True) for k in range(3)]
    sessions = [session("rich", demand=10, created_at=1.0), session("poor", demand=1, created_at=2.0)]
    # When planning
    actions = plan(sessions, [executor("e1", slots=4, used=3)], insts, now=NOW)
    # Then poor gets the free slot, which is all it can use, so nothing of rich's is drained
    assert Launch("poor", "e1") in actions
    assert of(Drain, actions) == []


def test_no_drain_when_nobody_is_above_share() -> None:
    insts = [instance("a1", session="a", busy=True), instance("a2", session="a", busy=True),
             instance("b1", session="b", busy=True), instance("b2", session="b", busy=True)]
    sessions = [session("a", demand=10), session("b", demand=10), session("c", demand=10)]
    # share = 4 // 3 = 1; a and b hold 2 each, c holds nothing -> one drain, never of c
    actions = plan(sessions, [executor("e1", slots=4, used=4)], insts, now=NOW)
    assert all(not d.instance.startswith("c") for d in of(Drain, actions))
    # and with exactly the share held by everyone, no drain
    sessions2 = [session("a", demand=10), session("b", demand=10)]
    assert plan(sessions2, [executor("e1", slots=4, used=4)], insts, now=NOW) == []


def test_contention_caps_each_session_at_its_share() -> None:
    # Given 4 free slots and two sessions wanting 10 each
    actions = plan([session("a", demand=10, created_at=1), session("b", demand=10, created_at=2)],
                   [executor("e1", slots=4)], [], now=NOW)
    # Then each gets its fair share of 2
    assert Counter(a.session for a in launches(actions)) == Counter({"a": 2, "b": 2})


# -- rule 6: idle timeout ---------------------------------------------------------------------------

def test_unbound_idle_instances_past_timeout_are_stopped_fresh_ones_kept() -> None:
    insts = [instance("old", idle_since=NOW - 61), instance("edge", idle_since=NOW - 60),
             instance("fresh", idle_since=NOW - 59), instance("new", idle_since=NOW)]
    actions = plan([], [executor("e1", used=4)], insts, now=NOW, idle_timeout=60)
    assert Counter(actions) == Counter([Stop("old"), Stop("edge")])


def test_idle_timeout_spares_bound_busy_and_unready_instances() -> None:
    insts = [instance("bound", session="s0", idle_since=0), instance("busy", busy=True, idle_since=0),
             instance("unready", ready=False, idle_since=0), instance("stopping", stopping=True, idle_since=0)]
    actions = plan([session("s0", demand=0)], [executor("e1", used=4)], insts, now=NOW, idle_timeout=10)
    assert actions == []


def test_reused_instance_is_not_also_stopped_for_idleness() -> None:
    insts = [instance("old", app="echo", idle_since=0)]
    actions = plan([session("s1", app="echo")], [executor("e1", used=1)], insts, now=NOW, idle_timeout=10)
    assert actions == [Rebind("old", "s1")]


# -- draining executors -----------------------------------------------------------------------------

def test_draining_executor_gets_no_launch() -> None:
    execs = [executor("d", slots=8, draining=True), executor("e1", slots=2, used=2)]
    assert plan([session("s1", demand=3)], execs, [], now=NOW) == []


def test_draining_executor_is_skipped_for_others() -> None:
    execs = [executor("d", slots=8, draining=True), executor("e1", slots=2)]
    actions = plan([session("s1", demand=5)], execs, [], now=NOW)
    assert actions and all(a == Launch("s1", "e1") for a in actions)
    assert not fits(session("s1"), execs[0])


# -- randomized properties --------------------------------------------------------------------------

def _random_world(rng: random.Random):
    apps = ["a", "b", "c"]
    zones = ["x", "y"]
    reqs = [Resources(), Resources(cpu=1), Resources(cpu=2, memory=GIB), Resources(gpu=1)]
    execs = []
    for k in range(rng.randint(0, 4)):
        slots = rng.randint(0, 4)
        execs.append(ExecutorView(f"e{k}", slots, 0, Resources(rng.choice([1, 2, 4, 8]), rng.choice([1, 4]) * GIB,
                                                              rng.randint(0, 2)),
                                  Resources(), {"zone": rng.choice(zones)}, rng.random() < 0.2))
    sessions = [SessionView(f"s{k}", rng.choice(apps), rng.randint(0, 6), rng.choice(reqs),
                            rng.choice([{}, {"zone": rng.choice(zones)}]), rng.choice([None, 1, 2, 3]),
                            float(rng.randint(0, 10))) for k in range(rng.randint(0, 5))]
    instances = []
    for ex in execs:
        for k in range(rng.randint(0, ex.slots)):
            sid = rng.choice([None, "gone"] + [s.id for s in sessions])
            instances.append(InstanceView(f"{ex.id}-i{k}", ex.id, rng.choice(apps), sid, rng.choice(reqs),
                                          ready=rng.random() < 0.8, busy=rng.random() < 0.4,
                                          draining=rng.random() < 0.15, stopping=rng.random() < 0.1,
                                          idle_since=float(rng.randint(0, 100))))
            ex.used_slots += 1
            ex.allocated = ex.allocated + instances[-1].resreq
    return sessions, execs, instances


@pytest.mark.parametrize("seed", range(10))
def test_plan_respects_free_slots_and_acts_once_per_instance(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        sessions, execs, instances = _random_world(rng)
        free = {e.id: e.slots - e.used_slots for e in execs}
        draining = {e.id for e in execs if e.draining}
        ids = {i.id for i in instances}
        actions = plan(sessions, execs, instances, now=100.0, idle_timeout=30.0)
        per_exec = Counter(a.executor for a in launches(actions))
        for ex_id, n in per_exec.items():
            assert n <= free[ex_id], (ex_id, n, free, actions)
            assert ex_id not in draining
        touched = [a.instance for a in actions if isinstance(a, (Rebind, Stop, Drain))]
        assert len(touched) == len(set(touched)), actions
        assert set(touched) <= ids
        wanted = {s.id: s for s in sessions}
        for a in launches(actions) + [a for a in actions if isinstance(a, Rebind)]:
            assert a.session in wanted and wanted[a.session].demand > 0


# -- an instance serves one owner for life ------------------------------------------------------

def test_an_idle_instance_of_another_owner_is_never_rebound_and_is_stopped_for_its_slot() -> None:
    # Given alice's idle instance holding the only slot, and a session of bob's with work
    execs = [executor("e1", slots=1, used=1)]
    idle = instance("i1", owner="alice", idle_since=0.0)
    # When planning
    actions = plan([session("bob-s", owner="bob")], execs, [idle], now=NOW, bind_grace=1.0)
    # Then alice's process is not handed to bob: it is stopped, freeing the slot for a new one
    assert of(Rebind, actions) == [] and of(Stop, actions) == [Stop("i1")]


def test_an_idle_instance_of_the_same_owner_is_reused() -> None:
    execs = [executor("e1", slots=1, used=1)]
    idle = instance("i1", owner="alice", idle_since=0.0)
    actions = plan([session("alice-s2", owner="alice")], execs, [idle], now=NOW, bind_grace=1.0)
    assert actions == [Rebind("i1", "alice-s2")]


def test_with_free_slots_another_owner_gets_a_new_instance_and_the_idle_one_is_left_alone() -> None:
    execs = [executor("e1", slots=2, used=1)]
    idle = instance("i1", owner="alice", idle_since=NOW - 2)
    actions = plan([session("bob-s", owner="bob")], execs, [idle], now=NOW, bind_grace=1.0)
    assert actions == [Launch("bob-s", "e1")]
