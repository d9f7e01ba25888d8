"""Flows end to end: a parameter scan of a numpy simulation, then an analysis flow mapped onto it.

    pip install -e '.[examples]' && python examples/flows/run_local.py [--out DIR]

Starts a manager and two executors (two slots each) on loopback, registers the two flows of
pipeline.py, composes them with pipeline.yaml (``FlowOfFlows.from_yaml``; ``pipeline.composition()``
is the same in code), validates and runs the flow of flows, and prints every task's state, how
long the scan's independent tasks ran at the same time, the analysis results (raw, file and db
mappings of the scan) and the path of the PNG plot it wrote (into ``--out``, or a new temporary
directory that is kept).
"""
import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import pipeline  # noqa: E402

from client.flows import FlowOfFlows  # noqa: E402
from client.local import LocalMesh  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def overlap(records):
    """(seconds during which two or more tasks ran at once, the most at once), from executor times."""
    events = sorted([(r["started_at"], 1) for r in records] + [(r["ended_at"], -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    running = peak = 0
    both = 0.0
    last = None
    for when, step in events:
        if running >= 2 and last is not None:
            both += when - last
        running += step
        peak = max(peak, running)
        last = when
    return both, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="directory of the PNG plot (default: a new temporary directory)")
    args = ap.parse_args()
    out = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="zeromesh-flows-")

    with LocalMesh(executors=2, slots=2) as mesh:
        os.environ["ZMESH_MANAGER"] = mesh.endpoint
        print(f"mesh up at {mesh.endpoint} with 2 executors x 2 slots")
        for flow in (pipeline.simulate, pipeline.analyze):
            print(f"registered {flow.register()}: {', '.join(flow.task_names)}")

        study = FlowOfFlows.from_yaml(os.path.join(HERE, "pipeline.yaml"))
        same = study.mapped_parameters == pipeline.composition().mapped_parameters
        print(f"{study!r} from pipeline.yaml (the same as pipeline.composition(): {same})")
        study.validate({"analyze": {"out_dir": out}})
        print("validated: every mapped flow and task exists, no cycle, no missing parameter")

        fr = study.run(parameters={"analyze": {"out_dir": out}}, run_name="oscillator-scan")
        state = fr.wait(timeout=120)
        print(f"flow run {fr.id}: {state}")
        tasks = fr.tasks()
        for name, rec in tasks.items():
            took = (rec["ended_at"] - rec["started_at"]) if rec.get("started_at") and rec.get("ended_at") else 0.0
            print(f"  {name:<20} {rec['state']:<10} {took:5.2f}s on {rec.get('executor')}")
        fr.raise_for_state()

        scan = [tasks[f"simulate/{t}"] for t in pipeline.SCAN_TASKS]
        both, peak = overlap(scan)
        compute = sum(r["ended_at"] - r["started_at"] for r in scan)
        span = max(r["ended_at"] for r in scan) - min(r["started_at"] for r in scan)
        executors = sorted({r["executor"] for r in scan})
        print(f"scan: {len(scan)} tasks, {compute:.2f}s of compute in {span:.2f}s, on {len(executors)} executors")
        if both > 0:
            print(f"scan tasks overlapped: {both:.2f}s with 2 or more running, up to {peak} at once")
        else:
            print("scan tasks did not overlap")

        summary = fr.result("analyze", "summarize")
        print(f"summary (raw mapping): {summary['runs']} runs, fastest to settle zeta={summary['fastest_zeta']:g} "
              f"in {summary['fastest_settling']:.2f}, slowest {summary['slowest_settling']:.2f}")
        print("comparison (db mapping: metrics.settling_time, zetas, omega0):")
        for row in fr.result("analyze", "compare"):
            print(f"  zeta={row['zeta']:<5g} settling time simulated {row['simulated']:6.3f}, "
                  f"predicted {row['predicted']:6.3f}, ratio {row['ratio']:.3f}")
        png = fr.result("analyze", "plot")
        with open(png, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
        if head != PNG_SIGNATURE:
            raise SystemExit(f"{png} is not a PNG")
        print(f"plot (file mapping): {png} ({os.path.getsize(png)} bytes, PNG)")
    print("mesh stopped")


if __name__ == "__main__":
    main()
