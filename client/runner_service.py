"""The built-in service of runner applications: runs the code a :class:`client.runner.Runner` shipped.

Started by executors as ``python3 -m client.runner_service`` (the spec :func:`client.runner.app_spec`
writes).  One entrypoint takes ``(descriptor key, method, args, kwargs)``:

* the descriptor (an object bound to the service's session: the package's key and hash, the kind
  of service and the cloudpickled function, class or object) is fetched once per process and session;
* the package is unpacked once per machine and hash (:func:`client.runner_package.unpack`) and
  put first on ``sys.path``; the call runs with it as the working directory;
* a class is constructed once per process and session; an object service's object is unpickled
  once per process and session and then changed by the calls (its session has one instance);
* :class:`client.objects.ObjectRef` arguments are read here with ``get_object``, through the
  executor's object cache.

The result goes back cloudpickled by this module, so a result that cannot be pickled fails the
call with a ``TypeError`` naming it (``TaskFailed`` on the client) instead of anything worse.
"""
from __future__ import annotations

import collections
import os
import pickle
import sys
from typing import Any, Dict, Optional, Tuple

import cloudpickle

from executor import Instance

from . import runner_package
from .objects import ObjectRef, get_object
from .runner import WARMUP

ins = Instance()
MAX_SERVICES = 64                  # descriptors (and their objects) kept per process, least recently used out
_services: "collections.OrderedDict[str, Tuple[str, Any]]" = collections.OrderedDict()   # key -> (kind, target)
_packages: Dict[str, str] = {}     # hash -> unpacked directory


def package_root() -> str:
    """Where packages are unpacked on this machine: the executor's run directory, else the user's cache."""
    run_dir = os.environ.get("ZMESH_RUN_DIR")
    if run_dir:
        return os.path.join(run_dir, "runner")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "zeromesh", "runner")


def _package(key: str, digest: str) -> str:
    path = _packages.get(digest)
    if path is None:
        path = os.path.join(package_root(), digest)
        if not os.path.isdir(path):
            path = runner_package.unpack(get_object(key), digest, package_root())
        _packages[digest] = path
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    if os.getcwd() != path:
        os.chdir(path)
    return path


def _service(key: str) -> Tuple[str, Any]:
    found = _services.get(key)
    if found is not None:
        _services.move_to_end(key)
        return found
    desc: Dict[str, Any] = pickle.loads(get_object(key))
    _package(desc["package"], desc["hash"])
    target = cloudpickle.loads(desc["target"])
    if desc["kind"] == "class":
        target = target()
    _services[key] = found = (desc["kind"], target)
    if len(_services) > MAX_SERVICES:
        _services.popitem(last=False)
    return found


def _resolve(value: Any) -> Any:
    return get_object(value) if isinstance(value, ObjectRef) else value


@ins.entrypoint
def run(call: Any) -> Optional[bytes]:
    key, method, args, kwargs = call
    kind, target = _service(key)
    if method == WARMUP:
        return None
    args = [_resolve(a) for a in args]
    kwargs = {k: _resolve(v) for k, v in kwargs.items()}
    fn = target if method is None else getattr(target, method)
    result = fn(*args, **kwargs)
    try:
        return cloudpickle.dumps(result)
    except Exception as exc:
        name = getattr(fn, "__qualname__", method or "the function")
        raise TypeError(f"the result of {name} cannot be pickled ({type(result).__name__}): "
                        f"{type(exc).__name__}: {exc}") from None


if __name__ == "__main__":
    # Serve from the module under its real name (client.runner_service), not this __main__ copy.
    import importlib
    importlib.import_module("client.runner_service").ins.run()
