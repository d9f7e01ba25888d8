"""Flows as plain data: what a registered flow is, how flows compose into one run, what may start.

A flow (``client.flows.Flow``) reaches the manager as a msgpack document, checked here by
:func:`check_flow`::

    {"name": "simulate", "labels": {"zone": "a"},
     "parameters": {"config": {}, "steps": {"default": <pickled 100>}},
     "functions": [<cloudpickled function>, ...],
     "tasks": [{"name": "prepare", "fn": 0, "args": [{"param": "config"}], "kwargs": {},
                "retries": 0, "timeout": None},
               {"name": "run", "fn": 1, "args": [{"task": "prepare"}, {"param": "steps"}], ...},
               {"name": "echo", "app": "echo-app", "args": [{"task": "run"}], ...}]}

An argument is one of ``{"param": name}``, ``{"task": name}`` (a task of the same flow),
``{"value": <pickled constant>}`` or ``{"mapped": flow, "task": name, "as": "raw"|"file"|"db",
"attribute": str|None, "index": [...]}`` (a task of another flow of the same run).  The manager
never unpickles: functions, defaults and constants are opaque bytes it hands to the flow service.

A run is one flow or several (a flow of flows), composed by :func:`compose` into one graph of
tasks named ``flow/task``; the order of flows is the order of their mapped parameters, and a
cycle, a mapped parameter naming a flow or task that is not there, or a required parameter
without a value is an :class:`~mesh.errors.InvalidArgument` naming it, before anything runs.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from mesh.errors import InvalidArgument

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAPPINGS = ("raw", "file", "db")
MAX_TASKS = 100_000            # tasks in one run
MAX_YAML = 1 << 20             # bytes of a flow-of-flows YAML file
RUN_STATES = ("scheduled", "pending", "running", "succeeded", "failed", "cancelled")
TASK_STATES = ("pending", "running", "succeeded", "failed", "skipped", "cancelled")
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
TASK_FINISHED = frozenset({"succeeded", "failed", "skipped", "cancelled"})


def _fail(msg: str, **details: Any) -> InvalidArgument:
    return InvalidArgument(msg, **details)


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise _fail(f"{what} must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit), "
                    f"not {value!r}", argument=what)
    return value


def check_flow(doc: Any) -> Dict[str, Any]:
    """The flow document, checked: names, references within the flow, no cycle."""
    if not isinstance(doc, dict):
        raise _fail("a flow is a mapping", argument="flow")
    name = _name(doc.get("name"), "flow name")
    labels = doc.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise _fail(f"flow {name!r}: labels map strings to strings", flow=name, argument="labels")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _fail(f"flow {name!r}: parameters is a mapping", flow=name)
    for p, info in params.items():
        _name(p, f"parameter name of flow {name!r}")
        if not isinstance(info, dict) or ("default" in info and not isinstance(info["default"], bytes)):
            raise _fail(f"flow {name!r}: parameter {p!r} is {{}} or {{'default': <pickled bytes>}}", flow=name)
    functions = doc.get("functions") or []
    if not isinstance(functions, list) or not all(isinstance(f, bytes) for f in functions):
        raise _fail(f"flow {name!r}: functions are pickled bytes", flow=name)
    tasks = doc.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise _fail(f"flow {name!r} has no tasks", flow=name)
    if len(tasks) > MAX_TASKS:
        raise _fail(f"flow {name!r} has {len(tasks)} tasks; at most {MAX_TASKS}", flow=name, limit="MAX_TASKS")
    seen: Set[str] = set()
    for t in tasks:
        if not isinstance(t, dict):
            raise _fail(f"flow {name!r}: a task is a mapping", flow=name)
        tname = _name(t.get("name"), f"task name in flow {name!r}")
        if tname in seen:
            raise _fail(f"flow {name!r} has two tasks named {tname!r}", flow=name, task=tname)
        seen.add(tname)
        fn, app = t.get("fn"), t.get("app")
        if (fn is None) == (app is None):
            raise _fail(f"task {name}/{tname} runs a function (fn) or an application (app)", task=tname)
        if fn is not None and (not isinstance(fn, int) or not 0 <= fn < len(functions)):
            raise _fail(f"task {name}/{tname}: fn {fn!r} is not one of the flow's functions", task=tname)
        if app is not None and not isinstance(app, str):
            raise _fail(f"task {name}/{tname}: app is an application name", task=tname)
        retries, timeout = t.get("retries", 0), t.get("timeout")
        if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 100:
            raise _fail(f"task {name}/{tname}: retries is 0 to 100, not {retries!r}", task=tname)
        if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                                    or timeout <= 0):
            raise _fail(f"task {name}/{tname}: timeout is a positive number of seconds", task=tname)
        args, kwargs = t.get("args") or [], t.get("kwargs") or {}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise _fail(f"task {name}/{tname}: args is a list and kwargs a mapping", task=tname)
        if app is not None and (len(args) != 1 or kwargs):
            raise _fail(f"task {name}/{tname} runs application {app!r}: it takes one argument, the request",
                        task=tname)
        for ref in [*args, *kwargs.values()]:
            _check_ref(ref, name, tname, params, app is not None)
    order(f"flow {name!r}", {t["name"]: {r["task"] for r in refs(t) if "task" in r and "mapped" not in r}
                            for t in tasks})
    for t in tasks:
        for r in refs(t):
            if "task" in r and "mapped" not in r and r["task"] not in seen:
                raise _fail(f"task {name}/{t['name']} takes the result of {r['task']!r}, which is not a task of "
                            f"flow {name!r}", flow=name, task=t["name"])
    return doc


def _check_ref(ref: Any, flow: str, task: str, params: Mapping[str, Any], app: bool) -> None:
    where = f"task {flow}/{task}"
    if not isinstance(ref, dict):
        raise _fail(f"{where}: an argument is a mapping", task=task)
    if "param" in ref:
        if ref["param"] not in params:
            raise _fail(f"{where} takes parameter {ref['param']!r}, which flow {flow!r} does not declare", task=task)
    elif "mapped" in ref:
        _name(ref["mapped"], f"{where}: mapped flow")
        _name(ref.get("task"), f"{where}: mapped task")
        if ref.get("as", "raw") not in MAPPINGS:
            raise _fail(f"{where}: a mapped parameter is passed as one of {MAPPINGS}, not {ref.get('as')!r}",
                        task=task)
        if app and ref.get("as", "raw") != "raw":
            raise _fail(f"{where} runs an application: its request is passed raw", task=task)
        if ref.get("as") == "db" and not isinstance(ref.get("attribute"), str):
            raise _fail(f"{where}: a mapped parameter passed as db names its attribute", task=task)
        if not isinstance(ref.get("index") or [], list):
            raise _fail(f"{where}: attribute_index is a list of keys or positions", task=task)
    elif "task" in ref:
        _name(ref["task"], f"{where}: upstream task")
    elif "value" in ref:
        if not isinstance(ref["value"], bytes):
            raise _fail(f"{where}: a constant argument is pickled bytes", task=task)
    else:
        raise _fail(f"{where}: an argument is a param, task, mapped or value reference", task=task)


def refs(task: Mapping[str, Any]) -> List[Dict[str, Any]]:
    return [*(task.get("args") or []), *(task.get("kwargs") or {}).values()]


def order(what: str, deps: Mapping[str, Set[str]]) -> List[str]:
    """A topological order of ``deps`` (name -> names it needs), or InvalidArgument naming a cycle."""
    state: Dict[str, int] = {}
    out: List[str] = []
    for root in deps:
        if state.get(root) == 2:
            continue
        stack: List[Tuple[str, List[str]]] = [(root, sorted(deps.get(root, ())))]
        path = [root]
        state[root] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                state[node] = 2
                out.append(node)
                continue
            nxt = todo.pop()
            if nxt not in deps:
                continue   # not a node here (checked by the caller)
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise _fail(f"{what} has a cycle: {' -> '.join(reversed(cycle))}", cycle=list(reversed(cycle)))
            if state.get(nxt) is None:
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(deps.get(nxt, ()))))
    return out


def compose(flows: Mapping[str, Dict[str, Any]], parameters: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """One run's graph from its flows (name -> checked document) and parameters (flow -> name ->
    pickled value, or a mapped reference ``{"mapped": flow, "task": ..., "as": ...}``: LUME-services'
    mapped parameters, bound when flows are composed): ``{"tasks": {"flow/task": node}, "order": [...]}`` where a node is the task's
    document with ``deps`` (qualified names), ``flow`` and ``fn_blob`` resolved, and each argument
    one of ``{"value": bytes}``, ``{"task": qualified}`` or ``{"task": qualified, "as": "file"|"db", ...}``."""
    extra = sorted(set(parameters) - set(flows))
    if extra:
        raise _fail(f"parameters given for {', '.join(map(repr, extra))}, which is not a flow of this run",
                    flow=extra[0])
    for fname, given in parameters.items():
        for p, v in given.items():
            if not isinstance(v, bytes) and not (isinstance(v, dict) and "mapped" in v):
                raise _fail(f"parameter {fname}.{p} is a pickled value or a mapped reference", parameter=p)
            if isinstance(v, dict):
                _check_ref(v, fname, f"(parameter {p})", {}, False)
    flow_deps = {name: {r["mapped"] for t in doc["tasks"] for r in refs(t) if "mapped" in r}
                 | {v["mapped"] for v in (parameters.get(name) or {}).values() if isinstance(v, dict)}
                 for name, doc in flows.items()}
    for name, needs in flow_deps.items():
        for other in sorted(needs):
            if other not in flows:
                raise _fail(f"flow {name!r} maps a parameter from flow {other!r}, which is not part of this run",
                            flow=name, missing=other)
    order("this flow of flows", flow_deps)
    tasks: Dict[str, Dict[str, Any]] = {}
    for fname, doc in flows.items():
        given = parameters.get(fname) or {}
        unknown = sorted(set(given) - set(doc.get("parameters") or {}))
        if unknown:
            raise _fail(f"flow {fname!r} has no parameter {unknown[0]!r}", flow=fname, parameter=unknown[0])
        names = {t["name"] for t in doc["tasks"]}
        for t in doc["tasks"]:
            qual = f"{fname}/{t['name']}"

            def resolve(ref: Dict[str, Any], t: Dict[str, Any] = t) -> Dict[str, Any]:
                if "param" in ref:
                    p = ref["param"]
                    if isinstance(given.get(p), dict):   # a mapped parameter
                        return resolve(given[p])
                    if p in given:
                        return {"value": given[p]}
                    default = (doc.get("parameters") or {})[p].get("default")
                    if default is None:
                        raise _fail(f"flow {fname!r} needs parameter {p!r} (task {t['name']!r} takes it)",
                                    flow=fname, parameter=p)
                    return {"value": default}
                if "mapped" in ref:
                    other = flows[ref["mapped"]]
                    if ref["task"] not in {x["name"] for x in other["tasks"]}:
                        raise _fail(f"flow {fname!r} maps {ref['mapped']}/{ref['task']}, which is not a task of "
                                    f"flow {ref['mapped']!r}", flow=fname, missing=f"{ref['mapped']}/{ref['task']}")
                    return {"task": f"{ref['mapped']}/{ref['task']}", "as": ref.get("as", "raw"),
                            "attribute": ref.get("attribute"), "index": list(ref.get("index") or [])}
                if "task" in ref:
                    assert ref["task"] in names
                    return {"task": f"{fname}/{ref['task']}", "as": "raw"}
                return {"value": ref["value"]}

            args = [resolve(r) for r in t.get("args") or []]
            kwargs = {k: resolve(r) for k, r in (t.get("kwargs") or {}).items()}
            fn = t.get("fn")
            tasks[qual] = {"flow": fname, "name": t["name"], "app": t.get("app"),
                           "fn": doc["functions"][fn] if fn is not None else None,
                           "args": args, "kwargs": kwargs, "retries": t.get("retries", 0),
                           "timeout": t.get("timeout"), "labels": doc.get("labels") or {},
                           "deps": sorted({a["task"] for a in [*args, *kwargs.values()] if "task" in a})}
    if len(tasks) > MAX_TASKS:
        raise _fail(f"this run has {len(tasks)} tasks; at most {MAX_TASKS}", limit="MAX_TASKS")
    for node in tasks.values():   # a task whose result is read as a record returns one (see flow_service)
        for a in [*node["args"], *node["kwargs"].values()]:
            if a.get("as") == "db":
                tasks[a["task"]]["record"] = True
    return {"tasks": tasks, "order": order("this run", {k: set(v["deps"]) for k, v in tasks.items()})}


def structure(doc: Dict[str, Any]) -> Dict[str, Any]:
    """The flow without its pickled code, defaults and constants (what others than its owner see)."""
    tasks = [{**t, "args": [_bare(r) for r in t.get("args") or []],
              "kwargs": {k: _bare(r) for k, r in (t.get("kwargs") or {}).items()}} for t in doc["tasks"]]
    params = {p: ({"default": b""} if "default" in i else {}) for p, i in (doc.get("parameters") or {}).items()}
    return {**doc, "functions": [b""] * len(doc.get("functions") or []), "parameters": params, "tasks": tasks}


def _bare(ref: Dict[str, Any]) -> Dict[str, Any]:
    return {"value": b""} if "value" in ref else ref


RESERVED_APPS = "zmesh-"   # application names the mesh's own services use (the flow service)


def check_app_name(name: str) -> None:
    if name.startswith(RESERVED_APPS):
        raise _fail(f"application names starting with {RESERVED_APPS!r} are reserved for the mesh's own services",
                    application=name)


def dependents(tasks: Mapping[str, Mapping[str, Any]]) -> Dict[str, List[str]]:
    """Task name -> the tasks that take its result."""
    out: Dict[str, List[str]] = {name: [] for name in tasks}
    for name, node in tasks.items():
        for d in node["deps"]:
            out[d].append(name)
    return out


def downstream(start: str, deps_of: Mapping[str, Sequence[str]]) -> List[str]:
    """Every task that needs ``start``'s result, directly or not."""
    seen: Set[str] = set()
    todo = list(deps_of.get(start, ()))
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(deps_of.get(n, ()))
    return sorted(seen)


