"""Helpers shared by the model-level features that patch a transformers model."""

from __future__ import annotations

from torch import nn


def base_transformers_model(model: nn.Module, needs: str, kind: str) -> nn.Module:
    """``model``, or the model a PeftModel wraps, checked to have a callable ``needs``.

    ``kind`` names what was expected in the error, e.g. "a transformers causal LM".
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not callable(getattr(model, needs, None)):
        raise TypeError(
            f"{type(model).__name__} has no {needs}(): expected {kind} (or a PeftModel "
            "wrapping one)"
        )
    return model
