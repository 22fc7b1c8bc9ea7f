"""The securities the simulator knows: Futu's "MARKET.CODE" strings with names, lot sizes and prices.

OpenD rejects codes it does not know, so the catalogue is closed; it is extended per simulator through
the constructor (`codes=[...]`) or `OpenDSim.add_security`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# Qot_Common.QotMarket for each prefix futu-api accepts on stock codes.
MARKETS: dict[str, int] = {
    "HK": 1,
    "US": 11,
    "SH": 21,
    "SZ": 22,
    "SG": 31,
    "JP": 41,
    "AU": 51,
    "MY": 61,
    "CA": 71,
}
MARKET_PREFIX: dict[int, str] = {v: k for k, v in MARKETS.items()} | {2: "HK"}  # 2 = deprecated HK_Future

# Local exchange time, since OpenD stamps quotes in the market's own clock.
_ZONES = {
    "HK": ("Asia/Hong_Kong", 8),
    "US": ("America/New_York", -5),
    "SH": ("Asia/Shanghai", 8),
    "SZ": ("Asia/Shanghai", 8),
    "SG": ("Asia/Singapore", 8),
    "JP": ("Asia/Tokyo", 9),
    "AU": ("Australia/Sydney", 10),
    "MY": ("Asia/Kuala_Lumpur", 8),
    "CA": ("America/Toronto", -5),
}


def market_tz(prefix: str) -> tzinfo:
    name, hours = _ZONES.get(prefix, ("UTC", 0))
    try:
        return ZoneInfo(name)
    except ZoneInfoNotFoundError:  # no tz database on this machine: a fixed offset is close enough
        return timezone(timedelta(hours=hours))


@dataclass(frozen=True, slots=True)
class Security:
    code: str  # "HK.00700"
    name: str
    lot_size: int
    price: float  # previous close; the random walk starts here
    list_time: str = "2000-01-01"
    sec_type: int = 3  # Qot_Common.SecurityType_Eqty

    @property
    def prefix(self) -> str:
        return self.code.split(".", 1)[0]

    @property
    def market(self) -> int:
        return MARKETS[self.prefix]

    @property
    def symbol(self) -> str:
        return self.code.split(".", 1)[1]


DEFAULT_SECURITIES: tuple[Security, ...] = (
    Security("HK.00700", "TENCENT", 100, 380.0, "2004-06-16"),
    Security("HK.09988", "BABA-W", 100, 80.0, "2019-11-26"),
    Security("HK.03690", "MEITUAN-W", 100, 120.0, "2018-09-20"),
    Security("HK.00005", "HSBC HOLDINGS", 400, 65.0, "1991-07-29"),
    Security("US.AAPL", "Apple", 1, 190.0, "1980-12-12"),
    Security("US.TSLA", "Tesla", 1, 250.0, "2010-06-29"),
    Security("US.MSFT", "Microsoft", 1, 410.0, "1986-03-13"),
    Security("US.NVDA", "NVIDIA", 1, 120.0, "1999-01-22"),
    Security("SH.600519", "Kweichow Moutai", 100, 1700.0, "2001-08-27"),
    Security("SZ.000001", "Ping An Bank", 100, 11.0, "1991-04-03"),
)


def split_code(code: str) -> tuple[str, str]:
    """("HK", "00700") from "HK.00700", splitting at the first dot as futu-api does ("US..DJI")."""
    prefix, dot, symbol = code.partition(".")
    if not dot or not symbol or prefix not in MARKETS:
        raise ValueError(f"bad Futu code {code!r}: expected MARKET.CODE with MARKET in {sorted(MARKETS)}")
    return prefix, symbol


def make_security(code: str) -> Security:
    """A plausible entry for a code outside the built-in list, stable across runs."""
    prefix, symbol = split_code(code)
    lot = 1 if prefix in ("US", "CA") else 100
    price = 5.0 + (zlib.crc32(code.encode()) % 40000) / 100.0
    return Security(code, symbol, lot, price)


def join_code(market: int, symbol: str) -> str:
    return f"{MARKET_PREFIX.get(market, str(market))}.{symbol}"


@lru_cache(maxsize=64)
def _local_second(prefix: str, second: int) -> str:
    return datetime.fromtimestamp(second, UTC).astimezone(market_tz(prefix)).strftime("%Y-%m-%d %H:%M:%S")


def local_time(prefix: str, ts_ms: int, *, millis: bool = False) -> str:
    """OpenD's time strings, in the exchange's clock; cached per second since every push needs one."""
    text = _local_second(prefix, ts_ms // 1000)
    return f"{text}.{ts_ms % 1000:03d}" if millis else text
