"""Direct Preference Optimization with the reference model for free.

The reference is the policy with its adapters disabled (``PeftModel.disable_adapter``): the
same weights in memory, no second copy. ``--precompute-ref`` scores every pair once before
training instead, so a step costs one forward/backward of the policy only.

For a pair with policy log-probabilities ``pc``, ``pr`` (chosen, rejected; summed over the
completion tokens), reference ``rc``, ``rr`` and ``d = (pc - rc) - (pr - rr)``, the loss
types are TRL's (``DPOTrainer``, TRL 1.16):

* ``sigmoid``: ``-log sigmoid(beta * d)``;
* ``ipo``: ``((pc - rc) / nc - (pr - rr) / nr - 1 / (2 beta))**2`` with ``nc``, ``nr`` the
  completion token counts (TRL's length normalisation);
* ``robust``: ``(-(1 - e) log sigmoid(beta d) + e log sigmoid(-beta d)) / (1 - 2e)``, ``e``
  the label-flip probability ``--label-smoothing``;

averaged over the pairs of the optimizer step (micro-batches are normalised by the pair
count of the whole step). ``--rpo-alpha a`` adds ``a`` times the mean NLL of the chosen
completion tokens of the step (RPO; TRL 1.16 spells it ``loss_type=["sigmoid", "sft"]``,
``loss_weights=[1, a]``).

DPO's known failure: the loss falls while the chosen answer's own log-probability falls
too, below the reference's; the margin grows because the rejected one falls faster. Each
step logs both log-probabilities and the margin, and the run warns once when the chosen
one drops below the reference's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trilora.train import data as D
from trilora.train.collectives import gather_objects, inference_model, on_main, rank_rows
from trilora.train.losses import sequence_logps
from trilora.train.methods.base import Method, MicroBatch, RunContext
from trilora.train.methods.settings import loss_type

__all__ = ["METHOD", "Dpo", "dpo_losses"]


def _sigmoid(d, beta, label_smoothing, chosen_avg, rejected_avg):
    return -F.logsigmoid(beta * d)


def _ipo(d, beta, label_smoothing, chosen_avg, rejected_avg):
    return (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2


def _robust(d, beta, e, chosen_avg, rejected_avg):
    return (-(1 - e) * F.logsigmoid(beta * d) + e * F.logsigmoid(-beta * d)) / (1 - 2 * e)


_LOSSES = {"sigmoid": _sigmoid, "ipo": _ipo, "robust": _robust}


def dpo_losses(
    policy: torch.Tensor,
    reference: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the chosen / rejected implicit rewards.

    Args:
        policy, reference: ``[2B]`` log-probabilities, the B chosen rows then the B rejected.
        beta: the DPO temperature (IPO's regularisation ``tau``).
        loss_type: ``sigmoid``, ``ipo`` or ``robust`` (see the module docstring).
        label_smoothing: ``robust``'s label-flip probability, in ``[0, 0.5)``.
        lengths: ``[2B]`` completion token counts (``ipo`` divides by them).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; rewards are
        ``beta * (policy - reference)``, detached.
    """
    b = policy.shape[0] // 2
    pc, pr = policy[:b], policy[b:]
    rc, rr = reference[:b].to(policy), reference[b:].to(policy)
    chosen, rejected = pc - rc, pr - rr
    if lengths is None:
        lengths = torch.ones_like(policy)
    lengths = lengths.to(policy).clamp_min(1)
    losses = _LOSSES[loss_type](
        chosen - rejected, beta, label_smoothing, chosen / lengths[:b], rejected / lengths[b:]
    )
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def completion_lengths(batch: dict[str, Any]) -> torch.Tensor:
    """int64 ``[rows]``: the labelled (completion) tokens of each row of ``batch``."""
    return (batch["labels"][:, 1:] != D.IGNORE).sum(-1)


