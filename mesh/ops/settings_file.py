"""Daemon configuration in layers: defaults < YAML file < ``ZMESH_*`` environment < flags.

:func:`load_layers` returns every key with its effective value and where that
value came from (``"default"``, ``"file:PATH"``, ``"env:NAME"``,
``"flag:--name"``), so ``zmesh config show`` can explain a running daemon's
configuration.  Pure: reads one file, touches no sockets.

A key the file does not know is an error naming the key and the file (a typo
must not silently fall back to a default); a ``null`` value in the file means
"not set here".  Environment variables are ``ZMESH_`` + the key in capitals
(``ZMESH_LOG_LEVEL``, ``ZMESH_HEARTBEAT_INTERVAL``), the same names
:class:`mesh.ops.config.Settings` and :mod:`mesh.ops.log` read.  A map value (executor
``labels``) is written ``k=v,k2=v2`` in the environment.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import fields as _dc_fields
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from mesh.errors import InvalidArgument
from mesh.ops.config import DEFAULT_MANAGER, Settings

MANAGER_CONFIG = "/etc/zeromesh/manager.yaml"
EXECUTOR_CONFIG_DIR = "/etc/zeromesh/executor.d"

_SETTINGS_DEFAULTS = {f.name: f.default for f in _dc_fields(Settings)}

MANAGER_KEYS: Dict[str, type] = {
    "bind": str, "db": str, "log_level": str, "log_format": str,
    "heartbeat_interval": float, "liveness": int, "curve_secret": str, "insecure": bool,
}
EXECUTOR_KEYS: Dict[str, type] = {
    "manager": str, "slots": int, "labels": dict, "name": str, "log_level": str,
    "manager_key": str, "curve_secret": str, "insecure": bool,
}
# Keys whose command-line flag is not simply --key-with-dashes.
FLAG_NAMES: Dict[str, str] = {"labels": "--label"}

Layers = Dict[str, Tuple[Any, str]]


def executor_config(name: str) -> str:
    """``/etc/zeromesh/executor.d/NAME.yaml``: what ``zeromesh-executor@NAME.service`` reads."""
    return os.path.join(EXECUTOR_CONFIG_DIR, f"{name}.yaml")


def manager_defaults() -> Dict[str, Any]:
    from mesh.ops.config import default_db
    return {"bind": "tcp://127.0.0.1:5555", "db": default_db(), "log_level": "INFO", "log_format": "kv",
            "heartbeat_interval": _SETTINGS_DEFAULTS["heartbeat_interval"],
            "liveness": _SETTINGS_DEFAULTS["liveness"], "curve_secret": None, "insecure": False}


def executor_defaults() -> Dict[str, Any]:
    """``name`` None means HOSTNAME-RANDOM, chosen by the daemon."""
    return {"manager": DEFAULT_MANAGER, "slots": os.cpu_count() or 1, "labels": {}, "name": None,
            "log_level": "INFO", "manager_key": None, "curve_secret": None, "insecure": False}


def coerce(value: Any, typ: type, key: str, source: str) -> Any:
    """``value`` as ``typ``; strings (environment) are parsed.  InvalidArgument says where it came from."""
    def bad(why: str = "") -> InvalidArgument:
        return InvalidArgument(f"{source}: {key} must be {_type_name(typ)}, got {value!r}{why}",
                               key=key, source=source)

    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        raise bad()
    if typ is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if typ is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if typ is dict:
        if isinstance(value, str):
            out: Dict[str, str] = {}
            for item in filter(None, (p.strip() for p in value.split(","))):
                k, sep, v = item.partition("=")
                if not sep or not k.strip():
                    raise bad(" (write k=v,k2=v2)")
                out[k.strip()] = v.strip()
            return out
        if isinstance(value, Mapping):
            if any(isinstance(v, (Mapping, list)) for v in value.values()):
                raise bad(" (values must be scalars)")
            return {str(k): "" if v is None else str(v) for k, v in value.items()}
        raise bad()
    raise TypeError(f"unsupported type {typ!r} for key {key!r}")


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _type_name(typ: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a map of key: value"}.get(typ, typ.__name__)


def read_file(path: str, keys: Mapping[str, type]) -> Dict[str, Any]:
    """The file's settings (null values dropped), raw; InvalidArgument for a missing, bad or unknown key."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise InvalidArgument(f"config file {path} does not exist", path=path) from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read config file {path}: {exc.strerror or exc}", path=path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidArgument(f"{where}: invalid YAML: {problem}", path=path,
                              line=mark.line + 1 if mark is not None else None) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path}: expected a map of settings at the top level, got {type(data).__name__}",
                              path=path)
    for key in data:
        if key not in keys:
            near = difflib.get_close_matches(str(key), list(keys), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(sorted(keys))})"
            raise InvalidArgument(f"{path}: unknown key {key!r}{hint}", path=path, key=str(key))
    return {k: v for k, v in data.items() if v is not None}


def load_layers(file_path: Optional[str], env: Mapping[str, str], flags: Mapping[str, Any],
                keys: Dict[str, type], env_prefix: str = "ZMESH_",
                defaults: Optional[Mapping[str, Any]] = None) -> Layers:
    """``{key: (value, source)}`` for every key: defaults < file < env < flags.

    ``flags`` holds the command-line values; None (flag not given) is skipped.
    A key missing from ``defaults`` defaults to None.
    """
    out: Layers = {k: ((defaults or {}).get(k), "default") for k in keys}
    if file_path:
        source = f"file:{file_path}"
        for k, v in read_file(file_path, keys).items():
            out[k] = (coerce(v, keys[k], k, source), source)
    for k, typ in keys.items():
        name = env_prefix + k.upper()
        raw = env.get(name)
        if raw is not None and raw != "":
            out[k] = (coerce(raw, typ, k, f"env:{name}"), f"env:{name}")
    for k, v in flags.items():
        if k not in keys:
            raise InvalidArgument(f"unknown setting {k!r} passed as a flag", key=k)
        if v is None:
            continue
        source = f"flag:{FLAG_NAMES.get(k, '--' + k.replace('_', '-'))}"
        out[k] = (coerce(v, keys[k], k, source), source)
    return out


def values(layers: Layers) -> Dict[str, Any]:
    """Just the effective values."""
    return {k: v for k, (v, _) in layers.items()}


def format_layers(layers: Layers) -> str:
    """One ``key = value  # source`` line per key, for ``zmesh config show``."""
    width = max((len(k) for k in layers), default=0)
    lines = []
    for k, (v, src) in layers.items():
        shown = ",".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else ("-" if v is None else v)
        lines.append(f"{k:<{width}} = {shown}  # {src}")
    return "\n".join(lines)
