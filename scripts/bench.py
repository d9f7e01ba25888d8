"""zeromesh benchmark: throughput, latency and manager cost, each next to the raw-ZeroMQ limit.

One command, nothing to set up: it starts a manager and an executor on
loopback (client.local.LocalMesh), registers a no-op service
(scripts/bench_apps/noop_service.py), runs for a bounded time, prints a
table and optionally writes JSON.  The raw-pyzmq limit (scripts/bench_limit.py)
is measured in the same run, interleaved with zeromesh (limit, zeromesh,
limit, zeromesh, ...); with ``--repeat N`` every figure is the median of N.

Figures:

* throughput of no-op tasks with 1 and 2 instances: one Session streams tasks
  with ``--window`` in flight for ``--seconds`` after a warm-up that proves
  every instance is serving (each instance process used CPU during it);
* latency p50/p99 of ``Session.invoke`` one task at a time, payload 0 B,
  100 KiB and 10 MiB;
* manager CPU seconds per 10,000 tasks (utime+stime of the manager process
  around each throughput run);
* manager RSS per queued task: ``--queued`` tasks submitted to a session whose
  app fits no executor (``labels: {never: match}``), so all of them wait in
  the manager;
* 10 MiB payload throughput: MB/s of payload (10^6 bytes, each way) streamed
  through one instance with ``payload_window`` tasks in flight, next to
  bench_limit.throughput moving the same payloads through raw pyzmq;
* fairness between sessions: on a mesh of one executor with 2 slots, a second
  session's ``invoke`` latency p50/p99 while idle, then while another client
  (a separate process) has submitted a 10,000-task burst at once to another
  session, once with both sessions of the same application and once with the
  probe on a second application; ratio = p99 during the burst / p99 idle.  A
  control sends the burst to another 2-slot mesh (its own manager and
  instances) instead: what the probe loses to the machine's cores alone;
* manager RSS after finished tasks: the 1-instance throughput session streams
  10,000 then 100,000 tasks in all (each collected by the client); RSS (VmRSS)
  at both points gives bytes per finished task = growth / 90,000 (0 = no
  growth with the number of finished tasks).  The manager's ``store_backlog``
  (group commits waiting for its SQLite writer) is recorded at both points,
  and RSS again once the writer has caught up (at most 30 s).

Ratios: throughput is zeromesh / limit (1.0 = as fast as raw ZeroMQ); latency
is zeromesh / limit (1.0 = no overhead, higher is slower).  CPU and RSS have
no raw counterpart and no ratio; fairness is compared with its own idle value.

With ``--peers``, after those figures (and with every zeromesh process
stopped) Ray and Dask distributed are measured by scripts/bench_peers.py, each
in its own subprocess with a time budget, with as many workers as zeromesh
instances: throughput of no-op tasks streamed with the same window, latency
p50/p99 of one no-op at a time (0 B), and start-up seconds; zeromesh's own
start-up (manager + executor until a first task returns) is measured for
comparison.  Each peer row gives peer / limit (as above) and the zeromesh
speed-up: zeromesh throughput / peer throughput, peer latency / zeromesh
latency, peer start-up / zeromesh start-up (above 1 = zeromesh is faster).
Peers are measured once, whatever ``--repeat``; a peer that cannot be
imported is reported missing with the reason.

Usage: python scripts/bench.py [--seconds 3] [--repeat 1] [--quick] [--peers] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_limit  # noqa: E402
import bench_peers  # noqa: E402

from client import Client, Session  # noqa: E402
from client.local import LocalMesh  # noqa: E402
from mesh.ops.config import Settings  # noqa: E402
from mesh.ops.process import die_with_parent  # noqa: E402

APPS = os.path.join(HERE, "bench_apps")
MAX_LOOPS = 10 ** 9          # count bound on every otherwise time-bounded loop
RESULT_WAIT = 30.0           # seconds any single task may take before the run is declared broken
WARMUP_LIMIT = 60.0          # seconds the instances have to start and serve
SIZES = (("0 B", 0), ("100 KiB", 100 * 1024), ("10 MiB", 10 * 1024 * 1024))

MIB10 = 10 * 1024 * 1024
# (label, the probe session's app, mesh of the burst): the burst always goes to app "noop"; the
# control puts it on another mesh (its own manager) to show what the machine's 2 cores alone cost
FAIR_APPS = (("same app", "noop", "fair"), ("second app", "noop-b", "fair"),
             ("control: other mesh", "noop", "slots2"))
FAIR_LIMIT = 60.0            # seconds the burst may take before the fairness run is declared broken
DRAIN_WAIT = 30.0            # seconds the manager's SQLite writer gets to catch up after the finished-task run

FULL = {"seconds": 3.0, "warmup": 0.5, "window": 2000, "queued": 100_000,
        "latency_counts": {"0 B": 2000, "100 KiB": 300, "10 MiB": 20}, "latency_seconds": 10.0,
        "payload_seconds": 3.0, "payload_window": 4,
        "burst": 10_000, "fair_idle": 1000, "finished": (10_000, 100_000)}
QUICK = {"seconds": 0.5, "warmup": 0.2, "window": 500, "queued": 5_000,
         "latency_counts": {"0 B": 100, "100 KiB": 20, "10 MiB": 3}, "latency_seconds": 3.0,
         "payload_seconds": 1.0, "payload_window": 4,
         "burst": 2_000, "fair_idle": 100, "finished": (1_000, 5_000)}


class BenchError(RuntimeError):
    pass


def sayer(silent: bool) -> Callable[[str], None]:
    """``say(msg)``: a progress line on stderr, unless ``silent``."""
    def say(msg: str) -> None:
        if not silent:
            print(msg, file=sys.stderr, flush=True)
    return say


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit(128 + 15): it unwinds through the ``with`` / ``finally`` blocks (LocalMesh's
    exit and the rest) that end every process a benchmark started, by PID."""
    def _terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)


