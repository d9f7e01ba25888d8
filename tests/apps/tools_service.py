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
    if op == "mark":              # record that this task ran: /done/<arg> = 1, and count the runs in /marks
        ins.patch_context([{"op": "add", "path": f"/done/{arg}", "value": 1},
                           {"op": "incr", "path": "/marks", "value": 1}])
        return arg
    if op == "cas":               # compare-and-set: replace /v with arg[1] only if it is arg[0]
        ins.patch_context([{"op": "test", "path": "/v", "value": arg[0]},
                           {"op": "replace", "path": "/v", "value": arg[1]}])
        return None
    if op == "replica":           # what this instance's replica holds, and how often it resynced
        return os.getpid(), ins.context(), ins.resyncs
    if op == "getobj":            # read an object through the executor's cache
        from client import get_object
        ref, pause = arg
        obj = get_object(ref)
        time.sleep(pause)
        return os.environ["ZMESH_EXECUTOR_ID"], obj.get("n"), len(obj["data"])
    if op == "raise":
        raise ValueError(f"bad value {arg!r}")
    if op == "crash":
        os._exit(3)
    if op == "sleep":
        time.sleep(arg)
        return os.getpid()
    if op == "where":             # sleep, then say which executor ran this
        time.sleep(arg)
        return os.environ["ZMESH_EXECUTOR_ID"]
    raise KeyError(op)


if __name__ == "__main__":
    ins.run()
