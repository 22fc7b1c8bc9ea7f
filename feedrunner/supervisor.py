"""`feedrunner run --workers N`: N worker processes on this host, each a runner serving its own shard of
the symbols, kept running and stopped together, behind one control address.

- Worker i of W on host shard (h, H) runs `feedrunner run FILE --shard h*W+i/H*W`: shard indexes are
  global, so W workers on each of H hosts split the deployment H*W ways (feedrunner.sharding).
- A worker serves its control API on 127.0.0.1 at a port of its choosing and, once started, writes
  {pid, port, shard} to an announce file in a directory only this user can read; the supervisor reaches
  it there (feedrunner.controlapi.SupervisorApi merges what the workers answer).
- A worker that exits unasked is restarted with backoff, reset once it has run for reset_after; after
  max_attempts exits in a row without that, the supervisor stops every worker and exits non-zero.
- SIGTERM/SIGINT: every worker gets SIGTERM and shutdown.deadline + 5 s to drain, then SIGKILL.
  SIGHUP goes to every started worker (sinks reopen their files, feeds.yaml reloads).
- Workers die with the supervisor, even one killed with -9 (PR_SET_PDEATHSIG on Linux).
- /metrics scrapes every worker's and labels each sample with its worker, rather than using
  prometheus-client's multiprocess mode: that mode sums the processes into one series (which worker is
  slow or down is lost), needs a shared mmap directory cleaned between runs, and cannot carry custom
  collectors or the gauges a runner sets at each scrape (see feedrunner.controlapi).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Gauge

from feedrunner.control import ControlServer
from feedrunner.controlapi import SupervisorApi
from feedrunner.filewatch import recheck, watch_file
from feedrunner.logsetup import configure_logging
from feedrunner.plan import RESTART_FIELDS
from feedrunner.resilience import BackoffTimer
from feedrunner.spec import Backoff, Shard, Spec

EX_SOFTWARE = 70
EX_UNAVAILABLE = 69
EXIT_GRACE = 5.0  # seconds past shutdown.deadline before a worker still draining is killed
ANNOUNCE_POLL = 0.1  # seconds between looks for a starting worker's announce file
PR_SET_PDEATHSIG = 1  # linux/prctl.h
EXIT_MEANING = {78: "invalid configuration", 69: "a service it needs is unavailable (a shard lock still held?)"}


def worker_shards(shard: Shard, workers: int) -> list[int]:
    """The global shard index of each worker of this host: worker i of W on host shard (h, H) is h*W + i."""
    return [shard.index * workers + i for i in range(workers)]


@dataclass
class Worker:
    index: int  # on this host
    shard: int  # global
    total: int
    announce: Path
    backoff: BackoffTimer
    proc: asyncio.subprocess.Process | None = None
    port: int | None = None  # known once the worker announced itself
    restarts: int = 0
    history: list[int] = field(default_factory=list)  # exit codes, oldest first
    final: int | None = None  # the exit code when stopped

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def up(self) -> bool:
        """Started (announced) and not exited."""
        return self.running and self.port is not None


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn: the kernel sends the worker SIGTERM when the supervisor dies, even by kill -9, so no
    worker outlives it holding its shard's lock and ports. The death signal follows the thread that forked,
    which is the supervisor's main thread (asyncio spawns from the loop's thread), alive as long as the
    process. libc is loaded here, in the parent: loading a library between fork and exec is unsafe."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl took effect: nobody would tell us
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    meaning = EXIT_MEANING.get(code)
    return f"exited with code {code}" + (f" ({meaning})" if meaning else "")


class Supervisor:
    def __init__(
        self,
        file: str,
        spec: Spec,
        watch: bool = False,
        read_from: tuple[int, int, int] | None = None,
        backoff: Backoff | None = None,
        command: Callable[[Worker], list[str]] | None = None,
    ) -> None:
        self.file = file
        self.spec = spec
        self.watch = watch
        self.read_from = read_from
        self.backoff = backoff or Backoff()
        self.command = command or self.worker_command
        self.workers: list[Worker] = []
        self.stopping = False
        self.failure: int | None = None  # the exit code when a worker could not be kept running
        self.control: ControlServer | None = None
        self._stop = asyncio.Event()
        self._preexec = _die_with_parent()
        self._refreshing: asyncio.Future[None] | None = None
        self.registry = CollectorRegistry()
        Gauge("feedrunner_workers", "Worker processes configured on this host.", registry=self.registry).set(
            spec.workers
        )
        self.up_gauge = Gauge(
            "feedrunner_worker_up", "1 while the worker runs and has started.", ["worker"], registry=self.registry
        )
        self.restart_counter = Counter(
            "feedrunner_worker_restarts",
            "Workers started again after an exit nobody asked for.",
            ["worker"],
            registry=self.registry,
        )

    def worker_command(self, w: Worker) -> list[str]:
        argv = [sys.executable, "-m", "feedrunner", "run", self.file, "--shard", f"{w.shard}/{w.total}"]
        argv += ["--worker-announce", str(w.announce)]
        return argv + (["--watch"] if self.watch else [])

    # -- lifecycle -----------------------------------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self.hangup)
        private = Path(tempfile.mkdtemp(prefix="feedrunner-workers-"))  # mode 0700
        total = self.spec.shard.count * self.spec.workers
        for i, g in enumerate(worker_shards(self.spec.shard, self.spec.workers)):
            w = Worker(i, g, total, private / f"worker-{i}.json", BackoffTimer(self.backoff))
            self.workers.append(w)
            self.up_gauge.labels(str(i)).set(0)
            self.restart_counter.labels(str(i))
        api = SupervisorApi(self)
        keepers: list[asyncio.Task[None]] = []
        watcher = None
        try:
            if self.spec.server.enabled:
                self.control = ControlServer(api)
                try:
                    await self.control.start()  # before any worker: a port in use stops here, nothing started
                except OSError as exc:
                    logger.error("cannot start: {}", exc)
                    return EX_UNAVAILABLE
            logger.info(
                "supervisor: {} workers, shards {}/{}",
                len(self.workers),
                ",".join(str(w.shard) for w in self.workers),
                total,
            )
            keepers = [asyncio.create_task(self._keep(w), name=f"worker-{w.index}") for w in self.workers]
            if self.watch:
                watcher = asyncio.create_task(watch_file(self.file, self.read_from, self.refresh_spec), name="watch")
            await self._stop.wait()
            return await self._stop_workers(keepers)
        finally:
            for task in (*keepers, watcher):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if self.control is not None:
                await self.control.stop()
            await api.close()
            shutil.rmtree(private, ignore_errors=True)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _on_stop_signal(self) -> None:
        if not self.stopping:
            logger.info("signal received: stopping {} workers", sum(w.running for w in self.workers))
        self.request_stop()

    def request_stop(self) -> None:
        self.stopping = True
        self._stop.set()

    def hangup(self) -> None:
        """Every started worker reopens its files and reloads; one still starting reads the file anyway."""
        if self.stopping:
            return
        for w in self.workers:
            if w.up:
                self._signal(w, signal.SIGHUP)
        self._refreshing = asyncio.ensure_future(self.refresh_spec())

    async def refresh_spec(self) -> None:
        """The supervisor's own view of feeds.yaml (its /config) follows what the workers reload; settings
        that need a restart keep their running values, as in a runner."""
        spec, _ = await recheck(self.file)
        if spec is not None:
            self.adopt(spec)

    def adopt(self, spec: Spec) -> None:
        self.spec = dataclasses.replace(spec, **{k: getattr(self.spec, k) for k in RESTART_FIELDS})

    async def _keep(self, w: Worker) -> None:
        """Run one worker until stopped: restart it with backoff whenever it exits unasked."""
        try:
            while not self.stopping:
                code = await self._run_once(w)
                if self.stopping:
                    w.final = code
                    return
                w.history.append(code)
                w.backoff.tick()  # ran healthy for reset_after: the count starts over
                started = "" if w.port is not None else " before it started"
                logger.error("worker {} (pid {}) {}{}", w.index, w.pid, describe_exit(code), started)
                if w.backoff.exhausted:
                    logger.error(
                        "worker {}: {} exits in a row; giving up and stopping every worker", w.index, w.backoff.attempts
                    )
                    self.failure = code if code > 0 else EX_SOFTWARE
                    self.request_stop()
                    return
                delay = w.backoff.next_delay()
                logger.warning("worker {}: restarting in {:.1f}s (attempt {})", w.index, delay, w.backoff.attempts)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self.stopping:
                    return
                w.restarts += 1
                self.restart_counter.labels(str(w.index)).inc()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("worker {}: supervising it failed; stopping every worker", w.index)
            self.failure = EX_SOFTWARE
            self.request_stop()

    async def _run_once(self, w: Worker) -> int:
        """Start the worker and wait for its exit code, noting its announce file on the way."""
        w.port = None
        w.announce.unlink(missing_ok=True)
        try:
            w.proc = await asyncio.create_subprocess_exec(
                *self.command(w), stdin=asyncio.subprocess.DEVNULL, preexec_fn=self._preexec
            )
        except OSError as exc:
            logger.error("worker {}: cannot start: {}", w.index, exc)
            return EX_SOFTWARE
        logger.info("worker {} (shard {}/{}) starting: pid {}", w.index, w.shard, w.total, w.pid)
        if self.stopping:  # asked to stop while it was being spawned
            self._signal(w, signal.SIGTERM)
        exited = asyncio.ensure_future(w.proc.wait())
        while w.port is None and not exited.done():
            await asyncio.wait({exited}, timeout=ANNOUNCE_POLL)
            self._read_announce(w)
        code = await exited
        self.up_gauge.labels(str(w.index)).set(0)
        return code

    def _read_announce(self, w: Worker) -> None:
        try:
            data = json.loads(w.announce.read_text())
        except (OSError, ValueError):
            return  # not there yet
        if data.get("pid") != w.pid or not isinstance(data.get("port"), int):
            return
        w.port = data["port"]
        w.backoff.connected()
        self.up_gauge.labels(str(w.index)).set(1)
        logger.info("worker {} (pid {}) started; control on 127.0.0.1:{}", w.index, w.pid, w.port)

    def _signal(self, w: Worker, sig: int) -> None:
        if w.running:
            assert w.proc is not None
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(sig)

    async def _stop_workers(self, keepers: list[asyncio.Task[None]]) -> int:
        """SIGTERM to every worker, shutdown.deadline + 5 s to drain, SIGKILL for what is left. 0 when
        every worker stopped cleanly: exit 0, or SIGTERM before it had started (nothing to drain)."""
        for w in self.workers:
            self._signal(w, signal.SIGTERM)
        wait = self.spec.shutdown_deadline + EXIT_GRACE
        _, late = await asyncio.wait(keepers, timeout=wait) if keepers else (set(), set())
        if late:
            for w in self.workers:
                if w.running:
                    logger.error(
                        "worker {} (pid {}) still running {:g}s after SIGTERM: killing it", w.index, w.pid, wait
                    )
                    self._signal(w, signal.SIGKILL)
            await asyncio.wait(late)
        failed = []
        for w in self.workers:
            if w.final is None:
                continue
            clean = w.final == 0 or (w.final == -signal.SIGTERM and w.port is None)
            (logger.info if clean else logger.error)("worker {} (pid {}) {}", w.index, w.pid, describe_exit(w.final))
            if not clean:
                failed.append(w.final)
        if self.failure is not None:
            return self.failure
        if failed:
            return next((c for c in failed if c > 0), EX_SOFTWARE)
        logger.info("supervisor stopped: every worker exited cleanly")
        return 0


def run(file: str, spec: Spec, watch: bool = False, read_from: tuple[int, int, int] | None = None) -> int:
    configure_logging(spec)
    return asyncio.run(Supervisor(file, spec, watch, read_from).serve())
