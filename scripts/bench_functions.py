"""Stateful functions: function-to-function throughput and ``call`` latency, against plain tasks.

One mesh (``client.local.LocalMesh``: a manager and **2 executors x 2 slots**, loopback, default
settings) serves two registered applications: the benchmark's functions
(scripts/bench_apps/fn_service.py, run with ``functions.run()``) and the no-op service
(scripts/bench_apps/noop_service.py).  Each run measures, in this order:

* **chain** (function-to-function throughput, one message in flight per address): one client
  ``Functions.send`` to ``bench/start``, which sends k (``--hops``) to ``bench/ping`` at each of
  ``--ids`` ids; ping sends k to ``bench/pong`` at its id, pong counts it in state and sends k - 1
  back to ping, ... until pong gets 1 and writes ``[id, n]`` to the egress ``bench/done``.  Timed
  from the send to the last id's egress record read by the client (``Functions.egress``).
  Messages = ids x 2k function invocations (all but the ids' first ones are function-to-function
  sends), 1 + ids + ids x 2k counting ``bench/start`` and its sends: msgs/s = ids x 2k / wall.
* **fan** (function-to-function throughput, batched): the same start, to ``bench/fan``, which
  sends k messages to ``bench/pong`` at its id in one invocation; pong's inbox fills, and the
  engine hands them over FN_BATCH (mesh/model/functions.py) at a time.  msgs/s = ids x k / wall
  (pong invocations; the ids' fan invocations are not counted).
* **call** latency: ``Functions.call`` one at a time on one address (``bench/echo``, which
  replies with its message), after a warm-up (bench_peers.one_at_a_time); p50 / p99.
* **plain** throughput: ``--tasks`` no-op tasks through one ``Session`` with ``--window`` in flight
  (bench.stream_count); tasks/s.
* **invoke** latency: ``Session.invoke`` of the no-op one at a time, same count and warm-up.

After each timed figure the pong counters are checked (``Functions.state``: every id counted
exactly what was sent; ids are new every run).  The two applications share the 4 slots, so
switching from one to the other stops instances: every counted figure comes after one uncounted
round of the same kind (instances launched, functions loaded).  The manager's CPU seconds are
recorded per figure.  Ratios are per run (the same machine moment), then min / median / max
over runs: throughput fn / plain (below 1: functions move fewer messages a second than plain
tasks), latency fn / plain (above 1: a call is slower than an invoke).

Every wait is bounded; the mesh's processes are ended by PID (LocalMesh).

Usage: python scripts/bench_functions.py [--runs 5] [--ids 50] [--hops 100] [--fan 400] [--tasks 40000]
                                        [--window 500] [--latency 1000] [--quick] [--silent] [--json PATH]
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

from bench import _table, cpu_seconds, exit_on_sigterm, noop_spec, parse_sized, sayer, stream_count, write_json  # noqa: E402
from bench_peers import one_at_a_time  # noqa: E402
from bench_runner import ratio, summary  # noqa: E402

from client import Client, Functions, Session  # noqa: E402
from client.local import LocalMesh  # noqa: E402
from mesh.testing import LocalMesh as AnyLocalMesh  # noqa: E402   (what LocalMesh's __enter__ is typed to return)
from mesh.model.functions import FN_BATCH  # noqa: E402

FN_APP, PLAIN_APP = "fnbench", "noop"
RUN_WAIT = {"full": 120.0, "quick": 60.0}   # seconds one timed figure may take
FULL = {"runs": 5, "ids": 50, "hops": 100, "fan": 400, "tasks": 40000, "window": 500, "latency": 1000}
QUICK = {"runs": 1, "ids": 10, "hops": 10, "fan": 20, "tasks": 1000, "window": 200, "latency": 100}
LATENCY_SECONDS = 30.0   # bound on one latency series


class BenchError(RuntimeError):
    pass


# -- functions ----------------------------------------------------------------------------------
def fn_throughput(fx: Functions, kind: str, ids: int, k: int, tag: str, wait: float, manager_pid: int,
                  cursor: Dict[str, int]) -> Dict[str, Any]:
    """One chain or fan round over ``ids`` new ids; wall from the start message to the last egress
    record.  ``cursor["egress"]``: where ``bench/done`` is read from (kept between rounds)."""
    target = {"chain": "bench/ping", "fan": "bench/fan"}[kind]
    prefix = f"{tag}-"
    offset = cursor["egress"] = _egress_head(fx, cursor["egress"])
    cpu0 = cpu_seconds(manager_pid)
    t0 = time.perf_counter()
    fx.send("bench/start", tag, [target, ids, k, prefix])
    done: Dict[str, int] = {}
    deadline = time.monotonic() + wait
    while len(done) < ids and time.monotonic() < deadline:
        for rec in fx.egress("bench/done", offset=offset, timeout=max(deadline - time.monotonic(), 0.01)):
            offset = rec.offset + 1
            ident, n = rec.message
            if ident.startswith(prefix):
                done[ident] = n
            if len(done) >= ids:
                break
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(manager_pid) - cpu0
    cursor["egress"] = offset
    if len(done) < ids:
        raise BenchError(f"{kind}: {len(done)} of {ids} ids finished within {wait:.0f}s")
    per_id = 2 * k if kind == "chain" else k
    expect = k   # pong counted k messages at every id (chain: k, k-1, ..., 1; fan: k-1 zeros and a 1)
    bad = {i: n for i, n in done.items() if n != expect}
    states = [fx.state("bench/pong", f"{prefix}{j}").get("n") for j in range(ids)]
    if bad or any(n != expect for n in states):
        raise BenchError(f"{kind}: pong counted {sorted(set(map(repr, states)))} (egress {sorted(set(bad.values()))}), not {expect}")
    msgs = ids * per_id
    return {"wall_s": round(wall, 4), "messages": msgs, "msgs_per_s": round(msgs / wall, 1),
            "manager_cpu_s": round(cpu, 3), "manager_cpu_us_per_msg": round(cpu * 1e6 / msgs, 1)}


def _egress_head(fx: Functions, head: int) -> int:
    """The next offset of ``bench/done`` from ``head`` on: a bounded read of what is there."""
    for _ in range(10 ** 6):
        got = False
        for rec in fx.egress("bench/done", offset=head, timeout=0.05):
            head, got = rec.offset + 1, True
        if not got:
            return head
    return head


def fn_latency(fx: Functions, count: int) -> Dict[str, Any]:
    def call() -> None:
        if fx.call("bench/echo", "lat", 7, timeout=30) != 7:
            raise BenchError("bench/echo did not reply with its message")
    return one_at_a_time(call, count, LATENCY_SECONDS)


def fn_instances(fx: Functions) -> int:
    return max((r["instances"] for r in fx.list() if r["type"].startswith("bench/")), default=0)


# -- plain tasks ----------------------------------------------------------------------------------
def plain_throughput(s: Session, tasks: int, window: int, manager_pid: int) -> Dict[str, Any]:
    cpu0 = cpu_seconds(manager_pid)
    wall = stream_count(s, tasks, window)
    cpu = cpu_seconds(manager_pid) - cpu0
    return {"wall_s": round(wall, 4), "tasks": tasks, "tasks_per_s": round(tasks / wall, 1),
            "manager_cpu_s": round(cpu, 3), "manager_cpu_us_per_task": round(cpu * 1e6 / tasks, 1)}


def plain_latency(s: Session, count: int) -> Dict[str, Any]:
    def call() -> None:
        if s.invoke(7, timeout=30) != 7:
            raise BenchError("the no-op did not return its request")
    return one_at_a_time(call, count, LATENCY_SECONDS)


# -- one run ----------------------------------------------------------------------------------------
def one_run(i: int, m: AnyLocalMesh, fx: Functions, opts: argparse.Namespace, wait: float,
            cursor: Dict[str, int]) -> Dict[str, Any]:
    assert m.manager is not None
    pid = m.manager.pid
    run: Dict[str, Any] = {}
    # functions: an uncounted round first (the plain session may hold the slots)
    fn_throughput(fx, "chain", opts.ids, max(2, opts.hops // 5), f"r{i}w", wait, pid, cursor)
    for kind, k in (("chain", opts.hops), ("fan", opts.fan)):
        r = fn_throughput(fx, kind, opts.ids, k, f"r{i}{kind}", wait, pid, cursor)
        run.update({f"{kind}_{key}": v for key, v in r.items()})
    lat = fn_latency(fx, opts.latency)
    run.update({"call_p50_us": lat["p50_us"], "call_p99_us": lat["p99_us"], "call_samples": lat["count"]})
    run["fn_instances"] = fn_instances(fx)
    # plain tasks: the same, warm first
    with Session(PLAIN_APP, manager=m.endpoint) as s:
        stream_count(s, max(opts.tasks // 4, 100), opts.window)   # uncounted
        r = plain_throughput(s, opts.tasks, opts.window, pid)
        run.update({f"plain_{key}": v for key, v in r.items()})
        lat = plain_latency(s, opts.latency)
        run.update({"invoke_p50_us": lat["p50_us"], "invoke_p99_us": lat["p99_us"], "invoke_samples": lat["count"]})
        run["plain_instances"] = s.info().get("instances")
    for kind in ("chain", "fan"):
        run[f"{kind}_plain_ratio"] = ratio(run[f"{kind}_msgs_per_s"], run["plain_tasks_per_s"])
    run["p50_ratio"] = ratio(run["call_p50_us"], run["invoke_p50_us"])
    run["p99_ratio"] = ratio(run["call_p99_us"], run["invoke_p99_us"])
    return run


def measure(opts: argparse.Namespace, say: Callable[[str], None]) -> Dict[str, Any]:
    wait = RUN_WAIT["quick" if opts.quick else "full"]
    runs: List[Dict[str, Any]] = []
    cursor = {"egress": 0}
    with tempfile.TemporaryDirectory(prefix="zmesh-fnbench-") as logs, \
            LocalMesh(executors=2, slots=2, env={"ZMESH_LOG_LEVEL": "WARNING"}, log_dir=logs) as m, \
            Client(m.endpoint) as c, Functions(m.endpoint) as fx:
        c.register_application(noop_spec(FN_APP, arguments=["fn_service.py"]))
        c.register_application(noop_spec(PLAIN_APP))
        t = time.perf_counter()
        if fx.call("bench/echo", "first", 1, timeout=60) != 1:   # the functions' first instance starts
            raise BenchError("bench/echo did not answer")
        first_call_s = time.perf_counter() - t
        for i in range(opts.runs):
            run = one_run(i, m, fx, opts, wait, cursor)
            runs.append(run)
            say(f"run {i + 1}: chain {run['chain_msgs_per_s']:,.0f} msg/s, fan {run['fan_msgs_per_s']:,.0f} msg/s, "
                f"plain {run['plain_tasks_per_s']:,.0f} tasks/s (chain/plain {run['chain_plain_ratio']}, "
                f"fan/plain {run['fan_plain_ratio']}); call p50 {run['call_p50_us']:,.0f} us p99 "
                f"{run['call_p99_us']:,.0f} us, invoke p50 {run['invoke_p50_us']:,.0f} us p99 "
                f"{run['invoke_p99_us']:,.0f} us (p50 ratio {run['p50_ratio']})")
    return {"runs": runs, "first_call_s": round(first_call_s, 3)}


# -- output ---------------------------------------------------------------------------------------
ROWS = (("chain: function-to-function messages/s", "chain_msgs_per_s", "msg/s"),
        ("chain: manager CPU per message", "chain_manager_cpu_us_per_msg", "us"),
        ("fan: function-to-function messages/s (batched)", "fan_msgs_per_s", "msg/s"),
        ("fan: manager CPU per message", "fan_manager_cpu_us_per_msg", "us"),
        ("plain: no-op tasks/s", "plain_tasks_per_s", "tasks/s"),
        ("plain: manager CPU per task", "plain_manager_cpu_us_per_task", "us"),
        ("chain / plain throughput", "chain_plain_ratio", "x"),
        ("fan / plain throughput", "fan_plain_ratio", "x"),
        ("Functions.call p50", "call_p50_us", "us"),
        ("Functions.call p99", "call_p99_us", "us"),
        ("Session.invoke p50", "invoke_p50_us", "us"),
        ("Session.invoke p99", "invoke_p99_us", "us"),
        ("call / invoke p50", "p50_ratio", "x"),
        ("call / invoke p99", "p99_ratio", "x"))


def show(res: Dict[str, Any]) -> None:
    def num(v: float) -> str:
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"

    st, sm = res["settings"], res["summary"]
    body = [(label, unit, *(num(sm[key][q]) for q in ("min", "median", "max"))) for label, key, unit in ROWS]
    _table(f"stateful functions vs plain tasks, {st['runs']} run(s), one LocalMesh of 2 executors x 2 slots: "
           f"{st['ids']} ids, chain {st['hops']} hops, fan {st['fan']}, {st['tasks']:,} plain tasks "
           f"(window {st['window']}), {st['latency']} calls",
           ("figure", "unit", "min", "median", "max"), body,
           "ratios per run, then min / median / max; throughput ratio below 1 and latency ratio above 1: "
           "functions are slower")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=None, help="counted runs (default 5)")
    ap.add_argument("--ids", type=int, default=None, help="ids (chains, fans) per round (default 50)")
    ap.add_argument("--hops", type=int, default=None, help="k of a chain: 2k messages per id (default 100)")
    ap.add_argument("--fan", type=int, default=None, help="messages per id of a fan (default 400)")
    ap.add_argument("--tasks", type=int, default=None, help="plain no-op tasks per throughput run (default 40000)")
    ap.add_argument("--window", type=int, default=None, help="plain tasks in flight (default 500)")
    ap.add_argument("--latency", type=int, default=None, help="calls / invokes per latency series (default 1000)")
    opts = parse_sized(ap, argv, FULL, QUICK, "1 small run (smoke test)")
    if min(opts.runs, opts.ids, opts.tasks, opts.window, opts.latency) < 1 or min(opts.hops, opts.fan) < 2:
        ap.error("counts must be positive (--hops and --fan at least 2)")

    say = sayer(opts.silent)
    exit_on_sigterm()   # unwinds through LocalMesh's exit, which ends every process by PID
    t0 = time.perf_counter()
    got = measure(opts, say)
    runs = got["runs"]
    res: Dict[str, Any] = {"settings": {"runs": opts.runs, "ids": opts.ids, "hops": opts.hops, "fan": opts.fan,
                                        "tasks": opts.tasks, "window": opts.window, "latency": opts.latency,
                                        "executors": 2, "slots": 2, "fn_batch": FN_BATCH, "cpus": os.cpu_count()},
                           "first_call_s": got["first_call_s"], "runs": runs, "summary": summary(runs)}
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    show(res)
    write_json(opts.json, res)
    return res


if __name__ == "__main__":
    main()
