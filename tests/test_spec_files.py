"""Reading feeds.yaml never blocks: FIFOs, devices, sockets and directories are refused before they are
opened, a file is read up to its size bound only, and a read that gets no answer is given up on."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import spawn

from feedrunner import yamlsource
from feedrunner.cli import EX_CONFIG
from feedrunner.spec import check_file

VALID = "version: 1\nvenues:\n  binance: {adapter: ccxt, exchange: binance, symbols: [BTC/USDT]}\n"
FIFO = "not a regular file (it is a FIFO); give the path of a feeds.yaml file"


def release(fifo: Path) -> None:
    """Unblock any reader stuck in open() on `fifo`, so a failing test leaves no thread behind."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "feeds.yaml"
    os.mkfifo(path)
    yield path
    release(path)


def in_thread(fn, *args, timeout: float = 1.0):
    """Run fn in a thread and return its result, failing if it has not returned within `timeout`."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    worker.start()
    worker.join(timeout)
    assert result, f"{fn.__name__} did not return within {timeout} s"
    return result[0]


def messages(found) -> list[str]:
    return [str(p) for p in found]


def test_check_file_refuses_a_fifo_within_a_second(fifo):
    spec, found = in_thread(check_file, fifo)
    assert spec is None
    assert messages(found) == [f"{fifo}: {FIFO}"]


def test_a_fifo_swapped_in_after_the_stat_cannot_block_open(fifo, tmp_path, monkeypatch):
    """The stat saw a regular file; by the open a FIFO is there: the open must not wait for a writer."""
    regular = tmp_path / "regular.yaml"
    regular.write_text(VALID)
    real_stat = os.stat
    monkeypatch.setattr(yamlsource.os, "stat", lambda path, *a, **kw: real_stat(regular))
    spec, found = in_thread(check_file, fifo)
    assert spec is None
    assert messages(found) == [f"{fifo}: {FIFO}"]


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda tmp: Path("/dev/zero"), "a character device"),  # would read forever
        (lambda tmp: tmp, "a directory"),
    ],
)
def test_other_non_regular_files_are_refused(tmp_path, make, kind):
    path = make(tmp_path)
    assert messages(in_thread(check_file, path)[1]) == [
        f"{path}: not a regular file (it is {kind}); give the path of a feeds.yaml file"
    ]


def test_a_unix_socket_is_refused(tmp_path):
    path = tmp_path / "feeds.yaml"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        assert messages(in_thread(check_file, path)[1]) == [
            f"{path}: not a regular file (it is a socket); give the path of a feeds.yaml file"
        ]


def test_a_path_that_cannot_exist_is_a_problem_at_once():
    assert messages(in_thread(check_file, "feeds\0.yaml")[1]) == ["feeds\0.yaml: cannot read: not a valid path"]


def test_symlinks_are_judged_by_what_they_name(fifo, tmp_path):
    """How Kubernetes mounts a ConfigMap: feeds.yaml is a link; a link to a FIFO is still a FIFO."""
    to_fifo = tmp_path / "to-fifo.yaml"
    to_fifo.symlink_to(fifo)
    assert messages(in_thread(check_file, to_fifo)[1]) == [f"{to_fifo}: {FIFO}"]
    target = tmp_path / "real.yaml"
    target.write_text(VALID)
    to_file = tmp_path / "to-file.yaml"
    to_file.symlink_to(target)
    spec, found = check_file(to_file)
    assert found == [] and spec is not None


def test_an_oversized_file_gives_its_real_size_without_being_read(tmp_path):
    big = tmp_path / "feeds.yaml"
    with big.open("wb") as fh:
        fh.truncate(9 * 1024 * 1024 + 5)  # sparse: nothing to read, only its size to see
    assert messages(check_file(big)[1]) == [f"{big}: file is 9.0 MiB (9,437,189 bytes); a spec may be at most 8 MiB"]


def test_a_read_that_never_answers_is_given_up(tmp_path, monkeypatch):
    """A stat or read on a stalled network file system blocks in the kernel; stand in for it with a read
    that waits on an event, and see the caller answered within its bound while the read is still stuck."""
    path = tmp_path / "feeds.yaml"
    path.write_text(VALID)
    stuck = threading.Event()
    monkeypatch.setattr(yamlsource.os, "read", lambda fd, n: stuck.wait(30) and b"")
    try:
        started = time.monotonic()
        data, found = yamlsource.read(str(path), timeout=0.2)
        took = time.monotonic() - started
    finally:
        stuck.set()
    assert data is None and took < 1.0
    assert messages(found) == [f"{path}: cannot read: no answer within 0.2 s (a stalled file system?)"]


@pytest.mark.parametrize("command", [["validate"], ["validate", "--format", "json"], ["run"]])
def test_cli_on_a_fifo_exits_78_at_once(fifo, command):
    """The console entry point as a subprocess: exit 78 promptly, the problem named, no traceback."""
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "feedrunner.cli", *command, str(fifo)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"feedrunner {command[0]} on a FIFO did not exit within 30 s")
    assert proc.returncode == EX_CONFIG
    assert time.monotonic() - started < 15  # a cold start imports ccxt; a blocked open() never returns
    out = proc.stdout + proc.stderr
    if "json" in command:
        assert json.loads(proc.stdout)["problems"][0]["message"] == FIFO
    else:
        assert f"{fifo}: {FIFO}" in out
    assert "Traceback" not in out


RUN = """\
version: 1
environment: simulator
simulator: {seed: 3, rate: 20}
venues:
  binance: {adapter: ccxt, exchange: binance, channels: [trades], symbols: [BTC/USDT]}
sinks: [{type: jsonl, path: "out/{venue}.jsonl", flush_interval: 100ms}]
logging: {level: INFO, format: json}
server: {listen: "127.0.0.1:0"}
state: {url: "sqlite:///state.db"}
"""


def test_reload_of_feeds_yaml_replaced_by_a_fifo_is_rejected(tmp_path):
    """SIGHUP and POST /reload: the runner keeps its config, says why, counts it, and still stops."""
    feeds = tmp_path / "feeds.yaml"
    feeds.write_text(RUN)
    proc = spawn(tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()

    def logged(text: str) -> list[str]:
        records = [json.loads(line)["record"]["message"] for line in list(lines) if line.startswith("{")]
        return [m for m in records if text in m]

    def wait_for(text: str, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while not logged(text) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert logged(text), f"no log line with {text!r} within {seconds} s"
        return logged(text)[0]

    try:
        wait_for("runner started", 30)
        base = re.search(r"http://[\d.]+:\d+", wait_for("control server on", 5))[0]
        feeds.unlink()
        os.mkfifo(feeds)
        proc.send_signal(signal.SIGHUP)
        wait_for(FIFO, 5)  # a reload blocked in open() logs nothing, ever
        assert logged("reload rejected, the running config stays")
        request = urllib.request.Request(f"{base}/reload", method="POST", headers={"X-Feedrunner": "1"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=10)
        assert answer.value.code == 422
        assert json.loads(answer.value.read())["problems"] == [f"feeds.yaml: {FIFO}"]  # the path it was run with
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'feedrunner_config_reloads_total{result="invalid"} 2.0' in metrics
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        release(feeds)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        reader.join(timeout=10)
    assert proc.returncode == 0
    assert not any("Traceback" in line for line in lines)
