"""The benchmark's service: a no-op entrypoint that returns its request unchanged."""
from executor import Instance

ins = Instance()


@ins.entrypoint
def noop(req):
    return req


if __name__ == "__main__":
    ins.run()
