"""The flows benchmark's plain-task service: the fan-out/fan-in flow's three functions as one entrypoint.

A request is ``("source", n)``, ``("work", xs, i)`` or ``("gather", parts)``; the answers are what
the flow's tasks return (scripts/bench_flows.py: ``source``, ``work``, ``gather``)."""
from executor import Instance

ins = Instance()


@ins.entrypoint
def fanout(req):
    op = req[0]
    if op == "source":
        return list(range(req[1]))
    if op == "work":
        return req[1][req[2]] * 2
    if op == "gather":
        return sum(req[1])
    raise ValueError(f"unknown operation {op!r}")


if __name__ == "__main__":
    ins.run()
