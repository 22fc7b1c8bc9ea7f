"""Has feeds.yaml changed? Shared by the runner and the supervisor (which must not load the runner: a
supervisor that imported SQLAlchemy, APScheduler and the adapters would hold their memory for nothing)."""

from __future__ import annotations

import os


def file_signature(path: str) -> tuple[int, int, int] | None:
    """stat() by path, not by open handle: editors that save by writing a new file and renaming it over
    the old one change the inode, which this sees."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # mid-rename: try again next tick
    return st.st_ino, st.st_mtime_ns, st.st_size
