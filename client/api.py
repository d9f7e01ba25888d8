"""``Client``: the management API (registry, sessions, tasks, executors, metrics).

Conventions people know from hub and REST clients: ``get_x(id)`` returns the
object or ``None``; ``find_x(filter=..., page=..., sort=...)`` returns a
:class:`Page` of typed records, filtered, sorted and paged by the manager::

    c.find_sessions(filter={"state": "open", "created_at": (">=", t0)},
                    page={"limit": 50, "offset": 0}, sort={"by": "created_at", "order": "descending"})

Filter ops: ``=`` ``!`` ``~`` (substring) ``<`` ``<=`` ``>`` ``>=`` (:class:`FilterOperator`), as
``(op, value)`` or as the FLAME Hub client's shorthand, a string that starts with the op::

    c.find_sessions(filter={"application": "~echo", "state": "!closed", "created_at": ">2026-01-01"})

Dates and times (ISO, UTC unless they say otherwise) compare with the epoch fields.  A page is
50 records unless ``page`` says otherwise (``mesh.core.query.DEFAULT_LIMIT``).

A :class:`Page` is a sequence (``for s in page``, ``len``, ``page[0]``,
``page[:10]``) that also carries ``total``, the number of matches over all
pages.  ``list_applications`` / ``list_sessions`` / ``list_executors`` are
aliases of the ``find_*`` calls kept for older callers: they return every
record (all pages), and records also read like the dicts they used to
return (``e["id"]``).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Type,
    TypeVar,
    Union,
    cast,
    overload,
)

from mesh.core.query import FilterOperator
from mesh.errors import InvalidArgument, NotFound
from mesh.model.spec import AppSpec, load_spec

from .connection import Connection
from .lenient import _lenient_loads

T = TypeVar("T")
MAX_PAGE = 10_000   # the manager's largest page (mesh.core.query.MAX_LIMIT)


class Record:
    """Typed records also read like the dicts older ``list_*`` calls returned: ``r["id"]``,
    ``r.get("cache")``, ``dict(r)``.  Attribute access is the typed way."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def keys(self) -> List[str]:
        return [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()


def _build(cls: Type[T], d: Mapping[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in d.items() if k in names})  # newer managers may send more fields


F = TypeVar("F", bound=Callable[..., Any])


def _condition(value: Any) -> Any:
    """A filter condition as it travels: ``(op, value)`` as a list, a :class:`FilterOperator` as its
    symbol; the shorthand string (``"~echo"``) as it is (the manager reads it)."""
    if isinstance(value, (tuple, list)):
        return [x.value if isinstance(x, FilterOperator) else x for x in value]
    return value


def _renamed(**old_to_new: str) -> Callable[[F], F]:
    """Keep an old keyword spelling working (hidden): ``get_session(sid=...)`` is
    ``get_session(session_id=...)``; ids are ``session_id``/``task_id``/``executor_id`` everywhere."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return cast(F, call)
    return wrap


def _spec(spec: Any) -> AppSpec:
    if isinstance(spec, AppSpec):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return load_spec(os.fspath(spec))
    if isinstance(spec, Mapping):
        return AppSpec.from_dict(spec)
    raise InvalidArgument(f"an application spec is an AppSpec, a dict or a YAML path, not {type(spec).__name__}")


@dataclass
class Application(Record):
    name: str
    command: str = ""
    arguments: List[str] = field(default_factory=list)
    working_directory: Optional[str] = None
    labels: Dict[str, str] = field(default_factory=dict)
    description: str = ""
    created_at: float = 0.0
    spec: Dict[str, Any] = field(default_factory=dict)
    owner: str = ""                 # a temporary application's user (docs/runner.md)
    lease: Optional[str] = None     # a temporary application ends with this lease
    version: int = 1                # metadata.version; update_application bumps it


@dataclass
class SessionInfo(Record):
    id: str
    application: str
    state: str
    created_at: float
    closed_at: Optional[float] = None
    pending: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    instances: int = 0
    context_version: int = 0
    context_kind: str = "doc"
    bytes_in: int = 0
    conflicts: int = 0
    resreq: Dict[str, Any] = field(default_factory=dict)
    max_instances: Optional[int] = None   # the session's own bound on its instances, if any
    version: Optional[int] = None   # the version of its application it was opened on


@dataclass
class ExecutorInfo(Record):
    id: str
    state: str
    slots: int
    used_slots: int = 0
    instances: int = 0
    hostname: Optional[str] = None
    cpu: float = 0
    memory: int = 0
    gpu: int = 0
    labels: Dict[str, str] = field(default_factory=dict)
    python: Optional[str] = None
    last_seen: float = 0.0
    joined_at: float = 0.0
    cache: Dict[str, Any] = field(default_factory=dict)
    capabilities: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskInfo(Record):
    id: int
    session: str
    state: str
    attempts: int = 0
    created_at: float = 0.0
    finished_at: Optional[float] = None
    error: Optional[Dict[str, Any]] = None
    instance: Optional[str] = None
    has_result: bool = False   # get_task: the result is kept (its session is open, or closed within result_retention)
    result: Any = None         # get_task: the entrypoint's return value, when has_result


@dataclass
class Page(Sequence[T]):
    """One page of a ``find_*`` answer: a sequence of records plus ``total``, the number of
    matches over every page (``len(page) <= total``).  Slicing keeps ``total``."""

    items: List[T]
    total: int

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> "Page[T]": ...

    def __getitem__(self, index: Union[int, slice]) -> Union[T, "Page[T]"]:
        if isinstance(index, slice):
            return Page(self.items[index], self.total)
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)


class Client:
    """The management API over one connection (thread-safe; a ``with`` block closes it).

    Every failure is a :mod:`mesh.errors` type: ``InvalidArgument`` for a malformed endpoint
    (from the constructor) or bad input, ``NotFound`` for an unknown name or id (``get_*`` return
    ``None`` instead), ``Unavailable`` when the manager does not answer within ``request_timeout``
    or the connection's I/O thread died, ``PermissionDenied``/``Unauthenticated`` on a secured mesh.
    An argument that cannot be sent (msgpack cannot encode it) is ``InvalidArgument`` and a call over
    ``max_message_size`` is ``ResourceExhausted``, both before anything is sent; neither costs the
    connection.  No call waits without a deadline.
    """

    def __init__(self, manager: Optional[str] = None, connection: Optional[Connection] = None, auth: Any = None,
                 manager_key: Optional[str] = None) -> None:
        self._own = connection is None
        self.conn = connection or Connection(manager, manager_key=manager_key, auth=auth)

    def close(self) -> None:
        if self._own:
            self.conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def ping(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        return self.conn.call("ping", {}, timeout=timeout)

    def stats(self) -> Dict[str, Any]:
        return self.conn.call("stats")

    def metrics(self) -> str:
        """Prometheus text: counters, gauges and the task latency histogram."""
        return self.conn.call("metrics")["text"]

    # -- registry -------------------------------------------------------------------
    def register_application(self, spec: Any, replace: bool = False) -> Dict[str, Any]:
        """``spec``: an AppSpec, a spec dict, or a path (str or PathLike) to a YAML file.
        A bad spec is ``InvalidArgument``; a name taken (without ``replace``) is ``AlreadyExists``."""
        return self.conn.call("register_application", {"spec": _spec(spec).to_dict(), "replace": replace})

    def update_application(self, spec: Any) -> Dict[str, Any]:
        """Replace a registered application's spec; new instances use it.  Its ``version`` goes up
        by one (or to the spec's ``metadata.version`` if that is higher); a session records the
        version it was opened on."""
        spec = _spec(spec)
        name = spec.name
        if self.get_application(name) is None:
            raise NotFound(f"application {name!r} is not registered", application=name)
        return self.register_application(spec, replace=True)

    def unregister_application(self, name: str) -> None:
        self.conn.call("unregister_application", {"name": name})

    # -- leases: what lives only while this client renews it (docs/runner.md) ---------------
    def create_lease(self, ttl: float) -> Dict[str, Any]:
        """A lease of ``ttl`` seconds: ``{id, ttl, expires_at}``; renew it well within ``ttl``."""
        return self.conn.call("create_lease", {"ttl": ttl})

    def renew_lease(self, lease_id: str) -> Dict[str, Any]:
        return self.conn.call("renew_lease", {"id": lease_id})

    def release_lease(self, lease_id: str) -> Dict[str, Any]:
        """End the lease now: its sessions close, its objects and temporary applications go."""
        return self.conn.call("release_lease", {"id": lease_id})

    def register_temporary_application(self, spec: Any, lease_id: str) -> Dict[str, Any]:
        """An application of the caller's (a ``user`` may register one) that ends with the lease."""
        return self.conn.call("register_temporary_application", {"spec": _spec(spec).to_dict(), "lease": lease_id})

    def unregister_temporary_application(self, name: str) -> None:
        self.conn.call("unregister_temporary_application", {"name": name})

    def get_application(self, name: str) -> Optional[Application]:
        d = self._get("get_application", {"name": name})
        return None if d is None else _build(Application, d)

    def list_applications(self) -> Page[Application]:
        """Alias of :meth:`find_applications` with every application (all pages), by name."""
        return self._find_all(self.find_applications, "name")

    def find_applications(self, filter: Optional[Mapping[str, Any]] = None, page: Optional[Mapping[str, Any]] = None,
                          sort: Optional[Mapping[str, Any]] = None) -> Page[Application]:
        """Registered applications, filtered, sorted and paged by the manager (default: the first 50):
        a :class:`Page`."""
        return self._find("find_applications", Application, filter, page, sort)

    # -- sessions and tasks -------------------------------------------------------------
    @_renamed(sid="session_id")
    def get_session(self, session_id: str) -> Optional[SessionInfo]:
        d = self._get("get_session", {"id": session_id})
        return None if d is None else _build(SessionInfo, d)

    def list_sessions(self) -> Page[SessionInfo]:
        """Alias of :meth:`find_sessions` with every session you may read (all pages), oldest first."""
        return self._find_all(self.find_sessions, "created_at")

    def find_sessions(self, filter: Optional[Mapping[str, Any]] = None, page: Optional[Mapping[str, Any]] = None,
                      sort: Optional[Mapping[str, Any]] = None) -> Page[SessionInfo]:
        """Sessions you may read, filtered, sorted and paged by the manager (default: the first 50):
        a :class:`Page`."""
        return self._find("find_sessions", SessionInfo, filter, page, sort)

    @_renamed(sid="session_id")
    def close_session(self, session_id: str) -> Dict[str, Any]:
        """Close a session: its pending tasks are cancelled, its instances released."""
        return self.conn.call("close_session", {"id": session_id})

    def find_tasks(self, session_id: str, filter: Optional[Mapping[str, Any]] = None,
                   page: Optional[Mapping[str, Any]] = None, sort: Optional[Mapping[str, Any]] = None) -> Page[TaskInfo]:
        """Tasks of one session, filtered, sorted and paged by the manager (default: the first 50):
        a :class:`Page`."""
        return self._find("find_tasks", TaskInfo, filter, page, sort, session=session_id)

    def get_task(self, task_id: int) -> Optional[TaskInfo]:
        """The task's record and, once it succeeded, its result (``has_result``, ``result``) while
        its session is open and for ``result_retention`` seconds after it closed.  The result is
        unpickled leniently: an instance of a class this process cannot import comes back as an
        object holding its fields."""
        try:
            d, blob = self.conn.call_blob("get_task", {"id": task_id})
        except NotFound:
            return None
        task = _build(TaskInfo, d)
        if task.has_result and blob is not None:
            task.result = _lenient_loads(blob)
        return task

    def cancel_task(self, task_id: int) -> None:
        """Cancel a queued task (its caller gets ``Cancelled``); a running task cannot be interrupted."""
        self.conn.call("cancel_task", {"id": task_id})

    # -- executors ----------------------------------------------------------------------
    def list_executors(self) -> Page[ExecutorInfo]:
        """Alias of :meth:`find_executors` with every executor (all pages), by id."""
        return self._find_all(self.find_executors, "id")

    def get_executor(self, executor_id: str) -> Optional[ExecutorInfo]:
        d = self._get("get_executor", {"id": executor_id})
        return None if d is None else _build(ExecutorInfo, d)

    def find_executors(self, filter: Optional[Mapping[str, Any]] = None, page: Optional[Mapping[str, Any]] = None,
                       sort: Optional[Mapping[str, Any]] = None) -> Page[ExecutorInfo]:
        """Connected executors, filtered, sorted and paged by the manager (default: the first 50):
        a :class:`Page`."""
        return self._find("find_executors", ExecutorInfo, filter, page, sort)

    def drain_executor(self, executor_id: str) -> None:
        """No new work on the executor; its instances stop once their tasks are done."""
        self.conn.call("drain_executor", {"id": executor_id})

    # -- identity (admin) ---------------------------------------------------------------
    def whoami(self) -> Dict[str, Any]:
        return self.conn.call("whoami")

    def add_user(self, name: str, role: str, password: str) -> Dict[str, Any]:
        return self.conn.call("add_user", {"name": name, "role": role, "password": password})

    def remove_user(self, name: str) -> None:
        self.conn.call("remove_user", {"name": name})

    def list_users(self) -> List[Dict[str, Any]]:
        return self.conn.call("list_users")

    def create_robot(self, name: str, role: str) -> Dict[str, Any]:
        """Returns the robot's id and its secret: the secret is shown this once."""
        return self.conn.call("create_robot", {"name": name, "role": role})

    def revoke_robot(self, robot_id: str) -> None:
        self.conn.call("revoke_robot", {"id": robot_id})

    def list_robots(self) -> List[Dict[str, Any]]:
        return self.conn.call("list_robots")

    def add_executor_key(self, public: str, name: str) -> None:
        self.conn.call("add_executor_key", {"public": public, "name": name})

    def revoke_executor_key(self, key_or_name: str) -> None:
        self.conn.call("revoke_executor_key", {"key": key_or_name})

    def list_executor_keys(self) -> List[Dict[str, Any]]:
        return self.conn.call("list_executor_keys")

    # -- flows (client/flows.py has the model; these are its management calls) -------------------
    def register_flow(self, document: Mapping[str, Any]) -> Dict[str, Any]:
        """Store a flow document (``Flow.document()``); a changed one becomes a new version."""
        return self.conn.call("register_flow", {"flow": dict(document)})

    def get_flow(self, name: str, document: bool = False) -> Dict[str, Any]:
        """A registered flow's newest version (``NotFound`` if none); ``document`` adds its document."""
        return self.conn.call("get_flow", {"name": name, "document": document})

    def find_flows(self, filter: Optional[Mapping[str, Any]] = None, page: Optional[Mapping[str, Any]] = None,
                   sort: Optional[Mapping[str, Any]] = None) -> Page[Dict[str, Any]]:
        return self._find_dicts("find_flows", filter, page, sort)

    def run_flow(self, flows: Sequence[str], parameters: Optional[Mapping[str, Mapping[str, bytes]]] = None,
                 run_name: Optional[str] = None, labels: Optional[Mapping[str, str]] = None,
                 scheduled_start_time: Optional[float] = None, schedule: Optional[str] = None,
                 mapped_parameters: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Dict[str, Any]:
        """Start a run of registered flows (parameters pickled by the caller): the run's record."""
        return self.conn.call("run_flow", {
            "flows": list(flows), "parameters": {f: dict(p) for f, p in (parameters or {}).items()},
            "run_name": run_name, "labels": dict(labels) if labels is not None else None,
            "scheduled_start_time": scheduled_start_time, "schedule": schedule,
            "mapped_parameters": {f: dict(p) for f, p in (mapped_parameters or {}).items()}})

    def get_flow_run(self, run_id: str, wait: Optional[float] = None) -> Dict[str, Any]:
        """A run and its tasks' records; ``wait``: up to that many seconds (60 at most) for it to end."""
        if wait is None:
            return self.conn.call("get_flow_run", {"id": run_id})
        wait = max(0.0, min(float(wait), 60.0))
        return self.conn.call("get_flow_run", {"id": run_id, "wait": wait},
                              timeout=wait + self.conn.settings.request_timeout)

    def find_flow_runs(self, filter: Optional[Mapping[str, Any]] = None, page: Optional[Mapping[str, Any]] = None,
                       sort: Optional[Mapping[str, Any]] = None) -> Page[Dict[str, Any]]:
        """Runs filtered, sorted and paged like find_sessions (fields: id, name, flows, state, owner,
        created_at, scheduled_start_time, started_at, ended_at, schedule)."""
        return self._find_dicts("find_flow_runs", filter, page, sort)

    def cancel_flow_run(self, run_id: str) -> Dict[str, Any]:
        return self.conn.call("cancel_flow_run", {"id": run_id})

    def find_flow_schedules(self, filter: Optional[Mapping[str, Any]] = None,
                            page: Optional[Mapping[str, Any]] = None,
                            sort: Optional[Mapping[str, Any]] = None) -> Page[Dict[str, Any]]:
        return self._find_dicts("find_flow_schedules", filter, page, sort)

    def cancel_flow_schedule(self, schedule_id: str) -> Dict[str, Any]:
        return self.conn.call("cancel_flow_schedule", {"id": schedule_id})

    def read_object(self, key: str) -> Any:
        """An object's value read directly from the manager (no cache): a document or the unpickled blob."""
        import cloudpickle

        from mesh.wire.protocol import unpack
        header, data = self.conn.call_blob("get_object", {"key": key, "have": 0})
        if data is None:
            raise NotFound(f"object {key!r} has no data", key=key)
        return unpack(data) if header.get("kind") == "doc" else cloudpickle.loads(data)

    # -- plumbing -------------------------------------------------------------------------
    def _find_dicts(self, method: str, filter: Optional[Mapping[str, Any]], page: Optional[Mapping[str, Any]],
                    sort: Optional[Mapping[str, Any]]) -> Page[Dict[str, Any]]:
        r = self.conn.call(method, {"filter": dict(filter or {}), "page": dict(page or {}), "sort": dict(sort or {})})
        return Page(list(r["items"]), r["total"])

    def _get(self, method: str, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        try:
            return self.conn.call(method, args)
        except NotFound:
            return None

    def _find(self, method: str, cls: Type[T], filter: Optional[Mapping[str, Any]],
              page: Optional[Mapping[str, Any]], sort: Optional[Mapping[str, Any]], **extra: Any) -> Page[T]:
        args: Dict[str, Any] = {"filter": {k: _condition(v) for k, v in (filter or {}).items()},
                                "page": dict(page or {}), "sort": dict(sort or {}), **extra}
        r = self.conn.call(method, args)
        return Page([_build(cls, d) for d in r["items"]], r["total"])

    @staticmethod
    def _find_all(find: Callable[..., "Page[T]"], by: str) -> Page[T]:
        """Every match of ``find``, page after page (bounded: a page never comes back empty early
        unless the set shrank, and then we stop)."""
        items: List[T] = []
        while True:
            page = find(page={"limit": MAX_PAGE, "offset": len(items)}, sort={"by": by})
            items.extend(page.items)
            if not page.items or len(items) >= page.total:
                return Page(items, max(page.total, len(items)))
