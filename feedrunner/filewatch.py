"""feeds.yaml read again: has it changed, and is it valid (within a time bound). Shared by the runner and
the supervisor (which must not load the runner: a supervisor that imported SQLAlchemy, APScheduler and
the adapters would hold their memory for nothing)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger

from feedrunner.spec import Spec, check_file

Signature = tuple[int, int, int]
CHECK_TIMEOUT = 30.0  # seconds a reload may take to read and check feeds.yaml


def file_signature(path: str) -> Signature | None:
    """stat() by path, not by open handle: editors that save by writing a new file and renaming it over
    the old one change the inode, which this sees."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # mid-rename: try again next tick
    return st.st_ino, st.st_mtime_ns, st.st_size


async def watch_file(
    path: str, last: Signature | None, changed: Callable[[], Awaitable[Any]], every: float = 0.5
) -> None:
    """Call `changed` whenever the file differs from `last`, its signature taken before the spec was
    read: an edit saved while starting is a change too."""
    while True:
        await asyncio.sleep(every)
        now = file_signature(path)
        if now is not None and now != last:
            await asyncio.sleep(0.2)  # let a burst of writes settle
            last = file_signature(path)
            logger.info("{} changed on disk: reloading", path)
            await changed()


async def recheck(path: str) -> tuple[Spec | None, list[Any]]:
    """The file validated again off the event loop, within CHECK_TIMEOUT (a dead mount blocks a read)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(check_file, path), CHECK_TIMEOUT)
    except TimeoutError:
        return None, [f"{path}: not read within {CHECK_TIMEOUT:g}s"]


def log_rejected(problems: list[Any], what: str) -> None:
    logger.error("reload rejected, {}: {} problem(s)", what, len(problems))
    for p in problems:
        logger.error("  {}", p)
