"""``zmesh``: run the daemons and manage the mesh from a terminal or a script.

Tables for people, ``--json`` for scripts.  Every error is one line,
``error: CODE: message``, and the exit code is the error's stable
``exit_code`` (see docs/operations.md, "Exit codes").

This module only assembles the command line: the root group and shared helpers
live in :mod:`client.cli_common`, and importing the command modules below
registers their commands on it (imports go one way: they never import this one).
"""
from __future__ import annotations

from . import (
    cli_daemons,  # noqa: F401  (manager, executor, up, config show)
    cli_dashboard,  # noqa: F401  (dashboard)
    cli_flows,  # noqa: F401  (flow list, view, run, cancel, runs, schedules, unschedule)
    cli_functions,  # noqa: F401  (functions list/send/state, egress tail)
    cli_manage,  # noqa: F401  (register, unregister, list, view, close, cancel, drain, top, invoke, ...)
    cli_security,  # noqa: F401  (keys, executor-keys, users, robots, login)
)
from .cli_common import _errors, _table, _when, json_option, main, manager_option

__all__ = ["main", "_errors", "_table", "_when", "json_option", "manager_option"]

if __name__ == "__main__":
    main()
