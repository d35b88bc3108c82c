"""Model configs bundled for ``trilora mem``: the ``config.json`` of published checkpoints.

Each ``NAME.json`` here holds the architecture fields of the model's published
``config.json`` (Hugging Face hub), so ``trilora mem NAME`` needs no download. Importing this
package is cheap (no torch): the CLI lists the names in its ``--help``.
"""

from __future__ import annotations

import json
from importlib import resources

__all__ = ["load", "names"]


def names() -> list[str]:
    """Names of the bundled configs, sorted."""
    root = resources.files(__name__)
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load(name: str) -> dict:
    """The raw ``config.json`` dict of preset ``name`` (KeyError if there is none)."""
    if name not in names():
        raise KeyError(name)
    return json.loads((resources.files(__name__) / f"{name}.json").read_text())
