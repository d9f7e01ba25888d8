"""The built-in service of runner applications: runs the code a :class:`client.runner.Runner` shipped.

Started by executors as ``python3 -m client.runner_service`` (the spec :func:`client.runner.app_spec`
writes).  One entrypoint takes ``(descriptor key, method, args, kwargs)``:

* the descriptor (an object bound to the service's session: the package's key and hash, the kind
  of service and the cloudpickled function, class or object) is fetched once per process and session;
* the package is unpacked once per machine and hash (:func:`client.runner_package.unpack`) and
  put first on ``sys.path``; the call runs with it as the working directory;
* a class is constructed once per process and session; an object service's object lives in its
  one instance and is checkpointed after every call (:func:`_stateful`), so it survives the
  instance being stopped or replaced;
* :class:`client.objects.ObjectRef` arguments are read here with ``get_object``, through the
  executor's object cache.

The result goes back cloudpickled by this module, so a result that cannot be pickled fails the
call with a ``TypeError`` naming it (``TaskFailed`` on the client) instead of anything worse.
"""
from __future__ import annotations

import collections
import fcntl
import os
import pickle
import sys
from typing import Any, Dict, List, Optional, Tuple

import cloudpickle

from executor import Instance
from mesh.errors import DeadlineExceeded, FailedPrecondition, NotFound, from_wire

from . import runner_package
from .objects import ObjectRef, get_object, update_object
from .runner import WARMUP, PendingResult

PENDING_STEP = 30.0    # seconds one wait for another call's answer lasts (the manager allows up to 60)
PENDING_WAIT = 3600.0  # seconds a call waits for an argument that is another call's answer

ins = Instance()
MAX_SERVICES = 64                  # descriptors (and their objects) kept per process, least recently used out
_services: "collections.OrderedDict[str, Tuple[str, Any, Dict[str, Any]]]" = collections.OrderedDict()
_packages: Dict[str, str] = {}     # hash -> unpacked directory
_locks: List[int] = []             # shared locks on the packages this process uses (see _package)
_dirty: Dict[str, str] = {}        # object services changed since their last checkpoint: key -> state key
KEPT_OUTCOMES = 64                 # outcomes of an object's latest calls kept in its checkpoint, for retries
_states: Dict[str, List[Any]] = {}   # descriptor key of an object service -> [last seq applied, the object]


def package_root() -> str:
    """Where packages are unpacked on this machine: the executor's run directory, else the user's cache."""
    run_dir = os.environ.get("ZMESH_RUN_DIR")
    if run_dir:
        return os.path.join(run_dir, "runner")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "zeromesh", "runner")


def _package(key: str, digest: str) -> str:
    path = _packages.get(digest)
    if path is None or not os.path.isdir(path):
        path = os.path.join(package_root(), digest)
        os.makedirs(package_root(), exist_ok=True)
        # a shared lock for this process's life: the executor removes only packages nobody holds
        fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _locks.append(fd)
        if not os.path.isdir(path):
            path = runner_package.unpack(get_object(key), digest, package_root())
        _packages[digest] = path
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    if os.getcwd() != path:
        os.chdir(path)
    return path


def _dependencies(deps: List[str]) -> None:
    """The runner's ``dependencies``, installed once per machine and set, first on sys.path."""
    path = runner_package.install(deps, package_root())
    if path not in sys.path:
        sys.path.insert(0, path)


def _service(key: str) -> Tuple[str, Any, Dict[str, Any]]:
    """(kind, function or constructed instance or None, descriptor) of one service, cached per process."""
    found = _services.get(key)
    if found is not None:
        _services.move_to_end(key)
        return found
    desc: Dict[str, Any] = pickle.loads(get_object(key))
    _package(desc["package"], desc["hash"])
    if desc.get("dependencies"):
        _dependencies(desc["dependencies"])
    target = None
    if desc["kind"] != "object":          # an object comes from its checkpoint (_stateful)
        target = cloudpickle.loads(desc["target"])
        if desc["kind"] == "class":
            target = target()
    _services[key] = found = (desc["kind"], target, desc)
    if len(_services) > MAX_SERVICES:
        _services.popitem(last=False)
    return found


def _resolve(value: Any) -> Any:
    if isinstance(value, ObjectRef):
        return get_object(value)
    if isinstance(value, PendingResult):
        return _pending(value.key)
    return value


