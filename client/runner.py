"""``Runner``: run the functions, classes and objects of this directory on the mesh, no service file.

::

    with Runner("my-job") as rr:              # packages os.getcwd(), registers application "my-job"
        s = rr.service(sum_func)              # a function: stateless, autoscaled
        s(1, 3).get()                         # 4
        k = rr.service(Counter())             # an object: stateful, one instance, calls in order
        k.add(10).wait(); k.add(k.get_count()).get()

A runner application runs :mod:`client.runner_service`; each service is one session of it, whose
descriptor (the cloudpickled function, class or object, and the package's key) is an object bound
to that session, shipped once.  Semantics, and what is not done yet: docs/runner.md.
"""
from __future__ import annotations

import concurrent.futures
import functools
import inspect
import logging
import os
import pickle
import secrets
import sys
import sysconfig
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import cloudpickle

from mesh.errors import (AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument, MeshError, NotFound,
                         PermissionDenied)
from mesh.model.spec import RUNNER_HASH_ENV

from . import runner_package
from .api import Client
from .connection import Connection
from .objects import ObjectRef, _encode
from .session import Session

__all__ = ["ObjectFuture", "Runner", "RunnerService", "SessionContext"]

log = logging.getLogger("zeromesh.runner")

LEASE_TTL = 30.0   # seconds the mesh keeps a runner's things after its client stops renewing them
SERVICE_MODULE = "client.runner_service"
MAX_SESSION_ID = 128
WARMUP = "__warmup__"   # the method name the runner service loads for and answers without running anything
PACKAGE_ENV, HASH_ENV = "ZMESH_RUNNER_PACKAGE", RUNNER_HASH_ENV
# zeromesh's own packages travel by reference (executors have them)
_OWN_ROOTS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), p)
                   for p in ("mesh", "executor", "client"))


@dataclass
class SessionContext:
    """Names a service's session: attach it as ``_session_context`` to a function, class or object.

    ``session_id``: the session's id (else one is generated, starting with the runner's name);
    ``application_name``: open the session on that (runner) application instead of the runner's."""

    session_id: Optional[str] = None
    application_name: Optional[str] = None

    def __post_init__(self) -> None:
        sid = self.session_id
        if sid is not None:
            if not isinstance(sid, str):
                raise InvalidArgument(f"session_id must be a string, not {type(sid).__name__}", argument="session_id")
            if not sid.strip():
                raise InvalidArgument("session_id cannot be empty", argument="session_id")
            if len(sid) > MAX_SESSION_ID:
                raise InvalidArgument(f"session_id is too long ({len(sid)} characters; at most {MAX_SESSION_ID})",
                                      argument="session_id")
        app = self.application_name
        if app is not None and not isinstance(app, str):
            raise InvalidArgument(f"application_name must be a string, not {type(app).__name__}",
                                  argument="application_name")


class SessionId(str):
    """A session id that may also be called, as ``Session.id()`` is: ``svc._session.id == svc._session.id()``."""

    def __call__(self) -> str:
        return str(self)


