"""futu-api's own generated protobuf modules, loaded without executing `futu/__init__.py`.

Importing the `futu` package pulls in pandas, opens a log file under $HOME and replaces the SIGINT
handler with one that calls `os._exit(0)`; a simulator should do none of that, yet it must speak exactly
the schema the installed client parses. The generated `*_pb2` files import one another as top-level
modules (futu appends their folder to `sys.path` itself), so they are loaded the same way here. If the
client is imported into the same process, before or after, the descriptor pool accepts the identical
files again and both sides share one set of message classes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

_MODULES = (
    "Common_pb2",
    "Qot_Common_pb2",
    "InitConnect_pb2",
    "KeepAlive_pb2",
    "GetGlobalState_pb2",
    "Notify_pb2",
    "Qot_Sub_pb2",
    "Qot_RegQotPush_pb2",
    "Qot_GetSubInfo_pb2",
    "Qot_GetBasicQot_pb2",
    "Qot_UpdateBasicQot_pb2",
    "Qot_GetTicker_pb2",
    "Qot_UpdateTicker_pb2",
    "Qot_GetOrderBook_pb2",
    "Qot_UpdateOrderBook_pb2",
    "Qot_GetSecuritySnapshot_pb2",
)


def _pb_dir() -> str:
    spec = importlib.util.find_spec("futu")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("futu-api is not installed; the OpenD simulator uses its protobuf modules")
    return os.path.join(next(iter(spec.submodule_search_locations)), "common", "pb")


def _load(name: str) -> ModuleType:
    full = f"futu.common.pb.{name}"
    if full in sys.modules:
        return sys.modules[full]
    if "futu.common.pb" in sys.modules:  # the client is already loaded: reuse its modules
        return importlib.import_module(full)
    folder = _pb_dir()
    if folder not in sys.path:
        sys.path.append(folder)
    return importlib.import_module(name)


_loaded = {name: _load(name) for name in _MODULES}

# Untyped generated code: expose the modules as Any so attribute access type-checks.
Common: Any = _loaded["Common_pb2"]
QotCommon: Any = _loaded["Qot_Common_pb2"]
InitConnect: Any = _loaded["InitConnect_pb2"]
KeepAlive: Any = _loaded["KeepAlive_pb2"]
GetGlobalState: Any = _loaded["GetGlobalState_pb2"]
Notify: Any = _loaded["Notify_pb2"]
QotSub: Any = _loaded["Qot_Sub_pb2"]
QotRegQotPush: Any = _loaded["Qot_RegQotPush_pb2"]
QotGetSubInfo: Any = _loaded["Qot_GetSubInfo_pb2"]
QotGetBasicQot: Any = _loaded["Qot_GetBasicQot_pb2"]
QotUpdateBasicQot: Any = _loaded["Qot_UpdateBasicQot_pb2"]
QotGetTicker: Any = _loaded["Qot_GetTicker_pb2"]
QotUpdateTicker: Any = _loaded["Qot_UpdateTicker_pb2"]
QotGetOrderBook: Any = _loaded["Qot_GetOrderBook_pb2"]
QotUpdateOrderBook: Any = _loaded["Qot_UpdateOrderBook_pb2"]
QotGetSecuritySnapshot: Any = _loaded["Qot_GetSecuritySnapshot_pb2"]
