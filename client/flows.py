"""Flows: tasks whose results feed other tasks, flows of flows, scheduled and durable runs.

The LUME-services model (Prefect flows, flows of flows, mapped parameters) natively on the mesh::

    sim = Flow("simulate", labels={"zone": "a"})

    @sim.task
    def prepare(config: dict) -> dict: ...

    @sim.task(retries=2)
    def run(prepared: dict, steps: int) -> dict: ...

    with sim:                                    # wiring by calling
        p = prepare(Parameter("config"))
        r = run(p, Parameter("steps", default=100))

    sim.register()
    fr = sim.run(parameters={"config": {"n": 4}, "steps": 10})
    fr.wait(timeout=60); fr.result("run")

Inside ``with flow:`` calling a task records it and returns a :class:`TaskRef`; outside, the
task is the plain function.  Functions travel by value (cloudpickle), like the runner's; the
manager drives each run (mesh/core/flows.py), so a run survives the client and a manager restart.
docs/flows.md states what is guaranteed.
"""
from __future__ import annotations

import contextvars
import datetime
import functools
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union, cast

import cloudpickle

from mesh.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, TaskFailed, from_wire
from mesh.model import flows as model

from .api import Client, Page
from .runner import by_value

__all__ = ["Flow", "FlowOfFlows", "FlowRun", "Parameter", "TaskRef", "mapped", "load_file"]

_current: "contextvars.ContextVar[Optional[Flow]]" = contextvars.ContextVar("zeromesh_flow", default=None)
WAIT_STEP = 30.0   # seconds one get_flow_run {wait} asks the manager to hold the answer
_MISSING = object()


def load_file(path: Union[str, "os.PathLike[str]"]) -> Any:
    """The value behind a ``file``-mapped parameter (a path on the executor)."""
    with open(path, "rb") as f:
        return cloudpickle.load(f)


@dataclass(frozen=True)
class Parameter:
    """A value given when the flow runs (``run(parameters={name: value})``), or its default."""
    name: str
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        return self.default is _MISSING


@dataclass(frozen=True)
class Mapped:
    """The result of task ``task`` of flow ``flow`` in the same run (a flow of flows)."""
    flow: str
    task: str
    as_: str = "raw"
    attribute: Optional[str] = None
    attribute_index: Sequence[Any] = ()

    def ref(self) -> Dict[str, Any]:
        return {"mapped": self.flow, "task": self.task, "as": self.as_, "attribute": self.attribute,
                "index": list(self.attribute_index)}


def mapped(flow: str, task: str, as_: str = "raw", attribute: Optional[str] = None,
           attribute_index: Optional[Sequence[Any]] = None) -> Mapped:
    """A parameter taken from another flow's task result: ``raw`` (the value), ``file`` (a local
    path to it; :func:`load_file`) or ``db`` (``result[attribute][index...]`` of a record result)."""
    if as_ not in model.MAPPINGS:
        raise InvalidArgument(f"as_ is one of {model.MAPPINGS}, not {as_!r}", argument="as_")
    if as_ == "db" and not attribute:
        raise InvalidArgument("a db mapping names the record's attribute", argument="attribute")
    return Mapped(flow, task, as_, attribute, tuple(attribute_index or ()))


@dataclass(frozen=True)
class TaskRef:
    """A task's future result inside ``with flow:``; pass it to another task."""
    flow: str
    name: str