def parse_sized(ap: "argparse.ArgumentParser", argv: Optional[List[str]], full: Dict[str, Any],
                quick: Dict[str, Any], quick_help: str, peer: Optional[Tuple[str, str]] = None) -> Any:
    """The benchmarks' shared options, parsed: ``--quick``, ``--json``, ``--silent``, the hidden
    ``--PEER-child``/``--PEER-module`` (a test names a missing module), and every size option the
    caller left unset (None) taken from ``full`` or, with ``--quick``, ``quick``."""
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--json", help="also write every run's figures here")
    ap.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    if peer is not None:
        name, module = peer
        ap.add_argument(f"--{name}-child", help=argparse.SUPPRESS)
        ap.add_argument(f"--{name}-module", default=module, help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    for key, value in (quick if opts.quick else full).items():
        if getattr(opts, key, None) is None:
            setattr(opts, key, value)
    return opts


def write_json(path: Optional[str], res: Dict[str, Any], indent: int = 1) -> None:
    """Write a benchmark's figures to ``path`` (``--json``); no path, nothing written."""
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=indent)


def noop_spec(name: str = "noop", **spec: Any) -> Dict[str, Any]:
    return {"metadata": {"name": name},
            "spec": {"working_directory": APPS, "command": sys.executable,
                     "arguments": ["noop_service.py"], **spec}}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def children(ppid: int, marker: str) -> List[int]:
    """PIDs of ``ppid``'s descendants whose command line contains ``marker``, without the
    executor's guards (executor/guard.py: an instance's service runs under one)."""
    parents: Dict[int, int] = {}
    cmdlines: Dict[int, bytes] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdlines[int(name)] = f.read()
        except (OSError, ValueError, IndexError):
            continue
    out = []
    for pid, cmd in cmdlines.items():
        if marker.encode() not in cmd or b"guard.py" in cmd:
            continue
        up = parents.get(pid)
        for _ in range(16):   # bounded walk up the tree
            if up == ppid:
                out.append(pid)
                break
            if up is None or up <= 1:
                break
            up = parents.get(up)
    return sorted(out)


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


class Bench:
    """The meshes of one run, started lazily, all stopped by ``close``."""

    def __init__(self, env: Dict[str, str], log_dir: str) -> None:
        self.env = env
        self.log_dir = log_dir
        self.meshes: Dict[str, LocalMesh] = {}
        self.sessions: Dict[str, Session] = {}

    def mesh(self, key: str, slots: int, secure: bool = False) -> LocalMesh:
        m = self.meshes.get(key)
        if m is None:
            d = os.path.join(self.log_dir, key)
            os.makedirs(d, exist_ok=True)
            m = LocalMesh(executors=1, slots=slots, env=self.env, log_dir=d, secure=secure)
            self.meshes[key] = m   # registered before start, so close() ends a half-started mesh
            m.start()
            with m.client() as c:
                c.register_application(noop_spec())
        return m

    def session(self, slots: int, secure: bool = False) -> Tuple[LocalMesh, Session]:
        """A warm session; ``secure``: on a CURVE mesh, logged in as its admin."""
        key = f"slots{slots}" + ("-curve" if secure else "")
        m = self.mesh(key, slots, secure)
        s = self.sessions.get(key)
        if s is None:
            s = self.sessions[key] = Session("noop", manager=m.endpoint, manager_key=m.manager_key, auth=m.admin)
        return m, s

    def close(self) -> None:
        for s in self.sessions.values():
            try:
                s.close()
            except Exception:
                pass
        for m in self.meshes.values():
            m.stop()


# -- throughput ----------------------------------------------------------------------
def stream(session: Session, seconds: float, window: int, req: Any = None) -> Tuple[int, float]:
    """Keep ``window`` no-op tasks in flight for ``seconds``; (tasks completed, elapsed).

    Results are collected oldest first; completions out of order are counted
    when the older ones finish, which evens out over a run.  Everything still
    in flight at the end is awaited (not counted), so the next phase starts idle.
    """
    futs: Deque[Any] = collections.deque()
    done = 0
    start = time.perf_counter()
    end = start + seconds
    try:
        for _ in range(MAX_LOOPS):
            if time.perf_counter() >= end:
                break
            for _ in range(window - len(futs)):
                futs.append(session.submit(req))
            futs[0].result(RESULT_WAIT)
            while futs and futs[0].done():
                futs.popleft().result()
                done += 1
        elapsed = time.perf_counter() - start
    finally:
        for f in futs:
            f.result(RESULT_WAIT)
    return done, elapsed


def warm_up(mesh: LocalMesh, session: Session, instances: int, seconds: float, window: int) -> Dict[str, Any]:
    """Stream until ``instances`` instance processes exist and each one used CPU
    during the last burst, i.e. each was launched, said hello and ran tasks."""
    assert mesh.executors
    epid = mesh.executors[0].pid
    t0 = time.monotonic()
    rounds = 0
    for rounds in range(1, MAX_LOOPS):
        before = {p: _cpu_or_zero(p) for p in children(epid, "noop_service.py")}
        stream(session, seconds, window)
        pids = children(epid, "noop_service.py")
        busy = [p for p in pids if _cpu_or_zero(p) > before.get(p, 0.0)]
        if len(pids) >= instances and len(busy) >= instances:
            return {"instances": len(pids), "rounds": rounds, "seconds": round(time.monotonic() - t0, 2)}
        if time.monotonic() - t0 > WARMUP_LIMIT:
            break
    raise BenchError(f"{instances} instance(s) were not all serving after {WARMUP_LIMIT:.0f}s "
                     f"({rounds} warm-up rounds); see {mesh.log_dir}")


