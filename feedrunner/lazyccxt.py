"""ccxt with only the exchanges a runner uses: `from feedrunner.lazyccxt import ccxt`.

ccxt's three package modules (`ccxt`, `ccxt.async_support`, `ccxt.pro`) import every exchange class
they list, over a hundred of each: about 110 MB of RSS and 3 s of start-up, to run one or two venues.
Here each package is a module that knows the same names from the `from X import Y` lines of ccxt's own
`__init__.py` and imports one on first use, so `ccxt.pro.binance` loads binance alone. The objects
are ccxt's own: `ccxt.pro.binance` is the class ccxt's package would give. When ccxt was already
imported the ordinary way, or its package files are not the shape this expects, ccxt is used as is.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import sys
import types
from typing import Any

PACKAGES = ("ccxt", "ccxt.async_support", "ccxt.pro")


class LazyPackage(types.ModuleType):
    """A package whose names resolve on first use to what its `__init__.py` would have bound."""

    def __init__(self, name: str, origin: str, path: list[str], names: dict[str, tuple[str, str]]) -> None:
        super().__init__(name)
        self.__file__ = origin
        self.__path__ = path
        self.__dict__["_names"] = names

    def __getattr__(self, attr: str) -> Any:
        where = self.__dict__["_names"].get(attr)
        if where is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")
        value = getattr(importlib.import_module(where[0]), where[1])
        self.__dict__[attr] = value
        return value

    def __setattr__(self, attr: str, value: Any) -> None:
        # Importing ccxt.pro.binance binds the submodule as ccxt.pro.binance; ccxt's __init__ rebinds the
        # name to the class right after, and so must this, or `ccxt.pro.binance(...)` would call a module.
        if isinstance(value, types.ModuleType) and attr in self.__dict__["_names"]:
            module, name = self.__dict__["_names"][attr]
            if f"{module}.{name}" != value.__name__:
                return
        super().__setattr__(attr, value)


def _lazy(name: str, parent: LazyPackage | None) -> LazyPackage | None:
    # PathFinder, not importlib.util.find_spec: that would import the parent package, all of it.
    spec = importlib.machinery.PathFinder.find_spec(name.rpartition(".")[2], parent.__path__ if parent else None)
    if spec is None or spec.origin is None or spec.submodule_search_locations is None:
        return None
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names: dict[str, tuple[str, str]] = {}
    literals: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                literals[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    if not isinstance(literals.get("exchanges"), list) or "__version__" not in literals:
        return None
    module = LazyPackage(name, spec.origin, list(spec.submodule_search_locations), names)
    module.__spec__ = spec
    module.__dict__.update(literals)
    return module


def _install() -> None:
    if any(p in sys.modules for p in PACKAGES):
        return
    root = _lazy("ccxt", None)
    packages = [root] + [_lazy(p, root) for p in PACKAGES[1:]] if root else [None]
    if any(p is None for p in packages):
        return
    for package in packages:
        sys.modules[package.__name__] = package  # type: ignore[union-attr]
    root.__dict__["async_support"] = packages[1]  # type: ignore[union-attr]
    root.__dict__["pro"] = packages[2]  # type: ignore[union-attr]


_install()

import ccxt  # noqa: E402
import ccxt.pro  # noqa: E402

__all__ = ["ccxt"]