class FlowTask:
    """A function of a flow (``@flow.task``) or an application's entrypoint (``flow.app_task``)."""

    def __init__(self, flow: "Flow", fn: Optional[Callable[..., Any]], name: str, retries: int = 0,
                 timeout: Optional[float] = None, app: Optional[str] = None) -> None:
        self.flow, self.fn, self.name, self.retries, self.timeout, self.app = flow, fn, name, retries, timeout, app
        if fn is not None:
            functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flow = _current.get()
        if flow is None:
            if self.fn is None:
                raise FailedPrecondition(f"{self.name} runs application {self.app!r}: call it inside `with flow:`")
            return self.fn(*args, **kwargs)
        if flow is not self.flow:
            raise InvalidArgument(f"task {self.name!r} belongs to flow {self.flow.name!r}, not {flow.name!r}")
        return flow._call(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<flow task {self.flow.name}/{self.name}>"


class Flow:
    """A named graph of tasks, registered with the manager and run there."""

    def __init__(self, name: str, labels: Optional[Mapping[str, str]] = None, schedule: Optional[str] = None,
                 client: Optional[Client] = None) -> None:
        model._name(name, "flow name")
        self.name = name
        self.labels = dict(labels or {})
        self.schedule = model.check_schedule(schedule)
        self._client = client
        self._tasks: List[Dict[str, Any]] = []
        self._functions: List[bytes] = []
        self._fn_index: Dict[bytes, int] = {}
        self._params: Dict[str, Parameter] = {}
        self._names: Dict[str, int] = {}
        self._token: Optional[contextvars.Token] = None

    # -- definition -------------------------------------------------------------------
    def task(self, fn: Optional[Callable[..., Any]] = None, *, name: Optional[str] = None, retries: int = 0,
             timeout: Optional[float] = None) -> Any:
        """Decorator: ``@flow.task`` or ``@flow.task(retries=2, timeout=60)``."""
        def wrap(f: Callable[..., Any]) -> FlowTask:
            if isinstance(f, FlowTask):   # a task of another flow: the same function, here too
                if f.fn is None:
                    return self.app_task(cast(str, f.app), name or f.name, retries, timeout)
                f = f.fn
            return FlowTask(self, f, name or f.__name__, retries, timeout)
        return wrap(fn) if fn is not None else wrap

    def app_task(self, app: str, name: Optional[str] = None, retries: int = 0,
                 timeout: Optional[float] = None) -> FlowTask:
        """A task that runs the entrypoint of registered application ``app`` on its one argument."""
        return FlowTask(self, None, name or app, retries, timeout, app=app)

    def __enter__(self) -> "Flow":
        if self._token is not None:
            raise FailedPrecondition(f"flow {self.name!r} is already being defined")
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None

    def _call(self, task: FlowTask, args: Sequence[Any], kwargs: Mapping[str, Any]) -> TaskRef:
        n = self._names.get(task.name, 0) + 1
        self._names[task.name] = n
        name = task.name if n == 1 else f"{task.name}-{n}"
        node: Dict[str, Any] = {"name": name, "args": [self._ref(a, name) for a in args],
                                "kwargs": {k: self._ref(v, name) for k, v in kwargs.items()},
                                "retries": task.retries, "timeout": task.timeout}
        if task.app is not None:
            node["app"] = task.app
        else:
            assert task.fn is not None
            by_value(task.fn)
            try:
                blob = cloudpickle.dumps(task.fn)
            except Exception as exc:
                raise InvalidArgument(f"task {name!r} cannot be pickled: {type(exc).__name__}: {exc}") from None
            if blob not in self._fn_index:
                self._fn_index[blob] = len(self._functions)
                self._functions.append(blob)
            node["fn"] = self._fn_index[blob]
        self._tasks.append(node)
        return TaskRef(self.name, name)

    def _ref(self, value: Any, task: str) -> Dict[str, Any]:
        if isinstance(value, TaskRef):
            if value.flow != self.name:
                return {"mapped": value.flow, "task": value.name, "as": "raw", "attribute": None, "index": []}
            return {"task": value.name}
        if isinstance(value, Parameter):
            old = self._params.get(value.name)
            if old is not None and old != value:
                raise InvalidArgument(f"parameter {value.name!r} is declared twice with different defaults",
                                      parameter=value.name)
            self._params[value.name] = value
            return {"param": value.name}
        if isinstance(value, Mapped):
            return value.ref()
        _no_refs_inside(value, f"an argument of task {task!r}")
        return {"value": _pickle(value, f"an argument of task {task!r}")}

    def document(self) -> Dict[str, Any]:
        """The flow as the manager stores it (mesh/model/flows.py), checked."""
        params: Dict[str, Any] = {}
        for name, p in self._params.items():
            params[name] = {} if p.required else {"default": _pickle(p.default, f"parameter {name!r}'s default")}
        return model.check_flow({"name": self.name, "labels": self.labels, "parameters": params,
                                 "functions": list(self._functions), "tasks": [dict(t) for t in self._tasks]})

    @property
    def task_names(self) -> List[str]:
        return [t["name"] for t in self._tasks]

    # -- manager ------------------------------------------------------------------------
    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client()
        return self._client

    def register(self) -> str:
        """Store the flow with the manager (a new version if it changed): its id ``name:version``."""
        return self.client.register_flow(self.document())["id"]

    def validate(self, parameters: Optional[Mapping[str, Any]] = None) -> None:
        """InvalidArgument naming what is wrong (with ``parameters``, also a missing required one)."""
        FlowOfFlows(self.name, [self], client=self._client).validate(
            None if parameters is None else {self.name: dict(parameters)})

    def run(self, parameters: Optional[Mapping[str, Any]] = None, run_name: Optional[str] = None,
            labels: Optional[Mapping[str, str]] = None, scheduled_start_time: Any = None,
            schedule: Optional[str] = None) -> "FlowRun":
        """Run the registered flow (registering this definition first if it changed)."""
        self.register()
        return _start(self.client, [self.name], {self.name: dict(parameters or {})}, {}, run_name, labels,
                      scheduled_start_time, schedule if schedule is not None else self.schedule)

    def run_and_return(self, parameters: Optional[Mapping[str, Any]] = None, task_name: Optional[str] = None,
                       timeout: Optional[float] = None, **run_args: Any) -> Any:
        """Run, wait, and return ``task_name``'s result (default: the flow's last task); a failed run
        raises the failing task's ``TaskFailed`` (its name, remote type and traceback)."""
        fr = self.run(parameters, **run_args)
        fr.wait(timeout=timeout)
        if fr.state != "succeeded":
            fr.raise_for_state()
        return fr.result(task_name or self.task_names[-1])

    def __repr__(self) -> str:
        return f"<Flow {self.name!r}: {len(self._tasks)} tasks>"


class FlowOfFlows:
    """Registered flows run together as one run: a flow's mapped parameters read the results of
    the flows it maps from in that run.  ``flows``: names, :class:`Flow` objects, or mappings
    ``{"name": ..., "mapped_parameters": {param: {"parent_flow_name", "parent_task_name",
    "map_type", "attribute", "attribute_index"}}}`` (LUME-services' form, as in YAML)."""

    def __init__(self, name: str, flows: Sequence[Union[str, Flow, Mapping[str, Any]]],
                 client: Optional[Client] = None) -> None:
        model._name(name, "flow of flows name")
        self.name = name
        self._client = client
        self.flows: List[str] = []
        self._local: Dict[str, Flow] = {}
        self.mapped_parameters: Dict[str, Dict[str, Dict[str, Any]]] = {}
        for f in flows:
            if isinstance(f, Flow):
                self._local[f.name] = f
                self.flows.append(f.name)
            elif isinstance(f, str):
                self.flows.append(f)
            elif isinstance(f, Mapping) and isinstance(f.get("name"), str):
                self.flows.append(f["name"])
                for param, m in (f.get("mapped_parameters") or {}).items():
                    self.mapped_parameters.setdefault(f["name"], {})[param] = _lume_mapping(f["name"], param, m)
            else:
                raise InvalidArgument(f"a flow of flows lists flow names, Flow objects or mappings with a name, "
                                      f"not {f!r}", argument="flows")
        if not self.flows or len(set(self.flows)) != len(self.flows):
            raise InvalidArgument(f"flow of flows {name!r} lists each flow once, at least one", argument="flows")

    @classmethod
    def from_yaml(cls, path: Union[str, "os.PathLike[str]"], client: Optional[Client] = None) -> "FlowOfFlows":
        """``name:`` and ``flows:`` (names, or ``{name, mapped_parameters}`` entries) from a YAML file."""
        import yaml
        with open(path, "rb") as f:
            raw = f.read(model.MAX_YAML + 1)
        if len(raw) > model.MAX_YAML:
            raise InvalidArgument(f"{path}: larger than {model.MAX_YAML} bytes", argument="path")
        try:
            doc = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"{path}: not YAML: {exc}", argument="path") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("flows"), list):
            raise InvalidArgument(f"{path}: a flow of flows has `name:` and a `flows:` list", argument="path")
        return cls(str(doc.get("name") or os.path.splitext(os.path.basename(str(path)))[0]), doc["flows"],
                   client=client)

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client()
        return self._client

    def _documents(self) -> Dict[str, Dict[str, Any]]:
        docs = {}
        for name in self.flows:
            local = self._local.get(name)
            if local is not None:
                docs[name] = local.document()
            else:
                docs[name] = self.client.get_flow(name, document=True)["document"]
        return docs

    def validate(self, parameters: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
        """Before anything runs: a mapped parameter naming a missing flow or task, or a cycle, is
        InvalidArgument naming it; with ``parameters`` (as ``run`` would get them), so is a required
        parameter that has no value and that nothing maps.  (Without ``parameters`` the required
        ones are not checked: they may come with the run.)"""
        docs = self._documents()
        given: Dict[str, Dict[str, Any]] = {f: {p: b"" for p in (parameters or {}).get(f, {})} for f in self.flows}
        if parameters is None:   # only what no call can give: parameters without default nothing maps
            given = {f: {p: b"" for p, info in (d.get("parameters") or {}).items() if "default" not in info}
                     for f, d in docs.items()}
        model.compose(docs, {f: {**given.get(f, {}), **self._mapped_refs().get(f, {})} for f in self.flows})

    def _mapped_refs(self) -> Dict[str, Dict[str, Any]]:
        return {f: {p: m for p, m in ps.items()} for f, ps in self.mapped_parameters.items()}

    def register(self) -> None:
        """Register the flows given as :class:`Flow` objects."""
        for f in self._local.values():
            f.register()

    def run(self, parameters: Optional[Mapping[str, Mapping[str, Any]]] = None, run_name: Optional[str] = None,
            labels: Optional[Mapping[str, str]] = None, scheduled_start_time: Any = None,
            schedule: Optional[str] = None) -> "FlowRun":
        """One run of every flow; ``parameters``: {flow name: {parameter: value}}."""
        self.register()
        params = {f: dict(p) for f, p in (parameters or {}).items()}
        return _start(self.client, self.flows, params, self.mapped_parameters, run_name or None, labels,
                      scheduled_start_time, schedule)

    def run_and_return(self, parameters: Optional[Mapping[str, Mapping[str, Any]]] = None,
                       flow_name: Optional[str] = None, task_name: Optional[str] = None,
                       timeout: Optional[float] = None, **run_args: Any) -> Any:
        fr = self.run(parameters, **run_args)
        fr.wait(timeout=timeout)
        if fr.state != "succeeded":
            fr.raise_for_state()
        flow = flow_name or self.flows[-1]
        return fr.result(flow, task_name) if task_name else fr.result(fr._last_task(flow))

    def __repr__(self) -> str:
        return f"<FlowOfFlows {self.name!r}: {', '.join(self.flows)}>"


class FlowRun:
    """One run, by id: ``FlowRun(id)`` finds any run the caller may read, also after it ended."""

    def __init__(self, run_id: str, client: Optional[Client] = None, view: Optional[Dict[str, Any]] = None) -> None:
        self.id = run_id
        self._client = client
        self._view = view

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client()
        return self._client

    def info(self, refresh: bool = True) -> Dict[str, Any]:
        """The run as the manager records it: state, times, error, and every task's record."""
        if refresh or self._view is None:
            self._view = self.client.get_flow_run(self.id)
        return self._view

    @property
    def state(self) -> str:
        return self.info()["state"]

    @property
    def name(self) -> str:
        return self.info(refresh=False)["name"]

    def done(self) -> bool:
        return self.state in model.FINISHED

    def wait(self, timeout: Optional[float] = None) -> str:
        """Wait until the run ends (``DeadlineExceeded`` after ``timeout`` seconds): its final state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = WAIT_STEP if deadline is None else min(WAIT_STEP, deadline - time.monotonic())
            if left <= 0:
                raise DeadlineExceeded(f"flow run {self.id} did not end within {timeout:g}s (it is "
                                       f"{self._view['state'] if self._view else 'unknown'})", timeout=timeout)
            view = self.client.get_flow_run(self.id, wait=left)
            self._view = view
            if view["state"] in model.FINISHED:
                return view["state"]

    def _qualified(self, flow_or_task: str, task: Optional[str]) -> str:
        view = self.info(refresh=False)
        if task is not None:
            return f"{flow_or_task}/{task}"
        if "/" in flow_or_task:
            return flow_or_task
        matches = [n for n in view["tasks"] if n.split("/", 1)[1] == flow_or_task]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFound(f"flow run {self.id} has no task {flow_or_task!r} (tasks: "
                           f"{', '.join(self._short(view))})", task=flow_or_task)
        raise InvalidArgument(f"{flow_or_task!r} is a task of several flows of this run: name the flow too "
                              f"(result(flow, task))", task=flow_or_task)

    def _last_task(self, flow: str) -> str:
        names = [n for n in self.info(refresh=False)["tasks"] if n.startswith(flow + "/")]
        if not names:
            raise NotFound(f"flow run {self.id} has no flow {flow!r}", flow=flow)
        return names[-1]

    @staticmethod
    def _short(view: Mapping[str, Any]) -> List[str]:
        multi = len(view["flows"]) > 1
        return [n if multi else n.split("/", 1)[1] for n in view["tasks"]]

    def result(self, flow_or_task: str, task: Optional[str] = None) -> Any:
        """A task's result: ``result("run")`` in a one-flow run, ``result("analyze", "summarize")``
        in a flow of flows.  A task that failed raises its ``TaskFailed``; one that has not
        succeeded (pending, running, skipped, cancelled) raises ``FailedPrecondition``."""
        view = self.info(refresh=self._view is None or self._view["state"] not in model.FINISHED)
        name = self._qualified(flow_or_task, task)
        rec = view["tasks"].get(name)
        if rec is None:
            raise NotFound(f"flow run {self.id} has no task {name!r}", task=name)
        if rec["state"] == "failed":
            raise _task_error(name, rec["error"])
        if rec["state"] != "succeeded":
            raise FailedPrecondition(f"task {name} of flow run {self.id} is {rec['state']}, it has no result",
                                     task=name, state=rec["state"])
        return self.client.read_object(rec["result"])

    def task_states(self) -> Dict[str, str]:
        """{task: state}; names are ``flow/task`` in a flow of flows."""
        view = self.info()
        return dict(zip(self._short(view), (t["state"] for t in view["tasks"].values())))

    def tasks(self) -> Dict[str, Dict[str, Any]]:
        """Every task's record: state, attempts, started_at, ended_at (the function's own run on its
        executor), executor, error, result (the object's key)."""
        view = self.info()
        return dict(zip(self._short(view), view["tasks"].values()))

    def cancel(self) -> str:
        """Stop what has not finished: the run ends ``cancelled``."""
        self._view = self.client.cancel_flow_run(self.id)
        return self._view["state"]

    def raise_for_state(self) -> None:
        """Raise what ended the run: the failing task's TaskFailed, or Cancelled/FailedPrecondition."""
        view = self.info(refresh=self._view is None)
        if view["state"] == "succeeded":
            return
        err = view.get("error") or {}
        if err.get("task"):
            raise _task_error(err["task"], err)
        raise FailedPrecondition(f"flow run {self.id} is {view['state']}", state=view["state"])

    def __repr__(self) -> str:
        return f"<FlowRun {self.id} {self._view['state'] if self._view else ''}>"


# -- helpers ---------------------------------------------------------------------------------
def _task_error(name: str, err: Mapping[str, Any]) -> Exception:
    details = dict(err.get("details") or {})
    if err.get("code") == TaskFailed.code:
        return TaskFailed(f"task {name} failed: {err.get('message')}", task=name,
                          **{k: v for k, v in details.items() if k != "task"})
    exc = from_wire(dict(err))
    return TaskFailed(f"task {name} failed: {exc}", task=name, type=type(exc).__name__, code=err.get("code"))


def _lume_mapping(flow: str, param: str, m: Any) -> Dict[str, Any]:
    if isinstance(m, Mapped):
        return m.ref()
    if not isinstance(m, Mapping) or not m.get("parent_flow_name") or not m.get("parent_task_name"):
        raise InvalidArgument(f"mapped parameter {flow}.{param} names parent_flow_name and parent_task_name",
                              flow=flow, parameter=param)
    return mapped(str(m["parent_flow_name"]), str(m["parent_task_name"]), str(m.get("map_type", "raw")),
                  m.get("attribute"), m.get("attribute_index")).ref()


def _pickle(value: Any, what: str) -> bytes:
    try:
        return cloudpickle.dumps(value)
    except Exception as exc:
        raise InvalidArgument(f"{what} cannot be pickled: {type(exc).__name__}: {exc}") from None


def _no_refs_inside(value: Any, what: str, depth: int = 0) -> None:
    if depth > 3:
        return
    items: Iterable[Any] = ()
    if isinstance(value, (list, tuple, set, frozenset)):
        items = value
    elif isinstance(value, dict):
        items = value.values()
    for v in items:
        if isinstance(v, (TaskRef, Parameter, Mapped)):
            raise InvalidArgument(f"{what} holds {v!r} inside a container: pass task results and parameters as "
                                  f"arguments of their own", argument=what)
        _no_refs_inside(v, what, depth + 1)


def _epoch(when: Any) -> Optional[float]:
    if when is None:
        return None
    if isinstance(when, datetime.datetime):
        if when.tzinfo is None:
            when = when.astimezone()   # a naive time is local time
        return when.timestamp()
    if isinstance(when, datetime.timedelta):
        return time.time() + when.total_seconds()
    if isinstance(when, (int, float)) and not isinstance(when, bool):
        return float(when)
    raise InvalidArgument("scheduled_start_time is a datetime, a timedelta from now, or epoch seconds",
                          argument="scheduled_start_time")


def _start(client: Client, flows: List[str], parameters: Mapping[str, Mapping[str, Any]],
           mapped_parameters: Mapping[str, Mapping[str, Any]], run_name: Optional[str],
           labels: Optional[Mapping[str, str]], scheduled_start_time: Any, schedule: Optional[str]) -> FlowRun:
    params: Dict[str, Dict[str, Any]] = {}
    for f, ps in parameters.items():
        if not isinstance(ps, Mapping):
            raise InvalidArgument(f"parameters of flow {f!r} are a mapping of name to value", flow=f)
        params[f] = {p: _pickle(v, f"parameter {f}.{p}") for p, v in ps.items()}
    view = client.run_flow(flows, params, run_name=run_name, labels=labels,
                           scheduled_start_time=_epoch(scheduled_start_time), schedule=schedule,
                           mapped_parameters=mapped_parameters)
    return FlowRun(view["id"], client, view)


def find_flow_runs(filter: Optional[Mapping[str, Any]] = None, page: Optional[Mapping[str, Any]] = None,
                   sort: Optional[Mapping[str, Any]] = None, client: Optional[Client] = None) -> "Page[Any]":
    return (client or Client()).find_flow_runs(filter=filter, page=page, sort=sort)

