"""A real network partition: one executor on its own test host (a network namespace
joined by a veth pair, with tc netem loss and delay), its link cut and healed."""
from __future__ import annotations

import os
import shutil
import subprocess
import warnings

import pytest
from conftest import FAST, tools_spec, wait_until

from client import Client, Session
from client.local import LocalMesh

NS = f"zmesh-t{os.getpid() % 100000}"
HOST_IF, NS_IF = f"zmh{os.getpid() % 100000}", f"zmn{os.getpid() % 100000}"
OCTET = 1 + os.getpid() % 250
HOST_IP, NS_IP = f"169.254.{OCTET}.1", f"169.254.{OCTET}.2"   # link-local, only on our own veth


def _ip(*args, ns=None):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20)


@pytest.fixture
def test_host():
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("iproute2 (ip, tc) is not installed")
    made = _ip("ip", "netns", "add", NS)
    if made.returncode != 0:
        pytest.skip(f"network namespaces are not permitted here: {made.stderr.strip()}")
    try:
        for step in (["ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF],
                     ["ip", "link", "set", NS_IF, "netns", NS],
                     ["ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_IF],
                     ["ip", "link", "set", HOST_IF, "up"]):
            r = _ip(*step)
            assert r.returncode == 0, r.stderr
        for step in (["ip", "addr", "add", f"{NS_IP}/30", "dev", NS_IF], ["ip", "link", "set", NS_IF, "up"],
                     ["ip", "link", "set", "lo", "up"]):
            r = _ip(*step, ns=NS)
            assert r.returncode == 0, r.stderr
        # a lossy, slow link in both directions, where the kernel has netem (sch_netem)
        netem = ["qdisc", "add", "dev"]
        results = (_ip("tc", *netem, HOST_IF, "root", "netem", "delay", "5ms", "loss", "1%"),
                   _ip("tc", *netem, NS_IF, "root", "netem", "delay", "5ms", "loss", "1%", ns=NS))
        for r in results:
            if "qdisc kind is unknown" in r.stderr:
                warnings.warn("this kernel has no sch_netem: the partition runs on a clean link")
                break
            assert r.returncode == 0, r.stderr
        yield NS
    finally:
        _ip("ip", "link", "del", HOST_IF)
        _ip("ip", "netns", "del", NS)


def test_partitioned_executor_tasks_move_and_it_rejoins_after_heal(test_host, tmp_path):
    m = LocalMesh(executors=0, slots=2, env=FAST, bind=f"tcp://{HOST_IP}:*", log_dir=str(tmp_path))
    try:
        m.start_manager()
        m.add_executor(name="local")
        m.add_executor(name="remote", prefix=["ip", "netns", "exec", test_host])
        m.wait_executors(2)
        with Client(m.endpoint) as c:
            c.register_application(tools_spec())
        with Client(m.endpoint) as c, Session("tools", manager=m.endpoint) as s:
            warm = [s.submit(("where", 0.2)) for _ in range(8)]
            assert {f.result(60) for f in warm} == {"local", "remote"}, "both hosts serve before the cut"
            futs = [s.submit(("where", 0.05)) for _ in range(150)]
            wait_until(lambda: sum(f.done() for f in futs) >= 10, timeout=30, what="10 answers before the cut")
            cut = _ip("ip", "link", "set", HOST_IF, "down")           # the cable is pulled
            assert cut.returncode == 0, cut.stderr
            try:
                wait_until(lambda: "remote" not in [e["id"] for e in c.list_executors()], timeout=30,
                           what="the cut-off executor to be evicted")
                done_before = sum(f.done() for f in futs)
                where = [f.result(90) for f in futs]     # every task answered despite the cut
                assert set(where) <= {"local", "remote"}
                assert where.count("local") >= len(futs) - done_before, "the rest ran on the side still connected"
            finally:
                _ip("ip", "link", "set", HOST_IF, "up")                # healed
            wait_until(lambda: "remote" in [e["id"] for e in c.list_executors()], timeout=40,
                       what="the healed executor to rejoin")
            info = c.get_session(s.id())
            assert info.succeeded == 158 and info.failed == 0
    finally:
        m.stop()