def pick(record: Any, attribute: str, index: Sequence[Any]) -> Any:
    """``record[attribute][i0][i1]...`` of a db-mapped result, or InvalidArgument saying where it stopped."""
    if not isinstance(record, dict):
        raise _fail(f"a result mapped as db is a mapping (a record), not {type(record).__name__}")
    if attribute not in record:
        raise _fail(f"the result has no attribute {attribute!r} (it has {', '.join(map(str, record)) or 'none'})",
                    attribute=attribute)
    value = record[attribute]
    for i in index:
        try:
            value = value[i]
        except (KeyError, IndexError, TypeError):
            raise _fail(f"the result's {attribute!r} has no index {i!r}", attribute=attribute, index=i) from None
    return value


def next_fire(cron: str, after: float) -> float:
    """The first time a cron schedule fires after ``after`` (epoch seconds, UTC)."""
    from datetime import datetime, timezone

    from croniter import croniter  # type: ignore[import-untyped]
    try:
        it = croniter(cron, datetime.fromtimestamp(after, timezone.utc))
    except (ValueError, KeyError, TypeError) as exc:
        raise _fail(f"schedule {cron!r} is not a cron expression: {exc}", argument="schedule") from None
    return float(it.get_next(float))


def check_schedule(cron: Optional[str]) -> Optional[str]:
    if cron is None:
        return None
    if not isinstance(cron, str):
        raise _fail("schedule is a cron expression such as '*/5 * * * *'", argument="schedule")
    next_fire(cron, 0.0)
    return cron
