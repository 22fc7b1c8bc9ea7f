"""A real nats-server with JetStream on file storage, for the NATS sink's tests.

The store directory outlives stop() and kill(), so restart() on the same port finds the streams and the
messages acknowledged before, as a deployed server would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nats
import servers
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

BINARY = "/usr/sbin/nats-server"


def binary() -> str:
    found = BINARY if os.access(BINARY, os.X_OK) else shutil.which("nats-server")
    if found is None:
        servers.unavailable("nats-server is not installed (Debian package nats-server)")
    assert found is not None
    return found


class NatsServer(servers.ServerProcess):
    """One nats-server process on 127.0.0.1; start() returns once the port accepts connections."""

    def __init__(self, user: str | None = None, password: str | None = None) -> None:
        self.binary = binary()
        self.port = servers.free_port()
        self.user, self.password = user, password
        self.root = tempfile.mkdtemp(prefix="feedrunner-nats-")
        self.store = os.path.join(self.root, "store")
        self.log = os.path.join(self.root, "server.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        cmd = [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.store, "-l", self.log]
        if self.user is not None:
            cmd += ["--user", self.user, "--pass", self.password or ""]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: see {self.log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"nats-server did not listen on {self.port} within {timeout}s")

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers, as with a hung server or a lost route.
        Returns once every thread has stopped, so nothing sent afterwards can be answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self.proc.pid}/task")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            states = [_state(t) for t in tasks.iterdir()]
            if all(s in ("T", "t", "") for s in states):
                return
            time.sleep(0.01)
        raise RuntimeError("nats-server did not stop on SIGSTOP")

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """The same port and store directory; the port may linger briefly after a kill."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.kill()  # SIGKILL ends a stopped process too
        shutil.rmtree(self.root, ignore_errors=True)


def _state(task: Path) -> str:
    """A thread's state letter from /proc (T when stopped), or "" once it has gone."""
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@dataclass(frozen=True, slots=True)
class Stored:
    subject: str
    data: bytes
    headers: dict[str, str]
    seq: int


async def read_stream(
    url: str,
    stream: str,
    count: int | None = None,
    timeout: float = 10.0,
    user: str | None = None,
    password: str | None = None,
) -> list[Stored]:
    """The messages of `stream` from the first, in stream order, headers included.

    Reads `count` messages, or by default as many as the stream holds now; stops at the deadline
    either way, so asking for more than is there returns what is there, late.
    """
    nc = await nats.connect(url, user=user, password=password, allow_reconnect=False, connect_timeout=2)
    out: list[Stored] = []
    try:
        js = nc.jetstream()
        if count is None:
            count = (await js.stream_info(stream)).state.messages
        sub = await js.pull_subscribe(
            "", stream=stream, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE)
        )
        deadline = time.monotonic() + timeout
        while len(out) < count and (left := deadline - time.monotonic()) > 0:
            try:
                msgs = await sub.fetch(min(count - len(out), 1000), timeout=min(left, 1.0))
            except (TimeoutError, NatsTimeoutError):
                continue
            out += [Stored(m.subject, m.data, dict(m.headers or {}), m.metadata.sequence.stream) for m in msgs]
        await sub.unsubscribe()
    finally:
        await nc.close()
    return out
