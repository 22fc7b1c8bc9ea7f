"""The `feedrunner` command: validate | run | schema | alerts | sim | status | rollout | plan.

Exit codes follow sysexits where they exist: 0 ok, 64 usage, 78 EX_CONFIG for an invalid spec (as
Vector does), 69 when a needed service is unavailable. No input ever produces a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from feedrunner.spec import Spec

from feedrunner import __version__

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CONFIG = 78


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="feedrunner", description="Run market-data feeds declared in feeds.yaml.")
    p.add_argument("--version", action="version", version=f"feedrunner {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    v = sub.add_parser("validate", help="check feeds.yaml files; exit 0 if valid, 78 if not")
    v.add_argument("files", nargs="*", default=["feeds.yaml"], metavar="FILE")
    v.add_argument("--format", choices=("text", "json"), default="text")
    v.add_argument("--quiet", "-q", action="store_true", help="print problems only")

    r = sub.add_parser("run", help="run the feeds of FILE (default feeds.yaml)")
    r.add_argument("file", nargs="?", default="feeds.yaml", metavar="FILE")
    r.add_argument("--dry-run", action="store_true", help="validate and print the plan, then exit")
    r.add_argument("--watch", action="store_true", help="reload when FILE changes (also: SIGHUP, POST /reload)")
    r.add_argument(
        "--workers", metavar="N|auto", help="worker processes, each serving a share of the symbols (default: FILE's)"
    )
    r.add_argument(
        "--shard", metavar="INDEX/COUNT", help="this host's share when COUNT hosts run FILE, e.g. 0/3 (default: FILE's)"
    )
    r.add_argument("--worker-announce", metavar="PATH", help=argparse.SUPPRESS)  # a supervisor's worker

    sub.add_parser("schema", help="print the JSON Schema of feeds.yaml")

    a = sub.add_parser("alerts", help="print alerting rules equivalent to FILE's health checks and rollout triggers")
    a.add_argument("file", nargs="?", default="feeds.yaml", metavar="FILE")
    a.add_argument(
        "--prometheus", action="store_true", required=True, help="as a Prometheus rule file (promtool check rules)"
    )

    pl = sub.add_parser("plan", help="what reloading FILE would change in the running runner; exit 0 none, 2 some")
    pl.add_argument("file", nargs="?", default="feeds.yaml", metavar="FILE")
    pl.add_argument("--url", help="control server URL (default: from FILE's server.listen)")
    pl.add_argument("--json", action="store_true")

    for name, text in (
        ("status", "show the running runner: venues, transports, rates, rollout"),
        ("rollout", "show or steer the rollout of the running runner"),
    ):
        c = sub.add_parser(name, help=text)
        if name == "rollout":
            c.add_argument(
                "action",
                nargs="?",
                default="status",
                choices=("status", "promote", "pause", "resume", "abort", "retry"),
            )
            c.add_argument("--full", action="store_true", help="promote: jump to the end of the rollout")
        c.add_argument("--file", "-f", default="feeds.yaml", help="feeds.yaml whose server.listen to talk to")
        c.add_argument("--url", help="control server URL (default: from feeds.yaml server.listen)")
        c.add_argument("--json", action="store_true", help="print the JSON the server returned")

    s = sub.add_parser("sim", help="run a venue simulator standalone (for demos and manual tests)")
    s.add_argument("venue", choices=("binance", "ib", "futu"))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--rate", type=float, default=5.0, help="trades per second per symbol")
    s.add_argument("--symbols", default="BTC/USDT,ETH/USDT,SOL/USDT", help="binance: comma-separated symbols")
    s.add_argument("--tick", type=float, default=0.005, help="binance: seconds between batches of trades")
    s.add_argument(
        "--record-send-times", action="store_true", help="binance: keep each trade's send time, at GET /_sim/sent"
    )
    return p


def _validate(args: argparse.Namespace) -> int:
    from feedrunner.spec import check_file, describe

    results = []
    worst = EX_OK
    for name in args.files:
        spec, problems = check_file(name)
        results.append((name, spec, problems))
        if problems:
            worst = EX_CONFIG
    if args.format == "json":
        out = [
            {"file": name, "valid": not problems, "problems": [p.as_dict() for p in problems]}
            for name, _, problems in results
        ]
        print(json.dumps(out if len(out) > 1 else out[0], indent=2))
        return worst
    for name, spec, problems in results:
        for problem in problems:
            print(problem)
        if spec is not None and not args.quiet:
            print(describe(spec))
        elif problems:
            print(f"{name}: {len(problems)} problem(s)", file=sys.stderr)
    return worst


def _run(args: argparse.Namespace) -> int:
    from feedrunner.filewatch import file_signature
    from feedrunner.sharding import parse_shard
    from feedrunner.spec import check_file, describe, workers_wanted

    try:
        workers = workers_wanted(args.workers, "--workers") if args.workers is not None else None
        shard = parse_shard(args.shard) if args.shard is not None else None
    except ValueError as exc:
        print(f"feedrunner: {exc}", file=sys.stderr)
        return EX_USAGE
    read_from = file_signature(args.file)  # before reading: --watch sees an edit made while starting
    spec, problems = check_file(args.file)
    for problem in problems:
        print(problem, file=sys.stderr)
    if spec is None:
        return EX_CONFIG
    spec = dataclasses.replace(
        spec, workers=workers if workers is not None else spec.workers, shard=shard if shard is not None else spec.shard
    )
    if args.worker_announce is not None:  # one worker of a supervisor: its shard, a private control port
        return _run_worker(spec, args, read_from)
    if spec.workers > 1:
        refused = _shared_files(spec)
        if refused:
            for line in refused:
                print(line, file=sys.stderr)
            return EX_CONFIG
    print(describe(spec))
    if spec.workers > 1 or spec.shard.count > 1:
        print(_assignment(spec) if args.dry_run else _scale_line(spec))
    if args.dry_run:
        return EX_OK
    if spec.workers > 1:
        from feedrunner import supervisor

        return supervisor.run(args.file, spec, watch=args.watch, read_from=read_from)
    from feedrunner.runner import run

    return run(spec, watch=args.watch, read_from=read_from)


def _run_worker(spec: Spec, args: argparse.Namespace, read_from: tuple[int, int, int] | None) -> int:
    """The supervisor reaches each worker on loopback at a port the worker announces; its log lines say
    which shard wrote them, since every worker shares the supervisor's stderr."""
    from loguru import logger

    from feedrunner.runner import run

    server = dataclasses.replace(spec.server, enabled=True, host="127.0.0.1", port=0)
    spec = dataclasses.replace(spec, server=server)
    tag = f"[shard {spec.shard.index}/{spec.shard.count}] "
    logger.configure(
        extra={"shard": spec.shard.index},
        patcher=lambda record: record.update(message=tag + record["message"]),
    )
    return run(spec, watch=args.watch, read_from=read_from, announce=args.worker_announce)


