"""Streaming and the asyncio client against the raw-pyzmq limit, with Ray's streaming generators as the peer.

One mesh (client.local.LocalMesh: a manager and 2 executors x 2 slots, default settings, loopback)
serves two applications: the streaming test service (tests/apps/stream_service.py, one instance
in use) and the no-op service (scripts/bench_apps/noop_service.py, an AsyncSession with
``max_instances=2``).  Each run, interleaved with the limit so that both see the same machine:

* one stream.  Time to first part: ``--first`` streams of 8 parts, one after another, from
  calling ``Session.stream()`` to its first part (the instance is warm), p50.  Parts/s: one
  stream of ``--parts`` small parts (``part-<i>``, about 25 bytes pickled), from ``stream()`` to
  the end.  The limit (bench_limit.stream): the same shape in raw pyzmq (client DEALER ->
  ROUTER broker -> 1 DEALER worker and back), one message per part, the same credit window
  (``stream_window``, 64) granted end to end as the client takes parts.
* AsyncSession.  Throughput: ``--calls`` ``await s.invoke()`` through one ``asyncio.gather`` of
  ``--window`` coroutines that each await their share in turn (so ``--window`` in flight); latency: ``--latency`` sequential
  ``await s.invoke()``, p50.  The limit: bench_limit.throughput (2 workers, the same window,
  streaming for as long as zeromesh took, at least 1 s) and bench_limit.latency (as
  scripts/bench_hotpath.py measures the synchronous client).

Ratios are zeromesh / limit per run (parts/s, tasks/s: higher is better; time to first part,
p50: lower is better), reported as min / median / max over ``--runs``.

Ray (after zeromesh, every zeromesh process stopped; ``--no-ray`` skips it): a
``@ray.remote(num_returns="streaming")`` generator of the same parts, with
``_generator_backpressure_num_objects`` set to the same window, in a child process with a time
budget (bench_peers.run_child; SIGTERM, then SIGKILL, by PID): ``ray.init(num_cpus=2)``, then
per run the time to the first part (``ray.get(next(gen))`` from ``.remote()``, ``--first``
streams of 8 parts, p50) and parts/s of one ``--parts`` stream.  Its ratios are zeromesh / Ray
on the medians.  Without Ray it is reported ``ray: not installed`` with the reason.

Usage: python scripts/bench_streaming.py [--runs 5] [--parts 20000] [--calls 20000] [--window 2000]
                                        [--latency 500] [--first 100] [--no-ray] [--quick] [--silent]
                                        [--json PATH]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_limit  # noqa: E402
import bench_peers  # noqa: E402
from bench import _table, exit_on_sigterm, noop_spec, parse_sized, sayer, write_json  # noqa: E402
from bench_hotpath import settle  # noqa: E402
from bench_runner import ratio, summary  # noqa: E402

from client import Client, Session  # noqa: E402
from client.aio import AsyncSession  # noqa: E402
from client.local import LocalMesh  # noqa: E402
from mesh.ops.config import Settings  # noqa: E402

STREAM_APPS = os.path.join(ROOT, "tests", "apps")
RESULT_WAIT = 60.0           # seconds one part may take before the run is declared broken
PHASE_WAIT = 120.0           # seconds an async phase (all its invokes) may take
WARMUP_LIMIT = 60.0          # seconds the instances have to start and serve
FIRST_PARTS = 8              # parts of each time-to-first-part stream
WARM_CALLS = 50              # sequential awaits before the latency samples
RAY_BUDGET = {"full": 300.0, "quick": 90.0}   # seconds for the Ray subprocess
FULL = {"runs": 5, "parts": 20_000, "calls": 20_000, "window": 2000, "latency": 500, "first": 100}
QUICK = {"runs": 1, "parts": 2_000, "calls": 2_000, "window": 500, "latency": 30, "first": 10}


class BenchError(RuntimeError):
    pass


def part_size(parts: int) -> int:
    """Bytes of a typical pickled part of a ``parts``-part stream (the raw limit sends this many)."""
    return len(pickle.dumps(f"part-{parts // 2}", protocol=pickle.HIGHEST_PROTOCOL))


# -- zeromesh: one stream ------------------------------------------------------------------
def one_stream(session: Session, n: int) -> tuple:
    """(seconds from ``stream()`` to its first part, seconds to its end) of an ``n``-part stream."""
    t0 = time.perf_counter()
    first: Optional[float] = None
    got = 0
    with session.stream({"n": n}, timeout=RESULT_WAIT) as parts:
        for _ in parts:
            if first is None:
                first = time.perf_counter() - t0
            got += 1
    took = time.perf_counter() - t0
    if got != n or first is None:
        raise BenchError(f"{got} parts of {n} arrived")
    return first, took


def mesh_stream(session: Session, parts: int, first: int) -> Dict[str, Any]:
    samples = [one_stream(session, FIRST_PARTS)[0] * 1e6 for _ in range(first)]
    _, took = one_stream(session, parts)
    ttfp = bench_limit.percentiles(samples)
    return {"parts_per_s": round(parts / took, 1), "first_p50_us": ttfp["p50_us"], "first_p99_us": ttfp["p99_us"]}


# -- zeromesh: the asyncio client ---------------------------------------------------------
async def aio_throughput(s: AsyncSession, calls: int, window: int) -> float:
    """Seconds for ``calls`` no-op ``await s.invoke()`` through one gather of ``window`` coroutines,
    each awaiting its share one after another (so at most ``window`` in flight).  Not an
    ``asyncio.Semaphore`` over ``calls`` coroutines: on Python 3.11 its release scans every woken
    waiter (``_wake_up_next``), quadratic in the waiters, which cost more than the invokes here."""
    left = [calls]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await s.invoke(None)   # no per-call timeout (a wait_for task each): the phase is bounded

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(min(window, calls)))), PHASE_WAIT)
    return time.perf_counter() - t0


async def aio_latency(s: AsyncSession, count: int) -> Dict[str, Any]:
    """``count`` sequential ``await s.invoke()`` after WARM_CALLS, the whole bounded by PHASE_WAIT."""
    samples: List[float] = []

    async def run() -> None:
        for i in range(WARM_CALLS + count):
            t = time.perf_counter_ns()
            await s.invoke(None)
            if i >= WARM_CALLS:
                samples.append((time.perf_counter_ns() - t) / 1000.0)

    await asyncio.wait_for(run(), PHASE_WAIT)
    return bench_limit.percentiles(samples)


async def aio_warm(s: AsyncSession, instances: int, window: int) -> int:
    """Bursts until ``instances`` instances serve the session (bounded); how many do."""
    deadline = time.monotonic() + WARMUP_LIMIT
    n = 0
    while time.monotonic() < deadline:
        await aio_throughput(s, 2 * window, window)
        n = (await s.info()).get("instances", 0)
        if isinstance(n, list):
            n = len(n)
        if n >= instances:
            await aio_throughput(s, 2 * window, window)
            return n
    raise BenchError(f"{n} of {instances} instances serve the async session after {WARMUP_LIMIT:.0f}s")


def measure_zeromesh(opts: argparse.Namespace, say: Callable[[str], None]) -> List[Dict[str, Any]]:
    runs: List[Dict[str, Any]] = []
    size = part_size(opts.parts)
    window = Settings().stream_window
    env = {"ZMESH_LOG_LEVEL": "WARNING"}
    loop = asyncio.new_event_loop()
    try:
        with tempfile.TemporaryDirectory(prefix="zmesh-sbench-") as logs, \
                LocalMesh(executors=2, slots=2, env=env, log_dir=logs) as m, Client(m.endpoint) as c:
            c.register_application(noop_spec())
            c.register_application(noop_spec("stream", working_directory=STREAM_APPS,
                                             arguments=["stream_service.py"]))
            a = AsyncSession("noop", manager=m.endpoint, max_instances=2)
            loop.run_until_complete(a.open())
            try:
                with Session("stream", manager=m.endpoint, max_instances=1) as s:
                    say("warming up: the stream instance and 2 no-op instances ...")
                    one_stream(s, 1000)
                    instances = loop.run_until_complete(aio_warm(a, 2, opts.window))
                    for i in range(opts.runs):
                        zs = mesh_stream(s, opts.parts, opts.first)
                        settle(c)
                        ls = bench_limit.stream(parts=opts.parts, window=window, payload=size,
                                                first_count=opts.first, first_parts=FIRST_PARTS)
                        took = loop.run_until_complete(aio_throughput(a, opts.calls, opts.window))
                        settle(c)
                        lt = bench_limit.throughput(workers=2, seconds=max(1.0, took), window=opts.window,
                                                    credit=100)
                        zl = loop.run_until_complete(aio_latency(a, opts.latency))
                        ll = bench_limit.latency(workers=2, count=opts.latency)
                        aio_tps = opts.calls / took
                        run = {"stream_parts_per_s": zs["parts_per_s"], "limit_parts_per_s": ls["parts_per_s"],
                               "parts_ratio": ratio(zs["parts_per_s"], ls["parts_per_s"]),
                               "first_part_p50_us": zs["first_p50_us"], "limit_first_p50_us": ls["first_p50_us"],
                               "first_part_ratio": ratio(zs["first_p50_us"], ls["first_p50_us"]),
                               "first_part_p99_us": zs["first_p99_us"],
                               "aio_tasks_per_s": round(aio_tps, 1), "limit_tasks_per_s": lt["tasks_per_s"],
                               "aio_throughput_ratio": ratio(aio_tps, lt["tasks_per_s"]),
                               "aio_p50_us": zl["p50_us"], "limit_p50_us": ll["p50_us"],
                               "aio_p50_ratio": ratio(zl["p50_us"], ll["p50_us"]),
                               "aio_p99_us": zl["p99_us"], "async_instances": instances}
                        runs.append(run)
                        say(f"run {i + 1}/{opts.runs}: {run}")
            finally:
                loop.run_until_complete(a.close())
    finally:
        loop.close()
    return runs


# -- Ray (in its own process) -------------------------------------------------------------
def ray_runs(ray: Any, runs: int, parts: int, first: int, window: int,
             report: Callable[[Dict[str, Any]], None]) -> None:
    res: Dict[str, Any] = {"available": True, "version": ray.__version__, "num_cpus": 2,
                           "backpressure": window, "runs": []}
    report(res)
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        res["init_s"] = round(time.perf_counter() - t0, 3)

        @ray.remote(num_returns="streaming", _generator_backpressure_num_objects=window)
        def gen_parts(n: int) -> Any:
            for i in range(n):
                yield f"part-{i}"

        def one(n: int) -> tuple:
            t = time.perf_counter()
            g = gen_parts.remote(n)
            got, first_s = 0, None
            for ref in g:
                ray.get(ref, timeout=RESULT_WAIT)
                if first_s is None:
                    first_s = time.perf_counter() - t
                got += 1
            if got != n or first_s is None:
                raise BenchError(f"{got} Ray parts of {n}")
            return first_s, time.perf_counter() - t

        one(1000)   # a worker started, the function exported
        for _ in range(runs):
            samples = [one(FIRST_PARTS)[0] * 1e6 for _ in range(first)]
            _, took = one(parts)
            ttfp = bench_limit.percentiles(samples)
            res["runs"].append({"parts_per_s": round(parts / took, 1), "first_part_p50_us": ttfp["p50_us"],
                                "first_part_p99_us": ttfp["p99_us"]})
            report(res)
    finally:
        ray.shutdown()


def ray_child(opts: argparse.Namespace) -> int:
    return bench_peers.child_main(opts.ray_child, [opts.ray_module],
                                  lambda report: ray_runs(sys.modules[opts.ray_module], opts.runs, opts.parts,
                                                          opts.first, Settings().stream_window, report))


def measure_ray(opts: argparse.Namespace, log_dir: str) -> Dict[str, Any]:
    budget = RAY_BUDGET["quick" if opts.quick else "full"]
    out, log_path = os.path.join(log_dir, "ray.json"), os.path.join(log_dir, "ray.log")
    args = [sys.executable, os.path.abspath(__file__), "--ray-child", out, "--ray-module", opts.ray_module,
            "--runs", str(opts.runs), "--parts", str(opts.parts), "--first", str(opts.first)]
    res = bench_peers.run_child(args, out, log_path, budget, "ray")
    if res.get("runs"):
        res["summary"] = summary(res["runs"])
    bench_peers.keep_log_tail(res, log_path)
    return res


VS_RAY = (("stream_parts_per_s", "parts_per_s"), ("first_part_p50_us", "first_part_p50_us"))


# -- output ----------------------------------------------------------------------------------
def show(res: Dict[str, Any]) -> None:
    def num(v: float) -> str:
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"

    st = res["settings"]
    keys = ("stream_parts_per_s", "limit_parts_per_s", "parts_ratio", "first_part_p50_us", "limit_first_p50_us",
            "first_part_ratio", "aio_tasks_per_s", "limit_tasks_per_s", "aio_throughput_ratio", "aio_p50_us",
            "limit_p50_us", "aio_p50_ratio")
    sm = res["summary"]
    body = [(k, "x" if "ratio" in k else "us" if k.endswith("_us") else "/s",
             *(num(sm[k][q]) for q in ("min", "median", "max"))) for k in keys]
    _table(f"streaming and the asyncio client vs raw pyzmq ({st['runs']} runs; one stream of {st['parts']:,} parts, "
           f"window {st['stream_window']}; {st['calls']:,} async invokes, {st['window']} in flight; "
           f"2 executors x 2 slots)", ("figure", "unit", "min", "median", "max"), body,
           "ratio = zeromesh / limit, per run (/s: higher is better; us: lower is better)", width=110)
    ray = res["ray"]
    if not ray.get("available"):
        print(f"ray: {ray.get('reason', 'not measured')}")
        return
    rs = ray.get("summary") or {}
    body = [(k, "us" if k.endswith("_us") else "/s", *(num(v[q]) for q in ("min", "median", "max")))
            for k, v in rs.items()]
    body += [(k, "x", "-", num(v), "-") for k, v in res["vs_ray"].items() if v is not None]
    _table(f"Ray {ray.get('version')} streaming generator (init {ray.get('init_s')} s; its own process, after "
           f"zeromesh; backpressure {ray.get('backpressure')})", ("figure", "unit", "min", "median", "max"), body,
           "a/b = zeromesh median / Ray median (parts/s: above 1 zeromesh faster; us: below 1)")
    if ray.get("error"):
        print(f"ray: incomplete ({ray['error']})")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=None, help="runs (default 5)")
    ap.add_argument("--parts", type=int, default=None, help="parts of the parts/s stream (default 20000)")
    ap.add_argument("--calls", type=int, default=None, help="async invokes for throughput (default 20000)")
    ap.add_argument("--window", type=int, default=None, help="async invokes in flight (default 2000)")
    ap.add_argument("--latency", type=int, default=None, help="sequential awaits per run (default 500)")
    ap.add_argument("--first", type=int, default=None, help="time-to-first-part samples per run (default 100)")
    ap.add_argument("--no-ray", dest="ray", action="store_false", help="do not measure Ray")
    opts = parse_sized(ap, argv, FULL, QUICK, "1 run, 2,000 parts and calls (for tests)",
                       peer=("ray", "ray"))
    if min(opts.runs, opts.parts, opts.calls, opts.window, opts.latency, opts.first) < 1:
        ap.error("--runs, --parts, --calls, --window, --latency and --first must be positive")
    if opts.ray_child:
        sys.exit(ray_child(opts))

    say = sayer(opts.silent)
    exit_on_sigterm()   # unwinds through LocalMesh's exit, which ends every process by PID
    t0 = time.perf_counter()
    runs = measure_zeromesh(opts, say)
    res: Dict[str, Any] = {"settings": {"runs": opts.runs, "parts": opts.parts, "part_bytes": part_size(opts.parts),
                                        "stream_window": Settings().stream_window, "first": opts.first,
                                        "first_parts": FIRST_PARTS, "calls": opts.calls, "window": opts.window,
                                        "latency": opts.latency, "executors": 2, "slots": 2,
                                        "cpus": os.cpu_count()},
                           "runs": runs, "summary": summary(runs)}
    if opts.ray:
        say("ray: in its own process ...")
        with tempfile.TemporaryDirectory(prefix="zmesh-sbench-ray-") as logs:
            res["ray"] = measure_ray(opts, logs)
        rs = res["ray"].get("summary") or {}
        res["vs_ray"] = {f"{a}/{b}": ratio(res["summary"][a]["median"], rs[b]["median"])
                         for a, b in VS_RAY if b in rs}
    else:
        res["ray"] = {"available": False, "reason": "not measured (--no-ray)"}
        res["vs_ray"] = {}
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    show(res)
    write_json(opts.json, res)
    return res


if __name__ == "__main__":
    main()
