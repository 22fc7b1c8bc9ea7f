"""TWS API framing and the message ids, tick types and error texts the simulator uses.

Every frame is a 4-byte big-endian length followed by NUL-terminated ASCII fields; the handshake is the
one exception (a bare ``API\\0`` before the first frame). The ids and layouts follow what ib_async 2.1
sends and parses at server version 176, which is the only judge of fidelity here.
"""

from __future__ import annotations

import struct
from enum import IntEnum

LEN = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024  # a length beyond this is garbage, not a request
API_SIGN = b"API\0"


class In(IntEnum):
    """Client -> server message ids."""

    REQ_MKT_DATA = 1
    CANCEL_MKT_DATA = 2
    PLACE_ORDER = 3
    REQ_OPEN_ORDERS = 5
    REQ_ACCT_DATA = 6
    REQ_EXECUTIONS = 7
    REQ_IDS = 8
    REQ_CONTRACT_DATA = 9
    REQ_AUTO_OPEN_ORDERS = 15
    REQ_ALL_OPEN_ORDERS = 16
    REQ_MANAGED_ACCTS = 17
    REQ_HISTORICAL_DATA = 20
    REQ_CURRENT_TIME = 49
    REQ_MARKET_DATA_TYPE = 59
    REQ_POSITIONS = 61
    REQ_ACCOUNT_SUMMARY = 62
    CANCEL_ACCOUNT_SUMMARY = 63
    CANCEL_POSITIONS = 64
    START_API = 71
    REQ_ACCOUNT_UPDATES_MULTI = 76
    CANCEL_ACCOUNT_UPDATES_MULTI = 77
    REQ_MATCHING_SYMBOLS = 81
    REQ_HISTORICAL_TICKS = 96
    REQ_TICK_BY_TICK_DATA = 97
    CANCEL_TICK_BY_TICK_DATA = 98
    REQ_COMPLETED_ORDERS = 99


class Out(IntEnum):
    """Server -> client message ids."""

    TICK_PRICE = 1
    TICK_SIZE = 2
    ERR_MSG = 4
    ACCT_VALUE = 6
    ACCT_UPDATE_TIME = 8
    NEXT_VALID_ID = 9
    CONTRACT_DATA = 10
    MANAGED_ACCTS = 15
    TICK_GENERIC = 45
    TICK_STRING = 46
    CURRENT_TIME = 49
    CONTRACT_DATA_END = 52
    OPEN_ORDER_END = 53
    ACCT_DOWNLOAD_END = 54
    EXECUTION_DATA_END = 55
    TICK_SNAPSHOT_END = 57
    MARKET_DATA_TYPE = 58
    POSITION_END = 62
    ACCOUNT_SUMMARY = 63
    ACCOUNT_SUMMARY_END = 64
    ACCOUNT_UPDATE_MULTI = 73
    ACCOUNT_UPDATE_MULTI_END = 74
    SYMBOL_SAMPLES = 79
    TICK_REQ_PARAMS = 81
    HISTORICAL_TICKS_LAST = 98
    TICK_BY_TICK = 99
    COMPLETED_ORDERS_END = 102


class Tick(IntEnum):
    """reqMktData tick types (https://interactivebrokers.github.io/tws-api/tick_types.html)."""

    BID_SIZE = 0
    BID = 1
    ASK = 2
    ASK_SIZE = 3
    LAST = 4
    HIGH = 6
    LOW = 7
    VOLUME = 8
    CLOSE = 9
    OPEN = 14
    LAST_TIMESTAMP = 45
    SHORTABLE = 46
    RT_VOLUME = 48
    TRADE_COUNT = 54
    SHORTABLE_SHARES = 89


TICK_BY_TICK_TYPES = {"Last": 1, "AllLast": 2, "BidAsk": 3, "MidPoint": 4}

# Real TWS wording, so log-matching code written against the sim works against TWS too.
ERRORS: dict[int, str] = {
    100: "Max rate of messages per second has been exceeded",
    101: "Max number of tickers has been reached",
    162: "Historical Market Data Service error message:HMDS query returned no data",
    200: "No security definition has been found for the request",
    201: "Order rejected - reason:the feedrunner TWS simulator is market-data only",
    300: "Can't find EId with tickerId:",
    320: "Server error when reading an API client request.",
    321: "Error validating request.-'bT' : cause - Invalid tick type",
    322: "Error processing request.-'bL' : cause - Duplicate ticker id",
    326: "Unable to connect as the client id is already in use. Retry with a unique client id.",
    354: "Requested market data is not subscribed.",
    1100: "Connectivity between IB and Trader Workstation has been lost.",
    1101: "Connectivity between IB and Trader Workstation has been restored - data lost.",
    1102: "Connectivity between IB and Trader Workstation has been restored - data maintained.",
    2103: "Market data farm connection is broken:usfarm",
    2104: "Market data farm connection is OK:usfarm",
    2106: "HMDS data farm connection is OK:ushmds",
    2158: "Sec-def data farm connection is OK:secdefnj",
    10190: "Max number of tick-by-tick requests has been reached.",
    10197: "No market data during competing live session",
}


def fmt(value: object) -> str:
    """One field as TWS writes it: bools as 1/0 and None as empty, which str() would get wrong."""
    if value is None:
        return ""
    if value is True:
        return "1"
    if value is False:
        return "0"
    return str(value)


def frame(*fields: object) -> bytes:
    payload = "".join(fmt(f) + "\0" for f in fields).encode()
    return LEN.pack(len(payload)) + payload


def tick_frame(head: str, req_id: int, rest: str) -> bytes:
    """Hot path: `head` is "<msgId>\\0<version>\\0" and `rest` the NUL-terminated fields after reqId."""
    payload = f"{head}{req_id}\0{rest}".encode()
    return LEN.pack(len(payload)) + payload
