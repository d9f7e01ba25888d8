"""``zmesh`` commands that look at and steer a running mesh.

register / unregister / list / view / close / cancel / drain / top / invoke / metrics / completion.
Tables for people, ``--json`` for scripts; errors as one line with the
error's exit code (see docs/operations.md, "Exit codes").
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import click

from mesh.core.query import DEFAULT_LIMIT, MAX_LIMIT
from mesh.errors import DeadlineExceeded, InvalidArgument, NotFound

from .cli_common import (_client, _errors, _jsonable, _lenient_loads, _parse_filter, _plain, _sort, _table,
                         _when, json_option, main, manager_option)

KINDS = {
    "a": ("applications", ["name", "version", "command", "labels", "created"], "find_applications"),
    "s": ("sessions", ["id", "application", "version", "state", "pending", "running", "succeeded", "failed", "created"],
          "find_sessions"),
    "e": ("executors", ["id", "state", "hostname", "slots", "used_slots", "cpu", "memory", "gpu", "labels"],
          "find_executors"),
    "t": ("tasks", ["id", "state", "attempts", "created", "finished", "error"], "find_tasks"),
}
def _dict(obj: Any) -> Dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return dict(obj)


def _human(kind: str, r: Dict[str, Any]) -> Dict[str, Any]:
    from mesh.model.resources import format_bytes
    r = dict(r)
    r["created"] = _when(r.get("created_at"))
    r["finished"] = _when(r.get("finished_at"))
    if kind == "e":
        r["memory"] = format_bytes(r.get("memory") or 0)
    if isinstance(r.get("labels"), dict):
        r["labels"] = ",".join(f"{k}={v}" for k, v in r["labels"].items()) or "-"
    if kind == "t":
        err = r.get("error")
        r["error"] = f"{err.get('code')}: {err.get('message', '')[:60]}" if isinstance(err, dict) else "-"
    return r


# -- registry ------------------------------------------------------------------------
@main.command()
@manager_option
@click.option("-f", "--file", "path", required=True, type=click.Path(dir_okay=False), help="Application spec (YAML).")
@click.option("--replace", is_flag=True, help="Replace an application of the same name.")
@json_option
@_errors
def register(manager: Optional[str], path: str, replace: bool, as_json: bool) -> None:
    """Register an application from its YAML spec."""
    from mesh.model.spec import load_spec
    spec = load_spec(path)
    with _client(manager) as c:
        app = c.register_application(spec, replace=replace)
    click.echo(json.dumps(app) if as_json else f"registered {app['name']} version {app.get('version', 1)}")


@main.command()
@manager_option
@click.option("-f", "--file", "path", required=True, type=click.Path(dir_okay=False), help="Application spec (YAML).")
@json_option
@_errors
def update(manager: Optional[str], path: str, as_json: bool) -> None:
    """Replace a registered application's spec: a new version (one up, or the spec's
    metadata.version if higher).  Open sessions keep the version they were opened on."""
    from mesh.model.spec import load_spec
    spec = load_spec(path)
    with _client(manager) as c:
        app = c.update_application(spec)
    click.echo(json.dumps(app) if as_json else f"updated {app['name']} to version {app.get('version', 1)}")


@main.command()
@manager_option
@click.option("-a", "--app", "name", required=True, help="Application name.")
@_errors
def unregister(manager: Optional[str], name: str) -> None:
    """Remove an application from the registry."""
    with _client(manager) as c:
        c.unregister_application(name)
    click.echo(f"unregistered {name}")


@main.command(name="list")
@manager_option
@click.option("-a", "--application", "--apps", "apps", is_flag=True, help="Applications.")
@click.option("-s", "--session", "--sessions", "sessions", is_flag=True, help="Sessions.")
@click.option("-e", "--executor", "--executors", "executors", is_flag=True, help="Executors.")
@click.option("-t", "--task", "--tasks", "tasks_of", default=None, metavar="SESSION_ID", help="Tasks of one session.")
@click.option("--filter", "filters", multiple=True, metavar="FIELD<op>VALUE",
              help="Repeatable: state=open, created_at>=1700000000, id~echo, state!=closed.")
@click.option("--sort", "sort", default=None, metavar="[-]FIELD", help="Sort by FIELD; -FIELD for descending.")
@click.option("--limit", type=click.IntRange(0, MAX_LIMIT), default=DEFAULT_LIMIT, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@json_option
@_errors
def list_(manager: Optional[str], apps: bool, sessions: bool, executors: bool, tasks_of: Optional[str],
          filters: Tuple[str, ...], sort: Optional[str], limit: int, offset: int, as_json: bool) -> None:
    """List applications (-a, --application), sessions (-s, --session), executors (-e, --executor)
    or a session's tasks (-t, --task SESSION_ID).

    Filtering, sorting and paging happen in the manager.
    """
    chosen = [k for k, on in (("a", apps), ("s", sessions), ("e", executors), ("t", tasks_of)) if on]
    if len(chosen) != 1:
        raise click.UsageError("choose one of -a, -s, -e, -t SESSION_ID")
    kind = chosen[0]
    title, columns, method = KINDS[kind]
    args: List[Any] = [tasks_of] if kind == "t" else []
    with _client(manager) as c:
        page = getattr(c, method)(*args, filter=_parse_filter(filters), page={"limit": limit, "offset": offset},
                                  sort=_sort(sort))
    rows = [_dict(i) for i in page.items]
    if as_json:
        click.echo(json.dumps(rows, default=str))
        return
    shown = f"{title} ({len(rows)} of {page.total})" if page.total > len(rows) else title
    _table([_human(kind, r) for r in rows], columns, shown)


@main.command()
@manager_option
@click.option("-a", "--application", "--app", "app", default=None, help="Application name.")
@click.option("-s", "--session", "session", default=None, help="Session id.")
@click.option("-e", "--executor", "executor_id", default=None, help="Executor id.")
@click.option("-t", "--task", "task_id", type=int, default=None, help="Task id.")
@json_option
@_errors
def view(manager: Optional[str], app: Optional[str], session: Optional[str], executor_id: Optional[str],
         task_id: Optional[int], as_json: bool) -> None:
    """Show one application, session, executor or task in full."""
    chosen = [(k, v) for k, v in (("a", app), ("s", session), ("e", executor_id), ("t", task_id)) if v is not None]
    if len(chosen) != 1:
        raise click.UsageError("choose one of -a NAME, -s SESSION_ID, -e EXECUTOR_ID, -t TASK_ID")
    kind, key = chosen[0]
    with _client(manager) as c:
        getters: Dict[str, Callable[[Any], Any]] = {"a": c.get_application, "s": c.get_session,
                                                   "e": c.get_executor, "t": c.get_task}
        obj = getters[kind](key)
    if obj is None:
        raise NotFound(f"{KINDS[kind][0][:-1]} {key!r} does not exist")
    d = _dict(obj)
    if as_json and kind != "t":
        click.echo(json.dumps(d, default=str))
        return
    if kind == "t":   # the result, as JSON where it is plain data (zmesh invoke prints it the same way)
        d["result"] = _plain(d.get("result"))
        if not d.get("has_result"):
            d.pop("result", None)
    if as_json:
        click.echo(json.dumps(d, default=repr))
        return
    for k, v in _human(kind, d).items():
        if k == "result":
            v = json.dumps(v) if _jsonable(v) else repr(v)
        if k not in ("spec", "capabilities", "has_result"):
            click.echo(f"{k:>18}: {v}")


@main.command()
@manager_option
@click.option("-s", "--session", "session", required=True, help="Session id.")
@_errors
def close(manager: Optional[str], session: str) -> None:
    """Close a session: pending tasks are cancelled, its instances released."""
    with _client(manager) as c:
        info = c.close_session(session)
    click.echo(f"closed {info['id']} ({info['succeeded']} succeeded, {info['failed']} failed, "
               f"{info['cancelled']} cancelled)")


@main.command()
@manager_option
@click.option("-t", "--task", "task_id", type=int, required=True, help="Task id.")
@_errors
def cancel(manager: Optional[str], task_id: int) -> None:
    """Cancel a queued task (a running task cannot be interrupted)."""
    with _client(manager) as c:
        c.cancel_task(task_id)
    click.echo(f"cancelled task {task_id}")


@main.command()
@manager_option
@click.option("-e", "--executor", "executor_id", required=True, help="Executor id.")
@_errors
def drain(manager: Optional[str], executor_id: str) -> None:
    """Drain an executor: no new work; its instances stop once their tasks are done."""
    with _client(manager) as c:
        c.drain_executor(executor_id)
    click.echo(f"draining {executor_id}")


@main.command()
@manager_option
@_errors
def metrics(manager: Optional[str]) -> None:
    """Print the manager's metrics (Prometheus text format)."""
    with _client(manager) as c:
        click.echo(c.metrics(), nl=False)


