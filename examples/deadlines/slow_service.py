"""A service whose work can take forever: the entrypoint sleeps as long as it is asked."""
import time

from executor import Instance

ins = Instance()


@ins.entrypoint
def work(seconds: float) -> str:
    time.sleep(seconds)
    return f"slept {seconds}s"


if __name__ == "__main__":
    ins.run()
