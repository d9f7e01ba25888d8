"""A client that stops reading does not grow the manager's memory without bound;
its answers wait in the database until it asks again."""
from __future__ import annotations

import time

import cloudpickle
import pytest
import zmq

from client import Client, Session
from client.local import LocalMesh
from conftest import FAST, tools_spec
from mesh.protocol import Cmd, decode, encode

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
                    stuck.send_multipart(encode(Cmd.SUBMIT, [s.id(), tags, "stuck", False], [payload] * 50))
                    deadline = time.monotonic() + 60
                    while c.get_session(s.id()).succeeded < start + 50 + 1 and time.monotonic() < deadline:
                        time.sleep(0.02)
                # kept answers are on disk once the writer thread has caught up
                deadline = time.monotonic() + 30
                while c.stats()["store_backlog"] and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.3)
                grown = _rss(m.manager.pid) - before
                assert s.invoke(("echo", "served"), timeout=30) == "served", "others are served meanwhile"
                if bounded:
                    assert grown < 60 * 2**20, f"manager grew {grown >> 20} MiB for a reader that reads nothing"
                else:   # negative control: without the limit the answers pile up in the manager
                    assert grown > 100 * 2**20, f"control grew only {grown >> 20} MiB; the test proves nothing"
                if bounded:   # the stuck client wakes up and asks again: its last answers were kept
                    resent = [TASKS - 3, TASKS - 2, TASKS - 1]
                    got = set()
                    deadline = time.monotonic() + 30
                    next_ask = 0.0
                    while got != set(resent) and time.monotonic() < deadline:
                        if time.monotonic() >= next_ask:   # as the client library does, every resend_after
                            stuck.send_multipart(encode(Cmd.SUBMIT, [s.id(), resent, "stuck", True], [payload] * 3))
                            next_ask = time.monotonic() + 2.0
                        if stuck.poll(100):                # old answers drain first
                            msg = decode(stuck.recv_multipart())
                            if msg.cmd is Cmd.RESULT:
                                got |= {tag for tag, err in msg.header[1] if err is None and tag in resent}
                    assert got == set(resent)
            finally:
                stuck.close(0)
