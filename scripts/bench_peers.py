"""Peer figures for the zeromesh benchmark: Ray and Dask distributed on this machine.

Same shapes as scripts/bench.py measures for zeromesh, so the numbers compare:

* Ray (local, ``ray.init(num_cpus=<cores>, include_dashboard=False,
  log_to_driver=False)`` on 127.0.0.1, usage stats off): start-up (init until a
  first task returns); throughput of a no-op remote task and of a no-op actor
  method with 1 and 2 workers (tasks: a custom resource caps concurrency at
  N; actors: N actors, round-robin), streaming with ``window`` refs in flight
  and ``ray.wait``; latency p50/p99 with one task in flight, remote task and
  actor method (1 worker).
* Dask distributed (``LocalCluster(n_workers=N, threads_per_worker=1,
  processes=True, dashboard_address=None)`` on 127.0.0.1,
  ``distributed.scheduler.worker-saturation`` = inf): start-up (cluster
  creation until a first future returns) per worker count; throughput of
  ``client.submit`` streaming with ``window`` futures in flight; latency
  p50/p99 of one future at a time (1 worker).  The window is capped at
  DASK_MAX_WINDOW; what is in flight after a run is cancelled and the
  scheduler left to empty before the next one.

Each peer runs in its own subprocess (``measure``), which ends on SIGTERM by
unwinding through ``ray.shutdown()`` / ``client.close()`` + ``cluster.close()``,
gets SIGKILL if it overruns its time budget, and gets SIGTERM if the benchmark
dies (PR_SET_PDEATHSIG).  The child rewrites its JSON after every figure, so a
peer that fails or overruns half-way still reports what it measured.  If a
peer cannot be imported, its figures are reported missing with the reason.

Usage: python scripts/bench_peers.py [--peer ray dask] [--instances 1 2] [--seconds 3] [--quick]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Deque, Dict, List, Optional

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import bench_limit  # noqa: E402  (scripts/ is on sys.path when run as a script or imported)

from mesh.ops.process import die_with_parent  # noqa: E402

MAX_LOOPS = 10 ** 9          # count bound on every otherwise time-bounded loop
RESULT_WAIT = 30.0           # seconds any single task may take before the run is declared broken
WARMUP_LIMIT = 60.0          # seconds workers have to start and serve
PEERS = ("ray", "dask")
# Dask moves ~100-1,000 no-op tasks/s here, so a deeper window buys nothing but seconds
# spent cancelling what is in flight after each run (cancels queue behind the tasks).
DASK_MAX_WINDOW = 500

FULL = {"seconds": 3.0, "warmup": 0.5, "window": 2000, "latency_count": 1000, "latency_seconds": 5.0}
QUICK = {"seconds": 0.5, "warmup": 0.2, "window": 500, "latency_count": 100, "latency_seconds": 2.0}


class PeerError(RuntimeError):
    pass




def one_at_a_time(call: Callable[[], Any], count: int, max_seconds: float) -> Dict[str, Any]:
    """Latency of ``call()`` (submit one task and wait for it), after a short warm-up."""
    warm = min(100, max(2, count // 10))
    samples: List[float] = []
    deadline = time.monotonic() + max_seconds
    for i in range(warm + count):
        if time.monotonic() > deadline:
            break
        t = time.perf_counter_ns()
        call()
        dt = time.perf_counter_ns() - t
        if i >= warm:
            samples.append(dt / 1000.0)
    return bench_limit.percentiles(samples)


def _rate(done: int, elapsed: float) -> Dict[str, Any]:
    if done <= 0:
        raise PeerError("no task completed during the throughput run")
    return {"tasks": done, "seconds": round(elapsed, 3), "tasks_per_s": round(done / elapsed, 1)}


# -- Ray -------------------------------------------------------------------------------
def _ray_stream(ray: Any, submit: Callable[[int], Any], seconds: float, window: int) -> Dict[str, Any]:
    """Keep ``window`` refs in flight for ``seconds``; ``ray.wait`` takes completions in batches.

    Everything still in flight at the end is awaited (not counted)."""
    pending: List[Any] = []
    batch = max(1, window // 20)
    done = seq = 0
    start = time.perf_counter()
    end = start + seconds
    try:
        for _ in range(MAX_LOOPS):
            if time.perf_counter() >= end:
                break
            for _ in range(window - len(pending)):
                pending.append(submit(seq))
                seq += 1
            ready, pending = ray.wait(pending, num_returns=min(batch, len(pending)), timeout=RESULT_WAIT)
            if not ready:
                raise PeerError(f"no Ray task finished within {RESULT_WAIT:.0f}s")
            ray.get(ready, timeout=RESULT_WAIT)
            done += len(ready)
        elapsed = time.perf_counter() - start
    finally:
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=RESULT_WAIT)
    return _rate(done, elapsed)


def ray_figures(instances: List[int], seconds: float, warmup: float, window: int, latency_count: int,
                latency_seconds: float, report: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network call home
    import ray

    res: Dict[str, Any] = {"available": True, "version": ray.__version__, "cpus": os.cpu_count(),
                           "throughput": {"task": {}, "actor": {}}, "latency": {}}
    report(res)
    t0 = time.perf_counter()
    try:
        # One slot resource caps concurrent tasks at N (each asks for 1/N of it), without
        # restarting Ray per worker count.
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 resources={"zm_slot": 1}, _node_ip_address="127.0.0.1")

        @ray.remote
        def noop(x: Any = None) -> Any:
            return None

        @ray.remote
        def whoami() -> int:
            time.sleep(0.05)  # long enough that concurrent calls land on distinct workers
            return os.getpid()

        @ray.remote(num_cpus=0)
        class Noop:
            def noop(self, x: Any = None) -> Any:
                return None

            def pid(self) -> int:
                return os.getpid()

        ray.get(noop.remote(), timeout=WARMUP_LIMIT + RESULT_WAIT)
        res["startup_s"] = round(time.perf_counter() - t0, 3)
        report(res)

        for n in instances:
            share = {"resources": {"zm_slot": round(1.0 / n, 4)}}
            task, who = noop.options(**share), whoami.options(**share)
            t1, pids = time.monotonic(), set()
            for _ in range(MAX_LOOPS):   # until N distinct workers have served
                pids.update(ray.get([who.remote() for _ in range(2 * n)], timeout=RESULT_WAIT))
                if len(pids) >= n or time.monotonic() - t1 > WARMUP_LIMIT:
                    break
            if len(pids) < n:
                raise PeerError(f"only {len(pids)} of {n} Ray workers served within {WARMUP_LIMIT:.0f}s")
            _ray_stream(ray, lambda i: task.remote(), warmup, window)
            r = _ray_stream(ray, lambda i: task.remote(), seconds, window)
            r["warmup"] = {"workers": len(pids), "seconds": round(time.monotonic() - t1, 2)}
            res["throughput"]["task"][str(n)] = r
            report(res)

        for n in instances:
            t1 = time.monotonic()
            actors = [Noop.remote() for _ in range(n)]
            try:
                pids = set(ray.get([a.pid.remote() for a in actors], timeout=WARMUP_LIMIT))
                if len(pids) < n:
                    raise PeerError(f"{n} Ray actors share {len(pids)} process(es)")
                _ray_stream(ray, lambda i: actors[i % n].noop.remote(), warmup, window)
                r = _ray_stream(ray, lambda i: actors[i % n].noop.remote(), seconds, window)
                r["warmup"] = {"workers": len(pids), "seconds": round(time.monotonic() - t1, 2)}
                res["throughput"]["actor"][str(n)] = r
                report(res)
                if n == 1:
                    a = actors[0]
                    res["latency"]["actor"] = one_at_a_time(
                        lambda: ray.get(a.noop.remote(), timeout=RESULT_WAIT), latency_count, latency_seconds)
                    report(res)
            finally:
                for a in actors:
                    ray.kill(a)

        task = noop.options(resources={"zm_slot": 1.0})
        res["latency"]["task"] = one_at_a_time(
            lambda: ray.get(task.remote(), timeout=RESULT_WAIT), latency_count, latency_seconds)
        report(res)
    finally:
        t2 = time.perf_counter()
        ray.shutdown()
        res["shutdown_s"] = round(time.perf_counter() - t2, 3)
    return res


# -- Dask ------------------------------------------------------------------------------
def _dask_stream(client: Any, fn: Callable[..., Any], seconds: float, window: int) -> Dict[str, Any]:
    """Keep ``window`` futures in flight for ``seconds``, collected oldest first (as bench.stream).

    What is still in flight at the end is cancelled, not awaited: at Dask's rate a full
    window can take many seconds to drain."""
    futs: Deque[Any] = collections.deque()
    done = 0
    start = time.perf_counter()
    end = start + seconds
    try:
        for _ in range(MAX_LOOPS):
            if time.perf_counter() >= end:
                break
            for _ in range(window - len(futs)):
                futs.append(client.submit(fn, pure=False))
            futs[0].result(timeout=RESULT_WAIT)
            while futs and futs[0].done():
                futs.popleft().result()
                done += 1
        elapsed = time.perf_counter() - start
    finally:
        if futs:
            client.cancel(list(futs))
            futs.clear()
            _dask_settle(client)
    return _rate(done, elapsed)


def _dask_settle(client: Any) -> None:
    """Wait (bounded) until the scheduler has forgotten every task, so cancellations
    are not processed during the next measurement."""
    deadline = time.monotonic() + RESULT_WAIT
    for _ in range(MAX_LOOPS):
        left = client.run_on_scheduler(_scheduler_tasks)
        if not left:
            return
        if time.monotonic() > deadline:
            raise PeerError(f"the Dask scheduler still held {left} tasks {RESULT_WAIT:.0f}s after cancelling")
        time.sleep(0.05)


def _scheduler_tasks(dask_scheduler: Any) -> int:
    return len(dask_scheduler.tasks)


def dask_cluster(distributed: Any, workers: int, threads: int) -> Any:
    """The benchmarks' Dask: a ``LocalCluster`` of ``workers`` processes x ``threads``, on loopback, no
    dashboard, logs at ERROR (``distributed``: the module, which the caller has imported)."""
    import logging

    return distributed.LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                                    dashboard_address=None, host="127.0.0.1", silence_logs=logging.ERROR)


def close_dask(client: Any, cluster: Any) -> float:
    """Close a Dask client, then its cluster (either None if start-up failed first); the seconds it took."""
    t = time.perf_counter()
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()
    return round(time.perf_counter() - t, 3)


def dask_figures(instances: List[int], seconds: float, warmup: float, window: int, latency_count: int,
                 latency_seconds: float, report: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    import dask
    import distributed
    from distributed import Client

    dask.config.set({"distributed.scheduler.worker-saturation": float("inf")})
    window = min(window, DASK_MAX_WINDOW)
    res: Dict[str, Any] = {"available": True, "version": distributed.__version__, "worker_saturation": "inf",
                           "window": window, "throughput": {"submit": {}}, "latency": {},
                           "startup_s_by_workers": {}}
    report(res)

    def noop(x: Any = None) -> Any:   # nested: cloudpickle ships it by value to the workers
        return None

    for n in instances:
        cluster = client = None
        t0 = time.perf_counter()
        try:
            cluster = dask_cluster(distributed, n, 1)
            client = Client(cluster)
            client.submit(noop, pure=False).result(timeout=WARMUP_LIMIT)
            startup = round(time.perf_counter() - t0, 3)
            res["startup_s_by_workers"][str(n)] = startup
            res.setdefault("startup_s", startup)
            client.wait_for_workers(n, timeout=WARMUP_LIMIT)
            pids = set(client.run(os.getpid).values())
            _dask_stream(client, noop, warmup, window)
            r = _dask_stream(client, noop, seconds, window)
            r["warmup"] = {"workers": len(pids)}
            res["throughput"]["submit"][str(n)] = r
            report(res)
            if n == 1:
                res["latency"]["submit"] = one_at_a_time(
                    lambda: client.submit(noop, pure=False).result(timeout=RESULT_WAIT),
                    latency_count, latency_seconds)
                report(res)
        finally:
            res.setdefault("shutdown_s_by_workers", {})[str(n)] = close_dask(client, cluster)
    return res


FIGURES = {"ray": ray_figures, "dask": dask_figures}
IMPORTS = {"ray": ("ray",), "dask": ("dask", "distributed")}


# -- the subprocess ----------------------------------------------------------------------
def missing(reason: str) -> Dict[str, Any]:
    return {"available": False, "reason": reason}


def measure(peer: str, instances: List[int], seconds: float, warmup: float, window: int, latency_count: int,
            latency_seconds: float, timeout: float, log_dir: Optional[str] = None) -> Dict[str, Any]:
    """Run one peer's figures in a child process with at most ``timeout`` seconds; never raises
    for the peer's own failures (they come back as ``available: False`` or an ``error``)."""
    if peer not in FIGURES:
        raise ValueError(f"unknown peer {peer!r}")
    log_dir = log_dir or tempfile.mkdtemp(prefix="zmesh-peers-")
    out = os.path.join(log_dir, f"{peer}.json")
    log_path = os.path.join(log_dir, f"{peer}.log")
    args = [sys.executable, HERE, "--child", peer, "--out", out, "--instances", *map(str, instances),
            "--seconds", str(seconds), "--warmup", str(warmup), "--window", str(window),
            "--latency-count", str(latency_count), "--latency-seconds", str(latency_seconds)]
    res = run_child(args, out, log_path, timeout, peer)
    res["log"] = log_path
    return res


