"""Issue 11's flood: one client submits a million no-op tasks; is any executor evicted, and
how much slower does another client get?

The goal measured ("Done when" of issue 11): under a million-task flood from one client, no
executor is evicted and another client's p99 stays within 5x its idle value.

The mesh is what a user runs: client.local.LocalMesh with a manager and 2 executors x 2 slots
on loopback, default settings (heartbeat_interval 1 s, liveness 3, max_store_backlog 64, ...:
no timer is shrunk, and any ZMESH_<setting> in the environment is dropped; the log is INFO in
key=value form, since it is read), and the no-op service (scripts/bench_apps/noop_service.py).
Three processes of ours talk to it:

* the probe (``--probe-child``): the "other" client, its own process so that the flood's
  pickling and I/O thread do not share its GIL; its session runs ``invoke(None)`` one task at
  a time: ``--idle`` samples with the flood client connected but quiet (after the manager's
  writer has caught up), then for the whole flood (bounded by ``--probe-max`` samples and the
  flood's time limit);
* the flood client (``--flood-child``): first streams until every slot holds an instance
  (so that no launch during the flood is a scale-out), then submits ``--tasks`` tasks as fast
  as its window allows (``--window``, default the client's own ``max_inflight``, 100,000)
  and collects every future;
* this process: polls the manager every 0.5 s meanwhile (``stats``, ``find_executors``, the
  executor and instance processes) and reads the daemons' logs afterwards.

Evictions, how they are counted: the manager has no eviction counter, so the count is the
manager's ``executor lost`` events (mesh/core/members.py ``lose_executor``; WARNING) in its log
from the flood's start to ``EVICTION_GRACE`` seconds after its end, broken down by reason
("no heartbeat for ...", "executor reconnected").  Cross-checks, reported beside it: executors
that joined again (their ``joined_at`` changed, or they vanished, in ``find_executors``
polls), executor processes that exited, and the executors' own ``manager silent; reconnecting``
events (executor/daemon.py: the executor gave up on the manager and stopped its instances).
The first goal passes when all of these are 0.

Instance restarts: the manager's ``launch instance`` events in the same window (every slot
already holds an instance when the flood starts, so a launch replaces a lost one), with the
manager's ``instance died`` and the executors' ``instance crashed`` events, and instance
processes first seen during the flood and those gone by its end (children of the executors,
sampled).

Also reported: flood throughput and duration, ``stats.store_pauses`` during the flood (the
manager stopped reading its socket because its SQLite writer fell ``max_store_backlog``
commits behind), the largest ``store_backlog`` seen, polls the manager did not answer, and
the probe's p50/p99 idle and during the flood with the ratio flood p99 / idle p99 (goal: <= 5).

Usage: python scripts/bench_flood.py [--tasks 1000000] [--window 100000] [--idle 1000]
                                    [--quick] [--max-seconds 1200] [--probe-max N] [--freeze SECONDS]
                                    [--log-dir DIR] [--silent] [--json PATH]

``--freeze 6`` is the negative control of the eviction count: executor-0 is stopped (SIGSTOP)
for 6 s when the flood starts, past the 3 s liveness, so the manager evicts it; the report
must count that eviction, its reconnect and the instances it lost (goal 1: FAIL).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Deque, Dict, List, Optional, Set

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench import children, exit_on_sigterm, noop_spec, sayer, write_json  # noqa: E402
from bench_limit import percentiles  # noqa: E402

from client import Client, Session  # noqa: E402
from client.local import LocalMesh  # noqa: E402
from mesh.ops.config import Settings  # noqa: E402
from mesh.ops.process import die_with_parent  # noqa: E402
from mesh.testing import LocalMesh as Processes  # noqa: E402  (what LocalMesh's `with` gives)

MAX_LOOPS = 10 ** 9        # count bound on every otherwise time-bounded loop
RESULT_WAIT = 60.0         # seconds one task may take before it counts as an error
WARMUP_LIMIT = 90.0        # seconds for the children's sessions and every slot's instance to serve
SETTLE_LIMIT = 60.0        # seconds the manager's writer gets to catch up before the idle samples
POLL = 0.5                 # seconds between polls of the manager during the flood
EVICTION_GRACE = 5.0       # seconds after the flood in which an eviction still counts (> 3 s liveness)
WARM_SAMPLES = 50          # probe invokes not counted, before each phase
GOAL_RATIO = 5.0           # flood p99 / idle p99 at most this
EXECUTORS, SLOTS = 2, 2
MARKER = "noop_service.py"  # in the command line of every instance process

FULL = {"tasks": 1_000_000, "idle": 1000, "max_seconds": 1200.0, "probe_max": 1_000_000}
QUICK = {"tasks": 100_000, "idle": 300, "max_seconds": 300.0, "probe_max": 200_000}


class BenchError(RuntimeError):
    pass


# -- the children ----------------------------------------------------------------------------
def _emit(obj: Dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


_STDIN = bytearray()   # what a child has read from its stdin and not yet used


def _stdin_line(timeout: float) -> Optional[str]:
    """A line from stdin within ``timeout`` seconds, else None ('' once stdin is closed).
    Read from the descriptor, not sys.stdin, whose buffer select() cannot see."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_LOOPS):
        if b"\n" in _STDIN:
            i = _STDIN.index(b"\n")
            line = bytes(_STDIN[:i + 1])
            del _STDIN[:i + 1]
            return line.decode()
        if not select.select([0], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return None
        chunk = os.read(0, 4096)
        if not chunk:
            return ""
        _STDIN.extend(chunk)
    return None


def _sample(s: Session, count: int, seconds: float, stop_on_stdin: bool) -> Dict[str, Any]:
    """``count`` one-at-a-time invokes (bounded by ``seconds``; with ``stop_on_stdin`` until a
    line arrives); a failed invoke is an error and its elapsed time still a sample."""
    samples: List[float] = []
    errors: List[str] = []
    t0 = time.monotonic()
    stopped = False
    for _ in range(count):
        if time.monotonic() - t0 > seconds:
            break
        if stop_on_stdin and samples and _stdin_line(0.0) is not None:   # ``stop``; one sample at least
            stopped = True
            break
        t = time.perf_counter_ns()
        try:
            s.invoke(None, timeout=RESULT_WAIT)
        except Exception as exc:   # noqa: BLE001 - a benchmark reports failures, it does not stop on one
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
        samples.append((time.perf_counter_ns() - t) / 1000.0)
    out: Dict[str, Any] = percentiles(samples) if samples else {"count": 0}
    out.update({"max_us": round(max(samples), 1) if samples else None, "errors": len(errors),
                "first_errors": errors[:3], "seconds": round(time.monotonic() - t0, 2), "stopped": stopped})
    return out


def probe_child(endpoint: str) -> None:
    """The other client.  Commands on stdin, one JSON answer line each on stdout:
    ``idle N SECONDS`` and ``flood N SECONDS`` (this one ends early at the next line, ``stop``),
    ``quit``."""
    with Session("noop", manager=endpoint) as s:
        for _ in range(WARM_SAMPLES):
            s.invoke(None, timeout=WARMUP_LIMIT)
        _emit({"ready": True})
        for _ in range(10):
            line = _stdin_line(3 * SETTLE_LIMIT + WARMUP_LIMIT)
            if not line or line.strip() == "quit":
                return
            kind, count, seconds = line.split()
            for _ in range(WARM_SAMPLES if kind == "idle" else 0):
                s.invoke(None, timeout=RESULT_WAIT)
            _emit(_sample(s, int(count), float(seconds), stop_on_stdin=kind == "flood"))


def flood_child(endpoint: str, count: int, window: int, max_seconds: float, instances: int) -> None:
    """The flooding client: stream until ``instances`` instances serve (every slot), say ready,
    wait for ``go``, submit ``count`` tasks with at most ``window`` futures held, collect them all."""
    with Session("noop", manager=endpoint) as s, Client(endpoint) as c:
        deadline = time.monotonic() + WARMUP_LIMIT
        for _ in range(MAX_LOOPS):
            _flood(s, 4000, 2000, WARMUP_LIMIT)
            if c.stats().get("instances", 0) >= instances:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"fewer than {instances} instances after {WARMUP_LIMIT:.0f}s")
        _flood(s, 4000, 2000, WARMUP_LIMIT)
        _emit({"ready": True, "instances": c.stats().get("instances")})
        if (_stdin_line(3 * SETTLE_LIMIT + WARMUP_LIMIT) or "").strip() != "go":
            return
        _emit(_flood(s, count, window, max_seconds, progress=True))


