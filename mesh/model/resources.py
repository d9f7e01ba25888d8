"""Resource requests and capacities (cpu, memory, gpu) and their arithmetic.

One small value type serves both sides of scheduling: an application's
per-instance request (``spec.resreq``) and an executor's free capacity.  The
scheduler only needs ``fits`` plus ``+``/``-`` to book and release capacity,
so the type stays a plain frozen dataclass that is cheap to copy and compare.

Memory sizes accept ``int`` bytes or strings with a unit suffix.  Every suffix
is *binary* (k = 1024, m = 1024**2, g = 1024**3, t = 1024**4, p = 1024**5),
whether written ``4g``, ``4G``, ``4gi``, ``4GiB`` or ``4gb``: users mostly mean
"gigabytes" loosely, and one rule is easier to reason about than two.

Flame's string form is accepted too, wherever a request is: ``"cpu=2,mem=4g,gpu=0"``
(:meth:`Resources.from_string`; ``mem`` and ``memory`` are the same key, in the string and in a
mapping).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Union

from mesh.errors import InvalidArgument

_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4, "p": 1024 ** 5}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgtp]?)(?:i?b?)", re.IGNORECASE)
_KEYS = ("cpu", "memory", "gpu")
_ALIASES = {"mem": "memory"}   # Flame's spelling of memory
_EPS = 1e-9  # cpu is fractional; tolerate float rounding from repeated +/-


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but ``cpu: true`` is a typo, not a quantity.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_memory(value: Any, field: str = "memory") -> int:
    """Turn ``4g`` / ``512m`` / ``1.5gi`` / ``1048576`` into int bytes (>= 0)."""
    if _is_number(value):
        if not math.isfinite(value):
            raise InvalidArgument(f"{field} must be a finite size", field=field)
        size = float(value)
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if not m:
            raise InvalidArgument(
                f"{field} must be bytes or a size like '512m' or '4g', got {value!r}",
                field=field)
        size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise InvalidArgument(
            f"{field} must be an integer or a size string, got {type(value).__name__}",
            field=field)
    if size < 0:
        raise InvalidArgument(f"{field} must not be negative", field=field)
    return int(size)


def format_bytes(n: Union[int, float]) -> str:
    """Human-readable binary size for tables: ``3.8 GiB``, ``512 B``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024:
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PiB"


@dataclass(frozen=True)
class Resources:
    """cpu in cores (fractional allowed), memory in bytes, gpu as a device count.

    The constructor does not validate so that subtraction may go negative
    (an over-booked executor); untrusted input goes through :meth:`parse`.
    """

    cpu: float = 0
    memory: int = 0
    gpu: int = 0

    @classmethod
    def from_string(cls, text: str, field: str = "resreq") -> Resources:
        """Flame's form, ``"cpu=2,mem=4g,gpu=0"``: comma-separated ``key=value`` pairs, keys
        ``cpu``, ``mem`` (or ``memory``) and ``gpu``, each at most once; values as in :meth:`parse`.
        An empty string is no request."""
        if not isinstance(text, str):
            raise InvalidArgument(f"{field} must be a string like 'cpu=2,mem=4g', got {type(text).__name__}",
                                  field=field)
        pairs: Dict[str, str] = {}
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or not value.strip():
                raise InvalidArgument(f"{field}: {part!r} is not key=value: give a mapping or a string "
                                      "like 'cpu=2,mem=4g,gpu=0'",
                                      field=field)
            if key in pairs or _ALIASES.get(key, key) in {_ALIASES.get(k, k) for k in pairs}:
                raise InvalidArgument(f"{field}: {key!r} is given twice", field=f"{field}.{key}")
            pairs[key] = value.strip()
        return cls.parse(pairs, field)

    @classmethod
    def parse(cls, value: Union[None, str, Mapping[str, Any], "Resources"], field: str = "resreq") -> Resources:
        """Validate a user/wire mapping, or Flame's string form (:meth:`from_string`); ``field``
        prefixes error messages."""
        if value is None:
            return cls()
        if isinstance(value, Resources):
            return value
        if isinstance(value, str):
            return cls.from_string(value, field)
        if not isinstance(value, Mapping):
            raise InvalidArgument(
                f"{field} must be a mapping or a string like 'cpu=2,mem=4g', got {type(value).__name__}",
                field=field)
        for key in value:
            if key not in _KEYS and key not in _ALIASES:
                raise InvalidArgument(
                    f"unknown key {field}.{key} (expected one of: {', '.join(_KEYS)}, or mem)",
                    field=f"{field}.{key}")
        if "mem" in value:
            if "memory" in value:
                raise InvalidArgument(f"{field} gives both mem and memory (the same key)", field=f"{field}.mem")
            value = {("memory" if k == "mem" else k): v for k, v in value.items()}
        cpu = value.get("cpu", 0)
        if cpu is None:
            cpu = 0
        if isinstance(cpu, str):
            try:
                cpu = float(cpu)
            except ValueError:
                raise InvalidArgument(f"{field}.cpu must be a number, got {cpu!r}",
                                      field=f"{field}.cpu") from None
        if not _is_number(cpu) or not math.isfinite(cpu):
            raise InvalidArgument(f"{field}.cpu must be a number", field=f"{field}.cpu")
        if cpu < 0:
            raise InvalidArgument(f"{field}.cpu must not be negative", field=f"{field}.cpu")
        memory = value.get("memory")
        memory = 0 if memory is None else parse_memory(memory, f"{field}.memory")
        gpu = value.get("gpu")
        gpu = 0 if gpu is None else gpu
        if isinstance(gpu, str) and gpu.strip().isdigit():   # "gpu=1" in the string form
            gpu = int(gpu)
        if not _is_number(gpu) or not math.isfinite(gpu) or gpu != int(gpu):
            raise InvalidArgument(f"{field}.gpu must be an integer", field=f"{field}.gpu")
        if gpu < 0:
            raise InvalidArgument(f"{field}.gpu must not be negative", field=f"{field}.gpu")
        return cls(cpu=float(cpu), memory=memory, gpu=int(gpu))

    def to_dict(self) -> Dict[str, Any]:
        return {"cpu": float(self.cpu), "memory": int(self.memory), "gpu": int(self.gpu)}

    def fits(self, free: Resources) -> bool:
        """True if this request can be placed into ``free`` capacity."""
        return (self.cpu <= free.cpu + _EPS and self.memory <= free.memory
                and self.gpu <= free.gpu)

    def __add__(self, other: Resources) -> Resources:
        if not isinstance(other, Resources):
            return NotImplemented
        return Resources(self.cpu + other.cpu, self.memory + other.memory, self.gpu + other.gpu)

    def __sub__(self, other: Resources) -> Resources:
        if not isinstance(other, Resources):
            return NotImplemented
        return Resources(self.cpu - other.cpu, self.memory - other.memory, self.gpu - other.gpu)


parse = Resources.parse
