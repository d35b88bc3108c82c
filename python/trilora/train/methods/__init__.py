"""Training methods: one module each, behind one seam (:class:`~.base.Method`).

A method says how its JSONL records are read and validated, how a batch is built, what
its loss and logged statistics are, and how it is evaluated; the loop
(:mod:`trilora.train.loop`) calls it and never asks which method it is. Add a method by
writing a module here and naming it in :data:`~.settings.METHODS`.

This package imports no torch at import time (the CLI reads :mod:`.settings`); a method's
module loads when :func:`build_method` is called.
"""

from __future__ import annotations

import importlib
from typing import Any

from trilora.train.methods.settings import METHODS

__all__ = ["METHODS", "build_method", "record_format"]


def build_method(cfg: Any) -> Any:
    """The :class:`~.base.Method` that ``cfg.method`` names, configured by ``cfg`` (a
    :class:`~trilora.train.config.TrainConfig`)."""
    # by name through importlib: a method's module (and torch) loads only when it runs
    module = importlib.import_module(f"trilora.train.methods.{cfg.method}")
    return module.METHOD(cfg)


def record_format(method: str) -> Any:
    """The :class:`~trilora.train.data.RecordFormat` of the method named ``method``."""
    return importlib.import_module(f"trilora.train.methods.{method}").METHOD.records
