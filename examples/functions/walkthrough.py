"""The Stateful Functions walkthrough, ported: every function of it, served by one instance.

Ports of the Flink Statefun Python SDK's walkthrough and greeter examples to zeromesh's SDK
(executor/functions.py).  Messages are plain Python objects (dataclasses here) instead of
protobufs: a function's type hint says which classes it takes.

* ``example/hello``     hello world: reply to the client and write a line to an egress
* ``example/typed``     typed dispatch on ``Union[Hello, AnotherHello]``; any other class is refused
* ``example/caller``    calls ``example/replier`` and gets the reply back as a message
* ``example/delayed``   ``send_after`` a reminder to itself; a cancelled one never arrives
* ``example/person``    counts visits in its state and forwards to ``example/greeter``,
                        which writes the greeting to the ``example/greets`` egress

run_local.py starts a mesh, registers this module as an application and drives each one.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from datetime import timedelta

from executor import StatefulFunctions, ValueSpec


@dataclass
class Hello:
    world: str


@dataclass
class AnotherHello:
    name: str


@dataclass
class HelloReply:
    message: str


@dataclass
class Remind:
    text: str
    seconds: float = 1.0


@dataclass
class Cancel:
    text: str


@dataclass
class GreetRequest:
    name: str
    visits: int = 0


functions = StatefulFunctions()


# -- hello ----------------------------------------------------------------------------------
@functions.bind("example/hello")
def hello(context, message: Hello):
    context.send_egress("example/log", f"{context.address} got {message}")
    context.reply(f"Hello {message.world}!")


# -- message types: dispatch on a Union ------------------------------------------------------
@functions.bind("example/typed")
def typed(context, message: typing.Union[Hello, AnotherHello]):
    if isinstance(message, Hello):
        context.reply(f"a Hello for world {message.world}")
    else:
        context.reply(f"an AnotherHello from {message.name}")


# -- a function calling another --------------------------------------------------------------
@functions.bind("example/caller", specs=[ValueSpec("replies")])
def caller(context, message: typing.Union[Hello, HelloReply]):
    if isinstance(message, Hello):      # from the client: ask example/replier
        context.send("example/replier", "some-id", message)
    else:                               # the replier's answer comes back as a message
        context["replies"] = (context["replies"] or 0) + 1
        context.send_egress("example/log", f"{context.address} got {message} from {context.caller}")


@functions.bind("example/replier")
def replier(context, message: Hello):
    context.reply(HelloReply(f"This is a reply to {context.caller}!"))


# -- delayed messages ------------------------------------------------------------------------
@functions.bind("example/delayed")
def delayed(context, message: typing.Union[Remind, Cancel, str]):
    me = context.address.identity
    if isinstance(message, Remind):     # remind me (this address) later
        context.send_after(timedelta(seconds=message.seconds), "example/delayed", me, message.text,
                           cancellation_token=f"{me}/{message.text}")
    elif isinstance(message, Cancel):   # changed my mind
        context.cancel_delayed_message(f"{me}/{message.text}")
    else:                               # a reminder arrived
        context.send_egress("example/log", f"{context.address} reminded: {message}")


# -- the count greeter (the playground's person / greeter) -------------------------------------
@functions.bind("example/person", specs=[ValueSpec("visits", type=int)])
def person(context, message: GreetRequest):
    visits = (context.storage.visits or 0) + 1
    context.storage.visits = visits
    context.send("example/greeter", message.name, GreetRequest(message.name, visits))


TEMPLATES = ["", "Welcome {}", "Nice to see you again {}", "Third time is a charm {}"]


@functions.bind("example/greeter")
async def greeter(context, message: GreetRequest):
    if message.visits < len(TEMPLATES):
        greeting = TEMPLATES[message.visits].format(message.name)
    else:
        greeting = f"Nice to see you at the {message.visits}-nth time {message.name}!"
    context.send_egress("example/greets", {"name": message.name, "greeting": greeting})


if __name__ == "__main__":
    functions.run()
