"""Direct Preference Optimization (sigmoid loss) with the reference model for free.

The reference is the policy with its adapters disabled (``PeftModel.disable_adapter``): the
same weights in memory, no second copy. ``--precompute-ref`` scores every pair once before
training instead, so a step costs one forward/backward of the policy only.

For a pair with policy log-probabilities ``pc``, ``pr`` (chosen, rejected; summed over the
completion tokens) and reference ``rc``, ``rr``:

    loss = -log sigmoid(beta * ((pc - rc) - (pr - rr)))

averaged over the pairs of the optimizer step (micro-batches are normalised by the pair
count of the whole step).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trilora.train.losses import token_losses

__all__ = ["dpo_losses", "sequence_logps"]


def sequence_logps(
    model: nn.Module, batch: dict[str, Any], autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """fp32 ``[rows]``: the summed log-probability of each row's completion tokens."""
    return -token_losses(model, batch, "none", autocast_dtype).sum(dim=-1)


def dpo_losses(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO losses and the chosen / rejected implicit rewards.

    Args:
        policy, reference: ``[2B]`` log-probabilities, the B chosen rows then the B rejected.
        beta: the DPO temperature.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; rewards are
        ``beta * (policy - reference)``, detached.
    """
    b = policy.shape[0] // 2
    pc, pr = policy[:b], policy[b:]
    rc, rr = reference[:b].to(policy), reference[b:].to(policy)
    logits = (pc - rc) - (pr - rr)
    losses = -F.logsigmoid(beta * logits)
    return losses, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()
