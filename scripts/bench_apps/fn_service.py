"""The functions benchmark's stateful functions (scripts/bench_functions.py).

* ``bench/ping`` at id i, message k (an int): sends k to ``bench/pong`` at the same id (another
  address: the type differs), one function-to-function message.
* ``bench/pong`` at id i, message k: counts it in state ``n``; if k > 1, sends k - 1 back to
  ``bench/ping`` at id i (a chain of hops); when k == 1 the chain has ended and its id goes to
  the egress ``bench/done`` with the count.
* ``bench/echo``: replies with its message (``Functions.call`` latency).
"""
from executor import StatefulFunctions, ValueSpec

functions = StatefulFunctions()


@functions.bind("bench/ping")
def ping(context, message: int):
    context.send("bench/pong", context.address.identity, message)


@functions.bind("bench/pong", specs=[ValueSpec("n")])
def pong(context, message: int):
    n = (context["n"] or 0) + 1
    context["n"] = n
    if message > 1:
        context.send("bench/ping", context.address.identity, message - 1)


@functions.bind("bench/echo")
def echo(context, message):
    context.reply(message)


if __name__ == "__main__":
    functions.run()
