"""Validating a large spec: 1,000 symbols over 3 venues (and a 3,000-symbol stress size), with rollout
phases referencing them.

Baseline, measured in the same run: the naive path (yaml.safe_load + a bare jsonschema validation),
which has no locations, interpolation or semantic checks. Target: well under 200 ms.
"""

from __future__ import annotations

import subprocess
import sys
import time

import jsonschema
import yaml

from bench.results import median_ms, record
from feedrunner.spec import check_text, schema

SIZES = (1000, 3000)  # symbols in total, over three venues
RUNS = 7


def big_spec(total: int = 1000) -> str:
    n = total // 3
    ccxt = [f"C{i:04d}/USDT" for i in range(total - 2 * n)]
    futu = [f"HK.{i:05d}" for i in range(n)]
    ib = [f"S{i:04d}" for i in range(n)]
    lines = [
        "version: 1",
        "environment: live",
        "defaults: {transport: websocket, poll_interval: 1s, stale_after: 15s, channels: [trades, ticker]}",
        "venues:",
        "  binance:",
        "    adapter: ccxt",
        "    exchange: binance",
        "    symbols:",
        *[f"      - {s}" for s in ccxt],
        "  futu:",
        "    adapter: futu",
        "    quota: 4000",
        "    symbols:",
        *[f"      - {s}" for s in futu],
        "  ib:",
        "    adapter: ib",
        "    market_data_lines: 4000",
        "    symbols:",
        *[f"      - {s}" for s in ib],
        "rollout:",
        "  phases:",
        f"    - {{name: canary, symbols: [binance:{ccxt[0]}], dwell: 1d}}",
        "    - {name: top5, symbols: {venue: binance, first: 5}, dwell: 3d}",
        "    - name: major",
        "      dwell: 1w",
        "      symbols:",
        *[f"        - binance:{s}" for s in ccxt[:100]],
        *[f"        - futu:{s}" for s in futu[:100]],
        "    - {name: full, symbols: all}",
        "  gates: [{metric: latency_p95, below: 500ms, window: 1h},",
        "          {metric: error_rate, below: 1%, window: 1h}]",
        "  rollback: [{metric: error_rate, above: 5%, window: 5m}]",
    ]
    return "\n".join(lines) + "\n"


def timed(fn, runs: int = RUNS) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(total: int) -> dict:
    text = big_spec(total)
    spec, problems = check_text(text, "big.yaml", {})
    assert spec is not None, problems[:3]
    validator = jsonschema.Draft202012Validator(schema())
    ours = timed(lambda: check_text(text, "big.yaml", {}))
    naive = timed(lambda: list(validator.iter_errors(yaml.safe_load(text))))
    naive_c = timed(lambda: list(validator.iter_errors(yaml.load(text, Loader=yaml.CSafeLoader))))
    return {
        "symbols": total,
        "bytes": len(text),
        "validate_ms_median": median_ms(ours),
        "baseline_pyyaml_jsonschema_ms_median": median_ms(naive),
        "baseline_libyaml_jsonschema_ms_median": median_ms(naive_c),
        "ratio_vs_pyyaml_baseline": round(median_ms(ours) / median_ms(naive), 2),
        "ratio_vs_libyaml_baseline": round(median_ms(ours) / median_ms(naive_c), 2),
    }


def main() -> dict:
    sizes = {str(total): measure(total) for total in SIZES}
    path = "/tmp/feedrunner-bench-big.yaml"
    with open(path, "w") as fh:
        fh.write(big_spec(SIZES[0]))
    cmd = [sys.executable, "-m", "feedrunner.cli", "validate", "-q", path]
    cold = timed(lambda: subprocess.run(cmd, check=True, capture_output=True), 3)
    figures = {"sizes": sizes, "cold_cli_ms_median": median_ms(cold), "runs": RUNS, "target_ms": 200}
    record("spec_validate", figures)
    print(f"spec validate over 3 venues, median of {RUNS} runs (baselines: parse + bare schema check, no")
    print("locations, interpolation or semantic checks):")
    print(f"  {'symbols':>8} {'KiB':>5} {'feedrunner':>11} {'pyyaml+js':>10} {'libyaml+js':>11} {'ratio':>6}")
    for s in sizes.values():
        print(
            f"  {s['symbols']:>8} {s['bytes'] / 1024:>5.0f} {s['validate_ms_median']:>8.1f} ms"
            f" {s['baseline_pyyaml_jsonschema_ms_median']:>7.1f} ms"
            f" {s['baseline_libyaml_jsonschema_ms_median']:>8.1f} ms"
            f" {s['ratio_vs_libyaml_baseline']:>5.2f}x"
        )
    print(
        "  target: < 200 ms at 1,000 symbols. Cold `feedrunner validate` (process start, imports incl."
        f" ccxt): {figures['cold_cli_ms_median']:.0f} ms"
    )
    return figures


if __name__ == "__main__":
    main()