def _flood(s: Session, count: int, window: int, max_seconds: float, progress: bool = False) -> Dict[str, Any]:
    """Submit ``count`` no-op tasks, at most ``window`` futures held; every result collected
    (a failed one counted).  Stops submitting after ``max_seconds``."""
    futs: Deque[Any] = collections.deque()
    sent = done = errors = 0
    t0 = last = time.monotonic()
    deadline = t0 + max_seconds
    timed_out = False
    for _ in range(MAX_LOOPS):
        while sent < count and len(futs) < window:
            futs.append(s.submit(None))
            sent += 1
            if sent % 1000 == 0 and time.monotonic() > deadline:
                break
        if not futs:
            break
        now = time.monotonic()
        if now > deadline:
            timed_out = True
            break
        try:
            futs.popleft().result(max(0.1, min(RESULT_WAIT, deadline - now)))
        except Exception:   # noqa: BLE001 - counted: a flood reports, it does not stop on one failure
            errors += 1
        done += 1
        while futs and futs[0].done():
            if futs.popleft().exception() is not None:
                errors += 1
            done += 1
        if progress and now - last > 10:
            last = now
            print(f"flood: {sent:,} sent, {done:,} answered, {now - t0:.0f}s", file=sys.stderr, flush=True)
    took = time.monotonic() - t0
    return {"tasks": count, "sent": sent, "answered": done, "errors": errors, "seconds": round(took, 2),
            "tasks_per_s": round(done / took, 1) if took > 0 else None, "timed_out": timed_out}


