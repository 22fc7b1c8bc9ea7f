"""Human units in feeds.yaml (250ms, 5%, 100MB) to plain numbers, and back for messages."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d|w)$")
_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(B|KB|MB|GB|KiB|MiB|GiB)$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_BYTES = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def duration(value: str | float | int) -> float:
    """Seconds from `1.5s`, `250ms`, `1d` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is not a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    m = _DURATION.match(value.strip())
    if not m:
        raise ValueError(f"'{value}' is not a duration like 250ms, 30s, 5m, 2h, 1d")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def ratio(value: str | float | int) -> float:
    """A fraction from `5%` or `0.05`."""
    if isinstance(value, bool):
        raise ValueError("a ratio is not a boolean")
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    if text.endswith("%"):
        return float(text[:-1]) / 100.0
    return float(text)


def size(value: str | int | float) -> float:
    """Bytes from `100MB`, `512KiB` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size is not a boolean")
    if isinstance(value, int | float):
        return float(value)
    m = _SIZE.match(value.strip())
    if not m:
        raise ValueError(f"'{value}' is not a size like 100MB or 512KiB")
    return float(m.group(1)) * _BYTES[m.group(2)]


def number(value: str | int | float) -> float:
    if isinstance(value, bool):
        raise ValueError("not a number")
    return float(value)


def fmt_duration(seconds: float) -> str:
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= scale and (seconds / scale).is_integer():
            return f"{int(seconds / scale)}{unit}"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