def mesh_throughput(bench: Bench, instances: int, seconds: float, warmup: float, window: int,
                    secure: bool = False) -> Dict[str, Any]:
    m, s = bench.session(instances, secure)
    warm = warm_up(m, s, instances, warmup, window)
    assert m.manager is not None
    pid = m.manager.pid
    cpu0 = cpu_seconds(pid)
    done, elapsed = stream(s, seconds, window)
    cpu = cpu_seconds(pid) - cpu0
    if done <= 0:
        raise BenchError("no task completed during the throughput run")
    return {"tasks": done, "seconds": round(elapsed, 3), "tasks_per_s": round(done / elapsed, 1),
            "manager_cpu_s": round(cpu, 3), "manager_cpu_s_per_10k": round(cpu / done * 10_000, 4),
            "warmup": warm}


# -- latency ---------------------------------------------------------------------------


def mesh_latency(bench: Bench, count: int, payload: int, max_seconds: float, secure: bool = False) -> Dict[str, Any]:
    """``invoke`` one task at a time on one warm instance; the round trip includes pickling."""
    _, s = bench.session(1, secure)
    body = b"x" * payload
    warm = min(100, max(2, count // 10))
    samples: List[float] = []
    deadline = time.monotonic() + max_seconds
    for i in range(warm + count):
        if time.monotonic() > deadline:
            break
        t = time.perf_counter_ns()
        out = s.invoke(body, timeout=RESULT_WAIT)
        dt = time.perf_counter_ns() - t
        if len(out) != payload:
            raise BenchError("the no-op returned a payload of the wrong size")
        if i >= warm:
            samples.append(dt / 1000.0)
    return bench_limit.percentiles(samples)


# -- memory ------------------------------------------------------------------------------
def queued_memory(bench: Bench, queued: int) -> Dict[str, Any]:
    """Manager RSS growth with ``queued`` tasks waiting for an instance that never starts."""
    m = bench.mesh("memory", 1)
    with Client(m.endpoint) as c:
        c.register_application(noop_spec("noop-nowhere", labels={"never": "match"}))
    assert m.manager is not None
    pid = m.manager.pid
    s = Session("noop-nowhere", manager=m.endpoint)
    try:
        time.sleep(0.2)
        before = rss_bytes(pid)
        t0 = time.monotonic()
        futs = [s.submit(None) for _ in range(queued)]
        submit_s = time.monotonic() - t0
        info: Dict[str, Any] = {}
        deadline = time.monotonic() + 120
        for _ in range(MAX_LOOPS):
            info = s.info()
            if info["pending"] >= queued or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if info.get("pending", 0) < queued:
            raise BenchError(f"only {info.get('pending')} of {queued} tasks reached the manager in time")
        queued_s = time.monotonic() - t0
        after = rss_bytes(pid)
        for _ in range(20):  # let the group commit run and the RSS settle; keep the highest reading
            time.sleep(0.1)
            after = max(after, rss_bytes(pid))
        t1 = time.monotonic()
        s.close()
        close_s = time.monotonic() - t1
        # The close reply follows every cancellation on the same socket, so all futures are resolved.
        cancelled = sum(1 for f in futs if f.done() and type(f.exception()).__name__ == "Cancelled")
    finally:
        s.close()
    return {"queued": queued, "rss_before": before, "rss_after": after,
            "bytes_per_queued_task": round((after - before) / queued, 1),
            "submit_s": round(submit_s, 3), "queued_s": round(queued_s, 3), "close_s": round(close_s, 3),
            "cancelled": cancelled}


def stream_count(session: Session, count: int, window: int) -> float:
    """Run exactly ``count`` no-op tasks with at most ``window`` in flight, collecting every
    result; returns the elapsed seconds."""
    futs: Deque[Any] = collections.deque()
    sent = 0
    start = time.perf_counter()
    for _ in range(MAX_LOOPS):
        while sent < count and len(futs) < window:
            futs.append(session.submit(None))
            sent += 1
        if not futs:
            break
        futs.popleft().result(RESULT_WAIT)
        while futs and futs[0].done():
            futs.popleft().result()
    return time.perf_counter() - start


def settled_rss(pid: int, readings: int = 5) -> int:
    """Highest VmRSS over ``readings`` samples 0.1 s apart, after the group commit has run."""
    time.sleep(0.2)
    out = 0
    for _ in range(readings):
        out = max(out, rss_bytes(pid))
        time.sleep(0.1)
    return out


def finished_memory(bench: Bench, counts: Tuple[int, int], window: int) -> Dict[str, Any]:
    """Manager RSS after ``counts[0]`` and ``counts[1]`` finished-and-collected tasks (in all)
    on the 1-instance throughput session: finished tasks should cost no memory."""
    m, s = bench.session(1)
    assert m.manager is not None
    pid = m.manager.pid
    with Client(m.endpoint) as c:
        def backlog() -> Dict[str, Any]:
            st = c.stats()
            return {k: st.get(k) for k in ("store_backlog", "tasks_in_memory")}

        before = settled_rss(pid)
        first, second = counts
        t1 = stream_count(s, first, window)
        rss_first, at_first = settled_rss(pid), backlog()
        t2 = stream_count(s, second - first, window)
        rss_second, at_second = settled_rss(pid), backlog()
        # Then give the group-commit writer time to catch up (bounded): does the memory come back?
        t0 = time.monotonic()
        for _ in range(MAX_LOOPS):
            if not backlog()["store_backlog"] or time.monotonic() - t0 > DRAIN_WAIT:
                break
            time.sleep(0.2)
        drain_s = time.monotonic() - t0
        rss_drained, drained = settled_rss(pid), backlog()
    return {"counts": list(counts), "rss_before": before, "rss_first": rss_first, "rss_second": rss_second,
            "bytes_per_finished_task": round((rss_second - rss_first) / (second - first), 2),
            "tasks_per_s": round(second / (t1 + t2), 1), "seconds": round(t1 + t2, 2),
            "at_first": at_first, "at_second": at_second, "writer_drain_s": round(drain_s, 2),
            "rss_drained": rss_drained, "after_drain": drained}


# -- 10 MiB payloads ----------------------------------------------------------------------
def mesh_payload_throughput(bench: Bench, payload: int, seconds: float, warmup: float,
                            window: int) -> Dict[str, Any]:
    """Stream ``payload``-byte requests through one instance (the no-op returns them), like
    bench_limit.throughput with the same payload, window and worker count."""
    _, s = bench.session(1)
    body = b"x" * payload
    stream(s, warmup, window, body)
    done, elapsed = stream(s, seconds, window, body)
    if done <= 0:
        raise BenchError("no payload task completed")
    return {"tasks": done, "seconds": round(elapsed, 3), "tasks_per_s": round(done / elapsed, 2),
            "mb_per_s": round(done * payload / elapsed / 1e6, 1)}


def limit_payload_throughput(payload: int, seconds: float, warmup: float, window: int,
                             credit: int) -> Dict[str, Any]:
    r = bench_limit.throughput(workers=1, seconds=seconds, payload=payload, credit=credit, window=window,
                               warmup=warmup)
    r["mb_per_s"] = round(r["tasks_per_s"] * payload / 1e6, 1)
    return r


# -- fairness between sessions ---------------------------------------------------------------
def burst_child(endpoint: str, app: str, count: int) -> None:
    """The burst's client, in its own process (so its pickling and I/O thread do not share the
    probe's GIL): open a session, make sure its instance serves, print ``ready``, wait for
    ``go`` on stdin, submit ``count`` tasks at once, wait for all, print the times."""
    s = Session(app, manager=endpoint)
    try:
        for _ in range(20):
            s.invoke(None, timeout=WARMUP_LIMIT)
        print(json.dumps({"ready": True}), flush=True)
        if sys.stdin.readline().strip() != "go":
            return
        t0 = time.perf_counter()
        futs = [s.submit(None) for _ in range(count)]
        t1 = time.perf_counter()
        deadline = time.monotonic() + FAIR_LIMIT
        for f in futs:
            f.result(max(0.1, deadline - time.monotonic()))
        t2 = time.perf_counter()
        print(json.dumps({"tasks": count, "submit_s": round(t1 - t0, 3), "burst_s": round(t2 - t0, 3)}),
              flush=True)
    finally:
        s.close()


def _read_line(proc: subprocess.Popen, buf: List[bytes], timeout: float) -> Optional[Dict[str, Any]]:
    """One JSON line from the child's stdout within ``timeout`` seconds, else None."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    for _ in range(MAX_LOOPS):
        joined = b"".join(buf)
        if b"\n" in joined:
            line, rest = joined.split(b"\n", 1)
            buf[:] = [rest]
            return json.loads(line)
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            raise BenchError(f"the burst client exited (code {proc.wait(5)}); see its log")
        buf.append(chunk)
    return None


def fairness(bench: Bench, probe_app: str, burst_mesh: str, burst: int, idle_count: int,
             max_seconds: float) -> Dict[str, Any]:
    """Latency of one session's ``invoke`` while idle, then while another client's burst of
    ``burst`` tasks (session of app ``noop``) runs; the probe's mesh: one executor, 2 slots.
    The burst goes to the same mesh, or (control) to ``burst_mesh``, another 2-slot mesh."""
    m = bench.mesh("fair", 2)
    bm = bench.mesh(burst_mesh, 2)
    if probe_app != "noop":
        with Client(m.endpoint) as c:
            if c.get_application(probe_app) is None:
                c.register_application(noop_spec(probe_app))
    log = open(os.path.join(m.log_dir, "burst-client.log"), "ab")
    probe = Session(probe_app, manager=m.endpoint)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--burst-child", bm.endpoint, "noop",
                             str(burst)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                            preexec_fn=die_with_parent(signal.SIGTERM))
    log.close()
    buf: List[bytes] = []
    try:
        for _ in range(20):                       # the probe's instance is up and serving
            probe.invoke(None, timeout=WARMUP_LIMIT)
        if _read_line(proc, buf, WARMUP_LIMIT) is None:
            raise BenchError(f"the burst client was not ready within {WARMUP_LIMIT:.0f}s; see {m.log_dir}")
        idle: List[float] = []
        deadline = time.monotonic() + max_seconds
        for i in range(idle_count + 50):
            if time.monotonic() > deadline:
                break
            t = time.perf_counter_ns()
            probe.invoke(None, timeout=RESULT_WAIT)
            if i >= 50:
                idle.append((time.perf_counter_ns() - t) / 1000.0)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        t0 = time.perf_counter()
        during: List[float] = []
        done: Optional[Dict[str, Any]] = None
        for _ in range(MAX_LOOPS):
            t = time.perf_counter_ns()
            probe.invoke(None, timeout=RESULT_WAIT)
            during.append((time.perf_counter_ns() - t) / 1000.0)
            done = _read_line(proc, buf, 0.0)
            if done is not None:
                break
            if time.perf_counter() - t0 > FAIR_LIMIT:
                raise BenchError(f"a burst of {burst} tasks did not finish within {FAIR_LIMIT:.0f}s")
        assert done is not None
        proc.wait(RESULT_WAIT)
    finally:
        try:
            probe.close()
        finally:
            LocalMesh.end(proc)
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    f.close()
    i, d = bench_limit.percentiles(idle), bench_limit.percentiles(during)
    return {"probe_app": probe_app, "burst_mesh": burst_mesh, "burst": burst, "burst_s": done["burst_s"], "submit_s": done["submit_s"],
            "burst_tasks_per_s": round(burst / done["burst_s"], 1),
            "idle": i, "during": d, "during_max_us": round(max(during), 1),
            "ratio_p50": ratio(d["p50_us"], i["p50_us"]), "ratio_p99": ratio(d["p99_us"], i["p99_us"])}



def mesh_startup(bench: Bench) -> Dict[str, Any]:
    """Seconds from starting a fresh manager + executor until a first no-op returns
    (includes registering the app and launching its instance), like the peers' start-up."""
    t0 = time.perf_counter()
    m = bench.mesh("startup", 1)
    s = Session("noop", manager=m.endpoint)
    try:
        s.invoke(None, timeout=WARMUP_LIMIT)
        elapsed = time.perf_counter() - t0
    finally:
        s.close()
    return {"startup_s": round(elapsed, 3)}


# -- peers ---------------------------------------------------------------------------------
PEER_BUDGET = {"ray": 120.0, "dask": 90.0}    # seconds per peer subprocess (full run)
PEER_BUDGET_QUICK = {"ray": 75.0, "dask": 45.0}
# peer -> kind -> table label; kinds are the keys bench_peers reports under throughput/latency
PEER_KINDS = {"ray": (("task", "Ray task"), ("actor", "Ray actor")), "dask": (("submit", "Dask submit"),)}


def measure_peers(opts: argparse.Namespace, cfg: Dict[str, Any], seconds: float, window: int,
                  log_dir: str, say: Any) -> Dict[str, Any]:
    pcfg = bench_peers.QUICK if opts.quick else bench_peers.FULL
    budget = PEER_BUDGET_QUICK if opts.quick else PEER_BUDGET
    out = {}
    for peer in bench_peers.PEERS:
        say(f"peer {peer}: {opts.instances} worker(s), budget {budget[peer]:.0f}s ...")
        out[peer] = bench_peers.measure(peer, opts.instances, seconds, cfg["warmup"], window,
                                        pcfg["latency_count"], pcfg["latency_seconds"], budget[peer],
                                        log_dir=log_dir)
    return out


def compare_peers(raw: Dict[str, Any], res: Dict[str, Any]) -> Dict[str, Any]:
    """Peer figures next to the limit and zeromesh (res holds zeromesh's medians)."""
    lat0 = res["latency"]["0 B"]
    zm_start = res.get("startup", {}).get("startup_s")
    out: Dict[str, Any] = {}
    for peer, kinds in PEER_KINDS.items():
        r = raw.get(peer) or bench_peers.missing("not measured")
        if not r.get("available"):
            out[peer] = {"available": False, "reason": r.get("reason", "unknown")}
            continue
        p: Dict[str, Any] = {"available": True, "version": r.get("version"), "startup_s": r.get("startup_s"),
                             "zeromesh_startup_s": zm_start,
                             "startup_speedup": ratio(r["startup_s"], zm_start) if r.get("startup_s") and zm_start
                             else None,
                             "throughput": {}, "latency": {}}
        for key in ("error", "window", "startup_s_by_workers", "wall_s", "log"):
            if key in r:
                p[key] = r[key]
        for kind, _ in kinds:
            tp: Dict[str, Any] = {}
            for n, zm in res["throughput"].items():
                got = r.get("throughput", {}).get(kind, {}).get(n)
                v = got["tasks_per_s"] if got else None
                tp[n] = {"tasks_per_s": v, "limit_tasks_per_s": zm["limit_tasks_per_s"],
                         "ratio": ratio(v, zm["limit_tasks_per_s"]) if v else None,
                         "zeromesh_tasks_per_s": zm["tasks_per_s"],
                         "zeromesh_speedup": ratio(zm["tasks_per_s"], v) if v else None}
            p["throughput"][kind] = tp
            got = r.get("latency", {}).get(kind)
            lat: Dict[str, Any] = {"count": got["count"] if got else None}
            for q in ("p50_us", "p99_us"):
                v = got[q] if got else None
                lat.update({q: v, "limit_" + q: lat0["limit_" + q],
                            "ratio_" + q[:3]: ratio(v, lat0["limit_" + q]) if v else None,
                            "zeromesh_" + q: lat0[q],
                            "zeromesh_speedup_" + q[:3]: ratio(v, lat0[q]) if v else None})
            p["latency"][kind] = lat
        out[peer] = p
    return out


# -- run ----------------------------------------------------------------------------------
def median(xs: List[float]) -> float:
    return round(statistics.median(xs), 4 if max(xs) < 10 else 1)


def ratio(a: float, b: float) -> Optional[float]:
    return round(a / b, 3) if b else None


def run(opts: argparse.Namespace) -> Dict[str, Any]:
    cfg = dict(QUICK if opts.quick else FULL)
    seconds = opts.seconds if opts.seconds is not None else cfg["seconds"]
    window = opts.window or cfg["window"]
    queued = opts.queued if opts.queued is not None else cfg["queued"]
    env: Dict[str, str] = {}
    if opts.prefetch is not None:
        env["ZMESH_PREFETCH"] = str(opts.prefetch)
    if opts.queue_target is not None:
        env["ZMESH_QUEUE_TARGET"] = str(opts.queue_target)
    settings = Settings.load({**os.environ, **env})
    credit = opts.credit or settings.prefetch
    log_dir = tempfile.mkdtemp(prefix="zmesh-bench-")
    started = time.monotonic()
    raw: Dict[str, Any] = {"throughput": {str(n): {"limit": [], "zeromesh": []} for n in opts.instances},
                           "latency": {label: {"limit": [], "zeromesh": []} for label, _ in SIZES},
                           "payload_10mib": {"limit": [], "zeromesh": []},
                           "fairness": {label: [] for label, _, _ in FAIR_APPS},
                           "curve": {"plain": [], "curve": []}}
    bench = Bench(env, log_dir)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not opts.silent else (lambda msg: None)
    try:
        for rep in range(opts.repeat):
            for n in opts.instances:
                say(f"[{rep + 1}/{opts.repeat}] throughput, {n} instance(s): limit ...")
                raw["throughput"][str(n)]["limit"].append(bench_limit.throughput(
                    workers=n, seconds=seconds, payload=0, credit=credit, window=window, warmup=cfg["warmup"]))
                say(f"[{rep + 1}/{opts.repeat}] throughput, {n} instance(s): zeromesh ...")
                raw["throughput"][str(n)]["zeromesh"].append(
                    mesh_throughput(bench, n, seconds, cfg["warmup"], window))
            for label, size in SIZES:
                count = cfg["latency_counts"][label]
                say(f"[{rep + 1}/{opts.repeat}] latency {label}: limit, zeromesh ...")
                raw["latency"][label]["limit"].append(bench_limit.latency(
                    workers=1, count=count, payload=size, max_seconds=cfg["latency_seconds"]))
                raw["latency"][label]["zeromesh"].append(
                    mesh_latency(bench, count, size, cfg["latency_seconds"]))
            pw, ps = cfg["payload_window"], cfg["payload_seconds"]
            say(f"[{rep + 1}/{opts.repeat}] throughput 10 MiB payloads, window {pw}: limit, zeromesh ...")
            raw["payload_10mib"]["limit"].append(limit_payload_throughput(MIB10, ps, cfg["warmup"], pw, credit))
            raw["payload_10mib"]["zeromesh"].append(
                mesh_payload_throughput(bench, MIB10, ps, cfg["warmup"], pw))
            for label, app, burst_mesh in FAIR_APPS:
                say(f"[{rep + 1}/{opts.repeat}] fairness ({label}): probe idle, then during a "
                    f"{cfg['burst']:,}-task burst ...")
                raw["fairness"][label].append(
                    fairness(bench, app, burst_mesh, cfg["burst"], cfg["fair_idle"], cfg["latency_seconds"]))
        if opts.curve:
            for rep in range(opts.repeat):
                for secure in (False, True):
                    name = "curve" if secure else "plain"
                    say(f"[{rep + 1}/{opts.repeat}] CURVE cost: {name} throughput and latency ...")
                    raw["curve"][name].append({
                        "throughput": mesh_throughput(bench, 1, seconds, cfg["warmup"], window, secure),
                        "latency": mesh_latency(bench, cfg["latency_counts"]["0 B"] // 2, 0, cfg["latency_seconds"],
                                                secure)})
        a, b = cfg["finished"]
        say(f"manager memory after {a:,} and {b:,} finished tasks ...")
        finished = finished_memory(bench, (a, b), window)
        say(f"manager memory with {queued} tasks queued ...")
        memory = queued_memory(bench, queued)
        if opts.peers:
            say("zeromesh start-up ...")
            startup = mesh_startup(bench)
    finally:
        bench.close()
    peers_raw: Dict[str, Any] = {}
    if opts.peers:
        peers_started = time.monotonic()
        peers_raw = measure_peers(opts, cfg, seconds, window, log_dir, say)
        peers_seconds = time.monotonic() - peers_started
    total = time.monotonic() - started

    result: Dict[str, Any] = {
        "settings": {"quick": opts.quick, "repeat": opts.repeat, "seconds": seconds, "window": window,
                     "limit_credit": credit, "prefetch": settings.prefetch, "queue_target": settings.queue_target,
                     "queued": queued, "payload_window": cfg["payload_window"], "burst": cfg["burst"],
                     "finished": list(cfg["finished"]), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                     "log_dir": log_dir},
        "throughput": {}, "latency": {}, "manager": {}, "runs": raw,
    }
    for n in opts.instances:
        r = raw["throughput"][str(n)]
        zm = median([x["tasks_per_s"] for x in r["zeromesh"]])
        lim = median([x["tasks_per_s"] for x in r["limit"]])
        result["throughput"][str(n)] = {"tasks_per_s": zm, "limit_tasks_per_s": lim, "ratio": ratio(zm, lim)}
        result["manager"][f"cpu_s_per_10k_tasks_{n}"] = median(
            [x["manager_cpu_s_per_10k"] for x in r["zeromesh"]])
    for label, _ in SIZES:
        r = raw["latency"][label]
        entry: Dict[str, Any] = {"count": r["zeromesh"][-1]["count"]}
        for p in ("p50_us", "p99_us"):
            zm = median([x[p] for x in r["zeromesh"]])
            lim = median([x[p] for x in r["limit"]])
            entry.update({p: zm, "limit_" + p: lim, "ratio_" + p[:3]: ratio(zm, lim)})
        result["latency"][label] = entry
    r = raw["payload_10mib"]
    zm = median([x["mb_per_s"] for x in r["zeromesh"]])
    lim = median([x["mb_per_s"] for x in r["limit"]])
    result["payload_10mib"] = {"mb_per_s": zm, "limit_mb_per_s": lim, "ratio": ratio(zm, lim),
                               "window": cfg["payload_window"]}
    result["fairness"] = {}
    for label, _, _ in FAIR_APPS:
        r = raw["fairness"][label]
        f: Dict[str, Any] = {"probe_app": r[0]["probe_app"], "burst_mesh": r[0]["burst_mesh"],
                             "burst": cfg["burst"],
                             "burst_s": median([x["burst_s"] for x in r]),
                             "samples_idle": r[-1]["idle"]["count"], "samples_during": r[-1]["during"]["count"]}
        for phase in ("idle", "during"):
            for q in ("p50_us", "p99_us"):
                f[f"{phase}_{q}"] = median([x[phase][q] for x in r])
        f["ratio_p50"] = median([x["ratio_p50"] for x in r])
        f["ratio_p99"] = median([x["ratio_p99"] for x in r])
        result["fairness"][label] = f
    if opts.curve:
        cv = raw["curve"]
        pick = {k: {"tasks_per_s": median([x["throughput"]["tasks_per_s"] for x in cv[k]]),
                    "p50_us": median([x["latency"]["p50_us"] for x in cv[k]]),
                    "p99_us": median([x["latency"]["p99_us"] for x in cv[k]])} for k in ("plain", "curve")}
        result["curve"] = {**pick,
                           "ratio_tasks_per_s": ratio(pick["curve"]["tasks_per_s"], pick["plain"]["tasks_per_s"]),
                           "ratio_p50": ratio(pick["curve"]["p50_us"], pick["plain"]["p50_us"]),
                           "ratio_p99": ratio(pick["curve"]["p99_us"], pick["plain"]["p99_us"])}
    first = str(opts.instances[0])
    result["manager"]["cpu_s_per_10k_tasks"] = result["manager"][f"cpu_s_per_10k_tasks_{first}"]
    result["manager"]["rss_bytes_per_queued_task"] = memory["bytes_per_queued_task"]
    result["manager"]["queued_memory"] = memory
    result["manager"]["rss_bytes_per_finished_task"] = finished["bytes_per_finished_task"]
    result["manager"]["finished_memory"] = finished
    result["total_seconds"] = round(total, 1)
    if opts.peers:
        result["startup"] = startup
        result["peers"] = compare_peers(peers_raw, result)
        result["peers_seconds"] = round(peers_seconds, 1)
        raw["peers"] = peers_raw
    return result


# -- output --------------------------------------------------------------------------------
def rows(res: Dict[str, Any]) -> List[Tuple[str, str, str, str, str]]:
    def num(v: Any, fmt: str = ",.0f") -> str:
        return "-" if v is None else format(v, fmt)

    out = []
    for n, r in res["throughput"].items():
        out.append((f"throughput no-op, {n} inst.", "tasks/s", num(r["tasks_per_s"]),
                    num(r["limit_tasks_per_s"]), num(r["ratio"], ".2f")))
    for label, r in res["latency"].items():
        for p in ("p50", "p99"):
            out.append((f"latency {label} {p} (n={r['count']})", "us", num(r[p + "_us"]),
                        num(r[f"limit_{p}_us"]), num(r[f"ratio_{p}"], ".2f")))
    p10 = res["payload_10mib"]
    out.append((f"throughput 10 MiB payloads (window {p10['window']})", "MB/s", num(p10["mb_per_s"], ",.1f"),
                num(p10["limit_mb_per_s"], ",.1f"), num(p10["ratio"], ".2f")))
    m = res["manager"]
    for n in res["throughput"]:
        out.append((f"manager CPU / 10k tasks, {n} inst.", "s", num(m[f"cpu_s_per_10k_tasks_{n}"], ".3f"), "-", "-"))
    q = m["queued_memory"]
    out.append((f"manager RSS / queued task ({q['queued']:,})", "bytes", num(m["rss_bytes_per_queued_task"]),
                "-", "-"))
    f = m["finished_memory"]
    a, b = f["counts"]
    out.append((f"manager RSS after {a:,} finished tasks", "MiB", num(f["rss_first"] / 2 ** 20, ",.1f"), "-", "-"))
    out.append((f"manager RSS after {b:,} finished tasks", "MiB", num(f["rss_second"] / 2 ** 20, ",.1f"), "-", "-"))
    out.append((f"manager RSS / finished task ({a:,} -> {b:,})", "bytes", num(m["rss_bytes_per_finished_task"], ",.1f"),
                "-", "-"))
    out.append((f"  SQLite writer backlog at {a:,} / {b:,}", "commits",
                f"{f['at_first']['store_backlog']} / {f['at_second']['store_backlog']}", "-", "-"))
    out.append((f"  manager RSS {f['writer_drain_s']:.0f} s later, writer caught up", "MiB",
                num(f["rss_drained"] / 2 ** 20, ",.1f"), "-", "-"))
    return out


def fair_rows(res: Dict[str, Any]) -> List[Tuple[str, ...]]:
    out: List[Tuple[str, ...]] = []
    for label, f in res["fairness"].items():
        for q in ("p50", "p99"):
            out.append((f"2nd session invoke {q}, {label} (n={f['samples_during']:,}/{f['samples_idle']:,})", "us",
                        format(f[f"during_{q}_us"], ",.0f"), format(f[f"idle_{q}_us"], ",.0f"),
                        format(f[f"ratio_{q}"], ".2f")))
        out.append((f"  burst of {f['burst']:,} tasks, {label}", "s", format(f["burst_s"], ".2f"), "-", "-"))
    return out


def peer_rows(res: Dict[str, Any]) -> List[Tuple[str, ...]]:
    def num(v: Any, fmt: str = ",.0f") -> str:
        return "-" if v is None else format(v, fmt)

    out: List[Tuple[str, ...]] = [("zeromesh start-up", "s", "-", "-", "-",
                                   num(res["startup"]["startup_s"], ".2f"), "-")]
    for peer, kinds in PEER_KINDS.items():
        p = res["peers"][peer]
        name = kinds[0][1].split()[0]
        if not p["available"]:
            out.append((f"{name}: missing ({p['reason'][:100]})", "-", "-", "-", "-", "-", "-"))
            continue
        out.append((f"{name} start-up", "s", num(p["startup_s"], ".2f"), "-", "-",
                    num(p["zeromesh_startup_s"], ".2f"), num(p["startup_speedup"], ".1f")))
        win = f", window {p['window']}" if p.get("window") and p["window"] != res["settings"]["window"] else ""
        for kind, label in kinds:
            for n, t in p["throughput"][kind].items():
                out.append((f"{label} throughput, {n} worker(s){win}", "tasks/s", num(t["tasks_per_s"]),
                            num(t["limit_tasks_per_s"]), num(t["ratio"], ".2f"),
                            num(t["zeromesh_tasks_per_s"]), num(t["zeromesh_speedup"], ".1f")))
        for kind, label in kinds:
            lat = p["latency"][kind]
            for q in ("p50", "p99"):
                out.append((f"{label} latency 0 B {q} (n={num(lat['count'], 'd')})", "us",
                            num(lat[q + "_us"]), num(lat[f"limit_{q}_us"]), num(lat[f"ratio_{q}"], ".2f"),
                            num(lat[f"zeromesh_{q}_us"]), num(lat[f"zeromesh_speedup_{q}"], ".1f")))
        if p.get("error"):
            out.append((f"{name}: incomplete ({p['error'][:100]})", "-", "-", "-", "-", "-", "-"))
    return out


def _table(title: str, header: Tuple[str, ...], body: List[Tuple[str, ...]], caption: str,
           width: int = 100) -> None:
    """A rich table when rich is installed, plain columns otherwise (shared by the bench scripts)."""
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        fmt = "%-44s%8s" + "%12s" * (len(header) - 2)
        print(title)
        print(fmt % header)
        for r in body:
            print(fmt % r)
        print(caption)
        return
    t = Table(title=escape(title), caption=escape(caption))
    t.add_column(header[0])
    t.add_column(header[1])
    for h in header[2:]:
        t.add_column(h, justify="right")
    for r in body:
        t.add_row(*(escape(c) for c in r))
    Console(width=max(width, Console().width)).print(t)


def show_peers(res: Dict[str, Any]) -> None:
    title = (f"peers vs raw ZeroMQ and zeromesh (same worker counts, window {res['settings']['window']}, "
             f"measured once, {res['peers_seconds']} s)")
    header = ("figure", "unit", "peer", "limit", "peer/limit", "zeromesh", "zm speed-up")
    caption = ("start-up: until a first task returns; peer/limit as above; zm speed-up = zeromesh/peer "
               "tasks/s, peer/zeromesh latency and start-up (above 1: zeromesh faster)")
    _table(title, header, peer_rows(res), caption, width=120)


def show(res: Dict[str, Any]) -> None:
    st = res["settings"]
    title = (f"zeromesh vs raw ZeroMQ ({st['cpus']} CPUs, window {st['window']}, prefetch {st['prefetch']}, "
             f"repeat {st['repeat']}, {res['total_seconds']} s)")
    header = ("figure", "unit", "zeromesh", "limit", "ratio")
    caption = "ratio = zeromesh / limit: throughput higher is better, latency lower is better"
    _table(title, header, rows(res), caption)
    show_fairness(res)
    if "curve" in res:
        show_curve(res)
    if "peers" in res:
        show_peers(res)


def show_curve(res: Dict[str, Any]) -> None:
    c = res["curve"]
    body = [("throughput no-op, 1 inst.", "tasks/s", f"{c['curve']['tasks_per_s']:,.0f}",
             f"{c['plain']['tasks_per_s']:,.0f}", f"{c['ratio_tasks_per_s']:.2f}"),
            ("latency 0 B p50", "us", f"{c['curve']['p50_us']:,.0f}", f"{c['plain']['p50_us']:,.0f}",
             f"{c['ratio_p50']:.2f}"),
            ("latency 0 B p99", "us", f"{c['curve']['p99_us']:,.0f}", f"{c['plain']['p99_us']:,.0f}",
             f"{c['ratio_p99']:.2f}")]
    _table("the cost of security: CURVE + tokens vs --insecure (same machine, same run)",
           ("figure", "unit", "secured", "insecure", "ratio"), body, "ratio = secured / insecure")


def show_fairness(res: Dict[str, Any]) -> None:
    f = next(iter(res["fairness"].values()))
    title = (f"fairness: a 2nd session's invoke during another client's {f['burst']:,}-task burst "
             f"(1 executor, 2 slots)")
    header = ("figure", "unit", "during", "idle", "ratio")
    caption = ("during = while the burst runs, idle = same session just before it (n = samples "
               "during/idle); ratio = during / idle (target p99 <= 5)")
    _table(title, header, fair_rows(res), caption)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=None, help="measured seconds per throughput run (default 3)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of every figure; medians are reported")
    ap.add_argument("--window", type=int, default=None, help="tasks kept in flight (default 2000)")
    ap.add_argument("--instances", type=int, nargs="+", default=[1, 2], help="instance counts to measure")
    ap.add_argument("--queued", type=int, default=None, help="tasks queued for the RSS figure (default 100000)")
    ap.add_argument("--prefetch", type=int, default=None, help="sets ZMESH_PREFETCH for the mesh")
    ap.add_argument("--queue-target", type=float, default=None, help="sets ZMESH_QUEUE_TARGET for the mesh")
    ap.add_argument("--credit", type=int, default=None, help="raw limit's credit per worker (default: prefetch)")
    ap.add_argument("--quick", action="store_true", help="tiny counts and durations (< 20 s), for tests")
    ap.add_argument("--peers", action="store_true",
                    help="also measure Ray and Dask distributed (scripts/bench_peers.py), ~2 more minutes")
    ap.add_argument("--curve", action="store_true",
                    help="also measure a secured mesh (CURVE, logged-in client) against an insecure one")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--burst-child", nargs=3, metavar=("ENDPOINT", "APP", "COUNT"), help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.burst_child:
        endpoint, app, count = opts.burst_child
        burst_child(endpoint, app, int(count))
        return {}
    if opts.repeat < 1 or (opts.seconds is not None and opts.seconds <= 0) or min(opts.instances) < 1:
        ap.error("--repeat, --seconds and --instances must be positive")

    exit_on_sigterm()   # unwinds through the finally blocks that end every child
    res = run(opts)
    show(res)
    write_json(opts.json, res, indent=2)
    return res


if __name__ == "__main__":
    main()
