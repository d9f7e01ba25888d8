"""What every ``zmesh`` command module shares: the root group, common options, the error
wrapper and table helpers.

Imports go one way: ``cli_common`` <- ``cli_daemons`` / ``cli_manage`` / ``cli_security`` / ``cli_flows``
<- ``cli`` (which imports the others so that their commands register on :data:`main`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import functools
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import click
import zmq

from mesh.errors import DeadlineExceeded, MeshError, Unavailable

from .lenient import _lenient_loads, _LenientUnpickler, _Unknown  # noqa: F401 (the CLI's names for them)
from mesh.ops.config import default_manager

if TYPE_CHECKING:
    from .api import Client

address_option = click.option("--manager", "-m", default=None, metavar="ADDR",
                              help="Manager address (default: $ZMESH_MANAGER or tcp://127.0.0.1:5555).")


def _set_manager_key(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> None:
    if value:
        os.environ["ZMESH_MANAGER_KEY"] = value


manager_key_option = click.option("--manager-key", default=None, metavar="FILE", expose_value=False,
                                  callback=_set_manager_key,
                                  help="The manager's public key file, for a secured mesh "
                                       "(default: $ZMESH_MANAGER_KEY).")


def manager_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--manager ADDR`` and ``--manager-key FILE``, on every client command (before or after
    the subcommand, as the README says); the key is not passed on: the connection reads it."""
    return address_option(manager_key_option(fn))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
config_option = click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
                             help="YAML config file; ZMESH_* environment variables and flags override it.")


def fail(exc: MeshError) -> None:
    """Print ``error: CODE: message`` on one line and exit with the error's stable exit code."""
    click.echo(f"error: {exc.code}: {exc}", err=True)
    sys.exit(exc.exit_code)


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure a command can expect is one line and the error's exit code, never a traceback.

    MeshErrors print as they are; a wait that ran out (``TimeoutError``) is ``deadline_exceeded`` and
    a ZeroMQ error is ``unavailable``, in case one slips past the client's own mapping."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MeshError as exc:
            fail(exc)
        except (TimeoutError, concurrent.futures.TimeoutError) as exc:
            fail(DeadlineExceeded(str(exc) or "a wait ran out of time"))
        except zmq.ZMQError as exc:
            fail(Unavailable(f"ZeroMQ: {exc}"))

    return wrapper


def _client(manager: Optional[str]) -> "Client":
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


def _table(rows: List[Dict[str, Any]], columns: List[str], title: str, keep: Sequence[str] = ()) -> None:
    """A table for people; columns in ``keep`` (ids, names: what people copy) are never cut short."""
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title, title_justify="left")
    for c in columns:
        if c in keep:
            table.add_column(c, no_wrap=True, min_width=max([len(c), *(len(str(r.get(c, ""))) for r in rows)]))
        else:
            table.add_column(c)
    for r in rows:
        table.add_row(*[str(r.get(c, "")) for c in columns])
    # Piped (not a terminal): no width to fit, so nothing is cut; rich would assume 80 columns.
    Console(width=None if sys.stdout.isatty() else 100_000).print(table)


# -- find: filters and sorting as the manager takes them (mesh/core/query.py) -------------------------
OPS = ("<=", ">=", "!=", "~", "<", ">", "=")


def _parse_filter(exprs: Tuple[str, ...]) -> Dict[str, Any]:
    """``state=open``, ``created_at>=1700000000``, ``id~echo``, ``state!=closed``: values are JSON when they parse."""
    out: Dict[str, Any] = {}
    for expr in exprs:
        op = next((o for o in OPS if o in expr), None)
        if op is None:
            raise click.BadParameter(f"{expr!r}: use FIELD=VALUE or FIELD<op>VALUE with op in {' '.join(OPS)}",
                                     param_hint="--filter")
        name, raw = expr.split(op, 1)
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[name.strip()] = ["!" if op == "!=" else op, value]
    return out


def _sort(spec: Optional[str]) -> Dict[str, str]:
    if not spec:
        return {}
    return {"by": spec.lstrip("-+"), "order": "descending" if spec.startswith("-") else "ascending"}


# -- answers and results, decoded leniently ----------------------------------------------------------
def _plain(v: Any) -> Any:
    """A dataclass or NamedTuple answer, or one of a class unknown here, as its fields (JSON)."""
    if isinstance(v, _Unknown):
        return dict(vars(v))
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    if isinstance(v, tuple) and hasattr(v, "_asdict"):
        return v._asdict()
    return v


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zeromesh", message="zeromesh %(version)s")
@click.option("--manager-key", default=None, metavar="FILE",
              help="The manager's public key file, for a secured mesh (default: $ZMESH_MANAGER_KEY).")
def main(manager_key: Optional[str]) -> None:
    """zeromesh: a ZeroMQ executor mesh for Python."""
    if manager_key:
        os.environ["ZMESH_MANAGER_KEY"] = manager_key