def _top_tables(c: Any, rate: float) -> Any:
    from rich.console import Group
    from rich.table import Table
    stats = c.stats()
    head = Table.grid(padding=(0, 2))
    head.add_row(f"tasks/s {rate:,.0f}", f"finished {stats['tasks_finished']:,}",
                 f"in manager {stats['tasks_in_memory']:,}", f"executors {stats['executors']}",
                 f"instances {stats['instances']}", f"protocol errors {stats['protocol_errors']}")
    ex = Table(title="executors", title_justify="left")
    for col in ("id", "state", "host", "slots", "used", "instances", "silent s"):
        ex.add_column(col)
    now = time.time()
    for e in c.find_executors(sort={"by": "id"}).items:
        ex.add_row(e.id, e.state, str(e.hostname), str(e.slots), str(e.used_slots), str(e.instances),
                   f"{now - e.last_seen:.1f}")
    se = Table(title="open sessions", title_justify="left")
    for col in ("id", "application", "pending", "running", "succeeded", "failed", "instances"):
        se.add_column(col)
    for s in c.find_sessions(filter={"state": "open"}, sort={"by": "created_at", "order": "descending"},
                             page={"limit": 20}).items:
        se.add_row(s.id, s.application, str(s.pending), str(s.running), str(s.succeeded), str(s.failed),
                   str(s.instances))
    return Group(head, ex, se), stats["tasks_finished"]


