"""Streaming entrypoints and the asyncio client on a real mesh (docs/streaming.md).

tests/apps/stream_service.py yields ``part-<i>``; its request says how many, how fast, when to
fail or die.  Every wait is bounded; a slow consumer is simulated by not reading (that pause is
the behaviour under test).
"""
from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest
from conftest import ECHO_YAML, FAST, HERE, wait_until

from client import AsyncSession, Client, Session
from client.connection import Connection
from client.local import LocalMesh
from mesh.errors import Cancelled, DeadlineExceeded, TaskFailed, Unavailable
from mesh.ops.config import Settings


def _spec(name: str = "streamer", restartable: bool = False) -> dict:
    env = {"RESTARTABLE": "1"} if restartable else {}
    return {"metadata": {"name": name},
            "spec": {"command": sys.executable, "arguments": ["stream_service.py"],
                     "working_directory": os.path.join(HERE, "apps"), "environments": env}}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = LocalMesh(executors=1, slots=2, env=FAST, log_dir=str(tmp_path_factory.mktemp("stream")))
    with m:
        with Client(m.endpoint) as c:
            c.register_application(_spec())
            c.register_application(_spec("restartable", restartable=True))
            c.register_application(ECHO_YAML)
        yield m


def test_ten_thousand_parts_arrive_in_order_each_once(mesh):
    with Session("streamer", manager=mesh.endpoint) as s:
        parts = list(s.stream({"n": 10_000}, timeout=60))
        assert parts == [f"part-{i}" for i in range(10_000)]
        assert s.invoke({"n": 3}, timeout=60) == ["part-0", "part-1", "part-2"]   # invoke: all of them


def test_an_error_ends_the_stream_after_the_parts_made_before_it(mesh):
    with Session("streamer", manager=mesh.endpoint) as s:
        got = []
        with pytest.raises(TaskFailed, match="failed after 3 parts"):
            for part in s.stream({"n": 10, "fail_at": 3}, timeout=60):
                got.append(part)
        assert got == ["part-0", "part-1", "part-2"]


def test_a_part_late_past_the_timeout_is_deadline_exceeded(mesh):
    with Session("streamer", manager=mesh.endpoint) as s:
        it = s.stream({"n": 3, "delay": 5}, timeout=0.5)
        assert next(it) == "part-0"
        with pytest.raises(DeadlineExceeded):
            next(it)
        it.close()


def test_closing_a_stream_stops_the_generator_and_frees_the_instance(tmp_path):
    with LocalMesh(executors=1, slots=1, env=FAST, log_dir=str(tmp_path)) as m:
        with Client(m.endpoint) as c:
            c.register_application(_spec())
        with Session("streamer", manager=m.endpoint) as s:
            assert s.invoke({"n": 1}, timeout=60) == ["part-0"]   # the one instance is up
            it = s.stream({"n": 1_000_000, "delay": 0.01, "dir": str(tmp_path), "tag": "a"}, timeout=30)
            assert [next(it), next(it)] == ["part-0", "part-1"]
            it.close()
            wait_until(lambda: os.path.exists(tmp_path / "closed-a"), timeout=10,
                       what="the generator's finally to run")
            start = time.monotonic()
            assert s.invoke({"n": 1}, timeout=30) == ["part-0"]
            assert time.monotonic() - start < 1.0, "the next task waited for the cancelled stream"
            with pytest.raises(Cancelled):
                it.future.result(10)


def _instance_pids(m: LocalMesh) -> list:
    out = []
    for ex in m.executors:
        try:
            with open(f"/proc/{ex.pid}/task/{ex.pid}/children") as f:
                kids = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for k in kids:   # the guard's child, or the instance itself
            try:
                with open(f"/proc/{k}/task/{k}/children") as f:
                    out += [int(p) for p in f.read().split()] or [k]
            except OSError:
                pass
    return out


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.mark.parametrize("window", [64, 0], ids=["credit", "negative-control-no-credit"])
def test_a_slow_consumer_pauses_the_producer(tmp_path, window):
    """100 KiB parts, a consumer that stops reading after 2: with credit the generator stops
    ``stream_window`` parts ahead and nothing piles up in the client; without (the negative
    control) the parts pile up in the client's buffer."""
    env = {**FAST, "ZMESH_STREAM_WINDOW": str(window)}
    with LocalMesh(executors=1, slots=1, env=env, log_dir=str(tmp_path)) as m:
        with Client(m.endpoint) as c:
            c.register_application(_spec())
        conn = Connection(m.endpoint, settings=Settings(stream_window=window))
        try:
            s = Session("streamer", connection=conn)
            s.invoke({"n": 1}, timeout=60)
            manager_before = _rss_kb(m.manager.pid)
            it = s.stream({"n": 3000, "size": 100 * 1024}, timeout=60)
            next(it)
            next(it)
            buf = it._buf
            # the producer runs until credit stops it (or, without credit, far past that)
            wait_until(lambda: buf.received >= min(window, 500) if window else buf.received >= 1000,
                       timeout=60, what="parts to arrive")
            time.sleep(1.0)   # the consumer is slow: nothing is read for a second
            queued = buf.received - buf.taken
            manager_grew = _rss_kb(m.manager.pid) - manager_before
            instance_rss = max((_rss_kb(p) for p in _instance_pids(m)), default=0)
            it.close()
            if window:
                assert queued <= window, f"{queued} parts waited in the client; the window is {window}"
                assert manager_grew < 50 * 1024, f"the manager grew {manager_grew} KiB"
                assert instance_rss < 200 * 1024, f"the producer holds {instance_rss} KiB"
            else:
                assert queued > 500, "without credit the parts should have piled up (the control failed)"
        finally:
            conn.close()


