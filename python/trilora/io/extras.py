"""Optional packages: one line that names the extra to install, instead of an internal error.

trilora's core needs torch, triton, transformers, peft, safetensors and numpy. A few
features need more (``pyproject.toml``'s extras): the bitsandbytes + PEFT baseline, GGUF
files, plots, YAML configs, TensorBoard logs, TRL. :func:`require` imports such a package
for a feature, or raises :class:`MissingExtra` (a :class:`~trilora.io.UserError`, printed by
the CLI as one line) that says what to install.

This module imports nothing heavy.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from trilora.io.errors import UserError

OPTIONAL: dict[str, tuple[str, str | None]] = {
    "bitsandbytes": ("bitsandbytes", "bench"),
    "gguf": ("gguf", "demo"),
    "matplotlib": ("matplotlib", "train"),
    "yaml": ("pyyaml", "train"),
    "tensorboard": ("tensorboard", "train"),
    "tqdm": ("tqdm", "train"),
    "trl": ("trl", None),
    "datasets": ("datasets", None),
}
"""Importable name -> (distribution to install, trilora extra that brings it, if any)."""


class MissingExtra(UserError):
    """A feature needs an optional package that does not import here."""


def install_hint(module: str) -> str:
    """How to install ``module``: ``pip install "trilora[EXTRA]" (or pip install DIST)``."""
    dist, extra = OPTIONAL.get(module.split(".")[0], (module.split(".")[0], None))
    if extra is None:
        return f"pip install {dist}"
    return f'pip install "trilora[{extra}]" (or pip install {dist})'


def missing_message(module: str, feature: str, exc: BaseException | None = None) -> str:
    """The one line :class:`MissingExtra` carries: ``feature`` needs ``module``, how to get it;
    with ``exc`` (the import's error) when the package is there but does not import."""
    dist = OPTIONAL.get(module.split(".")[0], (module.split(".")[0], None))[0]
    top = module.split(".")[0]
    if exc is None or (isinstance(exc, ModuleNotFoundError) and exc.name in (top, module)):
        return f"{feature} needs the {dist} package, which is not installed: {install_hint(module)}"
    return (
        f"{feature} needs the {dist} package, which is installed but does not import "
        f"({type(exc).__name__}: {exc}); reinstall it: {install_hint(module)}"
    )


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (a name in :data:`OPTIONAL`, or any importable name) for ``feature``.

    Args:
        module: what to import, e.g. ``"bitsandbytes"`` or ``"yaml"``.
        feature: what needs it, as the user named it: ``"trilora mem --baseline"``.

    Raises:
        MissingExtra: the import failed; the message names the extra or package to install.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(missing_message(module, feature, exc)) from exc


__all__ = ["OPTIONAL", "MissingExtra", "install_hint", "missing_message", "require"]