@main.command()
@manager_option
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one view and exit (for scripts and tests).")
@_errors
def top(manager: Optional[str], interval: float, once: bool) -> None:
    """A live view of executors, sessions and throughput, refreshed in place (Ctrl-C quits)."""
    from rich.console import Console
    from rich.live import Live
    with _client(manager) as c:
        view, last = _top_tables(c, 0.0)
        if once:
            Console().print(view)
            return
        t_last = time.monotonic()
        with Live(view, refresh_per_second=4, screen=False) as live:
            try:
                rate = 0.0
                while True:
                    time.sleep(interval)
                    view, done = _top_tables(c, rate)
                    now = time.monotonic()
                    rate = (done - last) / max(now - t_last, 1e-9)   # shown on the next refresh
                    last, t_last = done, now
                    live.update(view)
            except KeyboardInterrupt:
                pass


@main.command()
@manager_option
@click.argument("app", required=False)
@click.option("-a", "--app", "app_name", default=None, help="Application name (or give it as APP).")
@click.option("--input", "input_", default="null", show_default=True, help="The request, as JSON.")
@click.option("--count", type=click.IntRange(1, 10_000_000), default=1, show_default=True,
              help="Send the request this many times (a progress bar shows on a terminal).")
@click.option("--timeout", type=float, default=None, help="Seconds to wait for each answer (each part with --stream).")
@click.option("--stream", "stream", is_flag=True,
              help="Print each part of a streaming entrypoint as it arrives, one line each "
                   "(with --json: {\"seq\": N, \"part\": ...}).")