# -- driving the children ----------------------------------------------------------------------
class Child:
    """A child process of this script, spoken to in lines; ended by its PID."""

    def __init__(self, name: str, args: List[str], log_dir: str) -> None:
        self.name = name
        with open(os.path.join(log_dir, f"{name}.log"), "ab") as log:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log,
                                         preexec_fn=die_with_parent(signal.SIGTERM))
        self.buf = b""

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> Optional[Dict[str, Any]]:
        """One JSON line within ``timeout`` seconds, else None."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        for _ in range(MAX_LOOPS):
            if b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                return json.loads(line)
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise BenchError(f"the {self.name} exited (code {self.proc.wait(5)}); see its log")
            self.buf += chunk
        return None

    def expect(self, timeout: float, what: str) -> Dict[str, Any]:
        got = self.read(timeout)
        if got is None:
            raise BenchError(f"the {self.name}: no {what} within {timeout:.0f}s")
        return got

    def end(self) -> None:
        LocalMesh.end(self.proc)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


# -- watching the mesh -------------------------------------------------------------------------
class Watch:
    """What the manager and the processes say during the flood, polled every ``POLL`` seconds."""

    def __init__(self, mesh: Processes, client: Client) -> None:
        self.mesh = mesh
        self.client = client
        self.stats0 = client.stats()
        self.joined0 = self.joined()
        self.executor_pids = [p.pid for p in mesh.executors]
        self.instances0 = self.instance_pids()
        self.seen: Set[int] = set(self.instances0)
        self.rejoined: Set[str] = set()
        self.vanished: Set[str] = set()
        self.max_backlog = 0
        self.polls = self.poll_failures = 0
        self.last_stats = self.stats0
        self.offsets = {name: _size(path) for name, path in self.logs().items()}

    def logs(self) -> Dict[str, str]:
        names = ["manager"] + [f"executor-{i}" for i in range(len(self.mesh.executors))]
        return {n: os.path.join(self.mesh.log_dir, f"{n}.log") for n in names}

    def joined(self) -> Dict[str, float]:
        return {e.id: e.joined_at for e in self.client.find_executors()}

    def instance_pids(self) -> Set[int]:
        return {pid for ex in self.executor_pids for pid in children(ex, MARKER)}

    def poll(self) -> None:
        self.polls += 1
        self.seen |= self.instance_pids()
        try:
            st = self.client.stats()
            now = self.joined()
        except Exception:   # noqa: BLE001 - a manager too busy to answer is a finding, not a crash
            self.poll_failures += 1
            return
        self.last_stats = st
        self.max_backlog = max(self.max_backlog, int(st.get("store_backlog") or 0))
        for eid, at in self.joined0.items():
            if eid not in now:
                self.vanished.add(eid)
            elif now[eid] != at:
                self.rejoined.add(eid)

    def events(self) -> Dict[str, List[Dict[str, str]]]:
        """The log events since the flood started, per daemon."""
        out = {}
        for name, path in self.logs().items():
            with open(path, "rb") as f:
                f.seek(self.offsets[name])
                out[name] = [_kv(line.decode(errors="replace")) for line in f]
        return out

    def report(self) -> Dict[str, Any]:
        self.poll()
        ev = self.events()
        mgr = ev["manager"]
        execs = [e for name, lines in ev.items() if name != "manager" for e in lines]

        def named(lines: List[Dict[str, str]], msg: str) -> List[Dict[str, str]]:
            return [e for e in lines if e.get("msg") == msg]

        lost = named(mgr, "executor lost")
        reasons: Dict[str, int] = collections.Counter(e.get("reason", "?").split(" for ")[0] for e in lost)
        st0, st1 = self.stats0, self.last_stats
        return {
            "evictions": len(lost), "eviction_reasons": dict(reasons),
            "evicted": sorted({e.get("executor", "?") for e in lost}),
            "executors_rejoined": sorted(self.rejoined), "executors_vanished": sorted(self.vanished),
            "executor_processes_exited": sum(1 for p in self.mesh.executors if p.poll() is not None),
            "executor_reconnects": len(named(execs, "manager silent; reconnecting")),
            "instance_restarts": len(named(mgr, "launch instance")),
            "instance_deaths": len(named(mgr, "instance died")),
            "instance_crashes": len(named(execs, "instance crashed")),
            "instance_start_timeouts": len(named(mgr, "instance did not start in time")),
            "instance_pids_at_start": len(self.instances0), "instance_pids_new": len(self.seen - self.instances0),
            "instance_pids_gone": len(self.instances0 - self.instance_pids()),
            "store_pauses": int(st1.get("store_pauses", 0)) - int(st0.get("store_pauses", 0)),
            "store_pauses_total": int(st1.get("store_pauses", 0)),
            "max_store_backlog": self.max_backlog,
            "tasks_retried": int(st1.get("tasks_retried", 0)) - int(st0.get("tasks_retried", 0)),
            "late_answers_dropped": int(st1.get("late_answers_dropped", 0)) - int(st0.get("late_answers_dropped", 0)),
            "polls": self.polls, "poll_failures": self.poll_failures,
        }


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _kv(line: str) -> Dict[str, str]:
    """One key=value log line (mesh/ops/log.py) as a dict; {} for anything else."""
    try:
        return dict(tok.split("=", 1) for tok in shlex.split(line) if "=" in tok)
    except ValueError:
        return {}


class Freezer:
    """The negative control (``--freeze``): one executor stopped (SIGSTOP) for a while, then
    continued; the eviction count must see it."""

    def __init__(self) -> None:
        self.pid = 0
        self.until = 0.0

    def freeze(self, pid: int, seconds: float) -> None:
        self.pid, self.until = pid, time.monotonic() + seconds
        os.kill(pid, signal.SIGSTOP)

    def thaw_if_due(self) -> None:
        if self.pid and time.monotonic() >= self.until:
            self.thaw()

    def thaw(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.pid = 0


def default_timers() -> List[str]:
    """Drop every ``ZMESH_<setting>`` from this process's environment (which the mesh and the
    clients inherit), so that all run with the defaults a user gets; returns the names dropped.
    (A test run exports shrunk timers, mesh.testing.FAST; this benchmark must not inherit them.)"""
    names = {"ZMESH_" + f.name.upper() for f in dataclasses.fields(Settings)}
    return sorted(k for k in names if os.environ.pop(k, None) is not None)


def settle(client: Client) -> float:
    """Wait (bounded) until the manager's writer has caught up; returns the seconds waited."""
    t0 = time.monotonic()
    for _ in range(MAX_LOOPS):
        if not client.stats().get("store_backlog") or time.monotonic() - t0 > SETTLE_LIMIT:
            break
        time.sleep(0.1)
    return time.monotonic() - t0


