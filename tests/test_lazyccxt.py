"""feedrunner.lazyccxt gives ccxt's own objects, loading only the exchanges asked for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)


def _python(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


NAMES = """
import json, sys, types
def describe(v):
    if isinstance(v, types.ModuleType):
        return v.__name__
    if hasattr(v, "__qualname__"):
        return f"{v.__module__}.{v.__qualname__}"
    return repr(v)
def names(package):
    return {n: describe(getattr(package, n)) for n in dir(package) if not n.startswith("_") and n != "base"}
"""


def test_only_the_exchange_used_is_loaded_and_it_is_ccxts_own_class() -> None:
    got = _python(
        NAMES
        + """
from feedrunner.lazyccxt import ccxt, LazyPackage
ex = ccxt.pro.binance({})
loaded = sorted(m for m in sys.modules if m.count('.') == 1 and m.split('.')[1] in ccxt.exchanges
                or m.startswith(('ccxt.async_support.', 'ccxt.pro.')) and m.split('.')[2] in ccxt.exchanges)
print(json.dumps({
    "lazy": isinstance(ccxt, LazyPackage) and isinstance(ccxt.pro, LazyPackage),
    "class": ccxt.pro.binance is sys.modules['ccxt.pro.binance'].binance,
    "parent": issubclass(ccxt.pro.binance, ccxt.async_support.binance),
    "error": ccxt.NetworkError is sys.modules['ccxt.base.errors'].NetworkError,
    "exchanges": len(ccxt.exchanges), "pro": len(ccxt.pro.exchanges),
    "loaded": loaded,
}))
"""
    )
    assert got["lazy"] and got["class"] and got["parent"] and got["error"]
    assert got["exchanges"] > 50 and 0 < got["pro"] < got["exchanges"]
    assert got["loaded"] == ["ccxt.async_support.binance", "ccxt.pro.binance"]


def test_every_name_resolves_to_what_ccxts_own_packages_bind() -> None:
    code = (
        NAMES
        + """
SETUP
import ccxt.pro, ccxt.async_support
print(json.dumps([names(ccxt), names(ccxt.async_support), names(ccxt.pro)]))
"""
    )
    real = _python(code.replace("SETUP", "import ccxt"))
    lazy = _python(
        code.replace(
            "SETUP",
            "from feedrunner.lazyccxt import ccxt, LazyPackage\n"
            "for p in (ccxt, ccxt.async_support, ccxt.pro):\n"
            "    [getattr(p, n) for n in p.__dict__['_names']]",
        )
    )
    for got, want in zip(lazy, real, strict=True):
        assert {k: v for k, v in got.items() if k in want} == want
        assert set(want) <= set(got)


def test_ccxt_imported_the_ordinary_way_is_used_as_it_is() -> None:
    got = _python(
        "import json, ccxt\nfrom feedrunner.lazyccxt import ccxt as c, LazyPackage\n"
        "print(json.dumps({'lazy': isinstance(c, LazyPackage), 'same': c is ccxt}))"
    )
    assert got == {"lazy": False, "same": True}
