"""Raw ZeroMQ limit: the baseline zeromesh's benchmark compares itself to.

Why this exists: to judge zeromesh's overhead we need the best a plain
pyzmq pipeline of the same shape achieves on the same machine:

    client (DEALER) -> broker (ROUTER front, ROUTER back) -> N workers (DEALER)

Frames are a msgpack header plus one payload frame.  The broker uses a
blocking zmq.Poller, drains everything queued on each wake-up (NOBLOCK until
zmq.Again) and keeps each worker up to ``credit`` tasks ahead; every reply
returns one credit.  Workers echo the payload (no-op work).  Everything runs
on tcp://127.0.0.1 with OS-chosen ports read back from LAST_ENDPOINT.

``stream()`` is the limit of one stream (scripts/bench_streaming.py): the same
broker and one streaming worker that sends a start request's parts one message
each, never past the credit the client grants as it takes them (a window, as
zeromesh's ``stream_window``); time to the first part and parts/s.

Usage: python scripts/bench_limit.py [--workers 1 2] [--seconds 3] [--json out.json]
"""
import argparse
import contextlib
import json
import multiprocessing as mp
import sys
import time
from collections import deque
from typing import Any, Dict, List

import msgpack
import zmq

READY = b"R"
LIFETIME = 300.0  # hard cap (s) on any child process, so none can outlive a crash
MAX_LOOPS = 10 ** 9  # count bound on every otherwise time-bounded loop
IDLE_MS = 100  # poll timeout: how often idle children look at the stop event
DRAIN = 10000  # bound on messages taken per wake-up


def _stopping(stop, deadline, state):
    """Check the stop Event at most every 50 ms: its lock is costly per message."""
    now = time.monotonic()
    if now < state[0]:
        return False
    state[0] = now + 0.05
    return stop.is_set() or now > deadline


def _socket(ctx, kind):
    """Unlimited HWM: ROUTER drops silently at HWM; windows/credits bound queues."""
    s = ctx.socket(kind)
    for opt in (zmq.LINGER, zmq.SNDHWM, zmq.RCVHWM):
        s.setsockopt(opt, 0)
    return s


def _dealer(ctx, endpoint):
    """Connected DEALER plus a reusable Poller (Socket.poll builds one per call)."""
    sock = _socket(ctx, zmq.DEALER)
    sock.connect(endpoint)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    return sock, poller


def _recv(sock, n, copy, flags=0):
    """Receive n frames; only the payload (last) frame honours ``copy``.

    Frame counts are fixed, so skip recv_multipart's per-frame RCVMORE query
    (pyzmq's *_multipart measured ~3x slower than raw calls here).  Frames
    of one message arrive atomically, so only the first recv needs NOBLOCK."""
    parts = [sock.recv(flags)] + [sock.recv() for _ in range(n - 2)]
    return parts + [sock.recv(copy=copy)]


def _drain(sock, n, copy):
    """Yield every message already queued (NOBLOCK until zmq.Again), at most DRAIN."""
    for _ in range(DRAIN):
        try:
            yield _recv(sock, n, copy, zmq.NOBLOCK)
        except zmq.Again:
            return


def _send(sock, parts, copy):
    """Send envelope/header frames as bytes, the payload frame with ``copy``."""
    for p in parts[:-1]:
        sock.send(p, zmq.SNDMORE)
    sock.send(parts[-1], copy=copy)


def _broker(conn, n_workers, credit, copy, stop):
    """Route tasks to workers with credit; route replies back to their client."""
    ctx = zmq.Context()
    front, back = _socket(ctx, zmq.ROUTER), _socket(ctx, zmq.ROUTER)
    poller = zmq.Poller()
    for s in (front, back):
        s.bind("tcp://127.0.0.1:*")
        poller.register(s, zmq.POLLIN)
    conn.send((front.LAST_ENDPOINT.decode(), back.LAST_ENDPOINT.decode()))
    credits, ready, pending = {}, deque(), deque()
    deadline, state = time.monotonic() + LIFETIME, [0.0]
    try:
        for _ in range(MAX_LOOPS):
            events = dict(poller.poll(IDLE_MS))
            if _stopping(stop, deadline, state):
                break
            for msg in _drain(back, 4, copy) if back in events else ():
                wid = msg[0]
                if not msg[1]:  # registration: [wid, b"", READY, b""]
                    credits[wid] = credit
                    ready.append(wid)
                    if len(credits) == n_workers:
                        conn.send("ready")
                    continue
                _send(front, msg[1:], copy)  # a reply returns one credit
                credits[wid] += 1
                if credits[wid] == 1:
                    ready.append(wid)
            if front in events:
                pending.extend(_drain(front, 3, copy))
            while pending and ready:  # round-robin over workers holding credit
                wid = ready.popleft()
                _send(back, [wid] + pending.popleft(), copy)
                credits[wid] -= 1
                if credits[wid]:
                    ready.append(wid)
    finally:
        ctx.destroy(linger=0)


