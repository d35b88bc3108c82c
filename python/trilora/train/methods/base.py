"""The seam between the training loop and a training method.

The loop (:mod:`trilora.train.loop`) owns the run: data order, micro-batches, the
optimizer, checkpoints, logging. A :class:`Method` owns what differs between SFT, DPO and
GRPO: how records are read (:attr:`Method.records`), how rows are formed and batched, the
loss of a micro-batch and its logged statistics, and the held-out evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from trilora.distributed import DistEnv
from trilora.train import data as D

__all__ = ["Method", "MicroBatch", "RunContext"]


@dataclass
class MicroBatch:
    """This rank's rows of one global micro-batch: collated ``batch``, their row indices
    ``idx``, ``real`` (False: a stand-in row at weight 0, see
    :func:`trilora.train.collectives.rank_rows`) and ``index``, the micro-batch's position
    in the run (a pure function of the seed: methods key per-batch state on it)."""

    batch: dict[str, Any]
    idx: list[int]
    real: bool = True
    index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # what the method keeps beside the batch


@dataclass
class RunContext:
    """What a method's steps need from the run, built by the loop once the model is loaded.

    ``base_mode()`` is a context manager that runs ``model`` as the base (adapters
    disabled, no second copy); ``rows`` are the training rows (:meth:`Method.rows`).
    """

    model: nn.Module
    cfg: Any  # trilora.train.config.TrainConfig
    tokenizer: Any
    autocast_dtype: torch.dtype | None
    base_mode: Callable[[], AbstractContextManager]
    env: DistEnv
    pad_id: int
    run_dir: Path
    rows: list = field(default_factory=list)
    records: list[dict] = field(default_factory=list)  # the training records, by row
    val_records: list[dict] = field(default_factory=list)


class Method:
    """One training method. Subclasses set :attr:`name`, :attr:`records` and the loss.

    Normalisation: :meth:`loss_items` counts what the step's loss is averaged over (SFT:
    loss tokens; DPO: pairs, and chosen tokens for its NLL term), :attr:`item_kinds`
    numbers; the loop sums them over every micro-batch and rank of the step and passes the
    totals to :meth:`micro_loss`, so accumulated gradients are exactly those of the step's
    mean loss.
    """

    name: ClassVar[str]
    records: ClassVar[D.RecordFormat]
    # keys of the statistics :meth:`micro_loss` returns; summed over the micro-batches (each
    # already divided by the step's item count) and logged with every step
    stat_keys: ClassVar[tuple[str, ...]] = ()
    # (label, key, format) of the statistics shown on the progress bar
    bar_stats: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    item_kinds: ClassVar[int] = 1  # how many counts loss_items returns
    # optimizer steps each batch of data serves (GRPO's --num-iterations)
    repeats: int = 1

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    # --- data ---------------------------------------------------------------------------

    def rows(self, examples: list) -> list:
        """The training rows built from the tokenized examples (default: one each)."""
        return list(examples)

    def row_length(self, row: Any) -> int:
        """Tokens in ``row`` (batches group rows of similar length)."""
        return len(row)

    def collate(self, rows: list, pad_id: int) -> dict[str, Any]:
        """The tensors of one micro-batch of ``rows``."""
        raise NotImplementedError

    # --- training -----------------------------------------------------------------------

    def prepare(self, run: RunContext) -> None:
        """Work before the first step (e.g. scoring every row with the reference)."""

    def prepare_step(self, run: RunContext, step: int, micro: list[MicroBatch]) -> None:
        """Complete the micro-batches of optimizer step ``step`` before their items are
        counted (GRPO samples and scores its completions here)."""

    def loss_items(self, mb: MicroBatch) -> list[int]:
        """How many items of the step's mean loss ``mb`` holds (:attr:`item_kinds` counts)."""
        return [len(mb.idx)]

    def micro_loss(
        self, run: RunContext, mb: MicroBatch, num_items: list[int]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``(loss, stats)``: the 0-d loss of ``mb`` (its share of the step's mean, to
        backpropagate) and its :attr:`stat_keys` statistics (floats, same share);
        ``num_items`` are the step's totals of :meth:`loss_items` over every micro-batch
        and rank."""
        raise NotImplementedError

    def after_step(self, run: RunContext, record: dict[str, Any], say: Callable[[str], None]):
        """Look at a logged step's ``record`` (e.g. to warn about a known failure)."""

    def state(self) -> dict[str, Any] | None:
        """What a resumed run needs from this method beyond the model, optimizer and RNG
        (JSON-serialisable; kept in each checkpoint's trainer state)."""
        return None

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state` from a checkpoint."""

    def eval_line(self, figures: dict[str, float]) -> str:
        """The line a periodic evaluation prints."""
        return f"held-out loss {figures['eval_loss']:.4f}"

    def bar_text(self, record: dict[str, Any]) -> str:
        """The method's statistics of a step's ``record`` for the progress bar."""
        return " ".join(
            f"{label} {format(record[key], spec)}"
            for label, key, spec in self.bar_stats
            if key in record
        )

    # --- evaluation ---------------------------------------------------------------------

    def evaluate(
        self,
        run: RunContext,
        model: nn.Module,
        val: list,
        chunks: Iterator[tuple[list[int], bool]],
        all_reduce: Callable[[list[float]], list[float]],
        as_base: bool,
    ) -> dict[str, float]:
        """Held-out figures of ``model`` (in eval mode, no grad) on the examples ``val``.

        ``chunks`` yields ``(indices, real)`` for this rank; ``all_reduce`` sums a list of
        numbers over the ranks (every rank returns the same figures); ``as_base``: the
        caller already runs the model as the base (before training).
        """
        raise NotImplementedError
