"""systemd readiness, status and watchdog notifications, without a systemd binding.

The protocol is one datagram of ``KEY=VALUE`` lines sent to the unix socket
named by ``$NOTIFY_SOCKET`` (see sd_notify(3)); a name starting with ``@`` is
an abstract socket.  When the variable is unset (not started by systemd, or
``Type=`` is not ``notify``) every call is a no-op that returns False.  Send
errors are swallowed: a daemon must never die because systemd went away.

    ready("serving tcp://0.0.0.0:5555")     # READY=1 + STATUS=...
    status("3 sessions, 12 tasks in flight")
    period = watchdog_interval()            # None when WatchdogSec= is off
    watchdog()                              # every `period` seconds
    stopping()                              # on SIGTERM, before draining
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Callable, Optional

__all__ = ["notify", "ready", "status", "stopping", "reloading", "watchdog", "watchdog_interval"]


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; True if it was sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not fields:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]           # abstract namespace
    elif addr[0] != "/":
        return False                     # e.g. vsock: addresses, which this module does not speak
    data = "\n".join(fields).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | getattr(socket, "SOCK_CLOEXEC", 0)) as sock:
            sock.setblocking(False)      # never stall an event loop on a full receive queue
            sock.sendto(data, addr)
    except OSError:
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def ready(status_text: Optional[str] = None) -> bool:
    """The service is up (``Type=notify`` units count as started only now)."""
    return notify("READY=1", f"STATUS={_one_line(status_text)}") if status_text else notify("READY=1")


def status(text: str) -> bool:
    """One line shown by ``systemctl status`` (newlines are folded into spaces)."""
    return notify(f"STATUS={_one_line(text)}")


def stopping() -> bool:
    return notify("STOPPING=1")


def reloading() -> bool:
    """Before re-reading configuration on SIGHUP; send :func:`ready` when done."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog() -> bool:
    """Keep-alive for ``WatchdogSec=``; send it every :func:`watchdog_interval` seconds."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> Optional[float]:
    """Seconds between :func:`watchdog` pings (half of ``WatchdogSec=``), or None if it is off.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for:
    any other process (a child that inherited the environment) gets None.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def reload(apply: Optional[Callable[[], None]], logger: logging.Logger, status_line: str = "", **kv: Any) -> None:
    """The reload protocol (``systemctl reload``, SIGHUP): RELOADING=1, apply, READY=1.

    A failed reload keeps the running configuration and says so in the log:
    a bad edit of a config file must not take a daemon down.
    """
    from mesh.ops.log import event
    reloading()
    try:
        if apply is not None:
            apply()
    except Exception as exc:
        event(logger, logging.ERROR, "reload failed; keeping the running configuration", error=str(exc), **kv)
    else:
        event(logger, logging.INFO, "configuration reloaded", **kv)
    ready(status_line)
