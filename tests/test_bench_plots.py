"""The benchmark's plots are drawn from the results file alone, one per section that has data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bench package lives beside feedrunner

from bench.plots import QUANTILES, cdf_points, draw

PNG = b"\x89PNG\r\n\x1a\n"


def test_cdf_points_keep_fixed_quantiles_of_the_sorted_values():
    pts = cdf_points([float(v) for v in range(1000, 0, -1)])
    assert [q for _, q in pts] == QUANTILES
    assert pts[0][0] == 1.0 and pts[-1][0] == 1000.0
    assert [v for v, _ in pts] == sorted(v for v, _ in pts)
    assert dict((q, v) for v, q in pts)[0.5] == 501.0
    assert cdf_points([]) == []


def test_each_section_with_data_draws_one_png_and_a_missing_one_draws_nothing(tmp_path):
    results = tmp_path / "latest.json"
    results.write_text(json.dumps({"bus_sinks": {}}))
    assert draw(results) == []
    stream = {
        "polling_vs_websocket": {
            "cdf_ms": {"websocket": cdf_points([1.0, 1.2, 2.0]), "polling_1s": cdf_points([300.0, 500.0, 990.0])}
        },
        "latency": {
            "1000": {"p99_ms": 2.0, "bare_ccxt_p99_ms": 1.5, "p99_ms_runs": [1.9, 2.0], "bare_ccxt_p99_ms_runs": [1.5]},
            "5000": {"p99_ms": 3.0, "bare_ccxt_p99_ms": 2.5},
            "5000_tick_5ms": {"p99_ms": 9.0, "bare_ccxt_p99_ms": 9.5},  # not an offered rate: not on the x axis
        },
        "rss": {"symbols": 1000, "growth_mb_per_hour": 0.5, "samples": [[0, 150.0], [30, 151.0], [60, 150.5]]},
    }
    results.write_text(json.dumps({"ccxt_stream": stream}))
    made = draw(results)
    assert sorted(p.name for p in made) == ["latency_cdf.png", "p99_vs_rate.png", "rss_soak.png"]
    for path in made:
        assert path.parent == tmp_path and path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000