def _shared_files(spec: Spec) -> list[str]:
    """A file sink that several workers of this host would write to, one message per sink."""
    from feedrunner.spec import format_path, shared_file

    out = []
    for i, sink in enumerate(spec.sinks):
        problem = shared_file(sink)
        if problem is not None:
            where, message = problem
            out.append(f"{spec.source}: {format_path(('sinks', i, *where))}: {message}")
    return out


def _scale_line(spec: Spec) -> str:
    shard = f" (shard {spec.shard.index}/{spec.shard.count})" if spec.shard.count > 1 else ""
    return f"  workers: {spec.workers}{shard}"


def _assignment(spec: Spec) -> str:
    """Which worker serves how many symbols of each venue."""
    from feedrunner.sharding import assignment
    from feedrunner.supervisor import worker_shards

    total = spec.shard.count * spec.workers
    owners = assignment(spec, total)
    lines = [_scale_line(spec) + f"; {total} shard(s) in all"]
    mine = worker_shards(spec.shard, spec.workers)
    for i, g in enumerate(mine):
        per_venue: dict[str, int] = {}
        for (venue, _), owner in owners.items():
            if owner == g:
                per_venue[venue] = per_venue.get(venue, 0) + 1
        counts = ", ".join(f"{v} {n}" for v, n in per_venue.items()) or "none"
        lines.append(f"    worker {i} (shard {g}/{total}): {sum(per_venue.values())} symbols ({counts})")
    others = sum(1 for owner in owners.values() if owner not in mine)
    if others:
        lines.append(f"    other hosts: {others} symbols")
    return "\n".join(lines)


def _alerts(args: argparse.Namespace) -> int:
    """Rules on stdout (for a file), problems on stderr exactly as `validate` words them."""
    from feedrunner.promrules import render
    from feedrunner.spec import check_file

    spec, problems = check_file(args.file)
    for problem in problems:
        print(problem, file=sys.stderr)
    if spec is None:
        print(f"{args.file}: {len(problems)} problem(s)", file=sys.stderr)
        return EX_CONFIG
    sys.stdout.write(render(spec))
    return EX_OK


def _sim(args: argparse.Namespace) -> int:
    import asyncio
    import importlib

    module = {"binance": "feedrunner.sim.binance", "ib": "feedrunner.sim.tws", "futu": "feedrunner.sim.opend"}
    try:
        sim = importlib.import_module(module[args.venue])
    except ImportError as exc:
        print(f"feedrunner: the {args.venue} simulator is not available: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    if args.venue == "binance":
        coro = sim.run_standalone(
            args.host, args.port, args.seed, args.rate, args.symbols.split(","), args.record_send_times, args.tick
        )
    else:
        coro = sim.run_standalone(args.host, args.port, args.seed, args.rate)
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"feedrunner: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors; sysexits says 64
        return EX_USAGE if exc.code else EX_OK
    if args.command is None:
        parser.print_help()
        return EX_USAGE
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "schema":
            from feedrunner.spec import schema

            print(json.dumps(schema(), indent=2))
            return EX_OK
        if args.command == "run":
            return _run(args)
        if args.command == "alerts":
            return _alerts(args)
        if args.command == "sim":
            return _sim(args)
        if args.command == "plan":
            from feedrunner.statuscli import plan

            return plan(args)
        if args.command in ("status", "rollout"):
            from feedrunner.statuscli import command

            return command(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EX_OK
    return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
