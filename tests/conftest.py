"""Session-wide fixtures: real servers shared by every test that needs one (see servers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import servers


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    yield from servers.postgres()
