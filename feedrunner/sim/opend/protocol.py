"""FutuOpenD's framing: a 44-byte little-endian header, then the body, checked by its SHA1.

The header layout is futu-api's own (`MESSAGE_HEAD_FMT = "<1s1sI2B2I20s8s"` in common/constant.py):
'F', 'T', proto id u32, format u8 (0 protobuf, 1 JSON), version u8, serial u32, body length u32,
SHA1 of the (unencrypted) body, 8 reserved bytes. Replies echo the request's proto id and serial.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

HEADER = struct.Struct("<2sIBBII20s8s")
HEADER_LEN = HEADER.size  # 44
MAGIC = b"FT"
FMT_PROTOBUF = 0
MAX_BODY = 16 * 1024 * 1024  # far above any real request; beyond it the stream is garbage


class ProtoId(IntEnum):
    INIT_CONNECT = 1001
    GET_GLOBAL_STATE = 1002
    NOTIFY = 1003
    KEEP_ALIVE = 1004
    GET_USER_INFO = 1005
    QOT_SUB = 3001
    QOT_REG_QOT_PUSH = 3002
    QOT_GET_SUB_INFO = 3003
    QOT_GET_BASIC_QOT = 3004
    QOT_UPDATE_BASIC_QOT = 3005
    QOT_GET_TICKER = 3010
    QOT_UPDATE_TICKER = 3011
    QOT_GET_ORDER_BOOK = 3012
    QOT_UPDATE_ORDER_BOOK = 3013
    QOT_GET_SECURITY_SNAPSHOT = 3203


class SubType(IntEnum):
    """Qot_Common.SubType; names are futu-api's `SubType` strings."""

    QUOTE = 1
    ORDER_BOOK = 2
    TICKER = 4
    RT_DATA = 5
    K_DAY = 6
    K_5M = 7
    K_15M = 8
    K_30M = 9
    K_60M = 10
    K_1M = 11
    K_WEEK = 12
    K_MON = 13
    BROKER = 14
    K_QUARTER = 15
    K_YEAR = 16
    K_3M = 17
    K_10M = 18
    K_120M = 19
    K_180M = 20
    K_240M = 21
    ORDER_BOOK_ODD = 22


class ProtocolError(Exception):
    """The byte stream cannot be framed any more; OpenD drops such a connection."""


@dataclass(slots=True)
class Frame:
    proto_id: int
    serial: int
    body: bytes
    fmt: int = FMT_PROTOBUF
    version: int = 0
    sha_ok: bool = True


def encode(proto_id: int, serial: int, body: bytes, *, fmt: int = FMT_PROTOBUF, sha1: bytes | None = None) -> bytes:
    """One frame; `sha1` overrides the digest so fault injection can send a corrupt one."""
    digest = hashlib.sha1(body).digest() if sha1 is None else sha1
    return HEADER.pack(MAGIC, proto_id, fmt, 0, serial & 0xFFFFFFFF, len(body), digest, b"\0" * 8) + body


class FrameDecoder:
    """Incremental decoder: TCP delivers arbitrary slices, frames come out whole."""

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self._buf = bytearray()
        self._max_body = max_body

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= HEADER_LEN:
            magic, proto_id, fmt, version, serial, body_len, sha, _reserved = HEADER.unpack_from(self._buf)
            if magic != MAGIC:
                raise ProtocolError(f"bad magic {bytes(magic)!r}")
            if body_len > self._max_body:
                raise ProtocolError(f"body length {body_len} exceeds {self._max_body}")
            end = HEADER_LEN + body_len
            if len(self._buf) < end:
                break
            body = bytes(self._buf[HEADER_LEN:end])
            del self._buf[:end]
            frames.append(Frame(proto_id, serial, body, fmt, version, hashlib.sha1(body).digest() == sha))
        return frames
