"""GRPO: group-relative policy optimisation with reward functions (TRL's ``GRPOTrainer``).

For each prompt of a step the policy (adapters on, eval mode, KV cache) samples
``--num-generations`` completions of at most ``--max-completion-length`` tokens at
``--temperature`` / ``--top-p``; the reward functions (:mod:`.rewards`) score them, and each
completion's advantage is its reward minus its group's mean (divided by the group's
standard deviation + 1e-4 with ``--scale-rewards group``). The loss, per completion token
``t`` of completion ``i`` with mask ``m`` (0 after the first EOS, and for a truncated
completion with ``--mask-truncated-completions``), is TRL 1.16's ``_compute_loss``::

    r    = exp(logp - logp_old)                       (1 when --num-iterations is 1)
    l_it = -min(r * A_i, clip(r, 1 - epsilon, 1 + epsilon_high) * A_i)
           + beta * r * (exp(ref - logp) - (ref - logp) - 1)   (only when beta > 0; the
                                            factor r is TRL's default KL bias correction)
    grpo:    sum_i [ sum_t l_it m_it / max(1, sum_t m_it) ] / N
    dr_grpo: sum_it l_it m_it / (N * max_completion_length)
    dapo:    sum_it l_it m_it / sum_it m_it

with ``N`` the completions of the optimizer step (every micro-batch and rank). The
reference is the same model with its adapters disabled (no second copy), scored only
when ``beta > 0``. Log-probabilities go through the fused head in chunks
(:func:`trilora.train.losses.token_losses`, temperature applied to the logits as when
sampling): no ``[tokens, vocab]`` logits tensor exists.

``--num-iterations k`` reuses one generation batch for ``k`` optimizer steps; ``logp_old``
is then scored once at generation time, and the batch is kept in the checkpoint, so a run
resumed inside the ``k`` steps continues bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from trilora.train import data as D
from trilora.train.collectives import inference_model
from trilora.train.losses import compute_device, token_losses
from trilora.train.methods.base import Method, MicroBatch, RunContext
from trilora.train.methods.rewards import parse_rewards, score_rewards
from trilora.train.methods.settings import loss_type

__all__ = ["METHOD", "Grpo", "group_advantages", "grpo_loss"]


def group_advantages(rewards: torch.Tensor, group: int, scale: bool) -> torch.Tensor:
    """fp32 ``[N]`` advantages of ``rewards`` ``[N]`` (N = prompts x ``group``, a prompt's
    completions adjacent): minus the group mean, divided by the group's unbiased standard
    deviation + 1e-4 when ``scale``; NaN rewards (no function applied) are left out of the
    group figures and get advantage 0 (TRL's handling)."""
    grouped = rewards.view(-1, group)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    adv = grouped - mean
    if scale:
        count = (~grouped.isnan()).sum(dim=1, keepdim=True)
        var = torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * count / (count - 1)
        adv = adv / (var.sqrt() + 1e-4)
    return torch.nan_to_num(adv.reshape(-1), nan=0.0)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    max_completion_length: int,
    num_sequences: int,
    num_tokens: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """This micro-batch's share of the step's GRPO loss, and its statistics' shares.

    Args:
        logps: fp32 ``[N, T]`` per-token log-probabilities of the policy (differentiable).
        old_logps: ``[N, T]`` of the policy that sampled (None: ``logps`` detached).
        ref_logps: ``[N, T]`` of the reference (needed when ``beta > 0``).
        advantages: ``[N]``.
        mask: ``[N, T]`` 1 on the completion tokens that count.
        loss_type: ``grpo``, ``dr_grpo`` or ``dapo`` (see the module docstring).
        num_sequences, num_tokens: the optimizer step's completions and masked tokens.

    Returns:
        ``(loss, stats)``: ``stats`` holds ``kl`` and ``clip_fraction`` (token means over
        the step) as this micro-batch's share.
    """
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps.to(logps)
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.to(logps).unsqueeze(1)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    kl = None
    if beta != 0.0:
        delta = ref_logps.to(logps) - logps
        # TRL's use_bias_correction_kl (its default): the samples came from the old policy
        kl = (torch.exp(delta) - delta - 1) * coef_1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / num_sequences
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (num_sequences * max_completion_length)
    else:  # dapo
        loss = (per_token * mask).sum() / max(num_tokens, 1)
    with torch.no_grad():
        clipped = ((coef_1 < 1 - epsilon_low) & (adv < 0)) | (
            (coef_1 > 1 + epsilon_high) & (adv > 0)
        )
        stats = {
            "kl": float((kl * mask).sum()) / max(num_tokens, 1) if kl is not None else 0.0,
            "clip_fraction": float((clipped * mask).sum()) / max(num_tokens, 1),
        }
    return loss, stats


class Grpo(Method):
    """Prompts in, sampled completions scored by reward functions, the clipped policy loss."""

    name = "grpo"
    records = D.PROMPT_RECORDS
    item_kinds = 2  # completions, loss tokens

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.rewards = parse_rewards(cfg.reward, cfg.reward_weights)
        self.loss_type = loss_type(cfg)
        self.repeats = cfg.num_iterations
        self.epsilon_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
        self.stat_keys = (
            "reward",
            "reward_std",
            *(f"reward_{r.name}" for r in self.rewards),
            "kl",
            "clip_fraction",
            "completion_length",
            "truncated_fraction",
        )
        self.bar_stats = (
            ("reward", "reward", ".3f"),
            ("kl", "kl", ".4f"),
            ("clip", "clip_fraction", ".3f"),
            ("len", "completion_length", ".1f"),
        )
        # the generation batch of the current --num-iterations group: its index and, per
        # micro-batch, the scoring batch and what the loss needs
        self.generation: tuple[int, list[dict[str, Any]]] | None = None

    # --- data ---------------------------------------------------------------------------

    def collate(self, rows: list, pad_id: int) -> dict[str, Any]:
        # the prompts; prepare_step replaces them by prompts + sampled completions
        return {"prompts": rows}

    # --- generation ---------------------------------------------------------------------

    def _eos_ids(self, run: RunContext) -> set[int]:
        ids = set()
        for source in (getattr(run.model, "generation_config", None), run.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update(value if isinstance(value, list | tuple) else [value])
        ids.discard(None)
        return ids

    @torch.no_grad()
    def _sample(self, run: RunContext, prompts: list[list[int]]) -> list[list[int]]:
        """``len(prompts)`` completions (token ids, cut after the first EOS)."""
        cfg = self.cfg
        device = compute_device(run.model)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), run.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left-padded: generation continues every row at the end
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        eos = self._eos_ids(run)
        out = []
        with inference_model(run.model) as m:
            was_training = m.training
            m.eval()
            try:
                for s in range(0, len(prompts), cfg.generation_batch_size):
                    gen = m.generate(
                        input_ids=ids[s : s + cfg.generation_batch_size].to(device),
                        attention_mask=mask[s : s + cfg.generation_batch_size].to(device),
                        do_sample=True,
                        temperature=cfg.temperature,
                        top_p=cfg.top_p,
                        top_k=0,
                        max_new_tokens=cfg.max_completion_length,
                        pad_token_id=run.pad_id,
                        eos_token_id=sorted(eos) or None,
                        use_cache=True,
                    )
                    for row in gen[:, width:].tolist():
                        cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
                        out.append(row[:cut])
            finally:
                m.train(was_training)
        return out

    def _fields(self, records: list[dict]) -> tuple[list, dict[str, list]]:
        g = self.cfg.num_generations
        prompts = [r["prompt"] for r in records for _ in range(g)]
        keys = [k for k in records[0] if k != "prompt" and not k.startswith("_")]
        fields = {k: [r.get(k) for r in records for _ in range(g)] for k in keys}
        return prompts, fields

    def _completion_texts(self, run: RunContext, prompts: list, completions: list[list[int]]):
        texts = run.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return [
            [{"role": "assistant", "content": t}] if isinstance(p, list) else t
            for p, t in zip(prompts, texts)
        ]

    def _score_batch(self, prompt_ids: list[list[int]], completions: list[list[int]], pad_id):
        """The right-padded rows prompt + completion, labels on the completion tokens."""
        examples = []
        for p, c, keep in zip(prompt_ids, completions, self._kept(completions)):
            labels = [D.IGNORE] * len(p) + (list(c) if keep else [D.IGNORE] * len(c))
            labels[0] = D.IGNORE
            examples.append([D.Example(list(p) + list(c), labels, "")])
        return D.collate(examples, pad_id)

    def _kept(self, completions: list[list[int]]) -> list[bool]:
        if not self.cfg.mask_truncated_completions:
            return [True] * len(completions)
        return [not self._truncated(c) for c in completions]

    def _truncated(self, completion: list[int]) -> bool:
        return len(completion) >= self.cfg.max_completion_length and completion[-1] not in self.eos

    def _generate(self, run: RunContext, mb: MicroBatch) -> dict[str, Any]:
        cfg, g = self.cfg, self.cfg.num_generations
        self.eos = self._eos_ids(run)
        rows = mb.batch["prompts"]
        prompt_ids = [r.input_ids for r in rows for _ in range(g)]
        completions = self._sample(run, prompt_ids)
        records = [run.records[i] for i in mb.idx]
        prompts, fields = self._fields(records)
        texts = self._completion_texts(run, prompts, completions)
        scores = torch.tensor(
            score_rewards(self.rewards, prompts, texts, completions, fields), dtype=torch.float32
        )
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        total = (scores * weights).nansum(dim=1)
        total[scores.isnan().all(dim=1)] = float("nan")
        advantages = group_advantages(total, g, cfg.scale_rewards == "group")
        batch = self._score_batch(prompt_ids, completions, run.pad_id)
        entry: dict[str, Any] = {
            "idx": list(mb.idx),
            "batch": batch,
            "advantages": advantages,
            "rewards": torch.nan_to_num(total),
            "per_function": torch.nan_to_num(scores),
            "lengths": torch.tensor([len(c) for c in completions], dtype=torch.float32),
            "truncated": torch.tensor([self._truncated(c) for c in completions]),
            "old_logps": None,
            "ref_logps": None,
        }
        if self.repeats > 1 or cfg.beta != 0.0:
            with inference_model(run.model) as m, torch.no_grad():
                was_training = m.training
                m.eval()
                try:
                    if self.repeats > 1:
                        entry["old_logps"] = self._logps(run, m, batch)
                    if cfg.beta != 0.0:
                        with run.base_mode():
                            entry["ref_logps"] = self._logps(run, m, batch)
                finally:
                    m.train(was_training)
        return entry

    def _logps(self, run: RunContext, model, batch) -> torch.Tensor:
        return -token_losses(model, batch, "none", run.autocast_dtype, self.cfg.temperature)

    def prepare_step(self, run: RunContext, step: int, micro: list[MicroBatch]) -> None:
        group = step // self.repeats
        cached = self.generation
        # a checkpoint holds each rank's batch; resumed on another process count, a rank
        # whose rows differ from the saved batch's samples them again
        if (
            cached is None
            or cached[0] != group
            or [e["idx"] for e in cached[1]] != [list(mb.idx) for mb in micro]
        ):
            self.generation = (group, [self._generate(run, mb) for mb in micro])
        for mb, entry in zip(micro, self.generation[1]):
            mb.batch = entry["batch"]
            mb.extra = entry

    # --- training -----------------------------------------------------------------------

    def loss_items(self, mb: MicroBatch) -> list[int]:
        labels = mb.batch["labels"]
        return [labels.shape[0], int((labels[:, 1:] != D.IGNORE).sum())]

    def micro_loss(self, run: RunContext, mb: MicroBatch, num_items: list[int]):
        cfg, e = self.cfg, mb.extra
        num_sequences, num_tokens = num_items
        logps = self._logps(run, run.model, mb.batch)
        mask = torch.zeros_like(logps)
        mask[:, :-1] = (mb.batch["labels"][:, 1:] != D.IGNORE).to(mask)
        loss, stats = grpo_loss(
            logps,
            e["old_logps"],
            e["ref_logps"],
            e["advantages"],
            mask,
            loss_type=self.loss_type,
            beta=cfg.beta,
            epsilon_low=cfg.epsilon,
            epsilon_high=self.epsilon_high,
            max_completion_length=cfg.max_completion_length,
            num_sequences=num_sequences,
            num_tokens=num_tokens,
        )
        n = num_sequences
        rewards = e["rewards"]
        g = cfg.num_generations
        stats.update(
            reward=float(rewards.sum()) / n,
            reward_std=float(rewards.view(-1, g).std(dim=1, correction=int(g > 1)).sum()) * g / n,
            completion_length=float(e["lengths"].sum()) / n,
            truncated_fraction=float(e["truncated"].sum()) / n,
        )
        for j, r in enumerate(self.rewards):
            stats[f"reward_{r.name}"] = float(e["per_function"][:, j].sum()) / n
        return loss, stats

    # --- checkpoint state ---------------------------------------------------------------

    def state(self) -> dict[str, Any] | None:
        """The generation batch in use (resuming inside a --num-iterations group needs it)."""
        if self.generation is None or self.repeats == 1:
            return None
        group, entries = self.generation
        return {"group": group, "entries": [_to_lists(e) for e in entries]}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state:
            self.generation = (state["group"], [_from_lists(e) for e in state["entries"]])

    # --- evaluation ---------------------------------------------------------------------

    def evaluate(self, run, model, val, chunks, all_reduce, as_base):
        """Greedy completions of the held-out prompts, scored: mean reward and each
        function's mean (greedy: no random draw, so evaluating changes no RNG stream)."""
        self.eos = self._eos_ids(run)
        totals = [0.0] * (1 + len(self.rewards))
        count = 0
        device = compute_device(model)
        for rows, real in chunks:
            records = [run.val_records[i] for i in rows]
            prompt_ids = [val[i].input_ids for i in rows]
            width = max(len(p) for p in prompt_ids)
            ids = torch.full((len(rows), width), run.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompt_ids):
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=self.cfg.max_completion_length,
                pad_token_id=run.pad_id,
                eos_token_id=sorted(self.eos) or None,
                use_cache=True,
            )
            completions = []
            for row in gen[:, width:].tolist():
                cut = next((j + 1 for j, t in enumerate(row) if t in self.eos), len(row))
                completions.append(row[:cut])
            prompts = [r["prompt"] for r in records]
            keys = [k for k in records[0] if k != "prompt" and not k.startswith("_")]
            fields = {k: [r.get(k) for r in records] for k in keys}
            texts = self._completion_texts(run, prompts, completions)
            scores = torch.tensor(
                score_rewards(self.rewards, prompts, texts, completions, fields),
                dtype=torch.float64,
            )
            if not real:
                continue
            weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float64)
            total = (scores * weights).nansum(dim=1)
            totals[0] += float(total.sum())
            for j in range(len(self.rewards)):
                totals[1 + j] += float(torch.nan_to_num(scores[:, j]).sum())
            count += len(rows)
        sums = all_reduce([*totals, count])
        n = max(sums[-1], 1)
        out = {"eval_reward": sums[0] / n}
        for j, r in enumerate(self.rewards):
            out[f"eval_reward_{r.name}"] = sums[1 + j] / n
        return out

    def eval_line(self, figures: dict[str, float]) -> str:
        return f"held-out mean reward {figures['eval_reward']:.4f}"


def _to_lists(entry: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in entry.items():
        if k == "batch":
            out[k] = {n: t.tolist() for n, t in v.items()}
        elif isinstance(v, torch.Tensor):
            out[k] = {"dtype": str(v.dtype).removeprefix("torch."), "values": v.tolist()}
        else:
            out[k] = v
    return out


def _from_lists(entry: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in entry.items():
        if k == "batch":
            out[k] = {n: torch.tensor(t, dtype=torch.long) for n, t in v.items()}
        elif isinstance(v, dict):
            out[k] = torch.tensor(v["values"], dtype=getattr(torch, v["dtype"]))
        else:
            out[k] = v
    return out


METHOD = Grpo
