"""The runner end to end: run this directory's functions, classes and objects on a local mesh.

    python examples/runner/run_local.py

Starts a manager and two executors on loopback, then runs the example of docs/runner.md: the
Runner packages this directory (with shapes.py, imported on the executors by reference), the
functions and classes defined here travel by value, and leaving the ``with`` block unregisters
the application and deletes the package.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import shapes  # noqa: E402

from client import Runner  # noqa: E402
from client.local import LocalMesh  # noqa: E402


def sum_func(a: int, b: int) -> int:
    return a + b


class Calculator:
    def multiply(self, a, b):
        return a * b


class Counter:
    def __init__(self):
        self.count = 0

    def add(self, v):
        self.count += v
        return self.count

    def get_count(self):
        return self.count


def main() -> None:
    os.chdir(HERE)   # the runner packages the working directory: this one
    with LocalMesh(executors=2, slots=2) as mesh:
        os.environ["ZMESH_MANAGER"] = mesh.endpoint
        print(f"mesh up at {mesh.endpoint} with 2 executors")
        with Runner("my-job") as rr:
            s = rr.service(sum_func)
            f = s(1, 3)
            print(f"sum_func(1, 3) -> {f.get(60)}")
            c = rr.service(Calculator)
            print(f"Calculator.multiply(2, 3) -> {c.multiply(2, 3).get(60)}")
            k = rr.service(Counter())
            k.add(10).wait(60)
            print(f"Counter: add(10), add(get_count()) -> {k.add(k.get_count()).get(60)}")
            squares = rr.get([s(i, i) for i in range(100)], timeout=60)
            print(f"100 calls -> {len(squares)} results, sum {sum(squares)}")
            data = rr.put_object(list(range(1000)))
            print(f"sum of an object read on the executor -> {rr.service(sum)(data).get(60)}")
            print(f"shapes.area(3, 2) -> {rr.service(shapes.area)(3, h=2).get(60)}")
        print("runner closed: my-job unregistered, package deleted")
    print("mesh stopped")


if __name__ == "__main__":
    main()
