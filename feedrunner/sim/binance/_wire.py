"""Byte-level helpers for the Binance simulator's hot path.

Every market-data message is encoded once and the same websocket frame bytes are written to every
subscriber: server-to-client frames are unmasked and the simulator declines permessage-deflate, so a
frame is identical for all receivers and fan-out costs one `transport.write` per connection.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

try:  # orjson is several times faster than json for the REST bodies and ws acks
    import orjson

    def dumps(obj: Any) -> bytes:
        """Compact JSON as bytes."""
        return orjson.dumps(obj)

    loads: Callable[[str | bytes], Any] = orjson.loads
    JSONDecodeError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # pragma: no cover - orjson is in the dev venv
    import json

    def dumps(obj: Any) -> bytes:
        """Compact JSON as bytes."""
        return json.dumps(obj, separators=(",", ":")).encode()

    loads = json.loads
    JSONDecodeError = json.JSONDecodeError

_LEN2 = struct.Struct("!BBH").pack
_LEN8 = struct.Struct("!BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked, final text frame (RFC 6455 5.2) carrying `payload`."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return _LEN2(0x81, 126, n) + payload
    return _LEN8(0x81, 127, n) + payload


def num(x: float) -> str:
    """Binance prints every decimal with 8 places ("0.01000000"); clients parse the string."""
    return f"{x:.8f}"


def levels(side: list[tuple[float, float]]) -> list[list[str]]:
    """Book levels as Binance's [["price", "qty"], ...]."""
    return [[f"{p:.8f}", f"{q:.8f}"] for p, q in side]