@pytest.mark.parametrize("restartable", [True, False])
def test_an_instance_dying_mid_stream(tmp_path, restartable):
    with LocalMesh(executors=1, slots=1, env=FAST, log_dir=str(tmp_path)) as m:
        with Client(m.endpoint) as c:
            c.register_application(_spec("s", restartable=restartable))
        with Session("s", manager=m.endpoint) as s:
            got = []
            req = {"n": 300, "die_at": 150, "dir": str(tmp_path)}   # past one credit window (64)
            if restartable:   # run again from the start elsewhere; the parts we have are skipped
                got = list(s.stream(req, timeout=60))
                assert got == [f"part-{i}" for i in range(300)]
            else:
                with pytest.raises(Unavailable, match=r"after \d+ parts") as info:
                    for part in s.stream(req, timeout=60):
                        got.append(part)
                delivered = info.value.details["parts"]   # what reached the manager before the process died
                assert 0 < delivered <= 150 and got == [f"part-{i}" for i in range(delivered)]
            assert os.path.exists(tmp_path / "died")


def test_ten_thousand_concurrent_awaits_from_one_loop(mesh):
    from echo_service import EchoRequest

    async def main():
        async with AsyncSession("echo-app", manager=mesh.endpoint) as s:
            answers = await asyncio.wait_for(
                asyncio.gather(*(s.invoke(EchoRequest(f"m{i}")) for i in range(10_000))), 120)
            assert [a.text for a in answers] == [f"M{i}" for i in range(10_000)]
            parts = [p async for p in s.stream(EchoRequest("one"))]   # a plain entrypoint: one part
            assert [p.text for p in parts] == ["ONE"]
            with pytest.raises(DeadlineExceeded):
                async with AsyncSession("streamer", manager=mesh.endpoint) as slow:
                    await slow.invoke({"n": 2, "delay": 5}, timeout=0.5)
    asyncio.run(main())


def test_async_streams_and_cancelling_the_awaiting_task(mesh, tmp_path):
    async def main():
        async with AsyncSession("streamer", manager=mesh.endpoint) as s:
            assert [p async for p in s.stream({"n": 5})] == [f"part-{i}" for i in range(5)]

            async def consume():
                async for _ in s.stream({"n": 1_000_000, "delay": 0.01, "dir": str(tmp_path), "tag": "b"}):
                    pass
            task = asyncio.ensure_future(consume())
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    asyncio.run(main())
    wait_until(lambda: os.path.exists(tmp_path / "closed-b"), timeout=10, what="the generator to be closed")


def test_a_context_watcher_sees_every_version_in_order(mesh):
    async def main():
        async with AsyncSession("streamer", manager=mesh.endpoint, ctx={"n": 0, "log": []}) as s:
            seen = []
            started = asyncio.Event()

            async def watch():
                async for version, ctx in s.watch_context(timeout=30):
                    seen.append((version, ctx["n"], len(ctx["log"])))
                    started.set()
                    if version >= 100:
                        return
            watcher = asyncio.ensure_future(watch())
            await asyncio.wait_for(started.wait(), 30)   # it holds version 0: now write
            with Session(session_id=s.id(), manager=mesh.endpoint) as writer:
                for i in range(100):
                    await asyncio.get_running_loop().run_in_executor(None, writer.patch_context, [
                        {"op": "incr", "path": "/n", "value": 1}, {"op": "add", "path": "/log/-", "value": i}])
                writer.detach()
            await asyncio.wait_for(watcher, 60)
            assert seen == [(v, v, v) for v in range(101)]
    asyncio.run(main())
