"""Stateful functions for tests/test_functions.py: a counter, delays, expiring state."""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

from executor import StatefulFunctions, ValueSpec


@dataclass
class Tick:
    mid: str   # the sender's own id of this message (each must be counted exactly once)


functions = StatefulFunctions()


@functions.bind("test/count")
def count(context, message: Tick) -> None:
    n = (context["count"] or 0) + 1
    context["count"] = n
    context.send_egress("test/counted", {"id": context.address.identity, "mid": message.mid, "n": n})
    context.reply(n)


@functions.bind("test/delay")
def delay(context, message: str) -> None:
    what, _, seconds = message.partition(":")
    if what == "arm":        # arm:SECONDS, cancellable by the address's id
        context.send_after(timedelta(seconds=float(seconds)), "test/delay", context.address.identity,
                           f"fire:{time.time()}", cancellation_token="tok-" + context.address.identity)
    elif what == "disarm":
        context.cancel_delayed_message("tok-" + context.address.identity)
    elif what == "fire":     # fire:WHEN_ARMED
        context.send_egress("test/fired", {"id": context.address.identity, "armed": float(seconds),
                                           "fired": time.time()})


@functions.bind("test/expiring", specs=[ValueSpec("v", expire_after_write=timedelta(seconds=1))])
def expiring(context, message: str) -> None:
    if message == "get":
        context.reply(context["v"])
    else:
        context["v"] = message


if __name__ == "__main__":
    functions.run()
