"""Stateful functions on a real mesh: exactly-once effects while an executor is killed mid-stream,
durable delayed messages across a manager kill -9, expiring state.  Every wait is bounded."""
from __future__ import annotations

import collections
import concurrent.futures
import os
import random
import signal
import sys
import time

from conftest import FAST, HERE, wait_until

from client import Client, Functions
from client.local import LocalMesh
from fn_counter import Tick

SPEC = {"metadata": {"name": "fn-counter"},
        "spec": {"command": sys.executable, "arguments": ["fn_counter.py"],
                 "working_directory": os.path.join(HERE, "apps")}}


def _mesh(tmp_path, executors: int = 2) -> LocalMesh:
    return LocalMesh(executors=executors, slots=2, env=FAST, log_dir=str(tmp_path))


def test_exactly_once_while_an_executor_is_killed_mid_stream(tmp_path):
    ids = [f"user-{i}" for i in range(50)]
    rng = random.Random(7)
    sends = [(f"s{i}", rng.choice(ids)) for i in range(500)]   # client A: fire and forget
    calls = [(f"c{i}", rng.choice(ids)) for i in range(500)]   # client B: call, one reply each
    with _mesh(tmp_path) as m:
        with Client(m.endpoint) as c:
            c.register_application(SPEC)
        with Functions(m.endpoint) as a, Functions(m.endpoint) as b:
            assert b.call("test/count", "warm-up", Tick("w"), timeout=60) == 1

            def call(item):
                return b.call("test/count", item[1], Tick(item[0]), timeout=120)

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                replies = pool.map(call, calls)
                for mid, ident in sends:
                    a.send("test/count", ident, Tick(mid))
                wait_until(lambda: sum(a.state("test/count", i).get("count", 0) for i in ids[:10]) >= 30,
                           timeout=60, what="work under way")
                LocalMesh.end(m.executors[0], signal.SIGKILL)
                replies = list(replies)
            # every call got exactly one reply (an int: the count it made)
            assert len(replies) == 500 and all(isinstance(r, int) for r in replies)
            want = collections.Counter(ident for _, ident in sends + calls)

            def counts():
                return {i: a.state("test/count", i).get("count", 0) for i in ids}
            wait_until(lambda: counts() == {i: want[i] for i in ids}, timeout=120,
                       what="every message counted once")
            records = [r.message for r in a.egress("test/counted", offset=0, timeout=3)]
            mids = collections.Counter(r["mid"] for r in records)
            assert len(records) == 1001 and set(mids.values()) == {1}, [k for k, v in mids.items() if v != 1][:5]
            # each address's records number its messages 1..n in order: one message at a time per address
            by_id = collections.defaultdict(list)
            for r in records:
                by_id[r["id"]].append(r["n"])
            assert all(ns == list(range(1, len(ns) + 1)) for ns in by_id.values())


def test_delayed_messages_survive_a_manager_kill_and_a_cancelled_one_never_fires(tmp_path):
    with _mesh(tmp_path, executors=1) as m:
        with Client(m.endpoint) as c:
            c.register_application(SPEC)
        with Functions(m.endpoint) as fx:
            fx.send("test/delay", "late", "arm:3")
            fx.send("test/delay", "cancelled", "arm:2")
            fx.send("test/delay", "cancelled", "disarm")
            fx.send("test/delay", "sentinel", "arm:4")   # due after the cancelled one
            wait_until(lambda: not fx.list(filter={"type": "test/delay"})[0]["queued"], timeout=60,
                       what="the arming messages to be processed")
        LocalMesh.end(m.manager, signal.SIGKILL)
        m.start_manager()
        with Functions(m.endpoint) as fx:
            fired = {}
            deadline = time.monotonic() + 60
            offset = 0
            while len(fired) < 2 and time.monotonic() < deadline:
                for rec in fx.egress("test/fired", offset=offset, timeout=2):
                    fired[rec.message["id"]] = rec.message
                    offset = rec.offset + 1
            assert set(fired) == {"late", "sentinel"}   # the cancelled one never fired
            assert fired["late"]["fired"] - fired["late"]["armed"] >= 3
            assert fired["sentinel"]["fired"] - fired["sentinel"]["armed"] >= 4


def test_expired_state_reads_as_none(tmp_path):
    with _mesh(tmp_path, executors=1) as m:
        with Client(m.endpoint) as c:
            c.register_application(SPEC)
        with Functions(m.endpoint) as fx:
            before_write = time.monotonic()
            fx.call("test/expiring", "x", "hello", timeout=60)
            assert fx.call("test/expiring", "x", "get", timeout=30) in ("hello", None)
            wait_until(lambda: fx.call("test/expiring", "x", "get", timeout=30) is None, timeout=20,
                       what="the value to expire")
            assert time.monotonic() - before_write >= 1.0   # not before its second
            assert fx.state("test/expiring", "x") == {}
