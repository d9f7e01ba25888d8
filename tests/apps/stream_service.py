"""A streaming service for tests/test_streaming.py: an entrypoint that yields.

The request is a dict: ``n`` parts (``part-0``...), ``delay`` seconds between them, ``fail_at``:
raise after that many parts, ``die_at``: the process exits after that many parts (once: a marker
file in ``dir`` says it did), ``dir``: where ``closed-<tag>`` is written when the generator is
closed early (its ``finally``), ``size``: bytes of padding per part.  ``RESTARTABLE=1`` in the
environment declares the entrypoint restartable.
"""
import os
import time

from executor import Instance

ins = Instance()


@ins.entrypoint(restartable=os.environ.get("RESTARTABLE") == "1")
def parts(req: dict):
    finished = False
    try:
        for i in range(req.get("n", 10)):
            if req.get("fail_at") == i:
                raise ValueError(f"failed after {i} parts")
            if req.get("die_at") == i and req.get("dir"):
                marker = os.path.join(req["dir"], "died")
                if not os.path.exists(marker):
                    open(marker, "w").close()
                    os._exit(1)
            yield f"part-{i}" + "x" * req.get("size", 0)
            if req.get("delay"):
                time.sleep(req["delay"])
        finished = True
    finally:
        if not finished and req.get("dir") and req.get("tag"):
            open(os.path.join(req["dir"], "closed-" + req["tag"]), "w").close()


if __name__ == "__main__":
    ins.run()
