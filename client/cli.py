"""``zmesh``: run the daemons and manage the mesh from a terminal or a script.

Tables for people, ``--json`` for scripts.  Every error is one line,
``error: CODE: message``, and the exit code is the error's stable
``exit_code`` (see docs/cli.md).
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import click

from mesh.config import Settings, default_manager
from mesh.errors import InvalidArgument, MeshError

manager_option = click.option("--manager", "-m", default=None, metavar="ADDR",
                              help="Manager address (default: $ZMESH_MANAGER or tcp://127.0.0.1:5555).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
config_option = click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
                             help="YAML config file; ZMESH_* environment variables and flags override it.")


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a MeshError as one line and exit with its code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MeshError as exc:
            click.echo(f"error: {exc.code}: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def _client(manager: Optional[str]):
    from .api import Client
    return Client(manager or default_manager())


def _labels(values: Sequence[str]) -> Dict[str, str]:
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"labels look like key=value, got {v!r}", param_hint="--label")
        out[key] = val
    return out


def _when(ts: Optional[float]) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _table(rows: List[Dict[str, Any]], columns: List[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(r.get(c, "")) for c in columns])
    Console().print(table)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zeromesh", message="zeromesh %(version)s")
@click.option("--manager-key", default=None, metavar="FILE",
              help="The manager's public key file, for a secured mesh (default: $ZMESH_MANAGER_KEY).")
def main(manager_key: Optional[str]) -> None:
    """zeromesh: a ZeroMQ executor mesh for Python."""
    if manager_key:
        os.environ["ZMESH_MANAGER_KEY"] = manager_key


# -- daemons -----------------------------------------------------------------------
def _daemon_config(config_path: Optional[str], flags: Dict[str, Any], kind: str) -> Dict[str, Any]:
    """Effective daemon settings: defaults < --config file < ZMESH_* env < flags."""
    from mesh import settings_file as sf
    keys, defaults = ((sf.MANAGER_KEYS, sf.manager_defaults()) if kind == "manager"
                      else (sf.EXECUTOR_KEYS, sf.executor_defaults()))
    return sf.values(sf.load_layers(config_path, os.environ, flags, keys, defaults=defaults))


def _reloader(config_path: Optional[str], flags: Dict[str, Any], kind: str,
              daemon: Any = None) -> Callable[[], None]:
    """SIGHUP: re-read the config and apply what can change while running: the log level, and an
    executor's labels (the manager learns them from its next heartbeat).  The rest needs a restart."""
    def reload() -> None:
        import logging
        cfg = _daemon_config(config_path, flags, kind)
        logging.getLogger("zeromesh").setLevel((cfg["log_level"] or "INFO").upper())
        if daemon is not None:
            daemon.labels = dict(cfg["labels"] or {})
    return reload


@main.command()
@config_option
@click.option("--bind", default=None,
              help="Endpoint to bind (tcp://HOST:PORT, tcp://HOST:* for any port, ipc://PATH) "
                   "[default: tcp://127.0.0.1:5555].")
@click.option("--db", default=None, help="SQLite database (default: $ZMESH_DB or ~/.local/share/zeromesh/manager.db).")
@click.option("--endpoint-file", default=None, help="Write the bound endpoint here once serving.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics over HTTP on this port (GET /metrics; host: $ZMESH_METRICS_HOST).")
@click.option("--curve-secret", default=None, metavar="FILE",
              help="The manager's secret key file (zmesh keys generate): CURVE encryption and authentication.")
@click.option("--insecure", is_flag=True, default=None, help="Plain TCP, no authentication, every peer is admin.")
@click.option("--log-level", default=None)
@_errors
def manager(config_path: Optional[str], bind: Optional[str], db: Optional[str], endpoint_file: Optional[str],
            metrics_port: Optional[int], curve_secret: Optional[str], insecure: Optional[bool],
            log_level: Optional[str]) -> None:
    """Run the session manager in the foreground.  Needs --curve-secret FILE or --insecure."""
    from mesh import log
    from mesh.manager import run
    flags = {"bind": bind, "db": db, "log_level": log_level, "curve_secret": curve_secret, "insecure": insecure}
    cfg = _daemon_config(config_path, flags, "manager")
    log.setup(cfg["log_level"], cfg["log_format"])
    settings = Settings.load(heartbeat_interval=cfg["heartbeat_interval"], liveness=cfg["liveness"])
    run(cfg["bind"], cfg["db"], settings, endpoint_file, on_reload=_reloader(config_path, flags, "manager"),
        metrics_port=metrics_port, curve_secret=cfg["curve_secret"], insecure=cfg["insecure"])


@main.command()
@config_option
@manager_option
@click.option("--slots", type=click.IntRange(1, 4096), default=None,
              help="Instances this executor runs at once (default: CPU count).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label for placement; repeatable.")
@click.option("--name", default=None, help="Executor id (default: HOSTNAME-RANDOM).")
@click.option("--manager-key", default=None, metavar="FILE", help="The manager's public key file (secured mesh).")
@click.option("--curve-secret", default=None, metavar="FILE",
              help="This executor's secret key file; its public key must be on the manager's allow-list.")
