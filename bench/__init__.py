"""Benchmarks: figures, ratios against a baseline measured in the same run, results in bench/results/."""
