"""Application spec: what to launch on executors and how many instances.

The same validator guards both doors: YAML written by a user
(:func:`parse_spec` / :func:`load_spec`) and dicts arriving from the network or
SQLite (:meth:`AppSpec.from_dict`).  ``to_dict`` emits the YAML shape
(``{"metadata": ..., "spec": ...}``), so a stored spec reads like the file it
came from and round-trips through the one validator.  Unknown keys are errors
rather than ignored, because a silently ignored ``max_retires`` is worse than a
failed submit.  Every error names the field path, e.g. ``spec.command``.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from mesh.errors import InvalidArgument
from mesh.model.resources import Resources

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_TOP_KEYS = ("metadata", "spec")
_META_KEYS = ("name", "description", "version")
_SPEC_KEYS = ("working_directory", "command", "arguments", "environments", "labels",
              "resreq", "max_instances", "max_retries", "prefetch", "task_timeout")
DEFAULT_MAX_RETRIES = 3
RUNNER_HASH_ENV = "ZMESH_RUNNER_HASH"
"""In a runner application's ``environments``: the hash of its package (client/runner.py), which
executors unpack into ``<run dir>/runner/<hash>`` and remove once no instance uses it."""
MAX_SPEC_BYTES = 1 << 20
"""Largest spec file :func:`load_spec` reads (1 MiB; a real spec is a few hundred bytes).  At most
this many bytes plus one are read, so ``/dev/zero`` or a log file given by mistake fails at once
with ``InvalidArgument`` instead of filling memory."""


@dataclass(frozen=True)
class AppSpec:
    """A validated application spec.  Build it via parse/load/from_dict;
    the constructor trusts its arguments.  Dict fields are excluded from the
    hash so a spec can still be hashed despite holding dicts."""

    name: str
    command: str
    arguments: Tuple[str, ...] = ()
    working_directory: Optional[str] = None
    environments: Dict[str, str] = field(default_factory=dict, hash=False)
    labels: Dict[str, str] = field(default_factory=dict, hash=False)
    resreq: Resources = field(default_factory=Resources)
    max_instances: Optional[int] = None
    max_retries: int = DEFAULT_MAX_RETRIES
    prefetch: Optional[int] = None
    description: str = ""
    task_timeout: Optional[float] = None   # seconds one attempt of a task may run (None: no limit)
    version: int = 1   # metadata.version: an update of a registered application bumps it (docs/flame.md)

    def bumped(self, old: Optional["AppSpec"]) -> "AppSpec":
        """This spec as it replaces ``old``: its own version if that is newer, else ``old``'s plus one
        (an update always makes a new version; sessions record the version they ran)."""
        if old is None or self.version > old.version:
            return self
        return dataclasses.replace(self, version=old.version + 1)

    def to_dict(self) -> Dict[str, Any]:
        """Plain msgpack/JSON-able dict in the YAML layout (fresh copies)."""
        return {
            "metadata": {"name": self.name, "description": self.description, "version": self.version},
            "spec": {
                "working_directory": self.working_directory,
                "command": self.command,
                "arguments": list(self.arguments),
                "environments": dict(self.environments),
                "labels": dict(self.labels),
                "resreq": self.resreq.to_dict(),
                "max_instances": self.max_instances,
                "max_retries": self.max_retries,
                "prefetch": self.prefetch,
                "task_timeout": self.task_timeout,
            },
        }

    @classmethod
    def from_dict(cls, d: Any, base_dir: Optional[str] = None) -> AppSpec:
        """Validate an untrusted dict (wire, SQLite) exactly like parse_spec."""
        return _build(d, base_dir)


def parse_spec(text: str, base_dir: Optional[str] = None) -> AppSpec:
    """Parse YAML text; relative working_directory is joined to ``base_dir``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        details = {"line": mark.line + 1, "column": mark.column + 1} if mark else {}
        raise InvalidArgument(f"invalid YAML{where}: {problem}", **details) from None
    return _build(data, base_dir)


