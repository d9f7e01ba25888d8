"""The stateful functions walkthrough end to end, on a mesh this script starts on loopback.

    python examples/functions/run_local.py

Starts a manager and two executors, registers walkthrough.py as an application (one instance
serves all its functions; the manager learns their types when it says hello), then drives each
example with the client: ``send``, ``call``, ``egress`` and ``state``.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from walkthrough import AnotherHello, Cancel, GreetRequest, Hello, Remind  # noqa: E402

from client import Client, Functions  # noqa: E402
from client.local import LocalMesh  # noqa: E402
from mesh.errors import InvalidArgument  # noqa: E402

APP = {"metadata": {"name": "walkthrough"},
       "spec": {"command": sys.executable, "arguments": ["walkthrough.py"], "working_directory": HERE}}


class Egress:
    """Reads one egress on from where it left off."""

    def __init__(self, fx: Functions, typename: str) -> None:
        self.fx, self.typename, self.offset = fx, typename, 0

    def until(self, text: str, timeout: float = 10.0) -> bool:
        """Print records until one holds ``text``; False if none came within ``timeout`` seconds."""
        for rec in self.fx.egress(self.typename, offset=self.offset, timeout=timeout):
            self.offset = rec.offset + 1
            print(f"  egress {self.typename} #{rec.offset}: {rec.message}")
            if text in str(rec.message):
                return True
        return False


def main() -> None:
    with LocalMesh(executors=2, slots=2) as mesh:
        print(f"mesh up at {mesh.endpoint} with 2 executors")
        with Client(mesh.endpoint) as c:
            c.register_application(APP)
        with Functions(mesh.endpoint) as fx:
            log = Egress(fx, "example/log")

            print("hello:")
            print(f"  call example/hello/world -> {fx.call('example/hello', 'world', Hello('world'))!r}")
            log.until("example/hello/world")

            print("typed (Union[Hello, AnotherHello]):")
            print(f"  Hello -> {fx.call('example/typed', 'x', Hello('mesh'))!r}")
            print(f"  AnotherHello -> {fx.call('example/typed', 'x', AnotherHello('ada'))!r}")
            try:
                fx.call("example/typed", "x", 42)
            except InvalidArgument as exc:
                print(f"  int -> refused: {exc}")

            print("caller (example/caller sends to example/replier, which replies to it):")
            fx.send("example/caller", "c1", Hello("caller"))
            log.until("HelloReply")
            print(f"  state of example/caller/c1: {fx.state('example/caller', 'c1')}")

            print("delayed (remind me in 1s; a cancelled reminder never comes):")
            fx.send("example/delayed", "me", Remind("stretch", 1.0))
            fx.send("example/delayed", "me", Remind("coffee", 1.5))
            fx.send("example/delayed", "me", Cancel("coffee"))
            log.until("reminded: stretch")
            late = log.until("reminded: coffee", timeout=2.0)
            print(f"  coffee reminder {'arrived' if late else 'cancelled: nothing more within 2s'}")

            print("count greeter (example/person counts visits, example/greeter greets):")
            for name in ("alice", "alice", "bob", "alice", "alice"):
                fx.send("example/person", name, GreetRequest(name))
            greets = Egress(fx, "example/greets")
            greets.until("4-nth time alice")
            print(f"  state of example/person/alice: {fx.state('example/person', 'alice')}")

            print("function types:")
            for row in fx.list().items:
                print(f"  {row['type']:<16} app={row['application']} instances={row['instances']} "
                      f"addresses={row['addresses']} queued={row['queued']}")
    print("mesh stopped")


if __name__ == "__main__":
    main()
