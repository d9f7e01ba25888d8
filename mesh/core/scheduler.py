"""Placement policy: which sessions get instances on which executors.

Plain functions over plain data, so every decision is testable without a
socket.  The manager builds views of its state, calls :func:`plan`, and carries
out the returned actions.  Per-task dispatch (credit) is not decided here: it
is a hot-path detail of the manager; this module only decides *where
instances live and whom they serve*.

Rules, in order of priority:

1. A session with work gets instances up to its demand (pending + running
   tasks), its app's ``max_instances`` and, when slots are contended, its fair
   share of the slots.
2. An instance is reused before a new one is launched: an idle instance of the
   same application *and the same owner* is rebound to the session (no process
   start).  An instance serves one owner for its whole life, so a process one
   user's task may have changed never sees another user's requests or context.
3. A free slot on an executor that fits (labels, resources) gets a new instance.
4. With no free slot, an idle instance of another application (or owner) is
   stopped so that its slot can be reused.
5. A session below its fair share while another holds more than its share gets
   one of the other's instances drained (no new credit; rebound once idle), so
   no session waits forever behind a busy one.
6. Instances bound to no session and idle past ``idle_timeout`` are stopped.
7. An idle instance stays with its session for ``bind_grace`` seconds before it
   counts as spare, so a session that invokes one task at a time keeps it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

from mesh.model.resources import Resources


@dataclass
class ExecutorView:
    id: str
    slots: int
    used_slots: int = 0
    capacity: Resources = field(default_factory=Resources)
    allocated: Resources = field(default_factory=Resources)
    labels: Dict[str, str] = field(default_factory=dict)
    draining: bool = False

    @property
    def free(self) -> Resources:
        return self.capacity - self.allocated


@dataclass
class InstanceView:
    id: str
    executor: str
    app: str
    session: Optional[str]
    resreq: Resources = field(default_factory=Resources)
    ready: bool = False      # said hello; not yet ready instances still count as owned
    busy: bool = False       # has tasks in flight
    draining: bool = False   # gets no new tasks; will be rebound once idle
    stopping: bool = False   # told to stop; its slot is freed when it exits
    idle_since: float = 0.0
    owner: str = ""          # the user or robot it serves for life


@dataclass
class SessionView:
    id: str
    app: str
    demand: int              # pending + running tasks
    resreq: Resources = field(default_factory=Resources)
    labels: Dict[str, str] = field(default_factory=dict)
    max_instances: Optional[int] = None
    created_at: float = 0.0
    owner: str = ""


@dataclass(frozen=True)
class Launch:
    session: str
    executor: str


@dataclass(frozen=True)
class Rebind:
    instance: str
    session: Optional[str]


@dataclass(frozen=True)
class Stop:
    instance: str


@dataclass(frozen=True)
class Drain:
    instance: str


Action = Union[Launch, Rebind, Stop, Drain]


def fits(session: SessionView, executor: ExecutorView) -> bool:
    """Can ``executor`` host one more instance for ``session``?"""
    if executor.draining or executor.used_slots >= executor.slots:
        return False
    if any(executor.labels.get(k) != v for k, v in session.labels.items()):
        return False
    return session.resreq.fits(executor.free)


def _labels_match(session: SessionView, executor: ExecutorView) -> bool:
    return all(executor.labels.get(k) == v for k, v in session.labels.items())


def plan(sessions: List[SessionView], executors: List[ExecutorView], instances: List[InstanceView],
         now: float = 0.0, idle_timeout: float = 60.0, bind_grace: float = 0.0) -> List[Action]:
    actions: List[Action] = []
    execs = {e.id: e for e in executors}
    live = [i for i in instances if not i.stopping]
    owned: Dict[str, List[InstanceView]] = {}
    for inst in live:
        if inst.session is not None and not inst.draining:
            owned.setdefault(inst.session, []).append(inst)
    wanting = sorted((s for s in sessions if s.demand > 0),
                     key=lambda s: (len(owned.get(s.id, ())), s.created_at, s.id))
    wanted_ids = {s.id for s in wanting}
    total_slots = sum(e.slots for e in executors if not e.draining)
    need = sum(min(s.demand, s.max_instances or s.demand) for s in wanting)
    contended = need > total_slots
    share = max(1, total_slots // max(1, len(wanting)))

    # Idle instances that serve nobody with work: the pool we reuse or reclaim.
    # (an instance stays with its session for ``bind_grace`` after its last task: a client that
    # invokes one task at a time keeps its instance between calls instead of losing it to a burst)
    spare = [i for i in live if i.ready and not i.busy
             and (i.session is None or i.draining
                  or (i.session not in wanted_ids and now - i.idle_since >= bind_grace))]
    spare.sort(key=lambda i: (i.session is not None, i.idle_since))
    taken: set = set()

    given: Dict[str, int] = {}   # instances this call gives each session (rebinds, launches, slots freed)
    for s in wanting:
        have = len(owned.get(s.id, ()))
        target = min(s.demand, s.max_instances or s.demand)
        if contended:
            target = min(target, share)
        want = target - have
        while want > 0:
            reuse = next((i for i in spare if i.id not in taken and i.app == s.app and i.resreq == s.resreq
                          and i.owner == s.owner and i.executor in execs and not execs[i.executor].draining
                          and _labels_match(s, execs[i.executor])), None)
            if reuse is not None:
                taken.add(reuse.id)
                actions.append(Rebind(reuse.id, s.id))
                want -= 1
                given[s.id] = given.get(s.id, 0) + 1
                continue
            hosts = [e for e in executors if fits(s, e)]
            if hosts:
                host = max(hosts, key=lambda e: (e.slots - e.used_slots, e.id))
                host.used_slots += 1
                host.allocated = host.allocated + s.resreq
                actions.append(Launch(s.id, host.id))
                want -= 1
                given[s.id] = given.get(s.id, 0) + 1
                continue
            victim = next((i for i in spare if i.id not in taken and i.executor in execs
                           and _labels_match(s, execs[i.executor])), None)
            if victim is not None:
                taken.add(victim.id)
                actions.append(Stop(victim.id))
                want -= 1  # the slot comes back when the instance exits; count it as given
                given[s.id] = given.get(s.id, 0) + 1
                continue
            break

    if contended:
        for s in wanting:
            if len(owned.get(s.id, ())) + given.get(s.id, 0) >= min(share, s.demand):
                continue
            rich = max(owned.items(), key=lambda kv: len(kv[1]), default=None)
            if rich is None or len(rich[1]) <= share or rich[0] == s.id:
                continue
            victim = min(rich[1], key=lambda i: (i.busy, i.idle_since))
            if victim.id not in taken:
                taken.add(victim.id)
                rich[1].remove(victim)
                actions.append(Drain(victim.id))

    for inst in spare:
        if inst.id not in taken and inst.session is None and now - inst.idle_since >= idle_timeout:
            actions.append(Stop(inst.id))
    return actions