@click.option("--insecure", is_flag=True, default=None, help="Plain TCP to an --insecure manager.")
@click.option("--log-level", default=None)
@_errors
def executor(config_path: Optional[str], manager: Optional[str], slots: Optional[int], labels: Sequence[str],
             name: Optional[str], manager_key: Optional[str], curve_secret: Optional[str], insecure: Optional[bool],
             log_level: Optional[str]) -> None:
    """Run an executor daemon in the foreground (one per machine).

    Needs --manager-key FILE and --curve-secret FILE, or --insecure."""
    from executor.daemon import ExecutorDaemon
    from mesh import log
    flags = {"manager": manager, "slots": slots, "labels": _labels(labels) or None, "name": name,
             "log_level": log_level, "manager_key": manager_key, "curve_secret": curve_secret, "insecure": insecure}
    cfg = _daemon_config(config_path, flags, "executor")
    if not 1 <= cfg["slots"] <= 4096:
        raise InvalidArgument(f"slots must be between 1 and 4096, got {cfg['slots']}")
    log.setup(cfg["log_level"])
    # systemd's RuntimeDirectory= (/run/zeromesh-executor-NAME) when run as a unit, else a temporary directory
    daemon = ExecutorDaemon(cfg["manager"], cfg["slots"], cfg["labels"], cfg["name"],
                            run_dir=os.environ.get("RUNTIME_DIRECTORY") or None, manager_key=cfg["manager_key"],
                            curve_secret=cfg["curve_secret"], insecure=cfg["insecure"])
    daemon.on_reload = _reloader(config_path, flags, "executor", daemon)
    sys.exit(daemon.run())


@main.command()
@click.option("--executors", "-n", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--slots", type=click.IntRange(1, 4096), default=2, show_default=True, help="Slots per executor.")
@click.option("--bind", default="tcp://127.0.0.1:5555", show_default=True)
@click.option("--db", default=None, help="SQLite database (default: a fresh one in a temporary directory).")
def up(executors: int, slots: int, bind: str, db: Optional[str]) -> None:
    """Run a manager and executors on this machine in the foreground (Ctrl-C stops them)."""
    from .local import LocalMesh
    mesh = LocalMesh(executors=executors, slots=slots, db=db, bind=bind)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        mesh.start()
        click.echo(f"zeromesh up: manager {mesh.endpoint}, {executors} executors x {slots} slots, "
                   f"db {mesh.db}, logs {mesh.log_dir}")
        click.echo(f"try: ZMESH_MANAGER={mesh.endpoint} zmesh list -e")
        while not stop["now"]:
            if mesh.manager is not None and mesh.manager.poll() is not None:
                raise click.ClickException(f"the manager exited; see {mesh.log_dir}/manager.log")
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    except MeshError as exc:
        click.echo(f"error: {exc.code}: {exc}", err=True)
        sys.exit(exc.exit_code)
    finally:
        mesh.stop()


@main.group(name="config")
def config_group() -> None:
    """Daemon configuration files."""


@config_group.command(name="show")
@click.option("--manager-config", default=None, metavar="PATH",
              help="Manager config file (default: /etc/zeromesh/manager.yaml if it exists).")
@click.option("--executor-config", default=None, metavar="PATH",
              help="Executor config file, e.g. /etc/zeromesh/executor.d/NAME.yaml.")
@json_option
@_errors
def config_show(manager_config: Optional[str], executor_config: Optional[str], as_json: bool) -> None:
    """Print the effective daemon configuration, each value with its source.

    The environment layer is this shell's ZMESH_* variables, not a unit's Environment=.
    """
    from mesh import settings_file as sf
    if manager_config and executor_config:
        raise click.UsageError("choose one of --manager-config, --executor-config")
    if executor_config:
        layers = sf.load_layers(executor_config, os.environ, {}, sf.EXECUTOR_KEYS, defaults=sf.executor_defaults())
    else:
        path = manager_config or (sf.MANAGER_CONFIG if os.path.exists(sf.MANAGER_CONFIG) else None)
        layers = sf.load_layers(path, os.environ, {}, sf.MANAGER_KEYS, defaults=sf.manager_defaults())
    if as_json:
        click.echo(json.dumps({k: {"value": v, "source": src} for k, (v, src) in layers.items()}))
    else:
        click.echo(sf.format_layers(layers))


# -- registry ------------------------------------------------------------------------
@main.command()
@manager_option
@click.option("-f", "--file", "path", required=True, type=click.Path(dir_okay=False), help="Application spec (YAML).")
@click.option("--replace", is_flag=True, help="Replace an application of the same name.")
@json_option
@_errors
def register(manager: Optional[str], path: str, replace: bool, as_json: bool) -> None:
    """Register an application from its YAML spec."""
    from mesh.spec import load_spec
    spec = load_spec(path)
    with _client(manager) as c:
        app = c.register_application(spec, replace=replace)
    click.echo(json.dumps(app) if as_json else f"registered {app['name']}")


@main.command()
@manager_option
@click.option("-a", "--app", "name", required=True, help="Application name.")
@_errors
def unregister(manager: Optional[str], name: str) -> None:
    """Remove an application from the registry."""
    with _client(manager) as c:
        c.unregister_application(name)
    click.echo(f"unregistered {name}")


from . import cli_manage  # noqa: E402,F401  (registers list, view, close, cancel, drain, top, invoke, ...)
from . import cli_security  # noqa: E402,F401  (registers keys, executor-keys, users, robots, login)


if __name__ == "__main__":
    # run as `python -m client.cli`: use the imported module's group, on which cli_manage registered
    from client.cli import main as _main
    _main()
