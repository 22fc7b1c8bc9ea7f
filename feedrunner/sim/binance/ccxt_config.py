"""The ccxt configuration that points a binance client at a simulator (or any Binance-shaped host).

Kept here, next to the simulator, because the URL shapes are exactly what the simulator must serve:
REST calls go to urls.api.public + "/<path>", websockets to urls.api.ws.spot + "/<stream index>".
"""

from __future__ import annotations

from typing import Any

# ccxt's REST url keys; non-spot ones are pointed at the sim too so a stray call fails locally (404)
# instead of leaving the machine.
_REST_PATHS = {
    "public": "/api/v3",
    "private": "/api/v3",
    "v1": "/api/v1",
    "sapi": "/sapi/v1",
    "sapiV2": "/sapi/v2",
    "sapiV3": "/sapi/v3",
    "sapiV4": "/sapi/v4",
}


def ccxt_overrides(endpoints: dict[str, str]) -> dict[str, Any]:
    """Config for `ccxt.pro.binance(...)` / `ccxt.async_support.binance(...)` against these base URLs.

    * ws spot url ends in "/stream": ccxt appends "/<n>", and binance.is_spot_url() recognises spot
      connections by the substring "/stream" (the real host is stream.binance.com); on /stream/ the
      server speaks combined payloads, which ccxt unwraps.
    * fetchMarkets types ['spot']: load_markets makes exactly one request (exchangeInfo).
    * fetchCurrencies False: with credentials set it would call sapi capital/config/getall.
    """
    rest = endpoints["rest"].rstrip("/")
    ws = endpoints["ws"].rstrip("/")
    return {
        "urls": {
            "api": {
                **{key: rest + path for key, path in _REST_PATHS.items()},
                "ws": {"spot": ws + "/stream", "margin": ws + "/stream"},
            }
        },
        "options": {
            "defaultType": "spot",
            "fetchMarkets": {"types": ["spot"]},
            "fetchCurrencies": False,
        },
    }