# -- the run ----------------------------------------------------------------------------------
def run(opts: argparse.Namespace, log_dir: str, say: Any) -> Dict[str, Any]:
    env = {"ZMESH_LOG_LEVEL": "INFO", "ZMESH_LOG_FORMAT": "kv"}   # the defaults, pinned: the log is read
    settings = Settings.load({**os.environ, **env})   # what the daemons run with: the defaults
    started = time.monotonic()
    probe: Optional[Child] = None
    freezer = Freezer()
    flood: Optional[Child] = None
    with LocalMesh(executors=EXECUTORS, slots=SLOTS, env=env, log_dir=log_dir) as m, Client(m.endpoint) as c:
        try:
            c.register_application(noop_spec())
            say(f"mesh up ({EXECUTORS} executors x {SLOTS} slots, logs in {log_dir}); warming the clients ...")
            probe = Child("probe-client", ["--probe-child", m.endpoint], log_dir)
            probe.expect(WARMUP_LIMIT, "ready line")
            flood = Child("flood-client", ["--flood-child", m.endpoint, str(opts.tasks), str(opts.window),
                                           str(opts.max_seconds), str(EXECUTORS * SLOTS)], log_dir)
            ready = flood.expect(2 * WARMUP_LIMIT, "ready line")
            settled = settle(c)
            say(f"idle: {opts.idle} invokes by the other client ...")
            probe.send(f"idle {opts.idle} {opts.max_seconds}")
            idle = probe.expect(opts.max_seconds + RESULT_WAIT, "idle samples")
            watch = Watch(m, c)
            say(f"flood: {opts.tasks:,} tasks (window {opts.window:,}) while the other client invokes ...")
            probe.send(f"flood {opts.probe_max} {opts.max_seconds}")
            flood.send("go")
            t0 = time.monotonic()
            if opts.freeze:
                freezer.freeze(m.executors[0].pid, opts.freeze)
            result: Optional[Dict[str, Any]] = None
            last_say = t0
            for _ in range(MAX_LOOPS):
                result = flood.read(POLL)
                if result is not None:
                    break
                watch.poll()
                freezer.thaw_if_due()
                if time.monotonic() - t0 > opts.max_seconds + 2 * RESULT_WAIT:
                    raise BenchError(f"the flood did not end within {opts.max_seconds + 2 * RESULT_WAIT:.0f}s")
                if time.monotonic() - last_say > 10:
                    last_say = time.monotonic()
                    st = watch.last_stats
                    say(f"  {time.monotonic() - t0:.0f}s: finished {st.get('tasks_finished', 0):,}, "
                        f"store_backlog {st.get('store_backlog')}, store_pauses {st.get('store_pauses')}")
            assert result is not None
            probe.send("stop")
            during = probe.expect(RESULT_WAIT + 10, "flood samples")
            # an eviction just after the flood (or after the control's thaw) still counts
            grace = max(time.monotonic(), freezer.until) + EVICTION_GRACE
            for _ in range(int((grace - time.monotonic()) / POLL) + 2):
                if time.monotonic() >= grace:
                    break
                watch.poll()
                freezer.thaw_if_due()
                time.sleep(POLL)
            seen = watch.report()
            probe.send("quit")
        finally:
            freezer.thaw()
            for child in (flood, probe):
                if child is not None:
                    child.end()
    ratio = round(during["p99_us"] / idle["p99_us"], 2) if during.get("count") and idle.get("count") else None
    evicted = sum(seen[k] if isinstance(seen[k], int) else len(seen[k]) for k in
                  ("evictions", "executors_rejoined", "executors_vanished", "executor_processes_exited",
                   "executor_reconnects"))
    return {
        "settings": {"tasks": opts.tasks, "window": opts.window, "idle": opts.idle, "max_seconds": opts.max_seconds,
                     "freeze_s": opts.freeze,
                     "executors": EXECUTORS, "slots": SLOTS, "heartbeat_interval": settings.heartbeat_interval,
                     "liveness": settings.liveness, "max_store_backlog": settings.max_store_backlog,
                     "max_inflight": settings.max_inflight, "cpus": os.cpu_count(),
                     "python": sys.version.split()[0], "log_dir": log_dir,
                     "environment_dropped": opts.dropped},
        "warmup": {"instances": ready.get("instances"), "writer_settle_s": round(settled, 2)},
        "flood": result, "mesh": seen,
        "probe": {"idle": idle, "flood": during},
        "idle_p50_us": idle.get("p50_us"), "idle_p99_us": idle.get("p99_us"),
        "flood_p50_us": during.get("p50_us"), "flood_p99_us": during.get("p99_us"), "p99_ratio": ratio,
        "goals": {"no_eviction": evicted == 0 and not result["timed_out"],
                  "p99_within_5x": ratio is not None and ratio <= GOAL_RATIO and during["errors"] == 0},
        "total_seconds": round(time.monotonic() - started, 1),
    }


