"""Model configs bundled for ``trilora mem``: the ``config.json`` of published checkpoints.

Each ``NAME.json`` here holds the architecture fields of the model's published
``config.json`` (Hugging Face hub), so ``trilora mem NAME`` needs no download. Importing this
package is cheap (no torch): the CLI lists the names in its ``--help``.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

__all__ = ["load", "names", "read_model_config"]


def names() -> list[str]:
    """Names of the bundled configs, sorted."""
    root = resources.files(__name__)
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load(name: str) -> dict:
    """The raw ``config.json`` dict of preset ``name`` (KeyError if there is none)."""
    if name not in names():
        raise KeyError(name)
    return json.loads((resources.files(__name__) / f"{name}.json").read_text())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def read_model_config(source: str | os.PathLike) -> dict:
    """The raw ``config.json`` dict of a preset name, a ``config.json`` file or a model folder.

    Torch-free, so a command can reject a mistyped model before it imports the profiler.

    Raises:
        ValueError: the folder has no ``config.json``, the file is not JSON, or ``source`` is
            none of these (the message lists the presets).
    """
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{source} has no config.json")
        return _read_json(path)
    if path.is_file():
        return _read_json(path)
    if str(source) in names():
        return load(str(source))
    raise ValueError(
        f"unknown model {str(source)!r}: not a file, a folder with config.json, or a "
        f"preset; known presets: {', '.join(names())}"
    )
