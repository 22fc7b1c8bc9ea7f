"""The event loop `feedrunner run` runs on: uvloop where it is installed, asyncio's own loop otherwise.

uvloop does the loop's bookkeeping (callbacks, timers, socket readiness) in C; the thread bridges
(futu-api's callbacks, executor jobs) reach it through call_soon_threadsafe, which both loops provide.
"""

from __future__ import annotations

import asyncio
import importlib.util


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def new_loop(choice: str = "auto") -> tuple[asyncio.AbstractEventLoop, str]:
    """A new loop for `choice` (auto, uvloop or asyncio), and the name of what it is."""
    if choice == "uvloop" or (choice == "auto" and uvloop_available()):
        import uvloop

        return uvloop.new_event_loop(), f"uvloop {uvloop.__version__}"
    return asyncio.new_event_loop(), "asyncio"
