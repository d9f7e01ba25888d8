"""The manager's throughput with and without an open dashboard, in one run (docs/dashboard.md).

One local mesh; the same burst of small tasks is timed three times without a dashboard, then three
times with a dashboard process reading the mesh and five browsers' event streams open on it (what a
page holds), then three times without again.  Prints tasks per second for each phase and the manager
requests the dashboard made per second.

    PYTHONPATH=. python scripts/bench_dashboard.py [--tasks 5000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "apps")]

from client import Session  # noqa: E402
from client.local import LocalMesh, end_process  # noqa: E402
from mesh.testing import FAST  # noqa: E402


def burst(endpoint: str, n: int) -> float:
    with Session("tools", manager=endpoint) as s:
        s.submit(("echo", 0)).result(60)          # instances up before the clock starts
        t0 = time.perf_counter()
        futures = [s.submit(("echo", i)) for i in range(n)]
        for f in futures:
            f.result(120)
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from test_dashboard import start_dashboard   # the tests' launcher: reads the printed address
    from conftest import tools_spec
    with LocalMesh(executors=2, slots=2, env=FAST) as m:
        with m.client() as c:
            c.register_application(tools_spec())
        phases = {}
        phases["without (before)"] = [burst(m.endpoint, args.tasks) for _ in range(args.rounds)]
        proc, url = start_dashboard(m, interval=1.0)
        stop = threading.Event()
        streams = [urllib.request.urlopen(url + "/api/events", timeout=30) for _ in range(5)]

        def drain(r):  # read what the page would read, until told to stop
            try:
                while not stop.is_set() and r.readline():
                    pass
            except (OSError, AttributeError, ValueError):   # closed under it at the end
                pass
        readers = [threading.Thread(target=drain, args=(r,), daemon=True) for r in streams]
        for t in readers:
            t.start()
        try:
            with m.client() as c:
                r0, t0 = c.stats()["requests"], time.monotonic()
                phases["with a dashboard, 5 pages open"] = [burst(m.endpoint, args.tasks) for _ in range(args.rounds)]
                reqs = (c.stats()["requests"] - r0) / (time.monotonic() - t0)
        finally:
            stop.set()
            for r in streams:
                r.close()
            end_process(proc)
        phases["without (after)"] = [burst(m.endpoint, args.tasks) for _ in range(args.rounds)]
    print(f"{args.tasks} echo tasks per round, {args.rounds} rounds, 2 executors x 2 slots, one machine")
    for name, rates in phases.items():
        print(f"  {name:34s} median {statistics.median(rates):8.0f} tasks/s  (rounds: {', '.join(f'{r:.0f}' for r in rates)})")
    print(f"  management requests during the dashboard phase: {reqs:.1f}/s (the sampler's and the bench's own)")


if __name__ == "__main__":
    main()
