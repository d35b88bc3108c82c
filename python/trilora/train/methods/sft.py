"""Supervised fine-tuning: next-token cross-entropy on the response tokens."""

from __future__ import annotations

from typing import Any

from trilora.distributed import unwrap
from trilora.train import data as D
from trilora.train.losses import sft_loss_and_aux, token_losses
from trilora.train.methods.base import Method, MicroBatch, RunContext
from trilora.train.reporting import perplexity

__all__ = ["METHOD", "Sft"]


class Sft(Method):
    """Rows of one example each, or several packed (``--packing``); the loss is the mean
    over the step's loss tokens, through the model's own (fused) loss."""

    name = "sft"
    records = D.SFT_RECORDS

    def rows(self, examples: list) -> list:
        if self.cfg.packing:
            return D.pack(examples, self.cfg.max_seq_len)
        return [[e] for e in examples]

    def row_length(self, row: list) -> int:
        return sum(len(e) for e in row)

    def collate(self, rows: list, pad_id: int) -> dict[str, Any]:
        return D.collate(rows, pad_id)

    def loss_items(self, mb: MicroBatch) -> list[int]:
        return [int((mb.batch["labels"][:, 1:] != D.IGNORE).sum())]

    def prepare_step(self, run: RunContext, step: int, micro: list[MicroBatch]) -> None:
        # A mixture of experts logs its router's auxiliary loss with every step.
        config = getattr(unwrap(run.model), "config", None)
        moe = bool(getattr(config, "output_router_logits", False))
        self.stat_keys = ("aux_loss",) if moe else ()
        self.micro_count = max(1, sum(1 for mb in micro if mb.real))

    def micro_loss(self, run: RunContext, mb: MicroBatch, num_items: list[int]):
        loss, aux = sft_loss_and_aux(run.model, mb.batch, num_items[0], run.autocast_dtype)
        if "aux_loss" not in self.stat_keys:
            return loss, {}
        if aux is None:
            return loss, {"aux_loss": 0.0}
        world = max(1, run.env.world_size)
        if world > 1:
            # The loop scales each rank's loss by the rank count (right for the token-mean
            # cross-entropy) and the ranks' gradients are averaged; the model added
            # coef * aux of this rank's rows alone, so that term counts 1/world here: the
            # step then gets the ranks' mean auxiliary loss, as one process gets its own.
            coef = float(getattr(unwrap(run.model).config, "router_aux_loss_coef", 0.0))
            loss = loss - coef * aux.to(loss.dtype) * (1.0 - 1.0 / world)
        # Logged: the mean over the step's micro-batches and ranks (the loop sums the stats).
        return loss, {"aux_loss": float(aux.detach()) / (self.micro_count * world)}

    def evaluate(self, run, model, val, chunks, all_reduce, as_base):
        total, count = 0.0, 0
        for rows, real in chunks:
            batch = D.collate([[val[i]] for i in rows], run.pad_id)
            loss = float(token_losses(model, batch, "sum", run.autocast_dtype))
            if real:
                total += loss
                count += int((batch["labels"][:, 1:] != D.IGNORE).sum())
        total, count = all_reduce([total, count])
        count = int(count)
        loss = total / max(count, 1)
        return {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_tokens": count}


METHOD = Sft
