"""The hot path against its limit, run after run: no-op task throughput and one-task latency.

The mesh is the one issue 10 measures: a manager and 2 executors x 1 slot on
loopback, the no-op service (scripts/bench_apps/noop_service.py).  Each run,
interleaved with the raw-pyzmq limit (scripts/bench_limit.py: a ROUTER broker
with credit, 2 DEALER workers) so that both see the same machine (the limit
runs once the manager's writer has caught up, not while it still writes):

* throughput: ``--tasks`` no-op tasks streamed with ``--window`` in flight;
  the limit streams for as long as zeromesh took (at least 1 s);
* latency: ``--latency`` tasks one at a time (``Session.invoke``), p50 and p99.

Reported: each figure as min / median / max over ``--runs``, and the ratios
zeromesh / limit per run (throughput: higher is better; latency: lower).
With ``--json`` the per-run figures are written too.

Usage: python scripts/bench_hotpath.py [--runs 6] [--tasks 20000] [--window 2000] [--latency 500]
                                      [--quick] [--silent] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_limit  # noqa: E402
from bench import stream_count as stream  # noqa: E402  (count tasks, window in flight -> seconds)

from client import Client, Session  # noqa: E402
from client.local import LocalMesh  # noqa: E402

NOOP = {"metadata": {"name": "noop"},
        "spec": {"working_directory": os.path.join(HERE, "bench_apps"), "command": sys.executable,
                 "arguments": ["noop_service.py"]}}
RESULT_WAIT = 60.0


def latency(session: Session, count: int) -> Dict[str, Any]:
    samples: List[float] = []
    for i in range(count + 50):
        t = time.perf_counter_ns()
        session.invoke(None, timeout=RESULT_WAIT)
        if i >= 50:
            samples.append((time.perf_counter_ns() - t) / 1000.0)
    return bench_limit.percentiles(samples)


def warm(client: Client, session: Session, instances: int, window: int) -> None:
    """Stream until ``instances`` instances serve the session (bounded)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stream(session, 2 * window, window)
        if client.stats().get("instances", 0) >= instances:
            stream(session, 2 * window, window)
            return
    raise RuntimeError(f"fewer than {instances} instances after 60 s")


def settle(client: Client, timeout: float = 30.0) -> None:
    """Wait until the manager's writer has caught up, so the limit runs on an idle machine."""
    deadline = time.monotonic() + timeout
    while client.stats().get("store_backlog", 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)   # the last commit's tail; a benchmark pause, not a test's wait


def spread(xs: List[float]) -> str:
    return f"{min(xs):,.2f} / {statistics.median(xs):,.2f} / {max(xs):,.2f}"


def main(argv: Any = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--window", type=int, default=2000)
    ap.add_argument("--latency", type=int, default=500, help="one-at-a-time tasks per run")
    ap.add_argument("--json", help="also write every run's figures here")
    ap.add_argument("--quick", action="store_true", help="1 run of 2,000 tasks and 30 invokes (for tests)")
    ap.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    opts = ap.parse_args(argv)
    if opts.quick:
        opts.runs, opts.tasks, opts.latency = 1, 2000, 30
    runs: List[Dict[str, Any]] = []
    env = {"ZMESH_LOG_LEVEL": "WARNING"}
    with tempfile.TemporaryDirectory(prefix="zmesh-hot-") as logs, \
            LocalMesh(executors=2, slots=1, env=env, log_dir=logs) as m, Client(m.endpoint) as c:
        c.register_application(NOOP)
        with Session("noop", manager=m.endpoint) as s:
            warm(c, s, 2, opts.window)
            for i in range(opts.runs):
                took = stream(s, opts.tasks, opts.window)
                mine = opts.tasks / took
                settle(c)
                raw = bench_limit.throughput(workers=2, seconds=max(1.0, took), window=opts.window, credit=100)
                lat = latency(s, opts.latency)
                raw_lat = bench_limit.latency(workers=2, count=opts.latency)
                run = {"tasks_per_s": round(mine), "limit_tasks_per_s": raw["tasks_per_s"],
                       "throughput_ratio": round(mine / raw["tasks_per_s"], 3),
                       "p50_us": lat["p50_us"], "p99_us": lat["p99_us"],
                       "limit_p50_us": raw_lat["p50_us"], "limit_p99_us": raw_lat["p99_us"],
                       "p50_ratio": round(lat["p50_us"] / raw_lat["p50_us"], 3),
                       "p99_over_p50": round(lat["p99_us"] / lat["p50_us"], 3)}
                runs.append(run)
                if not opts.silent:
                    print(f"run {i + 1}: {run}", file=sys.stderr, flush=True)
    col = {k: [r[k] for r in runs] for k in runs[0]}
    summary = {k: {"min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in col.items()}
    print(f"{opts.runs} runs of {opts.tasks:,} no-op tasks (window {opts.window}) on 2 executors x 1 slot; "
          f"min / median / max")
    for k in ("tasks_per_s", "limit_tasks_per_s", "throughput_ratio", "p50_us", "limit_p50_us", "p50_ratio",
              "p99_us", "p99_over_p50"):
        print(f"  {k:18} {spread(col[k])}")
    low = min(col["tasks_per_s"]) / statistics.median(col["tasks_per_s"])
    print(f"  slowest run / median throughput: {low:.2f}")
    result = {"runs": runs, "summary": summary}
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
