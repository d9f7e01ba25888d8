"""One snapshot of the mesh per interval, shared by every open page: the dashboard's bounded read rate.

Whatever the number of browsers, the manager sees the same five management calls per interval
(``stats``, ``metrics``, ``find_executors``, ``find_sessions`` of the open ones, ``find_applications``)
from the dashboard's own connection.  The arithmetic (Prometheus text, rates, latency quantiles from
histogram deltas) is pure functions below, tested without a mesh; :class:`Sampler` only calls and keeps.

A snapshot holds nothing a logged-in viewer may not read: counters, executors, applications and
per-application throughput, never another user's session list (sessions are read with the person's
own login, see server.py).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

from mesh.errors import MeshError

HISTORY = 300          # points kept for the charts: five minutes at one per second
LATENCY_WINDOW = 10    # snapshots over which p50/p99 are taken (a quantile of one second's tasks is noise)
MAX_ROWS = 1000        # executors / applications / open sessions read per snapshot

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> List[Tuple[str, Dict[str, str], float]]:
    """Prometheus text exposition as (name, labels, value) samples; comments and junk lines skipped."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        out.append((m.group(1), dict(_LABEL.findall(m.group(3) or "")), value))
    return out


def histogram(samples: List[Tuple[str, Dict[str, str], float]], name: str) -> List[Tuple[float, float]]:
    """Cumulative buckets of histogram ``name`` as sorted (upper bound, count), +Inf last."""
    buckets = [(float(labels["le"]), v) for n, labels, v in samples if n == name + "_bucket" and "le" in labels]
    return sorted(buckets)


def quantile(before: List[Tuple[float, float]], after: List[Tuple[float, float]], q: float) -> Optional[float]:
    """The q-quantile of the observations made between two readings of a cumulative histogram: the
    upper bound of the bucket that holds it (as ``mesh.ops.metrics.Histogram.quantile``), ``None``
    when nothing was observed.  An observation past the last finite bound reports that bound."""
    old = dict(before)
    deltas = [(le, count - old.get(le, 0.0)) for le, count in after]
    total = deltas[-1][1] if deltas else 0.0
    if total <= 0:
        return None
    rank = q * total
    finite = [le for le, _ in deltas if not math.isinf(le)]
    for le, seen in deltas:
        if seen >= rank:
            return le if not math.isinf(le) else (finite[-1] if finite else None)
    return finite[-1] if finite else None


@dataclasses.dataclass
class Reading:
    """What one interval's calls returned (plain data: the sampler's input)."""
    at: float
    stats: Dict[str, Any]
    samples: List[Tuple[str, Dict[str, str], float]]
    executors: List[Dict[str, Any]]
    sessions: List[Dict[str, Any]]       # open sessions (for the per-application throughput only)
    applications: List[Dict[str, Any]]


def counters(r: Reading) -> Dict[str, float]:
    """Overview counters: executors, instances, open sessions, tasks queued/running/succeeded/failed."""
    out = {"executors": float(r.stats.get("executors", len(r.executors))), "instances": float(r.stats.get("instances", 0)),
           "sessions_open": float(r.stats.get("sessions", 0)), "queued": 0.0, "running": 0.0, "succeeded": 0.0,
           "failed": 0.0, "cancelled": 0.0, "finished": float(r.stats.get("tasks_finished", 0))}
    for name, labels, value in r.samples:
        state = labels.get("state")
        if name == "zeromesh_tasks" and state in ("pending", "running"):
            out["queued" if state == "pending" else "running"] = value
        elif name == "zeromesh_tasks_total" and state in ("succeeded", "failed", "cancelled"):
            out[state] = value
        elif name == "zeromesh_sessions_open":
            out["sessions_open"] = value
    return out


