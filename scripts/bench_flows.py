"""Flows: scheduling overhead per task in a fan-out/fan-in flow, against plain tasks and Dask.

The graph: ``source(n) -> n x work(xs, i) -> gather(*parts)`` (n = ``--tasks``, 1,000 by default;
n + 2 tasks in all).  The work is trivial (``xs[i] * 2``), so the time is the overhead of
scheduling and moving the tasks.  Three systems do the same graph in one run:

* **flow**: a :class:`client.flows.Flow` registered once; each run is ``f.run(parameters={"n": n})``
  then ``fr.wait()`` (the manager drives the run: mesh/core/flows.py; the built-in flow service
  runs the functions); wall time from ``run()`` to ``wait()`` returning.  ``fr.tasks()`` gives
  each task's body on its executor: when the first started and the last ended (from ``run()``),
  and the sum of the bodies (to show that the work is trivial).
* **plain**: the same work as plain tasks of a registered application
  (scripts/bench_apps/fanout_service.py, one entrypoint doing what the three functions do) through
  one ``Session``: ``source`` submitted and waited for, then n ``("work", xs, i)`` submits (the
  client passes ``xs`` in every request, as a plain user would), all collected, then one
  ``gather``; wall time from the first submit to the gather's answer.  The session is opened
  before the clock starts and closed after.
* **dask**: ``distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True)``
  (the same 4 slots; default Dask settings), ``client.submit`` graph of the same shape (a source
  future, n submits taking it, one gather submit taking them), ``gather.result()``; in its own
  process with a time budget, after every zeromesh process has stopped
  (scripts/bench_peers.py: ``run_child`` / ``child_main``).

zeromesh runs on one ``client.local.LocalMesh``: a manager and 2 executors x 2 slots, loopback,
default settings.  Flow and plain are interleaved run by run.  They are different applications on
the same 4 slots, so each switch stops the other's instances; every counted run is therefore
preceded by one uncounted run of the same system (instances launched, functions loaded), and the
Dask child does one uncounted graph before its runs.  Per task = wall / (n + 2).  Ratios: flow /
plain per run (the same machine moment), min / median / max; flow / dask on the medians (two
processes one after the other).  The manager's CPU seconds per run are recorded for flow and plain.

Every wait is bounded; every process started here is ended by its PID (the mesh by LocalMesh,
the Dask child by SIGTERM then SIGKILL).

Usage: python scripts/bench_flows.py [--runs 5] [--tasks 1000] [--no-dask] [--quick] [--silent] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_peers  # noqa: E402
from bench import _table, cpu_seconds, exit_on_sigterm, noop_spec, parse_sized, sayer, write_json  # noqa: E402
from bench_runner import ratio, summary  # noqa: E402

from client import Client, Session  # noqa: E402
from client.flows import Flow, Parameter  # noqa: E402
from client.local import LocalMesh  # noqa: E402

RUN_WAIT = {"full": 300.0, "quick": 120.0}      # seconds one run (flow or plain) may take
DASK_BUDGET = {"full": 400.0, "quick": 120.0}   # seconds for the Dask child, cluster start-up included
FULL = {"runs": 5, "tasks": 1000}
QUICK = {"runs": 1, "tasks": 200}
APP = "fanout"


class BenchError(RuntimeError):
    pass


# -- the work (module level: cloudpickle ships it by value from __main__) -----------------------
def source(n: int) -> list:
    return list(range(n))


def work(xs: list, i: int) -> int:
    return xs[i] * 2


def gather(*parts: int) -> int:
    return sum(parts)


def expected(n: int) -> int:
    return n * (n - 1)   # sum of 2 * i for i < n


# -- flow -----------------------------------------------------------------------------------------
def build_flow(n: int, client: Client) -> Flow:
    f = Flow(f"bench-fan-{n}", client=client)
    src, wk, ga = f.task(source), f.task(work), f.task(gather)
    with f:
        s = src(Parameter("n"))
        parts = [wk(s, i) for i in range(n)]   # constants are pickled as arguments
        ga(*parts)
    f.register()
    return f


def flow_run(f: Flow, n: int, wait: float, manager_pid: int) -> Dict[str, Any]:
    cpu0 = cpu_seconds(manager_pid)
    t_epoch, t0 = time.time(), time.perf_counter()
    fr = f.run(parameters={"n": n})
    state = fr.wait(timeout=wait)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(manager_pid) - cpu0
    if state != "succeeded":
        fr.raise_for_state()
    got = fr.result("gather")
    if got != expected(n):
        raise BenchError(f"the flow answered {got!r}, not {expected(n)}")
    by_name = fr.tasks()
    recs = list(by_name.values())
    starts = [r["started_at"] for r in recs if r.get("started_at") is not None]
    ends = [r["ended_at"] for r in recs if r.get("ended_at") is not None]
    if len(starts) != n + 2 or len(ends) != n + 2:
        raise BenchError(f"{len(starts)} of {n + 2} flow tasks have their times")
    return {"wall_s": round(wall, 4), "per_task_us": round(wall * 1e6 / (n + 2), 1),
            "first_start_s": round(min(starts) - t_epoch, 4),   # run() -> source's body started
            "last_end_s": round(max(ends) - t_epoch, 4),        # run() -> gather's body ended
            "bodies_s": round(sum(e - s for s, e in zip(starts, ends)), 4),
            # the fan-in: the last work body ended -> gather's body started (the engine submits it, the
            # flow service reads its n upstream results by key, then calls it)
            "fan_in_s": round(by_name["gather"]["started_at"] - max(r["ended_at"] for k, r in by_name.items()
                                                                     if k.startswith("work")), 4),
            "manager_cpu_s": round(cpu, 3),
            "executors": len({r.get("executor") for r in recs})}


# -- plain tasks ----------------------------------------------------------------------------------
def plain_run(endpoint: str, n: int, wait: float, manager_pid: int) -> Dict[str, Any]:
    with Session(APP, manager=endpoint) as s:
        cpu0 = cpu_seconds(manager_pid)
        t0 = time.perf_counter()
        deadline = time.monotonic() + wait

        def left() -> float:
            return max(deadline - time.monotonic(), 0.001)

        xs = s.submit(("source", n)).result(left())
        futs = [s.submit(("work", xs, i)) for i in range(n)]
        parts = [fu.result(left()) for fu in futs]
        got = s.submit(("gather", parts)).result(left())
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(manager_pid) - cpu0
        instances = s.info().get("instances")
    if got != expected(n):
        raise BenchError(f"the plain tasks answered {got!r}, not {expected(n)}")
    return {"wall_s": round(wall, 4), "per_task_us": round(wall * 1e6 / (n + 2), 1),
            "manager_cpu_s": round(cpu, 3), "instances": instances}


def measure_zeromesh(opts: argparse.Namespace, say: Callable[[str], None]) -> Dict[str, Any]:
    n, wait = opts.tasks, RUN_WAIT["quick" if opts.quick else "full"]
    runs: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="zmesh-fbench-") as logs, \
            LocalMesh(executors=2, slots=2, env={"ZMESH_LOG_LEVEL": "WARNING"}, log_dir=logs) as m, \
            Client(m.endpoint) as c:
        pid = m.manager.pid
        c.register_application(noop_spec(APP, arguments=["fanout_service.py"]))
        t = time.perf_counter()
        f = build_flow(n, c)
        define_s = time.perf_counter() - t
        for i in range(opts.runs):
            flow_run(f, n, wait, pid)                   # uncounted: the flow service's instances warm
            fl = flow_run(f, n, wait, pid)
            plain_run(m.endpoint, n, wait, pid)         # uncounted: the fanout service's instances warm
            pl = plain_run(m.endpoint, n, wait, pid)
            run = {"flow_" + k: v for k, v in fl.items()}
            run.update({"plain_" + k: v for k, v in pl.items()})
            run["flow_plain_ratio"] = ratio(fl["wall_s"], pl["wall_s"])
            runs.append(run)
            say(f"run {i + 1}: flow {fl['wall_s']} s ({fl['per_task_us']} us/task, manager CPU "
                f"{fl['manager_cpu_s']} s), plain {pl['wall_s']} s ({pl['per_task_us']} us/task), "
                f"flow/plain {run['flow_plain_ratio']}")
    return {"runs": runs, "define_and_register_s": round(define_s, 3)}


# -- Dask (in its own process) -------------------------------------------------------------------
def dask_runs(distributed: Any, n: int, runs: int, wait: float, report: Callable[[Dict[str, Any]], None]) -> None:
    res: Dict[str, Any] = {"available": True, "version": distributed.__version__, "workers": 2,
                           "threads_per_worker": 2, "runs": []}
    report(res)
    cluster = client = None
    t = time.perf_counter()
    try:
        cluster = bench_peers.dask_cluster(distributed, 2, 2)
        client = distributed.Client(cluster)
        client.wait_for_workers(2, timeout=wait)
        res["startup_s"] = round(time.perf_counter() - t, 3)
        report(res)

        def one() -> Dict[str, Any]:
            t0 = time.perf_counter()
            s = client.submit(source, n, pure=False)
            parts = [client.submit(work, s, i, pure=False) for i in range(n)]
            g = client.submit(gather, *parts, pure=False)
            got = g.result(timeout=wait)
            wall = time.perf_counter() - t0
            if got != expected(n):
                raise BenchError(f"Dask answered {got!r}, not {expected(n)}")
            del s, parts, g
            return {"wall_s": round(wall, 4), "per_task_us": round(wall * 1e6 / (n + 2), 1)}

        res["warmup"] = one()   # uncounted: functions shipped, workers warm
        report(res)
        for _ in range(runs):
            res["runs"].append(one())
            report(res)
    finally:
        res["shutdown_s"] = bench_peers.close_dask(client, cluster)
        report(res)


def dask_child(opts: argparse.Namespace) -> int:
    """The Dask subprocess (bench_peers.child_main: JSON after every figure, "not installed" without Dask)."""
    wait = RUN_WAIT["quick" if opts.quick else "full"]
    return bench_peers.child_main(opts.dask_child, [opts.dask_module],
                                  lambda report: dask_runs(sys.modules[opts.dask_module], opts.tasks, opts.runs,
                                                           wait, report))


def measure_dask(opts: argparse.Namespace, log_dir: str) -> Dict[str, Any]:
    out, log_path = os.path.join(log_dir, "dask.json"), os.path.join(log_dir, "dask.log")
    args = [sys.executable, os.path.abspath(__file__), "--dask-child", out, "--dask-module", opts.dask_module,
            "--runs", str(opts.runs), "--tasks", str(opts.tasks)] + (["--quick"] if opts.quick else [])
    res = bench_peers.run_child(args, out, log_path, DASK_BUDGET["quick" if opts.quick else "full"], "dask")
    if res.get("runs"):
        res["summary"] = summary(res["runs"])
    bench_peers.keep_log_tail(res, log_path)
    return res


# -- output ---------------------------------------------------------------------------------------
def show(res: Dict[str, Any]) -> None:
    def num(v: float) -> str:
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"

    st, zs = res["settings"], res["summary"]
    rows = [("flow: run() -> wait() returned", "wall_s"), ("flow: per task", "per_task_us"),
            ("flow: run() -> first task body started", "first_start_s"),
            ("flow: run() -> last task body ended", "last_end_s"),
            ("flow: last work ended -> gather started", "fan_in_s"), ("flow: sum of task bodies", "bodies_s"),
            ("flow: manager CPU", "manager_cpu_s")]
    body = [(label, "us" if k.endswith("_us") else "s", *(num(zs["flow_" + k][q]) for q in ("min", "median", "max")))
            for label, k in rows]
    body += [(label, "us" if k.endswith("_us") else "s", *(num(zs["plain_" + k][q]) for q in ("min", "median", "max")))
             for label, k in (("plain: first submit -> gather answered", "wall_s"), ("plain: per task", "per_task_us"),
                              ("plain: manager CPU", "manager_cpu_s"))]
    body.append(("flow / plain (per run)", "x", *(num(zs["flow_plain_ratio"][q]) for q in ("min", "median", "max"))))
    dk = res["dask"]
    ds = dk.get("summary") or {}
    if ds:
        body += [("dask: submit graph wall", "s", *(num(ds["wall_s"][q]) for q in ("min", "median", "max"))),
                 ("dask: per task", "us", *(num(ds["per_task_us"][q]) for q in ("min", "median", "max")))]
    if res.get("flow_dask_ratio") is not None:
        body.append(("flow / dask (medians)", "x", "-", num(res["flow_dask_ratio"]), "-"))
    if res.get("plain_dask_ratio") is not None:
        body.append(("plain / dask (medians)", "x", "-", num(res["plain_dask_ratio"]), "-"))
    _table(f"fan-out/fan-in: source -> {st['tasks']:,} work -> gather ({st['tasks'] + 2:,} tasks), {st['runs']} runs, "
           f"one LocalMesh of 2 executors x 2 slots; Dask LocalCluster 2 workers x 2 threads",
           ("figure", "unit", "min", "median", "max"), body,
           "per task = wall / (n + 2); ratios above 1: the flow is slower")
    if not dk.get("available"):
        print(f"dask: {dk.get('reason', 'not measured')}")
    elif dk.get("error"):
        print(f"dask: incomplete ({dk['error']})")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=None, help="counted runs of each system (default 5)")
    ap.add_argument("--tasks", type=int, default=None, help="work tasks in the fan-out (default 1000)")
    ap.add_argument("--no-dask", dest="dask", action="store_false", help="do not measure Dask")
    opts = parse_sized(ap, argv, FULL, QUICK, "1 run of 200 work tasks (smoke test)",
                       peer=("dask", "distributed"))
    if min(opts.runs, opts.tasks) < 1:
        ap.error("--runs and --tasks must be positive")
    if opts.dask_child:
        sys.exit(dask_child(opts))

    say = sayer(opts.silent)
    exit_on_sigterm()   # unwinds through LocalMesh's exit, which ends every process by PID
    t0 = time.perf_counter()
    zm = measure_zeromesh(opts, say)
    res: Dict[str, Any] = {"settings": {"runs": opts.runs, "tasks": opts.tasks, "executors": 2, "slots": 2,
                                        "cpus": os.cpu_count()},
                           "define_and_register_s": zm["define_and_register_s"],
                           "runs": zm["runs"], "summary": summary(zm["runs"])}
    if opts.dask:
        say("dask: in its own process ...")
        with tempfile.TemporaryDirectory(prefix="zmesh-fbench-dask-") as logs:
            res["dask"] = measure_dask(opts, logs)
    else:
        res["dask"] = {"available": False, "reason": "not measured (--no-dask)"}
    ds = res["dask"].get("summary") or {}
    med = {k: res["summary"][k]["median"] for k in ("flow_wall_s", "plain_wall_s")}
    res["flow_dask_ratio"] = ratio(med["flow_wall_s"], ds["wall_s"]["median"]) if ds else None
    res["plain_dask_ratio"] = ratio(med["plain_wall_s"], ds["wall_s"]["median"]) if ds else None
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    show(res)
    write_json(opts.json, res)
    return res


if __name__ == "__main__":
    main()
