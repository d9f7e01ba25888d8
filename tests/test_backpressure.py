"""A client that stops reading does not grow the manager's memory without bound;
its answers wait in the database until it asks again."""
from __future__ import annotations

import os
import sys
import threading
import time

import cloudpickle
import pytest
import zmq
from conftest import FAST, tools_spec, wait_until

from client import Client, Session
from client.local import LocalMesh
from mesh.data.store import Store, Writer
from mesh.wire.protocol import Cmd, Submit, decode, encode

PAYLOAD = 256 * 1024       # above malloc's mmap threshold, so freed memory leaves the RSS
TASKS = 600                # 150 MiB of answers the stuck client never reads


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("send_hwm,bounded", [(20, True), (0, False)], ids=["hwm-20", "no-hwm-control"])
def test_stuck_reader_keeps_manager_memory_bounded(tmp_path, send_hwm, bounded):
    # glibc tuned so that freed memory goes back to the OS at once: RSS then measures live memory
    env = {**FAST, "ZMESH_SEND_HWM": str(send_hwm), "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
           "MALLOC_TRIM_THRESHOLD_": str(128 * 1024), "MALLOC_ARENA_MAX": "1"}
    m = LocalMesh(executors=1, slots=2, env=env, log_dir=str(tmp_path))
    with m:
        with Client(m.endpoint) as c:
            c.register_application(tools_spec())
        with Session("tools", manager=m.endpoint) as s, Client(m.endpoint) as c:
            assert s.invoke(("echo", 0), timeout=30) == 0
            stuck = zmq.Context.instance().socket(zmq.DEALER)
            stuck.setsockopt(zmq.LINGER, 0)
            stuck.setsockopt(zmq.RCVHWM, 1)      # it reads nothing: let its own buffers fill at once
            stuck.setsockopt(zmq.RCVBUF, 4096)
            stuck.connect(m.endpoint)
            try:
                before = _rss(m.manager.pid)
                payload = cloudpickle.dumps(("echo", b"z" * PAYLOAD))
                for start in range(0, TASKS, 50):        # in steps, so inputs never pile up
                    tags = list(range(start, start + 50))
                    stuck.send_multipart(encode(Submit(s.id(), tags, "stuck", False), [payload] * 50))
                    wait_until(lambda: c.get_session(s.id()).succeeded >= start + 50 + 1, timeout=60, interval=0.02,
                               what=f"tasks {start}..{start + 49} to finish")
                # the kept answers are on disk, and the writer thread holds no batch any more
                wait_until(lambda: c.find_tasks(s.id(), filter={"state": "succeeded"}, page={"limit": 1}).total
                           == TASKS + 1 and c.stats()["store_backlog"] == 0,
                           timeout=30, what="every finished task in the database")
                grown = _rss(m.manager.pid) - before
                assert s.invoke(("echo", "served"), timeout=30) == "served", "others are served meanwhile"
                if bounded:
                    assert grown < 60 * 2**20, f"manager grew {grown >> 20} MiB for a reader that reads nothing"
                else:   # negative control: without the limit the answers pile up in the manager
                    assert grown > 100 * 2**20, f"control grew only {grown >> 20} MiB; the test proves nothing"
                if bounded:   # the stuck client wakes up and asks again: its last answers were kept
                    resent = [TASKS - 3, TASKS - 2, TASKS - 1]
                    got: set = set()
                    asked = [0.0]

                    def answered():
                        if time.monotonic() >= asked[0] + 2.0:   # as the client library does, every resend_after
                            stuck.send_multipart(encode(Submit(s.id(), resent, "stuck", True), [payload] * 3))
                            asked[0] = time.monotonic()
                        for _ in range(TASKS):                   # old answers drain first
                            if not stuck.poll(10):
                                break
                            msg = decode(stuck.recv_multipart())
                            if msg.cmd is Cmd.RESULT:
                                got.update(tag for tag, err in msg.header.outcomes if err is None and tag in resent)
                        return got == set(resent)

                    wait_until(answered, timeout=30, interval=0.01, what=f"answers to the resent tasks {resent}")
            finally:
                stuck.close(0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice is per thread on Linux only")
@pytest.mark.parametrize("nice", [10, 0], ids=["writer-nice-10", "equal-control"])
def test_writer_thread_runs_at_lower_priority_than_the_loop(nice):
    # Given a store writer made with Settings.writer_nice's value
    writer = Writer(Store(":memory:"), nice=nice)
    try:
        # When its thread reports its own nice value
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        theirs = writer.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result(10)
    finally:
        writer.close()
    # Then it is that much lower in priority than the calling (loop) thread, and only that thread is
    assert theirs == min(mine + nice, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