def _pending(key: str) -> Any:
    """Another call's answer, kept by the manager as object ``key`` once that call answers
    (mesh/core/results.py): wait for it here, in bounded steps (up to PENDING_WAIT in all)."""
    for _ in range(int(PENDING_WAIT / PENDING_STEP)):
        try:
            kept = get_object(key, wait=PENDING_STEP)
        except NotFound:
            continue   # not answered yet
        if isinstance(kept, dict) and "error" in kept:   # that call failed: so does this one
            raise from_wire(kept["error"])
        return cloudpickle.loads(kept)
    raise DeadlineExceeded(f"an argument (the answer of another call) was not there within {PENDING_WAIT:g}s",
                           timeout=PENDING_WAIT)


def _pickled(result: Any, what: str) -> bytes:
    try:
        return cloudpickle.dumps(result)
    except Exception as exc:
        raise TypeError(f"{what} cannot be pickled ({type(result).__name__}): {type(exc).__name__}: {exc}") from None


def _stateful(key: str, desc: Dict[str, Any], seq: int, method: str, args: Any, kwargs: Any) -> Optional[bytes]:
    """Apply call ``seq`` of an object service to its object; the checkpoint follows per batch.

    The object lives in this process between calls.  Before a batch of answers leaves this
    instance (``ins.before_answer``), ``(last call applied, object, {call: outcome})`` is written
    to the service's state object (bound to its session), once for all the batch's calls: nothing
    is answered that the checkpoint does not hold.  A process that has not applied ``seq - 1`` (a
    new instance after the last one was stopped, or one rebound to the session after another served
    it) loads the checkpoint first; a call the checkpoint already holds (a retry after an instance
    died between checkpoint and answer) returns the recorded outcome instead of running again."""
    state = _states.get(key)
    if state is None or state[0] != seq - 1:
        done, blob, outcomes = pickle.loads(get_object(desc["state"]))
        if seq <= done:   # applied already (a retry): its recorded outcome, never a second run
            if seq not in outcomes:
                raise FailedPrecondition(f"call {seq} of this object was applied and its outcome is no longer "
                                         f"kept (the last {KEPT_OUTCOMES} are)")
            return _replay(outcomes[seq])
        state = [done, cloudpickle.loads(blob), outcomes]
        _states[key] = state
    obj = state[1]
    fn = getattr(obj, method)
    error: Optional[BaseException] = None
    out = b""
    try:
        out = _pickled(fn(*args, **kwargs), f"the result of {type(obj).__name__}.{method}")
    except Exception as exc:   # the call failed: its effect on the object (if any) stays, as in-process
        error = exc
    state[0] = seq
    record: Any = out
    if error is not None:
        try:
            record = ("raised", cloudpickle.dumps(error))
        except Exception:
            record = ("raised", cloudpickle.dumps(RuntimeError(f"{type(error).__name__}: {error}")))
    state[2][seq] = record
    _dirty[key] = desc["state"]
    if error is not None:
        raise error
    return out


def _replay(record: Any) -> Optional[bytes]:
    if isinstance(record, tuple):   # ("raised", the pickled exception) the call ended with
        raise cloudpickle.loads(record[1])
    return record


def _checkpoint() -> None:
    """Write the checkpoints of the object services this batch changed (see _stateful)."""
    while _dirty:
        key, state_key = _dirty.popitem()
        state = _states.get(key)
        if state is None:
            continue
        done, obj, outcomes = state
        for old in sorted(outcomes)[:-KEPT_OUTCOMES]:   # the recent outcomes stay, for retries
            del outcomes[old]
        try:
            update_object(state_key, pickle.dumps((done, _pickled(obj, f"the state of {type(obj).__name__}"),
                                                   outcomes)))
        except BaseException:
            _states.pop(key, None)   # not durable: the next call reloads the last checkpoint
            raise


@ins.entrypoint
def run(call: Any) -> Optional[bytes]:
    key, method, args, kwargs, seq = call
    kind, target, desc = _service(key)
    if method == WARMUP:
        return None
    args = [_resolve(a) for a in args]
    kwargs = {k: _resolve(v) for k, v in kwargs.items()}
    if kind == "object":
        return _stateful(key, desc, seq, method, args, kwargs)
    fn = target if method is None else getattr(target, method)
    return _pickled(fn(*args, **kwargs), f"the result of {getattr(fn, '__qualname__', method or 'the function')}")


ins.before_answer(_checkpoint)


if __name__ == "__main__":
    # Serve from the module under its real name (client.runner_service), not this __main__ copy.
    import importlib
    importlib.import_module("client.runner_service").ins.run()