def per_application(sessions: List[Dict[str, Any]]) -> Dict[str, float]:
    """Tasks finished so far in the open sessions, by application."""
    out: Dict[str, float] = collections.defaultdict(float)
    for s in sessions:
        out[s["application"]] += s.get("succeeded", 0) + s.get("failed", 0)
    return dict(out)


class History:
    """The snapshots' series for the charts and the rates, bounded to :data:`HISTORY` points."""

    def __init__(self) -> None:
        self.readings: Deque[Reading] = collections.deque(maxlen=LATENCY_WINDOW + 1)
        self.series: Dict[str, Deque[Optional[float]]] = {k: collections.deque(maxlen=HISTORY)
                                                          for k in ("t", "rate", "p50", "p99")}

    def add(self, r: Reading) -> Dict[str, Any]:
        """Take one reading; return the snapshot the pages show."""
        prev = self.readings[-1] if self.readings else None
        self.readings.append(r)
        now = counters(r)
        rate = 0.0
        if prev is not None and r.at > prev.at:
            rate = max(0.0, now["finished"] - counters(prev)["finished"]) / (r.at - prev.at)
        oldest = self.readings[0]
        lat_before = histogram(oldest.samples, "zeromesh_task_latency_seconds") if oldest is not r else []
        lat_now = histogram(r.samples, "zeromesh_task_latency_seconds")
        p50, p99 = quantile(lat_before, lat_now, 0.5), quantile(lat_before, lat_now, 0.99)
        for key, value in (("t", r.at), ("rate", rate), ("p50", p50), ("p99", p99)):
            self.series[key].append(value)
        apps = per_application(r.sessions)
        apps_before = per_application(oldest.sessions) if oldest is not r else apps
        span = max(r.at - oldest.at, 1e-9)
        applications = []
        for a in r.applications:
            done = apps.get(a["name"], 0.0)
            gained = max(0.0, done - apps_before.get(a["name"], 0.0)) if oldest is not r else 0.0
            applications.append({**a, "tasks_per_second": round(gained / span, 3),
                                 "open_sessions": sum(1 for s in r.sessions if s["application"] == a["name"])})
        return {"at": r.at, "error": None, "counters": now, "tasks_per_second": round(rate, 3),
                "latency": {"p50": p50, "p99": p99, "window_seconds": round(r.at - oldest.at, 3)},
                "history": {k: list(v) for k, v in self.series.items()},
                "executors": r.executors, "applications": applications}


def _rows(page: Any) -> List[Dict[str, Any]]:
    return [dataclasses.asdict(x) for x in page]


class Sampler:
    """Reads the mesh through one client, at most once per ``interval``, and keeps the last snapshot."""

    def __init__(self, client: Any, interval: float = 1.0) -> None:
        self.client = client
        self.interval = interval
        self.history = History()
        self.latest: Dict[str, Any] = {"at": 0.0, "error": None, "counters": {}, "history": {}, "executors": [],
                                       "applications": [], "tasks_per_second": 0.0, "latency": {}}
        self.reads = 0          # management calls made, for the docs' overhead figure and the tests

    def read(self) -> Reading:
        c, page = self.client, {"limit": MAX_ROWS, "offset": 0}
        stats = c.stats()
        text = c.metrics()
        executors = _rows(c.find_executors(page=page, sort={"by": "id", "order": "ascending"}))
        sessions = _rows(c.find_sessions(filter={"state": "open"}, page=page))
        applications = _rows(c.find_applications(page=page, sort={"by": "name", "order": "ascending"}))
        self.reads += 5
        return Reading(time.time(), stats, parse_metrics(text), executors, sessions, applications)

    def sample(self) -> Dict[str, Any]:
        """One round of reads (blocking: run it off the event loop); a failure is kept in the snapshot
        as ``error`` with the last good figures, so a page says why it stopped moving."""
        try:
            self.latest = self.history.add(self.read())
        except MeshError as exc:
            self.latest = {**self.latest, "at": time.time(), "error": {"code": exc.code, "message": str(exc)}}
        return self.latest