def show(res: Dict[str, Any]) -> None:
    fl, ms, st = res["flood"], res["mesh"], res["settings"]
    ok = {True: "PASS", False: "FAIL"}
    print(f"flood of {st['tasks']:,} no-op tasks from one client (window {st['window']:,}) on "
          f"{st['executors']} executors x {st['slots']} slots, {st['cpus']} CPUs, default timers "
          f"(heartbeat {st['heartbeat_interval']:g}s x liveness {st['liveness']})")
    print(f"  flood: {fl['answered']:,} answered in {fl['seconds']:,.1f}s = {fl['tasks_per_s'] or 0:,.0f} tasks/s, "
          f"{fl['errors']} errors{', TIMED OUT' if fl['timed_out'] else ''}")
    print(f"  evictions (manager 'executor lost'): {ms['evictions']} {ms['eviction_reasons'] or ''}; "
          f"rejoined {len(ms['executors_rejoined'])}, vanished {len(ms['executors_vanished'])}, "
          f"executor reconnects {ms['executor_reconnects']}, executor processes exited "
          f"{ms['executor_processes_exited']}")
    print(f"  instance restarts (launches): {ms['instance_restarts']}; deaths {ms['instance_deaths']}, crashes "
          f"{ms['instance_crashes']}, instance PIDs new {ms['instance_pids_new']} / gone {ms['instance_pids_gone']}; "
          f"tasks retried "
          f"{ms['tasks_retried']}")
    print(f"  store_pauses {ms['store_pauses']}, max store_backlog {ms['max_store_backlog']}, "
          f"polls unanswered {ms['poll_failures']}/{ms['polls']}")
    pi, pf = res["probe"]["idle"], res["probe"]["flood"]
    print(f"  other client invoke: idle p50 {pi['p50_us']:,.0f} us p99 {pi['p99_us']:,.0f} us (n={pi['count']:,}); "
          f"flood p50 {pf.get('p50_us', 0):,.0f} us p99 {pf.get('p99_us', 0):,.0f} us max {pf.get('max_us') or 0:,.0f}"
          f" us (n={pf['count']:,}, {pf['errors']} errors)")
    print(f"  flood p99 / idle p99 = {res['p99_ratio']}")
    g = res["goals"]
    print(f"  goal 1, no executor evicted: {ok[g['no_eviction']]}")
    print(f"  goal 2, other client's p99 within {GOAL_RATIO:g}x idle: {ok[g['p99_within_5x']]}")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=None, help="tasks in the flood (default 1,000,000)")
    ap.add_argument("--window", type=int, default=None,
                    help="futures the flood client holds at most (default: max_inflight, 100,000)")
    ap.add_argument("--idle", type=int, default=None, help="the other client's idle samples (default 1000)")
    ap.add_argument("--max-seconds", type=float, default=None, help="time limit of the flood (default 1200)")
    ap.add_argument("--probe-max", type=int, default=None, help="the other client's samples during the flood, at most")
    ap.add_argument("--quick", action="store_true", help="100,000 tasks, 300 idle samples")
    ap.add_argument("--freeze", type=float, default=0.0, metavar="SECONDS",
                    help="negative control: stop executor-0 (SIGSTOP) for SECONDS when the flood starts; "
                         "more than 3 s gets it evicted, and the report must say so")
    ap.add_argument("--log-dir", help="keep the daemons' and clients' logs here (default: a temporary directory)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--probe-child", metavar="ENDPOINT", help=argparse.SUPPRESS)
    ap.add_argument("--flood-child", nargs=5, metavar=("ENDPOINT", "TASKS", "WINDOW", "SECONDS", "INSTANCES"),
                    help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.probe_child:
        probe_child(opts.probe_child)
        return {}
    if opts.flood_child:
        endpoint, tasks, window, seconds, instances = opts.flood_child
        flood_child(endpoint, int(tasks), int(window), float(seconds), int(instances))
        return {}
    cfg = QUICK if opts.quick else FULL
    for key in ("tasks", "idle", "max_seconds", "probe_max"):
        if getattr(opts, key) is None:
            setattr(opts, key, cfg[key])
    if opts.window is None:
        opts.window = Settings().max_inflight
    if min(opts.tasks, opts.window, opts.idle, opts.probe_max) < 1 or opts.max_seconds <= 0:
        ap.error("--tasks, --window, --idle, --probe-max and --max-seconds must be positive")

    exit_on_sigterm()   # unwinds through the finally blocks that end every child
    opts.dropped = default_timers()
    say = sayer(opts.silent)

    if opts.log_dir:
        os.makedirs(opts.log_dir, exist_ok=True)
        res = run(opts, opts.log_dir, say)
    else:
        with tempfile.TemporaryDirectory(prefix="zmesh-flood-") as logs:
            res = run(opts, logs, say)
    show(res)
    write_json(opts.json, res)
    return res


if __name__ == "__main__":
    main()
