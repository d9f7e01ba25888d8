"""Stateful functions for the CLI tests: one takes anything (JSON arrives as dict/list/str), one
takes only a dataclass, one replies with a class the CLI cannot import."""
from dataclasses import dataclass

from executor import StatefulFunctions, ValueSpec


@dataclass
class Point:
    x: int
    y: int


functions = StatefulFunctions()


@functions.bind("demo/counter", specs=[ValueSpec("n")])
def counter(context, message):
    n = (context["n"] or 0) + 1
    context["n"] = n
    context["last"] = message
    context.send_egress("demo/out", {"id": context.address.identity, "n": n, "got": message})
    context.reply({"n": n, "got": message})


@functions.bind("demo/point")
def point(context, message: Point):
    context.reply(Point(message.x + 1, message.y + 1))


@functions.bind("demo/maker")
def maker(context, message):
    context.reply(Point(len(str(message)), 0))


@functions.bind("demo/echo-egress")
def echo_egress(context, message):
    context.send_egress("demo/follow-out", message)
    context.reply(message)


if __name__ == "__main__":
    functions.run()
