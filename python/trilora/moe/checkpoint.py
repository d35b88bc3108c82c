"""Checkpoint keys that transformers converts on load (MoE experts saved per expert).

transformers 5 models keep an MoE layer's experts fused (``experts.gate_up_proj``
``[E, 2I, H]``), while their checkpoints usually hold one tensor per expert
(``experts.0.gate_proj.weight``, ...; Mixtral's ``block_sparse_moe.experts.0.w1.weight``).
transformers bridges the two with per-model weight conversions applied when it loads.
trilora's streaming loader uses the same conversions, through transformers' own mapping
(``transformers.conversion_mapping.get_model_conversion_mapping``) and key renaming
(``transformers.core_model_loading.rename_source_key``), so every model transformers can
load converts the same way, with no per-model code here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["ConversionGroup", "checkpoint_conversions"]


def _natural(key: str) -> list:
    # experts.10 after experts.9: the order MergeModulelist stacks them in.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


@dataclass
class ConversionGroup:
    """The checkpoint tensors that make one model tensor, and how (one transformers
    ``WeightConverter``)."""

    target: str
    converter: Any
    keys_by_pattern: dict[str, list[str]] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [k for keys in self.keys_by_pattern.values() for k in keys]

    def convert(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model tensor from the group's checkpoint tensors (popped from ``tensors``)."""
        collected = {
            pattern: [tensors.pop(k) for k in sorted(keys, key=_natural)]
            for pattern, keys in self.keys_by_pattern.items()
        }
        conv = self.converter
        for op in conv.operations:
            collected = op.convert(
                collected,
                source_patterns=conv.source_patterns,
                target_patterns=conv.target_patterns,
                full_layer_name=self.target,
                model=model,
                config=getattr(model, "config", None),
            )
        if len(collected) != 1:
            raise ValueError(
                f"converting into {self.target} gave {len(collected)} tensors, expected one"
            )
        return next(iter(collected.values()))


def checkpoint_conversions(
    model: nn.Module, keys: list[str], expected: set[str]
) -> tuple[dict[str, str], dict[str, ConversionGroup]]:
    """How the checkpoint ``keys`` that are not model keys map onto ``model``.

    Returns ``(renamed, groups)``: ``renamed`` maps a checkpoint key to the model key it
    loads into as it is (transformers' renamings, e.g. Mixtral's ``block_sparse_moe`` ->
    ``mlp``); ``groups`` maps a model key to the :class:`ConversionGroup` that builds it
    from several checkpoint tensors. Keys transformers does not map are left out. Without
    transformers' conversion machinery (older releases), both are empty.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # pragma: no cover - transformers 5 has both
        return {}, {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = dict.fromkeys(expected, True)
    prefix = getattr(model, "base_model_prefix", None)
    renamed: dict[str, str] = {}
    groups: dict[str, ConversionGroup] = {}
    for key in keys:
        if key in expected:
            continue
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if pattern is None:
            if target != key:
                renamed[key] = target
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        group = groups.setdefault(target, ConversionGroup(target, converter))
        group.keys_by_pattern.setdefault(pattern, []).append(key)
    return renamed, groups
