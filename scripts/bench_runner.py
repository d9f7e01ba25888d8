"""The runner against a registered service and Ray: cold start, warm latency and throughput.

One mesh (client.local.LocalMesh: a manager and 2 executors x 1 slot, default
settings, loopback).  Each run, the runner and a registered service are
measured interleaved (which goes first alternates from run to run), so both
see the same machine:

* cold start.  Runner: from ``Runner(name)`` (packaging a one-file directory
  that differs every run, so the executors unpack it anew; the upload into the
  object cache; registering the application) through ``rr.service(noop)``
  (opening its session, shipping its descriptor) to the first
  ``svc(0).get()`` answered (the instance launched, the package unpacked, the
  descriptor loaded).  Registered: from ``register_application`` of the no-op
  service (scripts/bench_apps/noop_service.py, a new name every run) through
  ``Session(...)`` to the first ``invoke`` answered (the instance launched).
  The object service's cold start is ``rr.service(Counter())`` (its own
  one-instance application, its session, its checkpoint) to the first
  ``add(1).get()``.  ratio = runner / registered.
* warm latency, one call at a time: ``svc(0).get()`` against
  ``Session.invoke``, in alternating blocks after 20 warm-up calls each; p50
  and p99.  ratio = runner / registered.
* warm throughput: ``--calls`` calls in flight at once (all submitted, then
  all collected), after a warm-up burst of a quarter of that: runner
  ``rr.get([svc(i) ...])`` against ``Session.submit`` futures.  ratio =
  runner / registered (above 1: the runner is faster).  Each side keeps the
  one instance it has (the scheduler does not take the other session's idle
  instance); ``instances_after_burst`` records it.
* the object service, after the function service is closed (so that two
  sessions, not three, share the two slots: a third one costs instance
  restarts of about 1.5 s in the middle of "warm" figures): cold start as
  above, latency of ``k.add(1).get()`` in alternating blocks with
  ``Session.invoke`` again (``phase2_registered_*``: its ratio's
  denominator), throughput of ``rr.get([k.add(1) ...])``, whose answers must
  come back n+1, n+2, ... (applied in order) or the run fails.

Ray (``--ray``, the default; ``--no-ray`` skips it) runs afterwards, with every
zeromesh process stopped, in a subprocess with a time budget (as
scripts/bench_peers.py does): ``ray.init(num_cpus=2)`` (2 slots, as the mesh
has) is timed but not part of any cold start, as starting the mesh is not.
Each run then defines a new ``@ray.remote`` function (its first call: the
function exported, a worker assigned, the answer back) and a new actor class
(creation + first method call: a worker process started for the actor), then
measures latency and throughput as above.  zeromesh / Ray ratios are taken on
the medians (two processes one after the other, not interleaved).  If Ray
cannot be imported it is reported ``ray: not installed`` with the reason; no
figure is invented.

Every loop is bounded in count and in time; every process started here is
ended by its PID (the mesh by LocalMesh, the Ray child by SIGTERM, then SIGKILL).

Usage: python scripts/bench_runner.py [--runs 3] [--calls 5000] [--latency 500] [--no-ray]
                                     [--quick] [--silent] [--json PATH]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import secrets
import statistics
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
from bench import _table, exit_on_sigterm, parse_sized, sayer, write_json  # noqa: E402

from client import Client, Runner, Session  # noqa: E402
from client import runner_package  # noqa: E402
from client.local import LocalMesh  # noqa: E402

APPS = os.path.join(HERE, "bench_apps")
RESULT_WAIT = 60.0           # seconds one call (a cold start included) may take before the run is declared broken
PHASE_WAIT = 120.0           # seconds a throughput burst may take to be answered in full
LATENCY_SECONDS = 30.0       # seconds each side's latency samples may take in one run (then fewer samples)
WARM_CALLS = 20              # one-at-a-time calls before the latency samples
BLOCKS = 5                   # latency samples are taken in this many alternating blocks
RAY_BUDGET = {"full": 300.0, "quick": 90.0}   # seconds for the Ray subprocess
FULL = {"runs": 3, "calls": 5000, "latency": 500}
QUICK = {"runs": 1, "calls": 300, "latency": 30}


class BenchError(RuntimeError):
    pass


# -- what runs remotely (defined in __main__: cloudpickle ships it by value) ------------------
def noop(x: Any = None) -> Any:
    return x


class Counter:
    """An actor-like object: its calls are applied one after another, in order."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, v: int) -> int:
        self.count += v
        return self.count


