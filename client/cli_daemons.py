"""``zmesh`` commands that run daemons: manager, executor, up, and ``config show``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence

import click

from mesh.errors import InvalidArgument, MeshError
from mesh.ops.config import Settings

from .cli_common import _errors, _labels, address_option, config_option, fail, json_option, main


def _daemon_config(config_path: Optional[str], flags: Dict[str, Any], kind: str) -> Dict[str, Any]:
    """Effective daemon settings: defaults < --config file < ZMESH_* env < flags."""
    from mesh.ops import settings_file as sf
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
    from mesh.manager import run
    from mesh.ops import log
    flags = {"bind": bind, "db": db, "log_level": log_level, "curve_secret": curve_secret, "insecure": insecure}
    cfg = _daemon_config(config_path, flags, "manager")
    log.setup(cfg["log_level"], cfg["log_format"])
    settings = Settings.load(heartbeat_interval=cfg["heartbeat_interval"], liveness=cfg["liveness"])
    run(cfg["bind"], cfg["db"], settings, endpoint_file, on_reload=_reloader(config_path, flags, "manager"),
        metrics_port=metrics_port, curve_secret=cfg["curve_secret"], insecure=cfg["insecure"])


@main.command()
@config_option
@address_option
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
    from mesh.ops import log
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
@click.option("--dashboard", "dashboard_port", is_flag=False, flag_value=8265, type=click.IntRange(0, 65535),
              default=None, metavar="[PORT]", help="Also serve the web dashboard on 127.0.0.1 (port 8265 by default).")
def up(executors: int, slots: int, bind: str, db: Optional[str], dashboard_port: Optional[int]) -> None:
    """Run a manager and executors on this machine in the foreground (Ctrl-C stops them)."""
    from .local import LocalMesh, end_process
    mesh = LocalMesh(executors=executors, slots=slots, db=db, bind=bind)
    stop = {"now": False}
    dash: Optional[subprocess.Popen] = None
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        mesh.start()
        click.echo(f"zeromesh up: manager {mesh.endpoint}, {executors} executors x {slots} slots, "
                   f"db {mesh.db}, logs {mesh.log_dir}")
        click.echo(f"try: ZMESH_MANAGER={mesh.endpoint} zmesh list -e")
        if dashboard_port is not None:   # its own process, a client like any other (ended by its PID below)
            dash = subprocess.Popen([sys.executable, "-m", "client.cli", "dashboard", "--manager", mesh.endpoint,
                                     "--port", str(dashboard_port)], env=mesh.env)
        while not stop["now"]:
            if mesh.manager is not None and mesh.manager.poll() is not None:
                raise click.ClickException(f"the manager exited; see {mesh.log_dir}/manager.log")
            if dash is not None and dash.poll() is not None:
                raise click.ClickException(f"the dashboard exited with {dash.returncode}")
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    except MeshError as exc:
        fail(exc)
    finally:
        if dash is not None:
            end_process(dash)
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
    from mesh.ops import settings_file as sf
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
