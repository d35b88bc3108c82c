"""``trilora bench``: the benchmark harness lives in :mod:`trilora.bench.cli`."""

from trilora.bench.cli import add_parser, run

__all__ = ["add_parser", "run"]
