"""``zmesh flow``: registered flows, their runs and schedules (client/flows.py has the model).

flow list / view / run / cancel / runs / schedules / unschedule.  Tables for people,
``--json`` for scripts; errors as one line with the error's exit code (docs/operations.md,
"Exit codes").  Every wait has a deadline (``--timeout``).
"""
from __future__ import annotations

import datetime
import json
import math
import pickle
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import click

from mesh.core.query import DEFAULT_LIMIT
from mesh.errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from mesh.model import flows as model

from .cli_common import (_client, _errors, _jsonable, _labels, _lenient_loads, _parse_filter, _plain, _sort,
                         _table, _when, json_option, main, manager_option)

FLOW_COLUMNS = ["name", "version", "owner", "tasks", "parameters", "created"]
RUN_COLUMNS = ["id", "name", "flows", "state", "owner", "created", "duration"]
TASK_COLUMNS = ["task", "state", "attempts", "started", "ended", "duration", "executor", "error"]
SCHEDULE_COLUMNS = ["id", "flows", "cron", "owner", "next", "active"]
MAX_PAGE = 10_000        # the manager's largest page (mesh.core.query.MAX_LIMIT)
MAX_PAGES = 1_000        # pages read for a --flow filter before giving up (10 million runs)


@main.group()
def flow() -> None:
    """Flows: list and view registered flows, run them, follow and cancel runs, schedules."""


# -- formatting ------------------------------------------------------------------------------
def _duration(start: Optional[float], end: Optional[float]) -> str:
    if start is None or end is None:
        return "-"
    d = max(end - start, 0.0)
    return f"{d * 1000:.0f}ms" if d < 1 else f"{d:.1f}s" if d < 120 else f"{d / 60:.1f}m"