class ServiceSession:
    """The session behind one service (``service._session``): ``id``, ``info()``, ``close()``."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.id = SessionId(session.id())

    def info(self) -> Dict[str, Any]:
        return self.session.info()

    def close(self) -> None:
        self.session.close()

    def __repr__(self) -> str:
        return f"ServiceSession({str(self.id)!r})"


class ObjectFuture:
    """The result of one call.  ``get()`` the value, ``wait()`` for it, ``ref()`` to keep it in the
    object cache; pass it as an argument to another call (resolved on the executor that runs that
    call, never through the client: docs/runner.md)."""

    def __init__(self, future: "concurrent.futures.Future[Any]", service: "RunnerService") -> None:
        self._future = future
        self._service = service
        self._lock = threading.Lock()
        self._value: Any = None
        self._decoded = False
        self._ref: Optional[ObjectRef] = None
        self._kept: Optional[str] = None   # its answer's object key once kept for another call ("" if not)

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until the call has finished (or failed); ``DeadlineExceeded`` after ``timeout`` seconds."""
        done, _ = concurrent.futures.wait([self._future], timeout)
        if not done:
            raise DeadlineExceeded(f"the call did not finish within {timeout}s (it keeps running)", timeout=timeout)

    def get(self, timeout: Optional[float] = None) -> Any:
        """The call's return value; its error (``TaskFailed`` for an exception raised remotely)."""
        data = self._future.result(timeout)
        with self._lock:
            if not self._decoded:
                self._value = None if data is None else cloudpickle.loads(data)
                self._decoded = True
            return self._value

    def ref(self, timeout: Optional[float] = None) -> ObjectRef:
        """The result as an object in the cache, bound to the service's session (deleted with it)."""
        value = self.get(timeout)
        with self._lock:
            if self._ref is None:
                self._ref = self._service._runner._put(value, session=str(self._service._session.id))
            return self._ref

    def __repr__(self) -> str:
        return f"ObjectFuture({self._service.name}, {'done' if self.done() else 'pending'})"


def _kind(obj: Any) -> str:
    if inspect.isclass(obj):
        return "class"
    if inspect.isroutine(obj) or isinstance(obj, functools.partial):
        return "function"
    return "object"