def _worker(endpoint, copy, stop):
    """No-op worker: decode the header (as a real one must) and echo the payload."""
    ctx = zmq.Context()
    sock, poller = _dealer(ctx, endpoint)
    sock.send_multipart([b"", READY, b""])  # empty client id marks registration
    deadline, state = time.monotonic() + LIFETIME, [0.0]
    try:
        for _ in range(MAX_LOOPS):
            events = poller.poll(IDLE_MS)
            if _stopping(stop, deadline, state):
                break
            for client, header, payload in _drain(sock, 3, copy) if events else ():
                _send(sock, [client, msgpack.packb(msgpack.unpackb(header)), payload], copy)
    finally:
        ctx.destroy(linger=0)


def _stream_worker(endpoint, copy, stop):
    """Streaming worker: a start ``[0, tag, n, window]`` (payload: the part) sends ``n`` parts
    ``[tag, seq]``, never at or past the client's credit (``window`` at first, then each credit
    ``[1, tag, upto]``), then an end ``[tag, -1]``.  Incoming credit is drained once per burst."""
    ctx = zmq.Context()
    sock, poller = _dealer(ctx, endpoint)
    sock.send_multipart([b"", READY, b""])
    streams = {}  # (client, tag) -> [next seq, n, upto, part]
    deadline, state = time.monotonic() + LIFETIME, [0.0]
    try:
        for _ in range(MAX_LOOPS):
            busy = any(st[0] < min(st[1], st[2]) for st in streams.values())
            events = poller.poll(0 if busy else IDLE_MS)
            if _stopping(stop, deadline, state):
                break
            for client, header, payload in _drain(sock, 3, copy) if events else ():
                h = msgpack.unpackb(header)
                if h[0] == 0:
                    streams[(client, h[1])] = [0, h[2], h[3] or h[2], payload]
                elif (client, h[1]) in streams:
                    st = streams[(client, h[1])]
                    st[2] = max(st[2], h[2])
            for (client, tag), st in list(streams.items()):
                upto = min(st[1], st[2])
                while st[0] < upto:
                    _send(sock, [client, msgpack.packb([tag, st[0]]), st[3]], copy)
                    st[0] += 1
                if st[0] >= st[1]:
                    _send(sock, [client, msgpack.packb([tag, -1]), b""], copy)
                    del streams[(client, tag)]
    finally:
        ctx.destroy(linger=0)


@contextlib.contextmanager
def _mesh(workers, credit, copy, worker=_worker):
    """Start broker + workers, yield a client (DEALER, Poller), end children by PID.

    The client context is created only after forking, so no child inherits it."""
    # Fork is cheap and works however this file was imported; spawn elsewhere.
    mpc = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    stop = mpc.Event()
    parent, child = mpc.Pipe()
    procs = [mpc.Process(target=_broker, args=(child, workers, credit, copy, stop), daemon=True)]
    ctx = None
    try:
        procs[0].start()
        if not parent.poll(10):
            raise RuntimeError("broker did not start")
        front, back = parent.recv()
        for _ in range(workers):
            procs.append(mpc.Process(target=worker, args=(back, copy, stop), daemon=True))
            procs[-1].start()
        if not parent.poll(10) or parent.recv() != "ready":
            raise RuntimeError("workers did not register")
        ctx = zmq.Context()
        yield _dealer(ctx, front)
    finally:
        if ctx is not None:
            ctx.destroy(linger=0)
        stop.set()
        for p in procs:
            p.join(2)
        for p in procs:
            for end in (p.terminate, p.kill):  # escalate, by PID, only if needed
                if p.is_alive():
                    end()
                    p.join(1)
        parent.close()
        child.close()


def throughput(workers: int = 1, seconds: float = 3.0, payload: int = 0,
               credit: int = 100, window: int = 1000, warmup: float = 0.3) -> dict:
    """Stream tasks with at most ``window`` in flight; count replies after warm-up."""
    copy = payload == 0  # zero-copy only pays off for real payloads
    body = b"x" * payload
    with _mesh(workers, credit, copy) as (sock, poller):
        seq = inflight = done = 0
        start = time.perf_counter()
        t0, end = None, start + warmup + seconds
        for _ in range(MAX_LOOPS):
            now = time.perf_counter()
            if now >= end:
                break
            if t0 is None and now >= start + warmup:
                t0, done = now, 0
            while inflight < window:
                _send(sock, [msgpack.packb(seq), body], copy)
                seq += 1
                inflight += 1
            if not poller.poll(5000):
                raise RuntimeError("no reply within 5 s")
            for header, _body in _drain(sock, 2, copy):
                msgpack.unpackb(header)
                inflight -= 1
                done += 1
        elapsed = time.perf_counter() - (t0 if t0 is not None else start)
    return {"tasks": done, "seconds": round(elapsed, 3), "tasks_per_s": round(done / elapsed, 1)}


