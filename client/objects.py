"""The object cache API: large data travels once, then follows by patches.

``put_object`` stores an object in the manager and returns a small, picklable
:class:`ObjectRef` to pass inside requests.  ``get_object`` always returns the
newest version, fetching only what the local cache lacks.  Inside a service
instance, reads go through the executor's shared cache (``ZMESH_OBJECT_CACHE``),
so each machine fetches an object once however many instances read it.
Documents come back as private copies; opaque objects as a shared, read-only
instance (unpickled once per version).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import cloudpickle

from mesh.data import patch
from mesh.data.cache import ObjectCache
from mesh.data.replica import DOC
from mesh.errors import Internal, InvalidArgument
from mesh.ops.config import Settings
from mesh.wire.protocol import pack

from .connection import Connection


def _cache_bytes() -> int:
    """``ZMESH_CACHE_BYTES``, parsed as every setting is (:attr:`mesh.ops.config.Settings.cache_bytes`);
    only that variable is read, so a malformed unrelated one cannot break ``import client``."""
    raw = os.environ.get("ZMESH_CACHE_BYTES")
    return Settings.load({} if raw is None else {"ZMESH_CACHE_BYTES": raw}).cache_bytes


CACHE_BYTES = _cache_bytes()


@dataclass(frozen=True)
class ObjectRef:
    key: str
    version: int


_lock = threading.Lock()
_conns: Dict[str, Connection] = {}
cache = ObjectCache(CACHE_BYTES)


def _conn(endpoint: Optional[str] = None, plain: bool = False) -> Connection:
    """One shared connection per endpoint.  ``plain``: the executor's local object cache (ipc, no
    CURVE; it passes this connection's token on to the manager, which authorizes every read)."""
    from mesh.ops.config import default_manager
    endpoint = endpoint or default_manager()
    with _lock:
        c = _conns.get(endpoint)
        if c is None:
            c = _conns[endpoint] = Connection(endpoint, plain=plain)
        return c


def _encode(obj: Any) -> Dict[str, Any]:
    if patch.is_document(obj):
        return {"kind": DOC, "data": pack(obj)}
    return {"kind": "blob", "data": cloudpickle.dumps(obj)}


def _sid(session: Any) -> Optional[str]:
    if session is None or isinstance(session, str):
        return session
    sid = getattr(session, "id", None)
    if not callable(sid):
        raise InvalidArgument(f"session is a Session, a session id or None, not {type(session).__name__}",
                              argument="session")
    return sid()


def put_object(obj: Any, *, session: Any = None, ttl: Optional[float] = None) -> ObjectRef:
    """Store ``obj``; with ``session`` it is deleted with the session, else at ``ttl`` or delete_object."""
    enc = _encode(obj)
    r, _ = _conn().call_blob("put_object", {"kind": enc["kind"], "session": _sid(session), "ttl": ttl}, enc["data"])
    return ObjectRef(r["key"], r["version"])


def get_object(ref: Union[ObjectRef, str], wait: Optional[float] = None) -> Any:
    """The newest version of the object, read through the local cache (and, inside a
    service instance, the executor's): only what the cache lacks crosses the network.
    ``wait``: seconds (at most 60) to wait for an object not put yet, such as a task's result
    kept for another task (mesh/core/results.py); ``NotFound`` if it is not put by then."""
    key = ref if isinstance(ref, str) else ref.key
    args: Dict[str, Any] = {"key": key}
    if wait is not None:
        args["wait"] = float(wait)
    cache_endpoint = os.environ.get("ZMESH_OBJECT_CACHE")
    reader = _conn(cache_endpoint, plain=True) if cache_endpoint else _conn()
    with _lock:
        have = cache.version(key)
    for _ in range(2):
        header, data = reader.call_blob("get_object", {**args, "have": have},
                                        timeout=None if wait is None else wait + reader.settings.request_timeout)
        with _lock:
            entry = cache.apply(key, header, data)
            if entry is None:   # the answer does not fit what the cache holds now: ask for all of it
                cache.forget(key)
                have = 0
                continue
            if entry.kind == DOC:
                return patch.copy_document(entry.value)
            if entry.obj is None:
                entry.obj = cloudpickle.loads(entry.value)
            return entry.obj
    raise Internal(f"the answer for object {key!r} with have=0 did not fill the cache", key=key)


def update_object(ref: Union[ObjectRef, str], obj: Any) -> ObjectRef:
    key = ref if isinstance(ref, str) else ref.key
    enc = _encode(obj)
    r, _ = _conn().call_blob("update_object", {"key": key, "kind": enc["kind"]}, enc["data"])
    return ObjectRef(key, r["version"])


def patch_object(ref: Union[ObjectRef, str], ops: List[Dict[str, Any]]) -> ObjectRef:
    key = ref if isinstance(ref, str) else ref.key
    patch.validate_ops(ops)
    r = _conn().call("patch_object", {"key": key, "ops": list(ops)})
    return ObjectRef(key, r["version"])


def delete_object(ref: Union[ObjectRef, str]) -> None:
    key = ref if isinstance(ref, str) else ref.key
    _conn().call("delete_object", {"key": key})
    with _lock:
        cache.forget(key)
