"""Structured one-line logs to stderr (journald picks them up as they are).

``key=value`` by default, JSON lines with ``ZMESH_LOG_FORMAT=json``.  Callers
pass fields as ``extra={"kv": {...}}`` through :func:`event`.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                  "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        fields.update(getattr(record, "kv", {}))
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(fields, default=str)
        return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


def _quote(v: Any) -> str:
    s = str(v)
    return json.dumps(s) if (not s or any(c in s for c in ' "=\n')) else s


def setup(level: str = "", fmt: str = "") -> None:
    level = (level or os.environ.get("ZMESH_LOG_LEVEL") or "INFO").upper()
    fmt = fmt or os.environ.get("ZMESH_LOG_FORMAT", "kv")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt == "json"))
    root = logging.getLogger("zeromesh")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def event(logger: logging.Logger, level: int, msg: str, **kv: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"kv": kv})
