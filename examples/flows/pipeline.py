"""The flows of the example: a parameter scan of a small numpy simulation, and its analysis.

``simulate``: a population of damped harmonic oscillators (random phases, one natural frequency
``omega0``), integrated with numpy for each damping ratio of the scan.  Each damping ratio is a
task of its own with no dependency on the others, so the manager runs them in parallel; ``collect``
gathers them into one record (a dict of plain values: lists and floats, no numpy arrays, so a
downstream flow can map it ``as db``).

``analyze``: takes the collected scan three ways (its parameters are mapped from
``simulate/collect`` when the flows are composed, see ``composition`` and pipeline.yaml):

* ``summarize``  ``scan``            mapped raw: the record itself;
* ``plot``       ``scan_file``       mapped as a file: a local path, read with ``load_file``; the task
                                     writes a PNG into the ``out_dir`` parameter (an absolute path);
* ``compare``    ``settling_times``  mapped as db: ``record["metrics"]["settling_time"]``, and
                 ``zetas``, ``omega0`` the record's ``zetas`` and ``omega0`` attributes.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List

import numpy as np

from client.flows import Flow, FlowOfFlows, Parameter, load_file, mapped

ZETAS = (0.05, 0.1, 0.2, 0.4)       # the scan: one task per damping ratio
SETTLED = 0.02                      # settled: the mean amplitude is below 2% of where it started
SAMPLES = 240                       # points of each recorded curve


# -- simulate ---------------------------------------------------------------------------------
def oscillate(zeta: float, omega0: float, t_end: float, n: int = 2000, dt: float = 1e-3,
              seed: int = 0) -> Dict[str, Any]:
    """Integrate ``n`` oscillators x'' + 2 zeta omega0 x' + omega0^2 x = 0 (semi-implicit Euler)."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0.0, 2.0 * math.pi, n)
    x, v = np.cos(phase), -omega0 * np.sin(phase)      # every oscillator starts at amplitude 1
    steps = round(t_end / dt)
    every = max(1, steps // SAMPLES)
    t, amp, x0 = [], [], []
    settling = None
    for i in range(steps + 1):
        if i % every == 0:
            a = float(np.mean(np.sqrt(x * x + (v / omega0) ** 2)))   # the mean amplitude (energy based)
            t.append(round(i * dt, 6))
            amp.append(a)
            x0.append(float(x[0]))
            if settling is None and a < SETTLED:
                settling = i * dt
        v -= dt * (2.0 * zeta * omega0 * v + omega0 * omega0 * x)
        x += dt * v
    return {"zeta": float(zeta), "omega0": float(omega0), "t": t, "amplitude": amp, "x": x0,
            "metrics": {"settling_time": float(settling if settling is not None else float("inf")),
                        "final_amplitude": amp[-1]}}


def collect(*runs: Dict[str, Any]) -> Dict[str, Any]:
    """The scan as one record: plain lists and floats, one entry per damping ratio."""
    runs_ = sorted(runs, key=lambda r: r["zeta"])
    return {"zetas": [r["zeta"] for r in runs_], "omega0": runs_[0]["omega0"], "t": runs_[0]["t"],
            "amplitude": [r["amplitude"] for r in runs_], "x": [r["x"] for r in runs_],
            "metrics": {k: [r["metrics"][k] for r in runs_] for k in runs_[0]["metrics"]}}


simulate = Flow("simulate")
collect_task = simulate.task(collect)
with simulate:
    omega0, t_end = Parameter("omega0", default=2 * math.pi), Parameter("t_end", default=16.0)
    scan = [simulate.task(oscillate, name=f"zeta-{z}")(z, omega0, t_end) for z in ZETAS]
    collect_task(*scan)

SCAN_TASKS = [f"zeta-{z}" for z in ZETAS]


# -- analyze ----------------------------------------------------------------------------------
def summarize(scan: Dict[str, Any]) -> Dict[str, Any]:
    """Raw mapping: the whole record."""
    ts = scan["metrics"]["settling_time"]
    fastest = min(range(len(ts)), key=ts.__getitem__)
    return {"runs": len(scan["zetas"]), "fastest_zeta": scan["zetas"][fastest], "fastest_settling": ts[fastest],
            "slowest_settling": max(ts)}


def plot(scan_file: str, out_dir: str) -> str:
    """File mapping: the record arrives as a local file; the PNG goes into ``out_dir``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scan = load_file(scan_file)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for zeta, amp, x in zip(scan["zetas"], scan["amplitude"], scan["x"]):
        line, = top.plot(scan["t"], x, lw=0.8, label=f"zeta={zeta:g}")
        bottom.semilogy(scan["t"], amp, color=line.get_color(), lw=1.2)
    bottom.axhline(SETTLED, color="grey", ls="--", lw=0.8)
    bottom.set_ylim(1e-4, 2.0)
    top.set_ylabel("x of one oscillator")
    top.legend(loc="upper right", fontsize=8)
    bottom.set_ylabel("mean amplitude")
    bottom.set_xlabel("t")
    fig.suptitle(f"damped oscillators, omega0={scan['omega0']:.3g}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "oscillator_scan.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def compare(settling_times: List[float], zetas: List[float], omega0: float) -> List[Dict[str, float]]:
    """Db mapping: only the values picked out of the record; against the envelope's ln(1/0.02)/(zeta omega0)."""
    out = []
    for zeta, ts in zip(zetas, settling_times):
        predicted = math.log(1.0 / SETTLED) / (zeta * omega0)
        out.append({"zeta": zeta, "simulated": round(ts, 3), "predicted": round(predicted, 3),
                    "ratio": round(ts / predicted, 3)})
    return out


analyze = Flow("analyze")
with analyze:
    analyze.task(summarize)(Parameter("scan"))
    analyze.task(plot)(Parameter("scan_file"), Parameter("out_dir"))
    analyze.task(compare)(Parameter("settling_times"), Parameter("zetas"), Parameter("omega0"))


def composition() -> FlowOfFlows:
    """The flow of flows in code; pipeline.yaml says the same.  Flows listed by name (or in a
    mapping with ``mapped_parameters``) are the registered ones: register both flows first."""
    return FlowOfFlows("oscillator-study", ["simulate", {"name": "analyze", "mapped_parameters": {
        "scan": mapped("simulate", "collect"),
        "scan_file": mapped("simulate", "collect", as_="file"),
        "settling_times": mapped("simulate", "collect", as_="db", attribute="metrics",
                                 attribute_index=["settling_time"]),
        "zetas": mapped("simulate", "collect", as_="db", attribute="zetas"),
        "omega0": mapped("simulate", "collect", as_="db", attribute="omega0"),
    }}])