def _clock(ts: Optional[float]) -> str:
    """A task's time of day, to the millisecond (the run's dates are in its header)."""
    if not ts:
        return "-"
    t = datetime.datetime.fromtimestamp(ts)
    return t.strftime("%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def _error_line(err: Any, width: int = 80) -> str:
    """A task's or run's error on one line: a failed function's remote type and message."""
    if not isinstance(err, Mapping):
        return "-"
    details = err.get("details") or {}
    message = str(err.get("message") or "")
    kind = details.get("type") if isinstance(details, Mapping) else None
    if err.get("code") == "task_failed" and kind and not message.startswith(f"{kind}:"):
        text = f"{kind}: {message}"
    elif err.get("code") == "task_failed":
        text = message
    else:
        text = f"{err.get('code')}: {message}"
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _kv(pairs: Sequence[Tuple[str, Any]]) -> None:
    for k, v in pairs:
        click.echo(f"{k:>20}: {v}")


def _labels_text(labels: Any) -> str:
    if not isinstance(labels, Mapping) or not labels:
        return "-"
    return ",".join(f"{k}={v}" for k, v in labels.items())


def _short(view: Mapping[str, Any], name: str) -> str:
    """``flow/task`` in a flow of flows, ``task`` in a run of one flow."""
    return name if len(view.get("flows") or []) > 1 else name.split("/", 1)[-1]


def _task_name(flows: Sequence[str], names: Sequence[str], task: str) -> str:
    """The qualified name (``flow/task``) of ``task`` (``task`` or ``flow/task``) among the run's ``names``."""
    if "/" in task:
        if task in names:
            return task
        matches: List[str] = []
    else:
        matches = [n for n in names if n.split("/", 1)[1] == task]
        if len(matches) == 1:
            return matches[0]
    if not matches:
        shown = names if len(flows) > 1 else [n.split("/", 1)[1] for n in names]
        raise NotFound(f"the run has no task {task!r} (tasks: {', '.join(shown)})", task=task)
    raise InvalidArgument(f"{task!r} is a task of several flows of this run: name it FLOW/TASK "
                          f"({', '.join(matches)})", task=task)


def _run_line(view: Mapping[str, Any]) -> str:
    line = f"run {view['id']} ({view['name']}): {view['state']}"
    if view["state"] == "scheduled":
        line += f" for {_when(view.get('scheduled_start_time'))}"
    if view.get("ended_at"):
        line += f" in {_duration(view.get('started_at'), view['ended_at'])}"
    if view.get("schedule"):
        line += f", schedule {view['schedule']}"
    return line


def _echo_value(value: Any, as_json: bool) -> None:
    """A result as JSON, leniently (as ``zmesh invoke`` prints answers): what JSON cannot hold via repr."""
    value = _plain(value)
    click.echo(json.dumps(value, default=repr) if as_json or _jsonable(value) else repr(value))


# -- input -----------------------------------------------------------------------------------
def _value(raw: str) -> Any:
    """A parameter's value: JSON when it parses, else the text itself (``--param name=alice``)."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _parameters(names: Sequence[str], parameters_json: Optional[str],
                pairs: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """{flow: {parameter: value}} from ``--parameters`` (one flow: {param: value}; several:
    {flow: {param: value}}) and then ``--param KEY=VALUE`` (several flows: KEY is FLOW.PARAM)."""
    out: Dict[str, Dict[str, Any]] = {}
    if parameters_json is not None:
        try:
            given = json.loads(parameters_json)
        except ValueError as exc:
            raise InvalidArgument(f"--parameters is not JSON: {exc}", argument="parameters") from None
        if not isinstance(given, dict):
            raise InvalidArgument("--parameters is a JSON object" + (" of {flow: {parameter: value}}"
                                  if len(names) > 1 else " of {parameter: value}"), argument="parameters")
        if len(names) == 1:
            out[names[0]] = dict(given)
        else:
            for f, ps in given.items():
                if not isinstance(ps, dict):
                    raise InvalidArgument(f"--parameters: with several flows it maps each flow to "
                                          f"{{parameter: value}}; {f!r} maps to {type(ps).__name__}",
                                          argument="parameters")
                out[f] = dict(ps)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--param looks like NAME=VALUE, got {pair!r}", argument="param")
        if len(names) == 1:
            f, p = names[0], key
        else:   # flow names may hold dots: the longest flow named before a dot
            owners = [n for n in names if key.startswith(n + ".") and len(key) > len(n) + 1]
            if not owners:
                raise InvalidArgument(f"--param {key}: with several flows name it FLOW.PARAM (flows: "
                                      f"{', '.join(names)})", argument="param")
            f = max(owners, key=len)
            p = key[len(f) + 1:]
        out.setdefault(f, {})[p] = _value(raw)
    return out


def _mapped(names: Sequence[str], pairs: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``--map FLOW.PARAM=PARENT/TASK[:raw|file|db[:ATTRIBUTE[:INDEX_JSON]]]``: LUME-services' mapped
    parameters, given when the flows run."""
    from .flows import mapped
    out: Dict[str, Dict[str, Any]] = {}
    for pair in pairs:
        key, sep, ref = pair.partition("=")
        owners = [n for n in names if key.startswith(n + ".") and len(key) > len(n) + 1]
        source, _, how = ref.partition(":")
        parent, slash, task = source.rpartition("/")
        if not sep or not owners or not slash or not parent or not task:
            raise InvalidArgument(f"--map looks like FLOW.PARAM=PARENT_FLOW/TASK[:raw|file|db[:ATTRIBUTE[:INDEX]]], "
                                  f"got {pair!r}", argument="map")
        as_, _, rest = how.partition(":")
        attribute, _, index_raw = rest.partition(":")
        index = _value(index_raw) if index_raw else []
        if not isinstance(index, list):
            index = [index]
        f = max(owners, key=len)
        out.setdefault(f, {})[key[len(f) + 1:]] = mapped(parent, task, as_ or "raw", attribute or None, index).ref()
    return out


def _at(when: Optional[str]) -> Optional[float]:
    """``--at``: ISO 8601 (a time without an offset is local time) or epoch seconds."""
    if when is None:
        return None
    try:
        epoch = float(when)
    except ValueError:
        try:
            t = datetime.datetime.fromisoformat(when.strip().replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(f"--at {when!r} is not a time: give ISO 8601 (2030-01-31T12:00:00, "
                                  f"+01:00 or Z for an offset) or epoch seconds", argument="at") from None
        epoch = (t if t.tzinfo is not None else t.astimezone()).timestamp()
    if not math.isfinite(epoch) or epoch < 0:
        raise InvalidArgument(f"--at {when!r} is not a time", argument="at")
    return epoch


def _read_result(c: Any, key: str) -> Any:
    """A result object, unpickled leniently (the flow's own classes need not be importable here)."""
    from mesh.wire.protocol import unpack
    header, data = c.conn.call_blob("get_object", {"key": key, "have": 0})
    if data is None:
        raise NotFound(f"object {key!r} has no data", key=key)
    return unpack(data) if header.get("kind") == "doc" else _lenient_loads(data)


def _wait(c: Any, view: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    from .flows import FlowRun
    fr = FlowRun(view["id"], c, view)
    try:
        fr.wait(timeout=timeout)
    except DeadlineExceeded as exc:   # say which run, and that it goes on
        raise DeadlineExceeded(f"{exc}; it goes on (zmesh flow view --run {view['id']}, "
                               f"zmesh flow cancel {view['id']})", run=view["id"], timeout=timeout) from None
    return fr.info(refresh=False)


def _raise_for_state(c: Any, view: Dict[str, Any]) -> None:
    """What ended the run, as the error the CLI exits with: the failing task's TaskFailed (its
    remote type and message), Cancelled, or FailedPrecondition."""
    if view["state"] == "succeeded":
        return
    if view["state"] == "cancelled":
        raise Cancelled(f"flow run {view['id']} was cancelled", run=view["id"])
    from .flows import FlowRun
    FlowRun(view["id"], c, view).raise_for_state()
    raise FailedPrecondition(f"flow run {view['id']} is {view['state']}", run=view["id"], state=view["state"])


# -- registered flows --------------------------------------------------------------------------
@flow.command(name="list")
@manager_option
@click.option("--filter", "filters", multiple=True, metavar="FIELD<op>VALUE",
              help="Repeatable: name~sim, owner=alice, version>=2.")
@click.option("--sort", "sort", default="name", show_default=True, metavar="[-]FIELD",
              help="Sort by FIELD; -FIELD for descending.")
@click.option("--limit", type=click.IntRange(0, MAX_PAGE), default=DEFAULT_LIMIT, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@json_option
@_errors
def list_flows(manager: Optional[str], filters: Tuple[str, ...], sort: str, limit: int, offset: int,
               as_json: bool) -> None:
    """Registered flows (each one's newest version)."""
    with _client(manager) as c:
        page = c.find_flows(filter=_parse_filter(filters), page={"limit": limit, "offset": offset}, sort=_sort(sort))
    rows = list(page.items)
    if as_json:
        click.echo(json.dumps(rows, default=str))
        return
    shown = [{**r, "parameters": ",".join(r.get("parameters") or []) or "-", "created": _when(r.get("created_at"))}
             for r in rows]
    _table(shown, FLOW_COLUMNS, f"flows ({len(rows)} of {page.total})" if page.total > len(rows) else "flows",
           keep=["name"])


@flow.command()
@manager_option
@click.argument("name", required=False)
@click.option("--run", "run_id", default=None, metavar="RUN_ID", help="Show one run and its tasks instead.")
@json_option
@_errors
def view(manager: Optional[str], name: Optional[str], run_id: Optional[str], as_json: bool) -> None:
    """Show flow NAME (version, labels, parameters, tasks and what each needs), or one run with
    --run RUN_ID (each task's state, attempts, times, executor and error; --json adds tracebacks)."""
    if (name is None) == (run_id is None):
        raise click.UsageError("name a flow (NAME) or a run (--run RUN_ID)")
    with _client(manager) as c:
        got = c.get_flow(name) if name is not None else c.get_flow_run(str(run_id))
    if as_json:
        click.echo(json.dumps(got, default=str))
    elif name is not None:
        _show_flow(got)
    else:
        _show_run(got)


def _show_flow(f: Mapping[str, Any]) -> None:
    params = f.get("parameters") or {}
    _kv([("flow", f["name"]), ("version", f["version"]), ("owner", f.get("owner") or "-"),
         ("created", _when(f.get("created_at"))), ("labels", _labels_text(f.get("labels"))),
         ("parameters", ", ".join(f"{p} ({'required' if i.get('required') else 'has a default'})"
                                  for p, i in params.items()) or "-")])
    rows = [{"task": t["name"], "runs": f"application {t['app']}" if t.get("app") else "function",
             "retries": t.get("retries", 0), "needs": ", ".join(t.get("needs") or []) or "-"}
            for t in f.get("tasks") or []]
    _table(rows, ["task", "runs", "retries", "needs"], "tasks", keep=["task"])


def _show_run(r: Mapping[str, Any]) -> None:
    err = r.get("error")
    err_text = "-"
    if isinstance(err, Mapping):
        err_text = (f"{err['task']}: " if err.get("task") else "") + _error_line(err)
    _kv([("run", r["id"]), ("name", r["name"]), ("flows", ", ".join(r.get("flows") or [])), ("state", r["state"]),
         ("owner", r.get("owner") or "-"), ("created", _when(r.get("created_at"))),
         ("scheduled", _when(r.get("scheduled_start_time"))), ("started", _when(r.get("started_at"))),
         ("ended", _when(r.get("ended_at"))), ("duration", _duration(r.get("started_at"), r.get("ended_at"))),
         ("schedule", r.get("schedule") or "-"), ("labels", _labels_text(r.get("labels"))),
         ("error", err_text)])
    rows = [{"task": _short(r, n), "state": t.get("state"), "attempts": t.get("attempts", 0),
             "started": _clock(t.get("started_at")), "ended": _clock(t.get("ended_at")),
             "duration": _duration(t.get("started_at"), t.get("ended_at")), "executor": t.get("executor") or "-",
             "error": _error_line(t.get("error"))}
            for n, t in (r.get("tasks") or {}).items()]
    _table(rows, TASK_COLUMNS, "tasks", keep=["task"])


# -- runs --------------------------------------------------------------------------------------
@flow.command()
@manager_option
@click.argument("names", nargs=-1, required=True, metavar="NAME [NAME...]")
@click.option("--param", "params", multiple=True, metavar="KEY=JSON",
              help="Repeatable; with several flows KEY is FLOW.PARAM.  A value that is not JSON is a string.")
@click.option("--parameters", "parameters_json", default=None, metavar="JSON",
              help="All parameters at once: {param: value}, or {flow: {param: value}} with several flows.")
@click.option("--map", "maps", multiple=True, metavar="FLOW.PARAM=FLOW/TASK[:AS[:ATTR[:INDEX]]]",
              help="Repeatable: a parameter taken from another flow's task result in the run "
                   "(AS: raw, file or db).")
@click.option("--run-name", default=None, metavar="S", help="The run's name (default: flows and an id).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Repeatable: executors' labels for the run's function tasks (replace the flows' labels).")
@click.option("--at", "at", default=None, metavar="TIME", help="Start no earlier than TIME (ISO 8601 or epoch).")
@click.option("--schedule", default=None, metavar="CRON", help="Run on this cron schedule ('*/5 * * * *', UTC); the first run at its next time.")
@click.option("--wait", is_flag=True, help="Wait until the run ends; a failed run exits with its task's error.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=60.0, show_default=True, metavar="S",
              help="Seconds --wait (and --result) wait; then deadline_exceeded (exit 9), the run goes on.")
@click.option("--result", "result_task", default=None, metavar="TASK",
              help="Wait, then print TASK's result (TASK or FLOW/TASK) as JSON.")
@json_option
@_errors
def run(manager: Optional[str], names: Tuple[str, ...], params: Tuple[str, ...], parameters_json: Optional[str],
        maps: Tuple[str, ...], run_name: Optional[str], labels: Tuple[str, ...], at: Optional[str],
        schedule: Optional[str], wait: bool, timeout: float, result_task: Optional[str], as_json: bool) -> None:
    """Run registered flow NAME; several NAMEs run as one flow of flows (a flow's mapped
    parameters read the other flows' results in the same run)."""
    flows = list(names)
    if len(set(flows)) != len(flows):
        raise InvalidArgument("name each flow once", argument="flows")
    given = _parameters(flows, parameters_json, params)
    # JSON values are plain data: pickle is enough (the flow service loads them with cloudpickle)
    pickled = {f: {p: pickle.dumps(v) for p, v in ps.items()} for f, ps in given.items()}
    when = _at(at)
    run_labels = _labels(labels) if labels else None
    mapped_parameters = _mapped(flows, maps)
    with _client(manager) as c:
        task = None
        if result_task is not None:   # before anything runs: a task the run will not have is an error now
            qualified = [f"{f}/{t['name']}" for f in flows for t in c.get_flow(f)["tasks"]]
            task = _task_name(flows, qualified, result_task)
        view = c.run_flow(flows, pickled, run_name=run_name, labels=run_labels, scheduled_start_time=when,
                          schedule=schedule, mapped_parameters=mapped_parameters)
        if wait or task is not None:
            view = _wait(c, view, timeout)
            if view["state"] != "succeeded":
                click.echo(json.dumps(view, default=str) if as_json else _run_line(view))
                _raise_for_state(c, view)
        if task is not None:
            rec = view["tasks"][task]
            _echo_value(_read_result(c, rec["result"]), as_json)
            return
    click.echo(json.dumps(view, default=str) if as_json else _run_line(view))


@flow.command()
@manager_option
@click.argument("run_id")
@json_option
@_errors
def cancel(manager: Optional[str], run_id: str, as_json: bool) -> None:
    """Cancel run RUN_ID: what has not finished stops and the run ends cancelled (a run that has
    already ended stays as it is)."""
    with _client(manager) as c:
        view = c.get_flow_run(run_id)   # NotFound if there is no such run
        ended = view["state"] in model.FINISHED
        if not ended:
            view = c.cancel_flow_run(run_id)
    if as_json:
        click.echo(json.dumps(view, default=str))
    elif not ended and view["state"] == "cancelled":
        click.echo(f"cancelled run {run_id}")
    else:
        click.echo(f"run {run_id} had already ended: {view['state']}")


@flow.command()
@manager_option
@click.option("--flow", "flow_name", default=None, metavar="NAME", help="Runs of flow NAME (alone or with others).")
@click.option("--state", default=None, metavar="STATE", help=f"One of {', '.join(model.RUN_STATES)}.")
@click.option("--owner", default=None, metavar="O", help="Runs of this user.")
@click.option("--filter", "filters", multiple=True, metavar="FIELD<op>VALUE",
              help="Repeatable: name~nightly, created_at>=1700000000, state!=succeeded.")
@click.option("--sort", "sort", default="created_at", show_default=True, metavar="[-]FIELD",
              help="Sort by FIELD; -FIELD (or --desc) for descending.")
@click.option("--desc", is_flag=True, help="Sort descending.")
@click.option("--limit", type=click.IntRange(0, MAX_PAGE), default=DEFAULT_LIMIT, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@json_option
@_errors
def runs(manager: Optional[str], flow_name: Optional[str], state: Optional[str], owner: Optional[str],
         filters: Tuple[str, ...], sort: str, desc: bool, limit: int, offset: int, as_json: bool) -> None:
    """Flow runs, filtered, sorted and paged by the manager (fields: id, name, flows, state, owner,
    created_at, scheduled_start_time, started_at, ended_at, schedule)."""
    filt = _parse_filter(filters)
    if state is not None:
        if state not in model.RUN_STATES:
            raise InvalidArgument(f"--state is one of {', '.join(model.RUN_STATES)}, not {state!r}", argument="state")
        filt["state"] = ["=", state]
    if owner is not None:
        filt["owner"] = ["=", owner]
    order = _sort(sort)
    if desc:
        order["order"] = "descending"
    with _client(manager) as c:
        if flow_name is None:
            page = c.find_flow_runs(filter=filt, page={"limit": limit, "offset": offset}, sort=order)
            rows, total = list(page.items), page.total
        else:
            rows, total = _runs_of(c, flow_name, filt, order, limit, offset)
    if as_json:
        click.echo(json.dumps(rows, default=str))
        return
    shown = [{**r, "created": _when(r.get("created_at")), "duration": _duration(r.get("started_at"), r.get("ended_at"))}
             for r in rows]
    _table(shown, RUN_COLUMNS, f"flow runs ({len(rows)} of {total})" if total > len(rows) else "flow runs",
           keep=["id"])


def _runs_of(c: Any, name: str, filt: Dict[str, Any], order: Dict[str, str], limit: int,
             offset: int) -> Tuple[List[Dict[str, Any]], int]:
    """Runs that include flow ``name``.  The manager lists a run's flows as one string (``a,b``) and
    matches substrings, so it narrows (``~``) and the exact match, then the page, happen here."""
    filt = {**filt, "flows": ["~", name]}
    seen: List[Dict[str, Any]] = []
    for _ in range(MAX_PAGES):
        page = c.find_flow_runs(filter=filt, page={"limit": MAX_PAGE, "offset": len(seen)}, sort=order)
        seen.extend(page.items)
        if not page.items or len(seen) >= page.total:
            break
    hits = [r for r in seen if name in str(r.get("flows") or "").split(",")]
    return hits[offset:offset + limit], len(hits)


# -- schedules ---------------------------------------------------------------------------------
@flow.command()
@manager_option
@click.option("--limit", type=click.IntRange(0, MAX_PAGE), default=DEFAULT_LIMIT, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@json_option
@_errors
def schedules(manager: Optional[str], limit: int, offset: int, as_json: bool) -> None:
    """Recurring flow runs (zmesh flow run --schedule CRON), active or not."""
    with _client(manager) as c:
        page = c.find_flow_schedules(page={"limit": limit, "offset": offset}, sort={"by": "id"})
    rows = list(page.items)
    if as_json:
        click.echo(json.dumps(rows, default=str))
        return
    shown = [{**r, "next": _when(r.get("next_at")) if r.get("active") else "-"} for r in rows]
    _table(shown, SCHEDULE_COLUMNS,
           f"flow schedules ({len(rows)} of {page.total})" if page.total > len(rows) else "flow schedules", keep=["id"])


@flow.command()
@manager_option
@click.argument("schedule_id", metavar="ID")
@_errors
def unschedule(manager: Optional[str], schedule_id: str) -> None:
    """Stop schedule ID: no more runs, and its run waiting for its time is cancelled."""
    with _client(manager) as c:
        c.cancel_flow_schedule(schedule_id)
    click.echo(f"unscheduled {schedule_id}")