def run_child(args: List[str], out: str, log_path: str, budget: float, what: str) -> Dict[str, Any]:
    """Run a peer's child process (``args``) that writes its figures as JSON to ``out``, with at
    most ``budget`` seconds: past it, its PID gets SIGTERM, then SIGKILL.  Its own failures come
    back in the figures (``available: False`` or an ``error``), never as an exception."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                preexec_fn=die_with_parent(signal.SIGTERM))
    timed_out = False
    try:
        proc.wait(budget)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):  # by PID, only if still running
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
    wall = round(time.monotonic() - t0, 1)
    try:
        with open(out) as f:
            res = json.load(f)
    except (OSError, ValueError):
        res = missing(f"{what} produced no figures (exit {proc.returncode}); see {log_path}")
    if timed_out:
        res["error"] = f"stopped after its {budget:.0f}s budget; see {log_path}"
    elif proc.returncode and res.get("available", True) and "error" not in res:
        res["error"] = f"exit {proc.returncode}; see {log_path}"
    res["wall_s"] = wall
    return res


def keep_log_tail(res: Dict[str, Any], log_path: str) -> None:
    """A child that failed or gave no figures: keep the end of its log in ``res`` (its directory may go away)."""
    if res.get("error") or "no figures" in res.get("reason", ""):
        with open(log_path, "rb") as log:
            res["log_tail"] = log.read()[-2000:].decode(errors="replace")


def child_main(out: str, modules: List[str], run: Callable[[Callable[[Dict[str, Any]], None]], None]) -> int:
    """The body of a peer's child process: import ``modules`` (a missing one is reported as "not
    installed", with no figures), then ``run(report)``, where ``report(figures)`` writes the JSON to
    ``out`` after every figure, so a child stopped for overrunning its budget still reports.
    SIGTERM unwinds (``ray.shutdown()``, ``cluster.close()`` run)."""
    def write(res: Dict[str, Any]) -> None:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, out)

    def _terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for mod in modules:
        try:
            __import__(mod)
        except Exception as e:  # ImportError, or a broken installation
            write(missing(f"not installed (import {mod}: {type(e).__name__}: {e})"))
            return 0
    state: Dict[str, Any] = {}

    def report(res: Dict[str, Any]) -> None:
        state["res"] = res
        write(res)

    try:
        run(report)
    except BaseException as e:
        res = state.get("res") or {"available": True}
        res["error"] = f"{type(e).__name__}: {e}"
        write(res)
        traceback.print_exc()
        return 1
    if state:
        write(state["res"])
    return 0


def _child(opts: argparse.Namespace) -> int:
    return child_main(opts.out, IMPORTS[opts.child],
                      lambda report: FIGURES[opts.child](opts.instances, opts.seconds, opts.warmup, opts.window,
                                                         opts.latency_count, opts.latency_seconds, report))


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", nargs="+", choices=PEERS, default=list(PEERS))
    ap.add_argument("--instances", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    ap.add_argument("--seconds", type=float, default=None, help="measured seconds per throughput run (default 3)")
    ap.add_argument("--warmup", type=float, default=None)
    ap.add_argument("--window", type=int, default=None, help="tasks kept in flight (default 2000)")
    ap.add_argument("--latency-count", type=int, default=None)
    ap.add_argument("--latency-seconds", type=float, default=None)
    ap.add_argument("--timeout", type=float, default=150.0, help="budget per peer, seconds")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", choices=PEERS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    cfg = QUICK if opts.quick else FULL
    for key in ("seconds", "warmup", "window", "latency_count", "latency_seconds"):
        if getattr(opts, key) is None:
            setattr(opts, key, cfg[key])
    if opts.child:
        sys.exit(_child(opts))
    res = {p: measure(p, opts.instances, opts.seconds, opts.warmup, opts.window, opts.latency_count,
                      opts.latency_seconds, opts.timeout) for p in opts.peer}
    print(json.dumps(res, indent=2))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
