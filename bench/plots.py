"""PNG plots of bench/results/latest.json, written beside it: `python -m bench.plots` redraws them from the
file alone, and `make bench` draws them after its runs. matplotlib (Agg) is a bench-only dependency."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.results import RESULTS

QUANTILES = [q / 1000 for q in range(0, 1000, 5)] + [0.995, 0.999, 1.0]  # what the results keep of a latency CDF


def cdf_points(values_ms: list[float]) -> list[list[float]]:
    """A CDF kept as (latency ms, quantile) at fixed quantiles: small in the results file, enough to draw."""
    if not values_ms:
        return []
    s = sorted(values_ms)
    return [[round(s[min(len(s) - 1, int(q * len(s)))], 3), q] for q in QUANTILES]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdf(pw: dict[str, Any], out: Path) -> Path | None:
    cdf = pw.get("cdf_ms")
    if not cdf:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, color in (("websocket", "#0969da"), ("polling_1s", "#bc4c00")):
        pts = cdf.get(name) or []
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name.replace("_", " "), color=color)
    ax.set_xscale("log")
    ax.set_xlabel("latency, simulator send -> sink write (ms, log scale)")
    ax.set_ylabel("fraction of trades")
    ax.set_title("Latency CDF: websocket vs 1 s polling (3 symbols, 20 trades/s each)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, plt, out / "latency_cdf.png")


def p99_vs_rate(latency: dict[str, Any], out: Path) -> Path | None:
    rates = sorted(int(k) for k in latency if k.isdigit())
    if not rates:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, color in (("p99_ms", "feedrunner", "#0969da"), ("bare_ccxt_p99_ms", "bare ccxt.pro", "#6e7781")):
        ax.plot(rates, [latency[str(r)][key] for r in rates], marker="o", label=label, color=color)
        runs = f"{key}_runs"
        for r in rates:
            ys = latency[str(r)].get(runs) or []
            ax.scatter([r] * len(ys), ys, color=color, alpha=0.35, s=12)
    ax.set_xscale("log")
    ax.set_xticks(rates, [f"{r:,}" for r in rates])
    ax.set_xlabel("offered trades/s over 10 symbols")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title("p99 latency vs offered rate (median line, runs as dots)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, plt, out / "p99_vs_rate.png")


def rss_soak(rss: dict[str, Any], out: Path) -> Path | None:
    samples = rss.get("samples")
    if not samples:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s[0] for s in samples], [s[1] for s in samples], marker=".", color="#0969da", label="RSS")
    ax.axhline(rss.get("target_rss_mb", 300), color="#cf222e", linestyle="--", label="target")
    ax.set_xlabel("seconds into the soak")
    ax.set_ylabel("RSS (MB)")
    ax.set_title(f"RSS over the soak: {rss['symbols']:,} symbols streaming, trend {rss['growth_mb_per_hour']} MB/h")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, plt, out / "rss_soak.png")


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(results: Path = RESULTS) -> list[Path]:
    """Every plot the results file has data for; a missing section draws nothing (not an empty plot)."""
    data = json.loads(results.read_text()) if results.exists() else {}
    stream = data.get("ccxt_stream", {})
    out = results.parent
    made = [
        latency_cdf(stream.get("polling_vs_websocket", {}), out),
        p99_vs_rate(stream.get("latency", {}), out),
        rss_soak(stream.get("rss", {}), out),
    ]
    return [p for p in made if p is not None]


def main() -> list[Path]:
    made = draw()
    for path in made:
        print(f"plot: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    if not made:
        print("plots: no figures to draw yet (run `python -m bench ccxt_stream`)")
    return made


if __name__ == "__main__":
    main()
