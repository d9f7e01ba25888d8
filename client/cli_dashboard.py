"""``zmesh dashboard``: serve the live web page of the mesh (client/dashboard, docs/dashboard.md)."""
from __future__ import annotations

from typing import Optional

import click

from mesh.errors import FailedPrecondition

from .cli_common import _errors, main, manager_option


def run_dashboard(manager: Optional[str], host: str, port: int, interval: float = 1.0,
                  manager_key: Optional[str] = None) -> None:
    """Serve in the foreground; prints the address (and whether it is reachable beyond this machine)."""
    try:
        from .dashboard import Settings, serve
    except ImportError as exc:
        raise FailedPrecondition(f"the dashboard needs its extra: pip install 'zeromesh[dashboard]' ({exc})") from None

    def ready(url: str) -> None:
        scope = "this machine only" if host in ("127.0.0.1", "localhost", "::1") else "every network it can reach"
        click.echo(f"zeromesh dashboard: {url} (bound to {host}: {scope}; --host changes it)", err=False)

    serve(Settings(manager=manager, manager_key=manager_key, interval=interval), host=host, port=port, ready=ready)


@main.command()
@manager_option
@click.option("--port", type=click.IntRange(0, 65535), default=8265, show_default=True, help="0: any free port.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 opens it to the network (log in still required on a secured mesh).")
@click.option("--interval", type=click.FloatRange(0.1, 60), default=1.0, show_default=True,
              help="Seconds between snapshots of the mesh (each is five management calls).")
@_errors
def dashboard(manager: Optional[str], port: int, host: str, interval: float) -> None:
    """A live web page of the mesh: overview, executors, applications, sessions and tasks.

    On a secured mesh the dashboard reads with its own credentials (ZMESH_ROBOT_ID/ZMESH_ROBOT_SECRET
    of a viewer robot is enough) and people log in on the page with their zeromesh user."""
    run_dashboard(manager, host, port, interval)
