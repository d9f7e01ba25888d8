"""A test service with one entrypoint that does whatever the request says."""
import os
import time

from executor import Instance

ins = Instance()


@ins.entrypoint
def tools(req):
    op, arg = req
    if op == "echo":
        return arg
    if op == "pid":
        return os.getpid()
    if op == "append":            # append to the context list, return (pid, context length)
        ctx = ins.context() or []
        ctx.append(arg)
        ins.update_context(ctx)
        return os.getpid(), len(ctx)
    if op == "context":
        return ins.context()
    if op == "incr":
        ins.patch_context([{"op": "incr", "path": "/n", "value": arg}])
        return None
    if op == "raise":
        raise ValueError(f"bad value {arg!r}")
    if op == "crash":
        os._exit(3)
    if op == "sleep":
        time.sleep(arg)
        return os.getpid()
    raise KeyError(op)


if __name__ == "__main__":
    ins.run()
