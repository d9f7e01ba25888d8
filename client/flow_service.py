"""The built-in service of flow tasks: runs the functions a :class:`client.flows.Flow` registered.

Started by executors as ``python3 -m client.flow_service`` (the manager registers its
application, ``zmesh-flow`` or ``zmesh-flow-<labels hash>``, on first use).  The manager builds
each request itself (mesh/core/flows.py), as msgpack in a pickled ``bytes``::

    {"fn": <cloudpickled function>, "args": [[how, value], ...], "kwargs": {name: [how, value]},
     "record": bool, "run": id, "task": "flow/task"}

where ``how`` is ``value`` (a pickled constant, parameter or small upstream result: up to 64 KiB
travel inside the request), ``doc`` (a small upstream record, msgpack), ``object`` (a larger
upstream result, read by key through the executor's object cache), ``file`` (the same, written once per machine to a
local file whose path the task gets; :func:`client.flows.load_file` reads it back) or ``plain``
(a value picked from an upstream record, ``db`` mapping).

The answer is an envelope the manager reads without unpickling: msgpack ``[kind, started_at,
ended_at, executor, data]``, where ``data`` is the cloudpickled result (``blob``), or, when
``record`` is set and the result is a mapping of plain values, its msgpack (``doc``), so the
manager can pick attributes out of it for a downstream ``db`` mapping.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import inspect
import os
import tempfile
import time
from typing import Any, Callable, List

import cloudpickle

from executor import Instance
from mesh.data import patch
from mesh.wire.protocol import pack, unpack

from .objects import get_object

ins = Instance()
MAX_FUNCTIONS = 256                    # unpickled functions kept per process, least recently used out
_functions: "collections.OrderedDict[str, Callable[..., Any]]" = collections.OrderedDict()


def files_root() -> str:
    """Where ``file``-mapped results are written on this machine (the executor's run directory)."""
    run_dir = os.environ.get("ZMESH_RUN_DIR") or os.path.join(tempfile.gettempdir(), "zeromesh")
    return os.path.join(run_dir, "flow-files")


def _function(blob: bytes) -> Callable[..., Any]:
    key = hashlib.sha256(blob).hexdigest()
    fn = _functions.get(key)
    if fn is None:
        fn = _functions[key] = cloudpickle.loads(blob)
        if len(_functions) > MAX_FUNCTIONS:
            _functions.popitem(last=False)
    else:
        _functions.move_to_end(key)
    return fn


def _file(key: str) -> str:
    """The upstream result ``key`` as a local file, written once per machine (atomically)."""
    root = files_root()
    path = os.path.join(root, key + ".pkl")
    if not os.path.exists(path):
        os.makedirs(root, exist_ok=True)
        value = get_object(key)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".part-")
        with os.fdopen(fd, "wb") as f:
            cloudpickle.dump(value, f)
        os.replace(tmp, path)
    return path


def _resolve(arg: List[Any]) -> Any:
    how, value = arg
    if how == "value":
        return cloudpickle.loads(value)
    if how == "doc":   # a small upstream record, sent inside the request
        return unpack(value)
    if how == "object":
        return get_object(value)
    if how == "file":
        return _file(value)
    return value   # plain: picked by the manager from an upstream record


@ins.entrypoint
def run_task(request: bytes) -> bytes:
    req = unpack(request)
    fn = _function(req["fn"])
    args = [_resolve(a) for a in req["args"]]
    kwargs = {k: _resolve(a) for k, a in req["kwargs"].items()}
    started = time.time()
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = asyncio.run(_awaited(result))
    ended = time.time()
    if req.get("record") and isinstance(result, dict) and patch.is_document(result):
        kind, data = "doc", pack(result)
    else:
        kind, data = "blob", cloudpickle.dumps(result)
    return pack(["doc" if kind == "doc" else "blob", started, ended, os.environ.get("ZMESH_EXECUTOR_ID"), data])


async def _awaited(result: Any) -> Any:
    return await result


if __name__ == "__main__":
    # Serve from the module under its real name (client.flow_service), not this __main__ copy.
    import importlib
    importlib.import_module("client.flow_service").ins.run()
