"""The context benchmark's service (scripts/bench_context.py).

It wraps ``Instance._apply_patch`` to record, for every replicated patch this
replica applies, ``version -> time.time()`` taken right after the apply, in the
module-level dict ``APPLIED`` (one dict per session id).  Patching a private
SDK method is a benchmark probe, not something services should do.

Requests are ``(op, arg)``:

* ``("sleep", seconds)``   -> ``(pid, executor id)`` after sleeping (binds instances)
* ``("patch", None)``      -> seconds spent in ``ins.patch_context([incr /n])``
* ``("update", None)``     -> ``(read s, write s)``: ``ins.context()``, n += 1, ``ins.update_context(whole)``
* ``("recorded", pause)``  -> ``(pid, executor id, {version: apply time}, resyncs)`` after ``pause`` seconds
"""
import os
import time

from executor import Instance

# When this file runs as __main__, the SDK imports it again by its file name
# (Instance._canonical) and serves from that copy: wrap once, share one dict.
_prev = Instance._apply_patch
if getattr(_prev, "bench_applied", None) is not None:
    APPLIED = _prev.bench_applied
else:
    APPLIED = {}   # session id -> {version: time.time() when this replica applied it}

    def _recording(self, msg, _real=_prev, _applied=APPLIED):
        before = self._version
        _real(self, msg)
        now = time.time()
        v = msg.header.version
        # Applied as a patch (not skipped, not replaced by a resync snapshot).
        if msg.header.session == self._sid and v == before + 1 and self._version == v:
            _applied.setdefault(self._sid, {})[v] = now

    _recording.bench_applied = APPLIED
    Instance._apply_patch = _recording

ins = Instance()
INCR = [{"op": "incr", "path": "/n", "value": 1}]


@ins.entrypoint
def context_bench(req):
    op, arg = req
    if op == "sleep":
        time.sleep(arg)
        return os.getpid(), os.environ["ZMESH_EXECUTOR_ID"]
    if op == "patch":
        t = time.perf_counter()
        ins.patch_context(INCR)
        return time.perf_counter() - t
    if op == "update":
        t0 = time.perf_counter()
        ctx = ins.context()
        ctx["n"] += 1
        t1 = time.perf_counter()
        ins.update_context(ctx)
        return t1 - t0, time.perf_counter() - t1
    if op == "recorded":
        time.sleep(arg or 0)
        return (os.getpid(), os.environ["ZMESH_EXECUTOR_ID"], dict(APPLIED.get(ins.session_id(), {})),
                ins.resyncs)
    raise KeyError(op)


if __name__ == "__main__":
    ins.run()