@json_option
@_errors
def invoke(manager: Optional[str], app: Optional[str], app_name: Optional[str], input_: str, count: int,
           timeout: Optional[float], stream: bool, as_json: bool) -> None:
    """Call APP (or -a APP, as in view and unregister) once, or --count times, in a fresh session
    and print the answers.  --timeout runs out as deadline_exceeded (exit 9).

    --stream prints the parts of a streaming entrypoint (one that yields) as they are made, one
    line each, until the stream ends; an error of the stream prints after the parts made before
    it; Ctrl-C stops the remote generator (exit 130)."""
    from .session import Session
    if app is None and app_name is None or app is not None and app_name is not None and app != app_name:
        raise click.UsageError("name the application once: APP or -a APP")
    if stream and count != 1:
        raise click.UsageError("--stream sends one request: drop --count")
    app = app or app_name
    try:
        request = json.loads(input_)
    except ValueError as exc:
        raise InvalidArgument(f"--input is not JSON: {exc}") from None
    from .session import _pickle
    payload = _pickle(request, "the request")
    if stream:
        try:
            with Session(app, manager=manager) as s:
                _invoke_stream(s, payload, timeout, as_json)
        except KeyboardInterrupt:   # the stream was closed (its generator stopped) on the way out
            click.echo("interrupted", err=True)
            sys.exit(130)
        return
    with Session(app, manager=manager) as s:
        if count == 1:   # answers decoded leniently: the service's classes need not be importable here
            answers = [s._conn.invoke(s.id(), payload, _lenient_loads, timeout)]
        else:
            answers = _invoke_many(s, payload, count, timeout)
    for a in answers if count <= 20 or as_json else answers[-1:]:
        a = _plain(a)
        click.echo(json.dumps(a, default=repr) if as_json or _jsonable(a) else repr(a))
    if count > 20 and not as_json:
        click.echo(f"({count} answers; the last shown)", err=True)


def _invoke_stream(s: Any, payload: bytes, timeout: Optional[float], as_json: bool) -> None:
    """Print each part as it arrives (decoded leniently, as ``invoke`` does), flushed line by line;
    ``timeout``: seconds to wait for each part.  However it ends early (an error, the wait running
    out, Ctrl-C), the stream is closed, which stops the remote generator."""
    from .streams import PartStream, StreamBuffer
    buf = StreamBuffer(s.id(), s._conn.settings.stream_window)
    s._conn.submit(s.id(), payload, _lenient_loads, stream=buf)
    parts = PartStream(buf, _lenient_loads, timeout)
    seq = 0
    try:
        for part in parts:
            part = _plain(part)
            if as_json:
                line = json.dumps({"seq": seq, "part": part}, default=repr)
            else:
                line = json.dumps(part, default=repr) if _jsonable(part) else repr(part)
            print(line, flush=True)
            seq += 1
    except DeadlineExceeded:
        if buf.ended or timeout is None:
            raise              # the stream's own error (an attempt past its task timeout), not our wait
        raise DeadlineExceeded(f"no part of the stream within {timeout:g}s after {seq} parts "
                               "(the stream was stopped)", timeout=timeout, parts=seq) from None
    finally:
        parts.close()


def _invoke_many(s: Any, request: Any, count: int, timeout: Optional[float]) -> List[Any]:
    """Submit ``count`` tasks; on a terminal, a progress bar with rate and ETA (quiet when piped)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    futs = [s._conn.submit(s.id(), request, _lenient_loads) for _ in range(count)]
    show = sys.stderr.isatty()
    with Progress(TextColumn("invoke"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                  disable=not show, transient=False) as bar:
        job = bar.add_task("invoke", total=count, rate="")
        started = time.monotonic()
        answers = []
        for i, f in enumerate(futs, 1):
            answers.append(f.result(timeout))
            if show and (i % 100 == 0 or i == count):
                bar.update(job, completed=i, rate=f"{i / max(time.monotonic() - started, 1e-9):,.0f}/s")
    return answers


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: eval "$(zmesh completion bash)"."""
    from click.shell_completion import get_completion_class
    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(main, {}, "zmesh", "_ZMESH_COMPLETE").source())
