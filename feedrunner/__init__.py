"""feedrunner: run market-data feeds declared in one feeds.yaml."""

__version__ = "0.1.0"
