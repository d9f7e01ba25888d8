"""Counters, gauges and histograms, rendered in the Prometheus text format.

Small on purpose: the manager updates plain numbers on its hot path and this
module only turns them into text when someone asks (``zmesh metrics``, or
HTTP ``GET /metrics`` with ``--metrics-port``).
"""
from __future__ import annotations

import bisect
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

# seconds from submit to answer: 100 µs .. 1 min
LATENCY_BUCKETS: Tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                      0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile (what a dashboard would show)."""
        if not self.count:
            return 0.0
        rank, seen = q * self.count, 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return self.buckets[i] if i < len(self.buckets) else float("inf")
        return float("inf")

    def snapshot(self) -> Dict[str, object]:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum, "count": self.count}


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(counters: Iterable[Tuple[str, str, Mapping[str, str], float]],
           gauges: Iterable[Tuple[str, str, Mapping[str, str], float]],
           histograms: Iterable[Tuple[str, str, Histogram]]) -> str:
    """Prometheus exposition format 0.0.4.  Each input: (name, help, labels, value)."""
    lines: List[str] = []
    for kind, series in (("counter", counters), ("gauge", gauges)):
        seen = set()
        for name, help_, labels, value in series:
            if name not in seen:
                seen.add(name)
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            lines.append(f"{name}{_labels(labels)} {value}")
    for name, help_, h in histograms:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        running = 0
        for bound, c in zip(list(h.buckets) + [float("inf")], h.counts):
            running += c
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{le="{le}"}} {running}')
        lines += [f"{name}_sum {h.sum}", f"{name}_count {h.count}"]
    return "\n".join(lines) + "\n"

