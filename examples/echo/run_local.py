"""The echo example end to end, on a mesh this script starts on loopback.

    python examples/echo/run_local.py

Starts a manager (SQLite in a temporary directory) and two executors as
separate processes, registers echo-app, runs a session, and stops everything.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from echo_service import EchoRequest  # noqa: E402

from client import Client, Session  # noqa: E402
from client.local import LocalMesh  # noqa: E402


def main() -> None:
    with LocalMesh(executors=2, slots=2) as mesh:
        os.environ["ZMESH_MANAGER"] = mesh.endpoint
        print(f"mesh up at {mesh.endpoint} with 2 executors")
        with Client() as c:
            c.register_application(os.path.join(HERE, "echo-app.yaml"))
        with Session("echo-app", ctx=[]) as session:
            r = session.invoke(EchoRequest("hello"))
            print(f"invoke -> {r}")
            futs = [session.submit(EchoRequest(f"x{i}")) for i in range(20)]
            print(f"20 submitted tasks -> {sum(1 for f in futs if f.result(60))} results")
            print(f"context now holds {len(session.context())} entries; session {session.id()}")
    print("mesh stopped")


if __name__ == "__main__":
    main()
