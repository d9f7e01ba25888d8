"""Nothing hangs forever: task timeouts and cancelling a running task, on a local mesh.

    python examples/deadlines/run_local.py

One executor with one slot, so a hung task would block everything behind it:
a task past its timeout is stopped (its instance and the instance's process tree)
and fails with DeadlineExceeded; a running task can be cancelled; the slot then
serves the next task.  See docs/reliability.md ("Nothing holds a slot forever").
"""
import os
import sys
import time

from client import Client, Session
from client.local import LocalMesh
from mesh.errors import Cancelled, DeadlineExceeded

HERE = os.path.dirname(os.path.abspath(__file__))
APP = {"metadata": {"name": "slow"},
       "spec": {"working_directory": HERE, "command": sys.executable, "arguments": ["slow_service.py"],
                "max_retries": 0, "task_timeout": 30}}   # the app's default timeout; submit(timeout=) overrides it


def main() -> None:
    with LocalMesh(executors=1, slots=1) as mesh, Client(mesh.endpoint) as c:
        c.register_application(APP)
        with Session("slow", manager=mesh.endpoint) as s:
            print(s.invoke(0.1, timeout=60))                       # a quick one: 'slept 0.1s'
            t0 = time.monotonic()
            try:
                s.submit(3600, timeout=1).result(60)               # an hour of work, a 1 s timeout
            except DeadlineExceeded as exc:
                print(f"after {time.monotonic() - t0:.1f}s: {exc}")
            hung = s.submit(3600)                                  # running, with no end in sight ...
            for _ in range(600):                                   # (bounded: up to 60 s)
                running = [t for t in c.find_tasks(s.id()) if t.state == "running"]
                if running:
                    break
                time.sleep(0.1)
            c.cancel_task(running[0].id)                           # ... until it is cancelled
            try:
                hung.result(60)
            except Cancelled as exc:
                print(f"cancelled: {exc}")
            print(s.invoke(0.1, timeout=60))                       # the one slot serves again
    print("mesh stopped")


if __name__ == "__main__":
    main()
