"""The functions benchmark's stateful functions (scripts/bench_functions.py).

* ``bench/ping`` at id i, message k (an int): sends k to ``bench/pong`` at the same id (another
  address: the type differs), one function-to-function message.
* ``bench/pong`` at id i, message k: counts it in state ``n``; if k > 1, sends k - 1 back to
  ``bench/ping`` at id i (a chain of hops); when k == 1 the chain has ended and its id goes to
  the egress ``bench/done`` as ``[id, n]``.
* ``bench/fan`` at id i, message k: sends k - 1 zeros and then one 1 to ``bench/pong`` at id i
  in one invocation (k function-to-function messages queued at once: the engine hands them to
  pong in batches); pong counts them all and the final 1 ends the id as above.
* ``bench/start``, message ``[target, ids, k, prefix]``: sends k to ``target`` at each of the ids
  ``prefix + str(j)`` (one client message starts every chain or fan).
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
    elif message == 1:
        context.send_egress("bench/done", [context.address.identity, n])


@functions.bind("bench/fan")
def fan(context, message: int):
    for _ in range(message - 1):
        context.send("bench/pong", context.address.identity, 0)
    context.send("bench/pong", context.address.identity, 1)


@functions.bind("bench/start")
def start(context, message: list):
    target, ids, k, prefix = message
    for j in range(ids):
        context.send(target, f"{prefix}{j}", k)


@functions.bind("bench/echo")
def echo(context, message):
    context.reply(message)


if __name__ == "__main__":
    functions.run()