class Dpo(Method):
    """Preference pairs; a micro-batch holds its B chosen rows then its B rejected rows."""

    name = "dpo"
    records = D.PAIR_RECORDS
    stat_keys = (
        "reward_accuracy",
        "reward_margin",
        "logp_chosen",
        "logp_rejected",
        "logp_margin",
        "ref_logp_chosen",
    )
    bar_stats = (
        ("logp chosen", "logp_chosen", ".1f"),
        ("rejected", "logp_rejected", ".1f"),
        ("margin", "logp_margin", ".2f"),
    )
    item_kinds = 2  # pairs, chosen completion tokens (the RPO term's mean)

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.ref_logps: torch.Tensor | None = None  # [rows, 2] with --precompute-ref
        self.loss_type = loss_type(cfg)
        self.warned = False

    def collate(self, rows: list, pad_id: int) -> dict[str, Any]:
        return D.collate_pairs(rows, pad_id)

    def prepare(self, run: RunContext) -> None:
        if self.cfg.precompute_ref:
            self.ref_logps = _precompute_ref(run)

    def _reference(self, run: RunContext, mb: MicroBatch) -> torch.Tensor:
        if self.ref_logps is not None:
            return torch.cat([self.ref_logps[mb.idx, 0], self.ref_logps[mb.idx, 1]])
        model = run.model
        was_training = model.training
        model.eval()
        with torch.no_grad(), run.base_mode():
            ref = sequence_logps(model, mb.batch, run.autocast_dtype)
        model.train(was_training)
        return ref

    def loss_items(self, mb: MicroBatch) -> list[int]:
        b = len(mb.idx)
        return [b, int(completion_lengths(mb.batch)[:b].sum())]

    def micro_loss(self, run: RunContext, mb: MicroBatch, num_items: list[int]):
        cfg = self.cfg
        pairs, chosen_tokens = num_items
        ref = self._reference(run, mb)
        policy = sequence_logps(run.model, mb.batch, run.autocast_dtype)
        ref = ref.to(policy.device)
        lengths = completion_lengths(mb.batch)
        losses, chosen_r, rejected_r = dpo_losses(
            policy, ref, cfg.beta, self.loss_type, cfg.label_smoothing, lengths
        )
        loss = losses.sum() / pairs
        b = len(mb.idx)
        pc, pr = policy[:b].detach(), policy[b:].detach()
        if cfg.rpo_alpha:
            loss = loss + cfg.rpo_alpha * (-policy[:b].sum()) / max(chosen_tokens, 1)
        stats = {
            "reward_accuracy": float((chosen_r > rejected_r).float().sum()) / pairs,
            "reward_margin": float((chosen_r - rejected_r).sum()) / pairs,
            "logp_chosen": float(pc.sum()) / pairs,
            "logp_rejected": float(pr.sum()) / pairs,
            "logp_margin": float((pc - pr).sum()) / pairs,
            "ref_logp_chosen": float(ref[:b].sum()) / pairs,
        }
        return loss, stats

    def after_step(self, run: RunContext, record: dict[str, Any], say) -> None:
        if self.warned or record.get("logp_chosen", 0.0) >= record.get("ref_logp_chosen", 0.0):
            return
        self.warned = True
        say(
            f"warning: step {record['step']}: the chosen answers' log-probability "
            f"({record['logp_chosen']:.2f}) fell below the reference's "
            f"({record['ref_logp_chosen']:.2f}): DPO is lowering both answers and the "
            "margin grows because the rejected one falls faster (the known collapse; "
            "held-out generations may get worse). Guards: --rpo-alpha 1 (an NLL term on "
            "the chosen answer), --loss-type ipo, a lower --lr or fewer steps"
        )

    def evaluate(self, run, model, val, chunks, all_reduce, as_base):
        losses, wins, margins = 0.0, 0, 0.0
        for rows, real in chunks:
            pairs = [val[i] for i in rows]
            batch = D.collate_pairs(pairs, run.pad_id)
            pol = sequence_logps(model, batch, run.autocast_dtype)
            if as_base:
                ref = pol
            else:
                with run.base_mode():
                    ref = sequence_logps(model, batch, run.autocast_dtype)
            if not real:
                continue
            loss, _, _ = dpo_losses(
                pol,
                ref,
                self.cfg.beta,
                self.loss_type,
                self.cfg.label_smoothing,
                completion_lengths(batch),
            )
            losses += sum(loss.tolist())
            b = len(pairs)
            wins += int((pol[:b] > pol[b:]).sum())
            margins += float((pol[:b] - pol[b:]).sum())
        losses, wins, margins = all_reduce([losses, wins, margins])
        n = max(len(val), 1)
        return {
            "eval_loss": losses / n,
            "eval_chosen_preferred": wins / n,
            "eval_logp_margin": margins / n,
        }


def _precompute_ref(run: RunContext) -> torch.Tensor:
    """``[rows, 2]`` reference log-probabilities (chosen, rejected) of every training pair,
    computed once and kept in ``OUT/ref_logps.pt`` (a resumed run reads them back)."""
    env, cfg = run.env, run.cfg
    path = run.run_dir / "ref_logps.pt"
    cached = on_main(env, lambda: torch.load(path, weights_only=True) if path.is_file() else None)
    if cached is not None:
        return cached
    n = len(run.rows)
    values: dict[int, tuple[float, float]] = {}
    with inference_model(run.model) as m:
        was_training = m.training
        m.eval()
        with torch.no_grad(), run.base_mode():
            for s in range(0, n, cfg.eval_batch_size):
                rows, real = rank_rows(list(range(s, min(s + cfg.eval_batch_size, n))), env)
                pairs = [run.rows[i] for i in rows]
                lp = sequence_logps(m, D.collate_pairs(pairs, run.pad_id), run.autocast_dtype)
                lp = lp.float().cpu()
                b = len(pairs)
                if real:
                    values.update((i, (lp[j].item(), lp[b + j].item())) for j, i in enumerate(rows))
        m.train(was_training)
    out = torch.empty(n, 2)
    for part in gather_objects(env, values):
        for i, (chosen, rejected) in part.items():
            out[i, 0], out[i, 1] = chosen, rejected

    def save() -> None:
        tmp = run.run_dir / ".ref_logps.pt.tmp"
        torch.save(out, tmp)
        tmp.replace(path)

    on_main(env, save)
    return out


METHOD = Dpo
