"""What each training method accepts: its name and the checks of settings that only make
sense for some methods. Torch-free: the CLI and
:meth:`trilora.train.config.TrainConfig.validate` read it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["LOSS_TYPES", "METHODS", "check_settings", "loss_type"]

METHODS = ("sft", "dpo", "grpo")

# TRL's names; the first of each is the default (``loss_type: none``)
LOSS_TYPES: dict[str, tuple[str, ...]] = {
    "sft": (),
    "dpo": ("sigmoid", "ipo", "robust"),
    "grpo": ("dapo", "grpo", "dr_grpo"),
}
# DPO's beta is its temperature, GRPO's the KL weight (TRL's defaults)
DEFAULT_BETA = {"sft": 0.1, "dpo": 0.1, "grpo": 0.0}
GRPO_ONLY = (
    "reward",
    "reward_weights",
    "epsilon_high",
    "mask_truncated_completions",
)

Bad = Callable[[str, str], Exception]  # bad(flag, why) -> the UsageError to raise


def _not_dpo(cfg: Any, bad: Bad) -> None:
    for name in ("rpo_alpha", "label_smoothing"):
        if getattr(cfg, name):
            raise bad(name, f"is a DPO setting; --method {cfg.method} does not use it")


def _not_grpo(cfg: Any, bad: Bad) -> None:
    for name in GRPO_ONLY:
        if getattr(cfg, name):
            raise bad(name, f"is a GRPO setting; --method {cfg.method} does not use it")
    if cfg.num_iterations != 1:
        raise bad("num_iterations", f"is a GRPO setting; --method {cfg.method} does not use it")


def _sft(cfg: Any, bad: Bad) -> None:
    _not_dpo(cfg, bad)
    _not_grpo(cfg, bad)


def _grpo(cfg: Any, bad: Bad) -> None:
    _not_dpo(cfg, bad)
    if not cfg.reward:
        raise bad("reward", "GRPO needs at least one reward function (json, regex:..., file.py:fn)")
    if cfg.beta < 0:
        raise bad("beta", f"must be >= 0, got {cfg.beta}")
    if cfg.packing:
        raise bad("packing", "packing applies to SFT; GRPO scores sampled completions")
    if cfg.finetune == "full" and cfg.beta > 0:
        raise bad(
            "beta",
            "GRPO's reference is the base with adapters disabled; full fine-tuning has "
            "no adapter, so keep --beta 0",
        )
    for name in (
        "num_generations",
        "max_completion_length",
        "num_iterations",
        "generation_batch_size",
    ):
        if getattr(cfg, name) < 1:
            raise bad(name, f"must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_generations < 2 and cfg.scale_rewards == "group":
        raise bad("num_generations", "a group needs at least 2 completions to compare")
    if not cfg.temperature > 0:
        raise bad("temperature", f"must be > 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise bad("top_p", f"must be in (0, 1], got {cfg.top_p}")
    if not 0 <= cfg.epsilon < 1:
        raise bad("epsilon", f"must be in [0, 1), got {cfg.epsilon}")
    if cfg.epsilon_high is not None and cfg.epsilon_high < 0:
        raise bad("epsilon_high", f"must be >= 0, got {cfg.epsilon_high}")


def _dpo(cfg: Any, bad: Bad) -> None:
    _not_grpo(cfg, bad)
    if not cfg.beta > 0:
        raise bad("beta", f"must be > 0, got {cfg.beta}")
    if cfg.rpo_alpha is not None and not cfg.rpo_alpha >= 0:
        raise bad("rpo_alpha", f"must be >= 0, got {cfg.rpo_alpha}")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise bad("label_smoothing", f"must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.label_smoothing and loss_type(cfg) != "robust":
        raise bad("label_smoothing", "applies to --loss-type robust")
    if cfg.packing:
        raise bad("packing", "packing applies to SFT; DPO scores whole sequences")
    if cfg.finetune == "full" and not cfg.precompute_ref:
        raise bad(
            "finetune",
            "DPO's reference is the base with adapters disabled; full "
            "fine-tuning has no adapter, so add --precompute-ref",
        )


_CHECKS: dict[str, Callable[[Any, Bad], None]] = {"sft": _sft, "dpo": _dpo, "grpo": _grpo}


def loss_type(cfg: Any) -> str | None:
    """``cfg.loss_type``, or the method's default when it is not set."""
    types = LOSS_TYPES[cfg.method]
    return cfg.loss_type if cfg.loss_type is not None else (types[0] if types else None)


def check_settings(cfg: Any, bad: Bad) -> None:
    """Fill ``cfg.beta``'s method default; raise ``bad(flag, why)`` for a setting
    ``cfg.method`` cannot take."""
    if cfg.beta is None:
        cfg.beta = DEFAULT_BETA[cfg.method]
    types = LOSS_TYPES[cfg.method]
    if cfg.loss_type is not None and cfg.loss_type not in types:
        allowed = f"one of {', '.join(types)}" if types else "none"
        raise bad("loss_type", f"--method {cfg.method} takes {allowed}, got {cfg.loss_type!r}")
    _CHECKS[cfg.method](cfg, bad)
