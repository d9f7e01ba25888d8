"""The manager's metrics: its core's counters and state as Prometheus text (``zmesh metrics``,
``GET /metrics``).  A read-only view; :mod:`mesh.ops.metrics` does the rendering."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from mesh.model.records import ALIVE, OPEN, PENDING, RUNNING
from mesh.ops.metrics import render


def metrics_text(core: Any, who: Any = None) -> str:
    """Every counter, gauge and histogram of a manager core, in the Prometheus text format.
    Series per session only for the sessions ``who`` (a Principal) may change; all without ``who``."""
    now, store_backlog = core.now, core.store_backlog
    Series = List[Tuple[str, str, Dict[str, str], float]]
    counters: Series = [(f"zeromesh_{k}_total", f"manager counter {k}", {}, v) for k, v in sorted(core.stats.items())]
    by_state: Dict[str, int] = {}
    for s in core.sessions.values():
        for state, n in s.counts.items():
            by_state[state] = by_state.get(state, 0) + n
    counters += [("zeromesh_tasks_total", "tasks that ended, by state", {"state": k}, v)
                 for k, v in sorted(by_state.items())]
    sessions = list(core.sessions.values())
    gauges: Series = [
        ("zeromesh_tasks", "tasks in the manager now, by state", {"state": PENDING}, sum(len(s.pending) for s in sessions)),
        ("zeromesh_tasks", "tasks in the manager now, by state", {"state": RUNNING}, sum(s.running for s in sessions)),
        ("zeromesh_sessions_open", "open sessions", {}, sum(1 for s in sessions if s.state == OPEN)),
        ("zeromesh_instances", "service instances", {}, len(core.instances)),
        ("zeromesh_store_backlog", "group commits waiting for the writer thread", {}, store_backlog)]
    gauges += [("zeromesh_session_queue_depth", "tasks queued per open session", {"session": s.id},
                len(s.pending)) for s in sessions if s.state == OPEN and (who is None or who.may_touch(s.owner))]
    gauges += [("zeromesh_executor_up", "1 if the executor is alive", {"executor": e.id},
                1 if e.state == ALIVE else 0) for e in core.executors.values()]
    gauges += [("zeromesh_executor_silence_seconds", "seconds since the executor was last heard",
                {"executor": e.id}, round(now - e.last_seen, 3)) for e in core.executors.values()]
    return render(counters, gauges, [("zeromesh_task_latency_seconds", "submit to answer", core.latency)])