class RunnerService:
    """A function, class or object running on the mesh as one session of a runner application.

    A function service is called directly; a class or object service through its public methods
    (``svc.multiply(2, 3)``).  Every call returns an :class:`ObjectFuture` at once."""

    def __init__(self, runner: "Runner", target: Any, kind: str, session: ServiceSession, descriptor: ObjectRef) -> None:
        self._runner = runner
        self._target = target
        self._kind = kind
        self._session = session
        self._descriptor = descriptor
        self._closed = False
        self._order = threading.Lock()
        self._seq = 0                 # calls of an object service numbered 1, 2, ... (its checkpoint's order)
        self.name = getattr(target if kind != "object" else type(target), "__name__", kind)
        self._cls = None if kind == "function" else (target if kind == "class" else type(target))

    def _call(self, method: Optional[str], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> ObjectFuture:
        if self._closed:
            raise FailedPrecondition(f"service {self.name} is closed")
        argument = self._runner._argument
        call_args = [argument(a) for a in args]
        call_kwargs = {k: argument(v) for k, v in kwargs.items()}
        if self._kind != "object" or method == WARMUP:
            return ObjectFuture(self._session.session.submit((self._descriptor.key, method, call_args,
                                                              call_kwargs, 0)), self)
        with self._order:   # numbered and queued together: the numbers are the submission order
            self._seq += 1
            fut = self._session.session.submit((self._descriptor.key, method, call_args, call_kwargs, self._seq))
        return ObjectFuture(fut, self)

    def __call__(self, *args: Any, **kwargs: Any) -> ObjectFuture:
        if self._kind != "function":
            methods = ", ".join(_public_methods(self._cls)) or "none"
            raise TypeError(f"{self.name} is a {self._kind} service: call its public methods ({methods}), "
                            "not the service itself")
        return self._call(None, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        cls = self.__dict__.get("_cls")
        if name.startswith("_") or cls is None:
            raise AttributeError(name)
        target = self.__dict__["_target"]
        member = getattr(target, name, None) if self.__dict__["_kind"] == "object" else getattr(cls, name, None)
        if member is None or not callable(member):
            raise AttributeError(f"{cls.__name__} has no public method {name!r}")

        def method(*args: Any, **kwargs: Any) -> ObjectFuture:
            return self._call(name, args, kwargs)
        method.__name__ = name
        return method

    def close(self) -> None:
        """End this service's session (its pending calls are cancelled, its objects deleted)."""
        if self._closed:
            return
        self._closed = True
        self._runner._close_service(self)

    def __repr__(self) -> str:
        return f"RunnerService({self.name}, {self._kind}, session={str(self._session.id)!r})"


def _public_methods(cls: Any) -> List[str]:
    return [n for n, _ in inspect.getmembers(cls, callable) if not n.startswith("_")]


@dataclass(frozen=True)
class PendingResult:
    """An ObjectFuture passed as an argument before its call answered: the manager keeps that
    call's answer as object ``key`` (mesh/core/results.py) and the executor running this call
    reads it from there (client/runner_service.py), never through the client."""
    key: str


def app_spec(name: str, package: ObjectRef, digest: str, max_instances: Optional[int] = None,
             description: str = "") -> Dict[str, Any]:
    """The spec of a runner application: the built-in service, the package in its environment."""
    spec: Dict[str, Any] = {"command": "python3", "arguments": ["-m", SERVICE_MODULE],
                            "environments": {PACKAGE_ENV: package.key, HASH_ENV: digest}}
    if max_instances is not None:
        spec["max_instances"] = max_instances
    return {"metadata": {"name": name, "description": description}, "spec": spec}


def _calling_session() -> Optional[str]:
    """The session of the runner-service call this code runs in (a nested Runner), else None."""
    service = sys.modules.get("client.runner_service")
    if service is None or not os.environ.get("ZMESH_RUNNER_PACKAGE"):
        return None
    sid: Optional[str] = service.ins.session_id()
    return sid


def _is_runner_app(app: Any) -> bool:
    return SERVICE_MODULE in list(getattr(app, "arguments", None) or [])


class Runner:
    """Packages the working directory, registers application ``name`` and runs services of it.

    ``fail_if_exists``: ``AlreadyExists`` if the application is registered already (else it is
    reused, and left registered on close).  ``excludes``: more patterns to leave out of the package
    (beside ``.git``, virtual environments, ``__pycache__``, ``*.pyc`` and ``.zmeshignore``'s).
    ``close()`` (or leaving the ``with`` block) closes the sessions, unregisters what this runner
    registered and deletes the package and the objects it put; it is idempotent."""

    def __init__(self, name: str, fail_if_exists: bool = False, *, excludes: Sequence[str] = (),
                 manager: Optional[str] = None, connection: Optional[Connection] = None,
                 root: Optional[str] = None, lease_ttl: float = LEASE_TTL,
                 dependencies: Sequence[str] = ()) -> None:
        self.name = name
        if isinstance(dependencies, str) or not all(isinstance(d, str) and d for d in dependencies):
            raise InvalidArgument("dependencies is a list of pip requirements, e.g. ['numpy==2.*']",
                                  argument="dependencies")
        self.dependencies = list(dependencies)   # installed on each executor, once per set (docs/runner.md)
        self.root = os.path.abspath(root or os.getcwd())
        self._own_conn = connection is None
        self._conn = connection or Connection(manager)
        self._client = Client(connection=self._conn)
        self._lock = threading.Lock()
        self._closed = False
        self._services: List[RunnerService] = []
        self._objects: List[ObjectRef] = []      # put by this runner (package included): deleted on close
        self._apps: List[str] = []               # registered by this runner: unregistered on close
        self._by_value: Set[str] = set()         # modules this runner registered for pickling by value
        self.registered = False                  # this runner registered application ``name``
        self.package: Optional[ObjectRef] = None
        self.lease: Optional[str] = None          # everything this runner creates ends with it
        self._renewing = threading.Event()
        # inside a runner service's call: a nested runner on that call's application and session,
        # whose lifecycle (package, application, lease) belongs to the outer runner
        self.nested_session = _calling_session()
        if self.nested_session is not None:
            self.package = ObjectRef(os.environ["ZMESH_RUNNER_PACKAGE"], 1)
            self.digest = os.environ.get("ZMESH_RUNNER_HASH", "")
            return
        try:
            self.lease = self._client.create_lease(lease_ttl)["id"]
            threading.Thread(target=self._renew, args=(lease_ttl,), daemon=True,
                             name=f"zmesh-lease-{name}").start()
            data, self.digest = runner_package.build(self.root, excludes)
            self.package = self._put(data, blob=True)
            existing = self._client.get_application(name)
            if existing is not None:
                if fail_if_exists:
                    raise AlreadyExists(f"application {name!r} is already registered", application=name)
                if not _is_runner_app(existing):
                    raise FailedPrecondition(f"application {name!r} exists and is not a runner application",
                                             application=name)
                if existing.lease and existing.owner != self._client.whoami()["name"]:
                    raise PermissionDenied(f"application {name!r} is a temporary application of {existing.owner!r}: "
                                           "choose another name", application=name)
            else:
                try:
                    self._client.register_temporary_application(
                        app_spec(name, self.package, self.digest, description=f"runner of {self.root}"), self.lease)
                    self._apps.append(name)
                    self.registered = True
                except AlreadyExists:   # registered by another runner meanwhile: reuse it
                    if fail_if_exists:
                        raise
        except BaseException:
            self.close()
            raise

    # -- services -------------------------------------------------------------------
    def service(self, obj: Any, autoscale: Optional[bool] = None, warmup: int = 0) -> RunnerService:
        """Run ``obj`` on the mesh.  A function or class is stateless and, by default
        (``autoscale=None`` or True), gets as many instances as its load asks for, up to the
        application's limits; ``autoscale=False`` fixes one instance.  An object is stateful: one
        instance, its calls applied in submission order.  ``warmup``: calls that only load the
        service, sent now so instances start before the first real call."""
        self._check_open()
        kind = _kind(obj)
        if kind == "object" and autoscale:
            raise ValueError(f"an object service ({type(obj).__name__} instance) is always fixed: one instance "
                             "holds its state; pass the class for a scaled, stateless service")
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError("warmup must be a non-negative number of calls")
        fixed = kind == "object" or autoscale is False
        if self.nested_session is not None:
            if fixed:
                raise ValueError("inside a runner service only function and class services are possible: they "
                                 "share the calling service's session (an object or a fixed service needs its own)")
            return self._service(obj, kind, Session(session_id=self.nested_session, connection=self._conn), warmup)
        ctx = _session_context(obj)
        sid = ctx.session_id if ctx is not None else None
        app = ctx.application_name if ctx is not None and ctx.application_name else self.name
        session = self._open_session(app, sid, 1 if fixed else None)   # fixed: one instance, its session's bound
        return self._service(obj, kind, session, warmup)

    def _service(self, obj: Any, kind: str, session: Session, warmup: int) -> RunnerService:
        nested = self.nested_session is not None
        try:
            desc = {"package": self.package.key if self.package else "", "hash": self.digest, "kind": kind,
                    "target": b"", "state": None, "dependencies": self.dependencies}
            if kind == "object":   # the object's checkpoint: (calls applied, the object, the last result)
                desc["state"] = self._put(pickle.dumps((0, self._dumps(obj), {})), session=session.id()).key
            else:
                desc["target"] = self._dumps(obj)
            descriptor = self._put(pickle.dumps(desc), session=session.id(), blob=True)
        except BaseException:
            if not nested:
                session.close()
            raise
        svc = RunnerService(self, obj, kind, ServiceSession(session), descriptor)
        with self._lock:
            self._services.append(svc)
        for _ in range(warmup):
            svc._call(WARMUP, (), {})
        return svc

    def _open_session(self, app: str, sid: Optional[str], max_instances: Optional[int] = None) -> Session:
        explicit = sid is not None
        for _ in range(8):   # a generated id taken by someone else: draw another (bounded)
            want = sid if explicit else f"{self.name}-{secrets.token_hex(4)}"
            try:
                info = self._conn.call("create_session", {"application": app, "id": want, "lease": self.lease,
                                                          "max_instances": max_instances})
            except AlreadyExists:
                if explicit:
                    raise
                continue
            return Session(session_id=info["id"], connection=self._conn)
        raise AlreadyExists(f"could not draw a free session id for {self.name!r}")

    def _dumps(self, obj: Any) -> bytes:
        """cloudpickle ``obj``; code from modules that executors cannot import (outside the package
        and outside installed code, e.g. a test module) travels by value."""
        module = getattr(obj if _kind(obj) != "object" else type(obj), "__module__", None)
        if module and module != "__main__" and module in sys.modules and module not in self._by_value:
            if self._needs_by_value(sys.modules[module]):
                cloudpickle.register_pickle_by_value(sys.modules[module])
                self._by_value.add(module)
        try:
            return cloudpickle.dumps(obj)
        except Exception as exc:
            raise InvalidArgument(f"{obj!r} cannot be pickled: {type(exc).__name__}: {exc}") from None

    def _needs_by_value(self, module: Any) -> bool:
        path = getattr(module, "__file__", None)
        if not path:
            return False
        path = os.path.abspath(path)
        if path.startswith(self.root + os.sep):
            rel = os.path.splitext(os.path.relpath(path, self.root))[0].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            return ".".join(rel) != module.__name__    # importable from the unpacked package: by reference
        return not installed_code(path)

    # -- futures --------------------------------------------------------------------
    @staticmethod
    def get(futures: Iterable[ObjectFuture], timeout: Optional[float] = None) -> List[Any]:
        """Every future's value, in order (``timeout`` bounds each wait)."""
        return [f.get(timeout) for f in futures]

    @staticmethod
    def wait(futures: Iterable[ObjectFuture], timeout: Optional[float] = None) -> None:
        """Until every call has finished; ``DeadlineExceeded`` if not all within ``timeout`` seconds."""
        futs = list(futures)
        _, pending = concurrent.futures.wait([f._future for f in futs], timeout)
        if pending:
            raise DeadlineExceeded(f"{len(pending)} of {len(futs)} calls unfinished after {timeout}s "
                                   "(they keep running)", timeout=timeout)

    @staticmethod
    def ref(futures: Iterable[ObjectFuture], timeout: Optional[float] = None) -> List[ObjectRef]:
        return [f.ref(timeout) for f in futures]

    @staticmethod
    def select(futures: Iterable[ObjectFuture], timeout: Optional[float] = None) -> Iterator[ObjectFuture]:
        """The futures in the order their calls finish (``DeadlineExceeded`` past ``timeout``)."""
        by_future = {f._future: f for f in futures}
        try:
            for done in concurrent.futures.as_completed(by_future, timeout):
                yield by_future[done]
        except concurrent.futures.TimeoutError:
            raise DeadlineExceeded(f"not every call finished within {timeout}s", timeout=timeout) from None

    def _argument(self, value: Any) -> Any:
        """An argument as it travels: an ObjectRef as it is (read on the executor); an ObjectFuture
        that has answered, as its value (the client has it already); one still running, as a
        :class:`PendingResult` the executor reads, or (if it answered meanwhile) as its value."""
        if not isinstance(value, ObjectFuture):
            return value
        fut = value._future
        tag: int = getattr(fut, "tag", 0)
        if tag and not fut.done():
            conn = value._service._runner._conn   # the connection that submitted it names it (cid, tag)
            with value._lock:                     # one key per future, however many calls take it
                if value._kept is None:
                    r = conn.call("keep_result", {"cid": conn.client_id, "tag": tag, "key": secrets.token_hex(16)})
                    value._kept = r.get("key") if r["kept"] else ""
            if value._kept:
                return PendingResult(value._kept)
        return value.get()

    # -- objects --------------------------------------------------------------------
    def put_object(self, obj: Any) -> ObjectRef:
        """Store ``obj`` in the object cache for this runner's calls (deleted when the runner closes)."""
        self._check_open()
        return self._put(obj)

    def _put(self, obj: Any, session: Optional[str] = None, blob: bool = False) -> ObjectRef:
        enc = {"kind": "blob", "data": cloudpickle.dumps(obj)} if blob else _encode(obj)
        r, _ = self._conn.call_blob("put_object", {"kind": enc["kind"], "session": session, "ttl": None,
                                                   "lease": self.lease if session is None else None}, enc["data"])
        ref = ObjectRef(r["key"], r["version"])
        if session is None:
            with self._lock:
                self._objects.append(ref)
        return ref

    # -- closing --------------------------------------------------------------------
    def _renew(self, ttl: float) -> None:
        """Renew the lease every third of its life until the runner closes.  A client killed stops
        renewing: the manager then cleans up everything the runner made (docs/runner.md)."""
        while not self._renewing.wait(ttl / 3):
            try:
                self._client.renew_lease(self.lease or "")
            except NotFound:
                if self._renewing.is_set():
                    return   # released by close() meanwhile
                log.error("runner %s lost its lease %s (not renewed in time): its application, sessions and "
                          "objects are gone", self.name, self.lease)
                return
            except MeshError as exc:   # the manager is away for a moment: try again at the next turn
                log.warning("runner %s could not renew its lease: %s", self.name, exc)

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"runner {self.name!r} is closed")

    def _close_service(self, svc: RunnerService) -> None:
        if self.nested_session is not None:
            return   # the calling service's session: the outer runner's to close
        svc._session.close()

    def _unregister(self, app: str) -> None:
        try:
            self._client.unregister_temporary_application(app)
        except NotFound:
            pass
        except FailedPrecondition as exc:   # someone else's sessions still use it: leave it to them
            log.warning("runner %s leaves application %s registered: %s", self.name, app, exc)
        with self._lock:
            if app in self._apps:
                self._apps.remove(app)

    def close(self) -> None:
        """Close the services' sessions, unregister what this runner registered, delete the package
        and the objects it put.  Idempotent; the first failure is raised after every step was tried."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            services, objects = list(self._services), list(self._objects)
        errors: List[BaseException] = []
        for svc in services:
            try:
                svc.close()
            except MeshError as exc:
                errors.append(exc)
        for app in list(self._apps):
            try:
                self._unregister(app)
            except MeshError as exc:
                errors.append(exc)
        for ref in objects:
            try:
                self._conn.call("delete_object", {"key": ref.key})
            except NotFound:
                pass
            except MeshError as exc:
                errors.append(exc)
        self._renewing.set()
        if self.lease is not None:   # whatever is left (it would go when the lease ran out anyway)
            try:
                self._client.release_lease(self.lease)
            except NotFound:
                pass
            except MeshError as exc:
                errors.append(exc)
        for module in self._by_value:
            if module in sys.modules:
                cloudpickle.unregister_pickle_by_value(sys.modules[module])
        self._by_value.clear()
        if self._own_conn:
            self._conn.close()
        if errors:
            raise errors[0]

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            self.close()
        except MeshError:
            if exc_type is None:
                raise
            log.warning("runner %s did not close cleanly", self.name, exc_info=True)

    def __repr__(self) -> str:
        return f"Runner({self.name!r}, services={len(self._services)}{', closed' if self._closed else ''})"


def installed_code(path: str) -> bool:
    """Is the file at ``path`` importable on every executor: the standard library, installed
    packages, or zeromesh itself?  Code elsewhere (a script, a test module) travels by value."""
    installed = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots = [os.path.abspath(p) + os.sep for p in installed | set(_OWN_ROOTS) if p]
    return any(os.path.abspath(path).startswith(r) for r in roots)


def by_value(obj: Any) -> None:
    """Make cloudpickle ship ``obj``'s module by value if executors cannot import it."""
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    path = getattr(module, "__file__", None)
    if module is not None and module.__name__ != "__main__" and path and not installed_code(path):
        cloudpickle.register_pickle_by_value(module)


def _session_context(obj: Any) -> Optional[SessionContext]:
    ctx = getattr(obj, "_session_context", None)
    if ctx is None or isinstance(ctx, SessionContext):
        return ctx
    log.warning("ignoring _session_context of %r: a %s, not a SessionContext", obj, type(ctx).__name__)
    return None