# -- measuring ---------------------------------------------------------------------------
def timed(call: Callable[[], Any]) -> float:
    t = time.perf_counter()
    call()
    return time.perf_counter() - t


def one_at_a_time(calls: Dict[str, Callable[[], Any]], count: int, max_seconds: float) -> Dict[str, Dict[str, Any]]:
    """Latency of each ``calls[name]()`` (one call, waited for), ``count`` samples each after
    WARM_CALLS, taken in BLOCKS alternating blocks (the order rotates) so all see the same noise."""
    names = list(calls)
    for name in names:
        for _ in range(WARM_CALLS):
            calls[name]()
    samples: Dict[str, List[float]] = {n: [] for n in names}
    spent = {n: 0.0 for n in names}
    per_block = max(1, -(-count // BLOCKS))
    for b in range(BLOCKS):
        for name in names[b % len(names):] + names[:b % len(names)]:
            call, xs = calls[name], samples[name]
            for _ in range(min(per_block, count - len(xs))):
                if spent[name] > max_seconds:
                    break
                t = time.perf_counter_ns()
                call()
                dt = time.perf_counter_ns() - t
                xs.append(dt / 1000.0)
                spent[name] += dt / 1e9
    return {n: bench_limit.percentiles(xs) for n, xs in samples.items()}


def burst(submit: Callable[[int], "concurrent.futures.Future[Any]"], count: int,
          result: Callable[[Any], Any] = lambda f: f.result(0)) -> Dict[str, Any]:
    """``count`` calls submitted at once, then all collected: calls per second, the answers."""
    t = time.perf_counter()
    futs = [submit(i) for i in range(count)]
    done, pending = concurrent.futures.wait([getattr(f, "_future", f) for f in futs], PHASE_WAIT)
    if pending:
        raise BenchError(f"{len(pending)} of {count} calls unanswered after {PHASE_WAIT:.0f}s")
    values = [result(f) for f in futs]
    took = time.perf_counter() - t
    return {"tasks_per_s": round(count / took, 1), "seconds": round(took, 3), "values": values}


def in_order(values: List[Any], start: int) -> bool:
    """The object service's (or actor's) answers to add(1), ..., add(1): start+1, start+2, ..."""
    return values == list(range(start + 1, start + 1 + len(values)))


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a is not None and b else None


def spread(xs: List[float]) -> Dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def summary(runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """min / median / max of every numeric figure over the runs."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: spread([r[k] for r in runs]) for k in keys}


# -- zeromesh ----------------------------------------------------------------------------
def noop_spec(name: str) -> Dict[str, Any]:
    return {"metadata": {"name": name},
            "spec": {"working_directory": APPS, "command": sys.executable, "arguments": ["noop_service.py"]}}


def package_dir(base: str, i: int) -> str:
    """A one-file directory for the runner to package, different every run (a new hash: unpacked anew)."""
    root = os.path.join(base, f"pkg-{i}")
    os.makedirs(root)
    with open(os.path.join(root, "bench_payload.py"), "w") as f:
        f.write(f'"""What the runner benchmark packages."""\nRUN = {secrets.token_hex(8)!r}\n')
    return root


def one_run(endpoint: str, c: Client, i: int, base: str, opts: argparse.Namespace) -> Dict[str, Any]:
    root = package_dir(base, i)
    app = f"noop-r{i}"
    state: Dict[str, Any] = {}
    parts: Dict[str, float] = {}

    def registered_cold() -> None:
        t = time.perf_counter()
        c.register_application(noop_spec(app))
        state["session"] = s = Session(app, manager=endpoint)
        t1 = time.perf_counter()
        s.invoke(None, timeout=RESULT_WAIT)
        parts["registered_register_session_s"] = round(t1 - t, 4)
        parts["registered_first_call_s"] = round(time.perf_counter() - t1, 4)

    def runner_cold() -> None:
        t = time.perf_counter()
        state["runner"] = rr = Runner(f"rbench-{i}-{secrets.token_hex(2)}", manager=endpoint, root=root)
        t1 = time.perf_counter()
        state["svc"] = svc = rr.service(noop)
        t2 = time.perf_counter()
        svc(0).get(RESULT_WAIT)
        parts["runner_package_register_s"] = round(t1 - t, 4)
        parts["runner_service_s"] = round(t2 - t1, 4)
        parts["runner_first_call_s"] = round(time.perf_counter() - t2, 4)

    try:
        first = (registered_cold, runner_cold) if i % 2 == 0 else (runner_cold, registered_cold)
        cold = {f.__name__: timed(f) for f in first}
        rr: Runner = state["runner"]
        s: Session = state["session"]
        svc = state["svc"]

        # phase 1: the function service against the registered one (2 sessions, 2 slots)
        lat = one_at_a_time({"registered": lambda: s.invoke(None, timeout=RESULT_WAIT),
                             "runner": lambda: svc(0).get(RESULT_WAIT)}, opts.latency, LATENCY_SECONDS)
        warm = max(1, opts.calls // 4)
        tp: Dict[str, Dict[str, Any]] = {}
        sides = [("registered", lambda n: burst(lambda j: s.submit(j), n)),
                 ("runner", lambda n: burst(lambda j: svc(j), n, lambda f: f.get(0)))]
        for name, go in (sides if i % 2 == 0 else sides[::-1]):
            go(warm)   # the scheduler moves the idle side's instance over: warm means both slots serve
            tp[name] = go(opts.calls)
            tp[name]["instances"] = (s.info() if name == "registered" else svc._session.info()).get("instances")
        for name in ("registered", "runner"):
            if tp[name].pop("values") != list(range(opts.calls)):
                raise BenchError(f"the {name} throughput burst answered wrongly")

        # phase 2: the object service against the registered one; the function service is closed
        # first, so that again two sessions share the two slots
        svc.close()

        def counter_cold() -> None:
            state["counter"] = rr.service(Counter())
            state["counter"].add(1).get(RESULT_WAIT)

        counter_s = timed(counter_cold)
        k = state["counter"]
        lat2 = one_at_a_time({"registered": lambda: s.invoke(None, timeout=RESULT_WAIT),
                              "counter": lambda: k.add(1).get(RESULT_WAIT)}, opts.latency, LATENCY_SECONDS)
        count_now = k.add(0).get(RESULT_WAIT)
        burst(lambda j: k.add(1), warm, lambda f: f.get(0))
        tp["counter"] = burst(lambda j: k.add(1), opts.calls, lambda f: f.get(0))
        ordered = in_order(tp["counter"].pop("values"), count_now + warm)
    finally:
        for name in ("runner", "session"):
            if name in state:
                try:
                    state[name].close()
                except Exception as exc:   # a close failing spoils the next run, not this one's figures
                    print(f"run {i + 1}: closing the {name} failed: {exc}", file=sys.stderr)
        try:
            c.unregister_application(app)
        except Exception as exc:
            print(f"run {i + 1}: unregistering {app} failed: {exc}", file=sys.stderr)

    reg_cold, run_cold = cold["registered_cold"], cold["runner_cold"]
    r, g, o, g2 = lat["runner"], lat["registered"], lat2["counter"], lat2["registered"]
    return {
        "runner_cold_s": round(run_cold, 4), "registered_cold_s": round(reg_cold, 4),
        "cold_ratio": ratio(run_cold, reg_cold), "counter_cold_s": round(counter_s, 4),
        **parts,
        "runner_p50_us": r["p50_us"], "runner_p99_us": r["p99_us"],
        "registered_p50_us": g["p50_us"], "registered_p99_us": g["p99_us"],
        "p50_ratio": ratio(r["p50_us"], g["p50_us"]), "p99_ratio": ratio(r["p99_us"], g["p99_us"]),
        "runner_tasks_per_s": tp["runner"]["tasks_per_s"], "registered_tasks_per_s": tp["registered"]["tasks_per_s"],
        "throughput_ratio": ratio(tp["runner"]["tasks_per_s"], tp["registered"]["tasks_per_s"]),
        "counter_p50_us": o["p50_us"], "counter_p99_us": o["p99_us"],
        "phase2_registered_p50_us": g2["p50_us"], "phase2_registered_p99_us": g2["p99_us"],
        "counter_p50_ratio": ratio(o["p50_us"], g2["p50_us"]), "counter_p99_ratio": ratio(o["p99_us"], g2["p99_us"]),
        "counter_tasks_per_s": tp["counter"]["tasks_per_s"],
        "counter_throughput_ratio": ratio(tp["counter"]["tasks_per_s"], tp["registered"]["tasks_per_s"]),
        "counter_in_order": ordered, "first": first[0].__name__.replace("_cold", ""),
        "latency_samples": {"runner": r["count"], "registered": g["count"], "counter": o["count"]},
        "instances_after_burst": {n: tp[n].get("instances") for n in ("registered", "runner")},
        "package_bytes": len(runner_package.build(root)[0]),
    }


PROGRESS = ("runner_cold_s", "registered_cold_s", "cold_ratio", "runner_p50_us", "registered_p50_us", "p50_ratio",
            "runner_tasks_per_s", "registered_tasks_per_s", "throughput_ratio", "counter_cold_s", "counter_p50_us",
            "counter_tasks_per_s")


def measure_zeromesh(opts: argparse.Namespace, say: Callable[[str], None]) -> List[Dict[str, Any]]:
    runs: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="zmesh-rbench-") as base, \
            LocalMesh(executors=2, slots=1, env={"ZMESH_LOG_LEVEL": "WARNING"},
                      log_dir=base) as m, Client(m.endpoint) as c:
        for i in range(opts.runs):
            run = one_run(m.endpoint, c, i, base, opts)
            if not run["counter_in_order"]:
                raise BenchError(f"run {i + 1}: the object service's calls were not applied in order")
            runs.append(run)
            say(f"run {i + 1}: " + ", ".join(f"{k} {run[k]}" for k in PROGRESS))
    return runs


# -- Ray (in its own process) -------------------------------------------------------------
def ray_one_run(ray: Any, calls: int, latency: int) -> Dict[str, Any]:
    """One run against Ray: a new remote function and a new actor class, then the same figures."""
    nonce = secrets.token_hex(8)

    def fn(x: Any = None, _nonce: str = nonce) -> Any:   # a new function every run: exported anew
        return x

    class Actor:
        run = nonce   # a new class every run

        def __init__(self) -> None:
            self.count = 0

        def add(self, v: int) -> int:
            self.count += v
            return self.count

    f, actor_class = ray.remote(fn), ray.remote(Actor)   # (local: nothing is sent before a call)
    f_cold = timed(lambda: ray.get(f.remote(0), timeout=RESULT_WAIT))
    holder: Dict[str, Any] = {}

    def actor_cold() -> None:
        holder["a"] = actor_class.remote()
        ray.get(holder["a"].add.remote(1), timeout=RESULT_WAIT)

    a_cold = timed(actor_cold)
    a = holder["a"]

    def ray_burst(submit: Callable[[int], Any], n: int) -> Dict[str, Any]:
        t0 = time.perf_counter()
        values = ray.get([submit(j) for j in range(n)], timeout=PHASE_WAIT)
        return {"tasks_per_s": round(n / (time.perf_counter() - t0), 1), "values": values}

    try:
        lat = one_at_a_time({"function": lambda: ray.get(f.remote(0), timeout=RESULT_WAIT),
                             "actor": lambda: ray.get(a.add.remote(1), timeout=RESULT_WAIT)},
                            latency, LATENCY_SECONDS)
        count_now = ray.get(a.add.remote(0), timeout=RESULT_WAIT)
        warm = max(1, calls // 4)
        ray_burst(lambda j: f.remote(j), warm)
        fb = ray_burst(lambda j: f.remote(j), calls)
        if fb["values"] != list(range(calls)):
            raise BenchError("a Ray throughput burst answered wrongly")
        ray_burst(lambda j: a.add.remote(1), warm)
        ab = ray_burst(lambda j: a.add.remote(1), calls)
        ordered = in_order(ab["values"], count_now + warm)
    finally:
        ray.kill(a)
    return {"function_cold_s": round(f_cold, 4), "actor_cold_s": round(a_cold, 4),
            "function_p50_us": lat["function"]["p50_us"], "function_p99_us": lat["function"]["p99_us"],
            "actor_p50_us": lat["actor"]["p50_us"], "actor_p99_us": lat["actor"]["p99_us"],
            "function_tasks_per_s": fb["tasks_per_s"], "actor_tasks_per_s": ab["tasks_per_s"],
            "actor_in_order": ordered,
            "latency_samples": {"function": lat["function"]["count"], "actor": lat["actor"]["count"]}}


def ray_runs(ray: Any, runs: int, calls: int, latency: int, report: Callable[[Dict[str, Any]], None]) -> None:
    res: Dict[str, Any] = {"available": True, "version": ray.__version__, "num_cpus": 2, "runs": []}
    report(res)
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        res["init_s"] = round(time.perf_counter() - t, 3)
        report(res)
        for _ in range(runs):
            res["runs"].append(ray_one_run(ray, calls, latency))
            report(res)
    finally:
        t = time.perf_counter()
        ray.shutdown()
        res["shutdown_s"] = round(time.perf_counter() - t, 3)
        report(res)


def ray_child(opts: argparse.Namespace) -> int:
    """The Ray subprocess (bench_peers.child_main: JSON after every figure, "not installed" without Ray)."""
    return bench_peers.child_main(opts.ray_child, [opts.ray_module],
                                  lambda report: ray_runs(sys.modules[opts.ray_module], opts.runs, opts.calls,
                                                          opts.latency, report))


def measure_ray(opts: argparse.Namespace, log_dir: str) -> Dict[str, Any]:
    """Run the Ray child with a time budget; its PID gets SIGTERM, then SIGKILL, if it overruns."""
    budget = RAY_BUDGET["quick" if opts.quick else "full"]
    out, log_path = os.path.join(log_dir, "ray.json"), os.path.join(log_dir, "ray.log")
    args = [sys.executable, os.path.abspath(__file__), "--ray-child", out, "--ray-module", opts.ray_module,
            "--runs", str(opts.runs), "--calls", str(opts.calls), "--latency", str(opts.latency)]
    res = bench_peers.run_child(args, out, log_path, budget, "ray")
    if res.get("runs"):
        res["summary"] = summary(res["runs"])
    bench_peers.keep_log_tail(res, log_path)
    return res


# zeromesh figure, Ray figure, which way is better: zeromesh / Ray on the medians
VS_RAY = (("runner_cold_s", "function_cold_s"), ("counter_cold_s", "actor_cold_s"),
          ("runner_p50_us", "function_p50_us"), ("runner_p99_us", "function_p99_us"),
          ("registered_p50_us", "function_p50_us"),
          ("counter_p50_us", "actor_p50_us"), ("counter_p99_us", "actor_p99_us"),
          ("runner_tasks_per_s", "function_tasks_per_s"), ("registered_tasks_per_s", "function_tasks_per_s"),
          ("counter_tasks_per_s", "actor_tasks_per_s"))


def vs_ray(zm: Dict[str, Dict[str, float]], ray: Dict[str, Any]) -> Dict[str, Optional[float]]:
    rs = ray.get("summary") or {}
    out = {f"{a}/{b}": ratio(zm[a]["median"], rs[b]["median"]) for a, b in VS_RAY if a in zm and b in rs}
    if ray.get("runs") and "runner_cold_s" in zm:   # Ray's first function after init: workers not yet used
        out["runner_cold_s/first_function_cold_s"] = ratio(zm["runner_cold_s"]["median"],
                                                            ray["runs"][0]["function_cold_s"])
    return out


# -- output -------------------------------------------------------------------------------
UNITS = {"_s": "s", "_us": "us", "_per_s": "tasks/s", "ratio": "x"}


def _unit(key: str) -> str:
    return next((u for suffix, u in sorted(UNITS.items(), key=lambda kv: -len(kv[0])) if key.endswith(suffix)), "")


def show(res: Dict[str, Any]) -> None:
    def num(v: float) -> str:
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"

    st = res["settings"]
    body = [(k, _unit(k), *(num(v[q]) for q in ("min", "median", "max"))) for k, v in res["summary"].items()]
    _table(f"runner vs registered no-op service ({st['runs']} runs, {st['calls']:,} calls in flight, "
           f"{st['latency']} one at a time, 2 executors x 1 slot)", ("figure", "unit", "min", "median", "max"),
           body, "ratio = runner / registered (cold start, latency: lower is better; throughput: higher)")
    ray = res["ray"]
    if not ray.get("available"):
        print(f"ray: {ray.get('reason', 'not measured')}")
        return
    rs = ray.get("summary") or {}
    body = [(k, _unit(k), *(num(v[q]) for q in ("min", "median", "max"))) for k, v in rs.items()]
    body += [(k, "x", "-", num(v), "-") for k, v in res["vs_ray"].items() if v is not None]
    _table(f"Ray {ray.get('version')} (init {ray.get('init_s')} s, not in any cold start; its own process, "
           "after zeromesh)", ("figure", "unit", "min", "median", "max"), body,
           "a/b = zeromesh median / Ray median (cold start, latency: below 1 zeromesh faster; tasks/s: above 1)")
    if ray.get("error"):
        print(f"ray: incomplete ({ray['error']})")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=None, help="runs (default 3)")
    ap.add_argument("--calls", type=int, default=None, help="calls in flight for throughput (default 5000)")
    ap.add_argument("--latency", type=int, default=None, help="one-at-a-time calls per side and run (default 500)")
    ap.add_argument("--no-ray", dest="ray", action="store_false", help="do not measure Ray")
    opts = parse_sized(ap, argv, FULL, QUICK, "1 run, 300 calls, 30 one at a time (for tests)",
                       peer=("ray", "ray"))
    if min(opts.runs, opts.calls, opts.latency) < 1:
        ap.error("--runs, --calls and --latency must be positive")
    if opts.ray_child:
        sys.exit(ray_child(opts))

    say = sayer(opts.silent)
    exit_on_sigterm()   # unwinds through LocalMesh's exit, which ends every process by PID
    t0 = time.perf_counter()
    runs = measure_zeromesh(opts, say)
    res: Dict[str, Any] = {"settings": {"runs": opts.runs, "calls": opts.calls, "latency": opts.latency,
                                        "executors": 2, "slots": 1, "cpus": os.cpu_count()},
                           "runs": runs, "summary": summary(runs)}
    if opts.ray:
        say("ray: in its own process ...")
        with tempfile.TemporaryDirectory(prefix="zmesh-rbench-ray-") as logs:
            res["ray"] = measure_ray(opts, logs)
        res["vs_ray"] = vs_ray(res["summary"], res["ray"]) if res["ray"].get("available") else {}
    else:
        res["ray"] = {"available": False, "reason": "not measured (--no-ray)"}
        res["vs_ray"] = {}
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    show(res)
    write_json(opts.json, res)
    return res


if __name__ == "__main__":
    main()