def load_spec(path: str, max_bytes: int = MAX_SPEC_BYTES) -> AppSpec:
    """Read a spec file (at most ``max_bytes``, see :data:`MAX_SPEC_BYTES`); its directory is the
    base for relative paths.  Every failure is ``InvalidArgument`` naming the file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise InvalidArgument(f"spec file not found: {path}", path=str(path)) from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read spec file {path}: {exc}", path=str(path)) from None
    if len(data) > max_bytes:
        raise InvalidArgument(f"spec file {path} is larger than the spec size limit ({max_bytes} bytes, "
                              "MAX_SPEC_BYTES)", path=str(path), limit="MAX_SPEC_BYTES", max=max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"cannot read spec file {path}: {exc}", path=str(path)) from None
    try:
        return parse_spec(text, base_dir=os.path.dirname(os.path.abspath(path)))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{path}: {exc.message}", path=str(path), **exc.details) from None


def _fail(path: str, msg: str) -> InvalidArgument:
    return InvalidArgument(f"{path} {msg}", field=path)


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(path, f"must be a mapping, got {type(value).__name__}")
    return value


def _check_keys(m: Mapping[str, Any], allowed: Tuple[str, ...], prefix: str) -> None:
    for key in m:
        if key not in allowed:
            name = f"{prefix}.{key}" if prefix else str(key)
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            tip = f"; did you mean '{hint[0]}'?" if hint else f" (expected one of: {', '.join(allowed)})"
            raise InvalidArgument(f"unknown key {name}{tip}", field=name)


def _scalar_str(value: Any, path: str) -> str:
    # YAML turns `PORT: 8080` / `DEBUG: true` into int/bool; env and labels
    # are strings on the executor side, so coerce scalars the way a shell would.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise _fail(path, f"must be a string, got {type(value).__name__}")


def _str_map(value: Any, path: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for key, val in _mapping(value, path).items():
        if not isinstance(key, str) or not key or "=" in key:
            raise _fail(path, f"has invalid key {key!r} (non-empty string without '=')")
        out[key] = _scalar_str(val, f"{path}.{key}")
    return out


def _opt_int(value: Any, path: str, minimum: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise _fail(path, f"must be >= {minimum}, got {value}")
    return value


def _opt_seconds(value: Any, path: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise _fail(path, f"must be a positive number of seconds, got {value!r}")
    return float(value)


def _opt_str(value: Any, path: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(path, f"must be a string, got {type(value).__name__}")
    return value


def _build(data: Any, base_dir: Optional[str]) -> AppSpec:
    if not isinstance(data, Mapping):
        raise InvalidArgument("spec document must be a mapping with 'metadata' and 'spec'")
    _check_keys(data, _TOP_KEYS, "")
    meta = _mapping(data.get("metadata"), "metadata")
    spec = _mapping(data.get("spec"), "spec")
    _check_keys(meta, _META_KEYS, "metadata")
    _check_keys(spec, _SPEC_KEYS, "spec")

    name = _opt_str(meta.get("name"), "metadata.name")
    if not name:
        raise _fail("metadata.name", "is required")
    if not NAME_RE.fullmatch(name):
        raise _fail("metadata.name", f"must match {NAME_RE.pattern} (lowercase), got {name!r}")
    command = _opt_str(spec.get("command"), "spec.command")
    if not command:
        raise _fail("spec.command", "is required")

    args = spec.get("arguments")
    if args is not None and not isinstance(args, (list, tuple)):
        raise _fail("spec.arguments", f"must be a list of strings, got {type(args).__name__}")
    arguments = tuple(_scalar_str(a, f"spec.arguments[{i}]") for i, a in enumerate(args or ()))

    workdir = _opt_str(spec.get("working_directory"), "spec.working_directory") or None
    if workdir and base_dir and not os.path.isabs(workdir):
        workdir = os.path.normpath(os.path.join(base_dir, workdir))

    max_retries = _opt_int(spec.get("max_retries"), "spec.max_retries", 0)
    version = _opt_int(meta.get("version"), "metadata.version", 1)
    return AppSpec(
        name=name,
        command=command,
        arguments=arguments,
        working_directory=workdir,
        environments=_str_map(spec.get("environments"), "spec.environments"),
        labels=_str_map(spec.get("labels"), "spec.labels"),
        resreq=Resources.parse(spec.get("resreq"), "spec.resreq"),
        max_instances=_opt_int(spec.get("max_instances"), "spec.max_instances", 1),
        max_retries=DEFAULT_MAX_RETRIES if max_retries is None else max_retries,
        prefetch=_opt_int(spec.get("prefetch"), "spec.prefetch", 1),
        task_timeout=_opt_seconds(spec.get("task_timeout"), "spec.task_timeout"),
        description=_opt_str(meta.get("description"), "metadata.description") or "",
        version=1 if version is None else version,
    )
