"""Shared fixtures: real servers for every test that needs one (see servers.py), and our log as records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import servers
from loguru import logger


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    yield from servers.postgres()


@pytest.fixture
def lines() -> Iterator[list[dict[str, Any]]]:
    """Our log as JSON records (as `logging.format: json` writes them)."""
    records: list[dict[str, Any]] = []
    sink = logger.add(lambda m: records.append(json.loads(m)["record"]), serialize=True, level="DEBUG")
    yield records
    logger.remove(sink)
