"""A real redis-server with an append-only file, for the Redis sink's tests.

Every write is fsynced before it is acknowledged (appendfsync always) and the directory outlives stop()
and kill(), so restart() on the same port finds every entry acknowledged before, as a deployed server
would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import redis
import servers
from redis.asyncio import Redis

BINARY = "/usr/bin/redis-server"

Entry = tuple[bytes, dict[bytes, bytes]]  # (stream entry id, fields)


def binary() -> str:
    found = BINARY if os.access(BINARY, os.X_OK) else shutil.which("redis-server")
    if found is None:
        servers.unavailable("redis-server is not installed (Debian package redis-server)")
    assert found is not None
    return found


class RedisServer(servers.ServerProcess):
    """One redis-server process on 127.0.0.1; start() returns once it answers PING."""

    def __init__(self, password: str | None = None) -> None:
        self.binary = binary()
        self.port = servers.free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="feedrunner-redis-")
        self.log = os.path.join(self.dir, "server.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir, "--logfile", self.log]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: see {self.log}")
            if self._answers():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING on {self.port} within {timeout}s")

    def _answers(self) -> bool:
        client = redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        try:
            return bool(client.ping())
        except redis.RedisError:  # refused while starting, LOADING while it reads the append-only file
            return False
        finally:
            client.close()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers, as behind a dead link."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """The same port and directory: the append-only file brings back every acknowledged entry."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.thaw()
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self) -> Redis:
        return Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)


async def read_stream(server: RedisServer, key: str | bytes, page: int = 10_000) -> list[Entry]:
    """Every entry of a stream, oldest first (XRANGE page by page); [] when the key does not exist."""
    client = server.client()
    out: list[Entry] = []
    try:
        start: bytes | str = "-"
        while True:
            got = await client.xrange(key, min=start, max="+", count=page)
            out += got
            if len(got) < page:
                return out
            start = b"(" + got[-1][0]
    finally:
        await client.aclose()