def latency(workers: int = 1, count: int = 2000, payload: int = 0,
            max_seconds: float = 20.0) -> dict:
    """One task in flight: round trip client -> broker -> worker -> broker -> client."""
    copy = payload == 0
    body = b"x" * payload
    samples = []
    with _mesh(workers, 100, copy) as (sock, poller):
        warm = min(100, max(2, count // 10))  # prime TCP connections and caches
        deadline = time.monotonic() + max_seconds
        for i in range(warm + count):
            if time.monotonic() > deadline:
                break
            t = time.perf_counter_ns()
            _send(sock, [msgpack.packb(i), body], copy)
            if not poller.poll(10000):
                raise RuntimeError("no reply within 10 s")
            header, reply = _recv(sock, 2, copy)
            dt = time.perf_counter_ns() - t
            if i >= warm:
                samples.append(dt / 1000.0)
            if len(reply) != payload:
                raise RuntimeError("echoed payload has the wrong size")
    return percentiles(samples)


def _one_stream(sock, poller, tag, n, window, body, copy):
    """One stream of ``n`` parts, granting credit as parts are taken (as the zeromesh client does:
    ``window`` more once half of it is used); (seconds to the first part, seconds to the end)."""
    t0 = time.perf_counter()
    _send(sock, [msgpack.packb([0, tag, n, window]), body], copy)
    taken, granted, first = 0, window, None
    for _ in range(MAX_LOOPS):
        if not poller.poll(5000):
            raise RuntimeError("no part within 5 s")
        for header, _part in _drain(sock, 2, copy):
            t, seq = msgpack.unpackb(header)
            if t != tag:
                raise RuntimeError("a part of another stream")
            if seq < 0:
                if taken != n:
                    raise RuntimeError(f"{taken} parts of {n} arrived")
                return first, time.perf_counter() - t0
            if first is None:
                first = time.perf_counter() - t0
            taken += 1
            if window and granted - taken <= window // 2:
                granted = taken + window
                _send(sock, [msgpack.packb([1, tag, granted]), b""], copy)
    raise RuntimeError("the stream did not end")


def stream(parts: int = 20000, window: int = 64, payload: int = 16, first_count: int = 100,
           first_parts: int = 8) -> dict:
    """The limit of one stream through the same shape (client -> broker -> 1 worker and back):
    ``first_count`` short streams (``first_parts`` parts each), time to the first part of each
    (from sending the request; the worker is warm); then one stream of ``parts`` parts of
    ``payload`` bytes, one message each, with ``window`` parts of credit granted end to end."""
    copy = payload < 65536
    body = b"x" * payload
    samples = []
    with _mesh(1, 100, copy, worker=_stream_worker) as (sock, poller):
        for tag in range(first_count + 5):   # 5 to warm up
            first, _ = _one_stream(sock, poller, tag, first_parts, window, body, copy)
            if tag >= 5:
                samples.append(first * 1e6)
        _, took = _one_stream(sock, poller, first_count + 5, parts, window, body, copy)
    ttfp = percentiles(samples)
    return {"parts": parts, "seconds": round(took, 4), "parts_per_s": round(parts / took, 1),
            "first_p50_us": ttfp["p50_us"], "first_p99_us": ttfp["p99_us"], "first_count": ttfp["count"]}


def percentiles(samples_us: List[float]) -> Dict[str, Any]:
    """count, p50, p99 and mean of latency samples in µs: the one definition every benchmark uses."""
    xs = sorted(samples_us)
    n = len(xs)
    if not n:
        raise RuntimeError("no latency samples")
    return {"count": n, "p50_us": round(xs[n // 2], 1), "p99_us": round(xs[min(n - 1, int(n * 0.99))], 1),
            "mean_us": round(sum(xs) / n, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", help="also write results to this file")
    args = ap.parse_args(argv)
    results = {"throughput": {}, "latency": {}}
    print("%-32s%28s" % ("benchmark", "result"))
    for w in args.workers:
        r = throughput(workers=w, seconds=args.seconds)
        results["throughput"][str(w)] = r
        print("%-32s%20s tasks/s" % ("throughput noop, %d worker(s)" % w,
                                         format(r["tasks_per_s"], ",.0f")))
    # Fewer round trips for big payloads keeps the whole run well under a minute.
    for size, label, count in ((0, "0 B", 2000), (100 * 1024, "100 KiB", 300),
                               (10 * 1024 * 1024, "10 MiB", 20)):
        r = latency(workers=1, count=count, payload=size, max_seconds=10.0)
        results["latency"][label] = r
        print("%-32s%28s" % ("latency %s (n=%d)" % (label, r["count"]), "p50 %s us  p99 %s us"
                             % (format(r["p50_us"], ",.0f"), format(r["p99_us"], ",.0f"))))
    print(json.dumps(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
