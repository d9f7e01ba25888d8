"""zeromesh context benchmark: one-op patches vs whole replacement, and replication lag.

One command, nothing to set up: it starts a manager and two executors (one
slot each) on loopback, registers scripts/bench_apps/context_service.py, runs
bounded loops, prints a table and optionally writes JSON.

Figures:

1. **Client writes** to a session whose context is ``{"n": 0, "big": "x" * 10 MiB}``
   (no instance bound, so no replica traffic): ``--writes`` times
   ``session.patch_context([incr /n])``, then ``--replaces`` times
   ``session.update_context(whole document with n changed)``.  Per write:
   wall time p50/p99, and bytes the manager received.  The manager's own
   counter (``session.info()["bytes_in"]``) is read around each run; when it
   does not move for a path, the bytes are measured on the wire instead: every
   frame the client's connection sends during the write call (a DEALER on
   loopback, so what the manager receives).  ``counted_by_manager`` says which.
2. **Instance writes** to the same context from inside a task: ``("patch")``
   does ``ins.patch_context([incr])``, ``("update")`` does ``ins.context()``,
   ``n += 1``, ``ins.update_context(whole)`` (which ships only the difference).
   Time of the write call measured inside the instance, and ``bytes_in`` per
   task minus the pickled request.
3. **Replication lag** on a fresh session with instances bound on both
   executors: ``--lag-writes`` client ``patch_context`` incr writes spaced
   ``--spacing`` ms apart; each replica records ``(version, time.time())`` when
   it applies a patch; lag = replica apply time - client time just before the
   write call, per (write, executor).  Same machine, same clock.

Ratios are patch / replacement (lower is better for both time and bytes).

Usage: python scripts/bench_context.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_limit  # noqa: E402
import cloudpickle  # noqa: E402

from client import Client, Session  # noqa: E402
from client.local import LocalMesh  # noqa: E402
from mesh.wire.protocol import pack  # noqa: E402

APPS = os.path.join(HERE, "bench_apps")
APP = "ctxbench"
MIB = 1024 * 1024
INCR = [{"op": "incr", "path": "/n", "value": 1}]
RESULT_WAIT = 60.0      # seconds any single task or call may take before the run is declared broken
BIND_LIMIT = 60.0       # seconds instances on both executors have to start and answer
MAX_ROUNDS = 200        # bursts of bind / probe tasks

FULL = {"writes": 300, "replaces": 30, "instance_writes": 200, "lag_writes": 1000, "seconds": 30.0}
QUICK = {"writes": 30, "replaces": 5, "instance_writes": 20, "lag_writes": 100, "seconds": 5.0}


class BenchError(RuntimeError):
    pass


def app_spec() -> Dict[str, Any]:
    return {"metadata": {"name": APP},
            "spec": {"working_directory": APPS, "command": sys.executable, "arguments": ["context_service.py"]}}




def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 6) if a is not None and b else None


class WireCounter:
    """Counts every byte the session's connection sends.

    Replaces ``_send_frames`` (every message the I/O thread sends, encoded already:
    control calls are encoded in the caller's thread) on this one Connection object
    with the same send plus a byte count.
    """

    def __init__(self, session: Session) -> None:
        self.bytes = 0

        def counting(sock: Any, frames: Any) -> None:
            self.bytes += sum(memoryview(f).nbytes for f in frames)
            sock.send_multipart(frames, copy=False)

        session._conn._send_frames = counting  # type: ignore[method-assign]


# -- 1. client writes -------------------------------------------------------------
def client_writes(session: Session, count: int, write: Callable[[int], int], seconds: float,
                  wire: WireCounter) -> Dict[str, Any]:
    """``count`` writes (bounded by ``seconds``); time, manager bytes_in and wire bytes per write."""
    info0 = session.info()
    samples: List[float] = []
    wire_bytes = 0
    deadline = time.monotonic() + seconds
    for i in range(count):
        if time.monotonic() > deadline:
            break
        b0 = wire.bytes
        t = time.perf_counter_ns()
        write(i)
        dt = time.perf_counter_ns() - t
        wire_bytes += wire.bytes - b0
        samples.append(dt / 1000.0)
    info1 = session.info()
    n = len(samples)
    if info1["context_version"] - info0["context_version"] != n:
        raise BenchError(f"{n} writes moved the context version by "
                         f"{info1['context_version'] - info0['context_version']}")
    bytes_in = (info1["bytes_in"] - info0["bytes_in"]) / n
    wire_per = wire_bytes / n
    counted = bytes_in > 0
    return {**bench_limit.percentiles(samples), "manager_bytes_in_per_write": round(bytes_in, 1),
            "wire_bytes_per_write": round(wire_per, 1), "counted_by_manager": counted,
            "bytes_per_write": round(bytes_in if counted else wire_per, 1)}


def run_client(session: Session, doc: Dict[str, Any], cfg: Dict[str, Any]) -> Dict[str, Any]:
    wire = WireCounter(session)
    for _ in range(3):  # warm the connection and the manager's code paths; not measured
        session.patch_context(INCR)
    base = session.context()["n"]

    def replace(i: int) -> int:
        return session.update_context({**doc, "n": base + cfg["writes"] + i + 1})

    patch = client_writes(session, cfg["writes"], lambda i: session.patch_context(INCR), cfg["seconds"], wire)
    full = client_writes(session, cfg["replaces"], replace, cfg["seconds"], wire)
    n_end = session.context()["n"]
    if n_end != base + cfg["writes"] + full["count"]:
        raise BenchError(f"context n is {n_end}, expected {base + cfg['writes'] + full['count']}")
    patch["encoded_bytes"] = len(pack(INCR))
    full["encoded_bytes"] = len(pack(doc))
    return {"patch": patch, "replace": full,
            "ratio": {"bytes": ratio(patch["bytes_per_write"], full["bytes_per_write"]),
                      "time_p50": ratio(patch["p50_us"], full["p50_us"])}}


# -- 2. instance writes --------------------------------------------------------------
def instance_writes(session: Session, op: str, count: int, seconds: float) -> Dict[str, Any]:
    req = (op, None)
    req_bytes = len(cloudpickle.dumps(req))
    session.invoke(req, timeout=RESULT_WAIT)  # warm; not measured
    info0 = session.info()
    write_us: List[float] = []
    read_us: List[float] = []
    invoke_us: List[float] = []
    deadline = time.monotonic() + seconds
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        t = time.perf_counter_ns()
        out = session.invoke(req, timeout=RESULT_WAIT)
        invoke_us.append((time.perf_counter_ns() - t) / 1000.0)
        if op == "update":
            read_s, write_s = out
            read_us.append(read_s * 1e6)
        else:
            write_s = out
        write_us.append(write_s * 1e6)
    info1 = session.info()
    n = len(write_us)
    if info1["context_version"] - info0["context_version"] != n:
        raise BenchError(f"{n} instance writes moved the version by "
                         f"{info1['context_version'] - info0['context_version']}")
    bytes_in = (info1["bytes_in"] - info0["bytes_in"] - n * req_bytes) / n
    w = bench_limit.percentiles(write_us)
    out_d: Dict[str, Any] = {"count": n, "p50_us": w["p50_us"], "p99_us": w["p99_us"],
                             "invoke_p50_us": bench_limit.percentiles(invoke_us)["p50_us"],
                             "bytes_per_write": round(bytes_in, 1), "request_bytes": req_bytes}
    if read_us:
        out_d["read_copy_p50_us"] = bench_limit.percentiles(read_us)["p50_us"]
    return out_d


def run_instance(session: Session, cfg: Dict[str, Any]) -> Dict[str, Any]:
    patch = instance_writes(session, "patch", cfg["instance_writes"], cfg["seconds"])
    full = instance_writes(session, "update", cfg["instance_writes"], cfg["seconds"])
    return {"patch": patch, "update": full,
            "ratio": {"bytes": ratio(patch["bytes_per_write"], full["bytes_per_write"]),
                      "time_p50": ratio(patch["p50_us"], full["p50_us"])}}


# -- 3. replication lag ----------------------------------------------------------------
def until_both(session: Session, req: Any, executors: int, what: str) -> Dict[str, Any]:
    """Submit bursts of ``req`` until ``executors`` distinct executor ids answered; eid -> last answer."""
    seen: Dict[str, Any] = {}
    deadline = time.monotonic() + BIND_LIMIT
    for _ in range(MAX_ROUNDS):
        futs = [session.submit(req) for _ in range(4 * executors)]
        for f in futs:
            out = f.result(RESULT_WAIT)
            seen[out[1]] = out
        if len(seen) >= executors or time.monotonic() > deadline:
            break
    if len(seen) < executors:
        raise BenchError(f"{what}: only executors {sorted(seen)} answered within {BIND_LIMIT:.0f}s")
    return seen


def run_lag(session: Session, count: int, spacing_ms: float, executors: int, seconds: float) -> Dict[str, Any]:
    bound = until_both(session, ("sleep", 0.05), executors, "binding")
    t0s: Dict[int, float] = {}
    rtt_us: List[float] = []   # the client's own write round trip, for comparison
    deadline = time.monotonic() + seconds
    done = 0
    for done in range(1, count + 1):
        t0 = time.time()
        version = session.patch_context(INCR)
        rtt_us.append((time.time() - t0) * 1e6)
        t0s[version] = t0
        time.sleep(spacing_ms / 1000.0)
        if time.monotonic() > deadline:
            break
    if len(t0s) != done:
        raise BenchError(f"{done} writes returned only {len(t0s)} distinct versions")
    time.sleep(0.1)  # patches already sent to the replicas precede the probes anyway (version order)
    probes = until_both(session, ("recorded", 0.05), executors, "probing")
    per: Dict[str, Any] = {}
    every: List[float] = []
    for eid, (pid, _, applied, resyncs) in sorted(probes.items()):
        lags = [(applied[v] - t0) * 1e6 for v, t0 in t0s.items() if v in applied]
        every += lags
        per[eid] = {**bench_limit.percentiles(lags), "pid": pid, "missing": len(t0s) - len(lags), "resyncs": resyncs,
                    "bound_pid": bound[eid][0]}
    return {"writes": len(t0s), "spacing_ms": spacing_ms, "per_executor": per, "overall": bench_limit.percentiles(every),
            "client_write_rtt": bench_limit.percentiles(rtt_us)}


# -- run ---------------------------------------------------------------------------------
def run(opts: argparse.Namespace) -> Dict[str, Any]:
    cfg = dict(QUICK if opts.quick else FULL)
    for key in ("writes", "replaces", "instance_writes", "lag_writes"):
        if getattr(opts, key) is not None:
            cfg[key] = getattr(opts, key)
    log_dir = tempfile.mkdtemp(prefix="zmesh-bench-context-")
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not opts.silent else (lambda msg: None)
    started = time.monotonic()
    doc = {"n": 0, "big": "x" * (opts.context_mib * MIB)}
    m = LocalMesh(executors=2, slots=1, log_dir=log_dir)
    sessions: List[Session] = []
    try:
        say("starting a manager and 2 executors ...")
        m.start()
        with Client(m.endpoint) as c:
            c.register_application(app_spec())
        s = Session(APP, ctx=doc, manager=m.endpoint)
        sessions.append(s)
        say(f"client writes: {cfg['writes']} patches, {cfg['replaces']} replacements of {opts.context_mib} MiB ...")
        client = run_client(s, doc, cfg)
        say(f"instance writes: {cfg['instance_writes']} patch_context, {cfg['instance_writes']} update_context ...")
        inst = run_instance(s, cfg)
        s.close()
        lag_doc = {"n": 0, "big": "x" * (opts.lag_context_mib * MIB)}
        s2 = Session(APP, ctx=lag_doc, manager=m.endpoint)
        sessions.append(s2)
        say(f"replication lag: {cfg['lag_writes']} writes, {opts.spacing} ms apart ...")
        lag = run_lag(s2, cfg["lag_writes"], opts.spacing, 2, cfg["seconds"] * 2)
        s2.close()
    finally:
        for sess in sessions:
            try:
                sess.close()
            except Exception:
                pass
        m.stop()
    total = time.monotonic() - started
    return {"settings": {"quick": opts.quick, "context_mib": opts.context_mib,
                         "lag_context_mib": opts.lag_context_mib, **cfg, "cpus": os.cpu_count(),
                         "python": sys.version.split()[0], "log_dir": log_dir},
            "client": client, "instance": inst, "lag": lag, "total_seconds": round(total, 1)}


# -- output ------------------------------------------------------------------------------
def rows(res: Dict[str, Any]) -> List[Tuple[str, str, str, str, str]]:
    def num(v: Any, fmt: str = ",.0f") -> str:
        return "-" if v is None else format(v, fmt)

    out = []
    c, i = res["client"], res["instance"]
    src = {True: "bytes_in", False: "wire"}
    out.append(("client write p50", "us", num(c["patch"]["p50_us"]), num(c["replace"]["p50_us"]),
                num(c["ratio"]["time_p50"], ".4f")))
    out.append(("client bytes/write (" + src[c["patch"]["counted_by_manager"]] + " / "
                + src[c["replace"]["counted_by_manager"]] + ")", "B", num(c["patch"]["bytes_per_write"]),
                num(c["replace"]["bytes_per_write"]), num(c["ratio"]["bytes"], ".2e")))
    out.append(("client manager bytes_in/write", "B", num(c["patch"]["manager_bytes_in_per_write"]),
                num(c["replace"]["manager_bytes_in_per_write"]), "-"))
    out.append(("instance write p50 (in task)", "us", num(i["patch"]["p50_us"]), num(i["update"]["p50_us"]),
                num(i["ratio"]["time_p50"], ".2f")))
    out.append(("instance invoke p50 (round trip)", "us", num(i["patch"]["invoke_p50_us"]),
                num(i["update"]["invoke_p50_us"]), "-"))
    out.append(("instance bytes_in/write", "B", num(i["patch"]["bytes_per_write"]),
                num(i["update"]["bytes_per_write"]), num(i["ratio"]["bytes"], ".2f")))
    lag = res["lag"]
    for eid, r in lag["per_executor"].items():
        out.append((f"lag {eid} p50 / p99 (n={r['count']}, miss {r['missing']})", "us", num(r["p50_us"]),
                    num(r["p99_us"]), "-"))
    o = lag["overall"]
    out.append((f"lag overall p50 / p99 (n={o['count']})", "us", num(o["p50_us"]), num(o["p99_us"]), "-"))
    w = lag["client_write_rtt"]
    out.append(("lag run: client write round trip p50 / p99", "us", num(w["p50_us"]), num(w["p99_us"]), "-"))
    return out


def show(res: Dict[str, Any]) -> None:
    st = res["settings"]
    title = (f"zeromesh context: patch vs replacement of a {st['context_mib']} MiB context, replication lag "
             f"({st['cpus']} CPUs, {res['total_seconds']} s)")
    header = ("figure", "unit", "patch", "replace", "ratio")
    caption = ("ratio = patch / replace, lower is better; lag rows: columns are p50 and p99. "
               "bytes: 'bytes_in' = manager counter, 'wire' = frames the client sent")
    from bench import _table
    _table(title, header, rows(res), caption, width=110)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=None, help="client patch writes (default 300)")
    ap.add_argument("--replaces", type=int, default=None, help="client whole replacements (default 30)")
    ap.add_argument("--instance-writes", type=int, default=None, help="instance writes per kind (default 200)")
    ap.add_argument("--lag-writes", type=int, default=None, help="writes for the lag figure (default 1000)")
    ap.add_argument("--spacing", type=float, default=3.0, help="ms between lag writes (default 3)")
    ap.add_argument("--context-mib", type=int, default=10, help="size of the big context value (default 10)")
    ap.add_argument("--lag-context-mib", type=int, default=0, help="big value in the lag session (default 0)")
    ap.add_argument("--quick", action="store_true", help="tiny counts (< 30 s), for tests")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    opts = ap.parse_args(argv)
    for key in ("writes", "replaces", "instance_writes", "lag_writes"):
        if getattr(opts, key) is not None and getattr(opts, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be positive")
    if opts.spacing < 0 or opts.context_mib < 1 or opts.lag_context_mib < 0:
        ap.error("--spacing and --lag-context-mib must be >= 0, --context-mib >= 1")

    def _terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally that ends every child

    signal.signal(signal.SIGTERM, _terminate)
    res = run(opts)
    show(res)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
