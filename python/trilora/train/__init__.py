"""The thin trainer: ``trilora train`` (SFT and DPO from JSONL) and ``trilora data check``.

Modules (data flows down only: this package -> loading/peft/memory/optim -> nn -> ops):

* :mod:`~trilora.train.config`: :class:`TrainConfig`, YAML + flags, validation (no torch).
* :mod:`~trilora.train.data`: JSONL reading, the four SFT shapes and DPO pairs, tokenization
  with response-only labels, truncation accounting, packing, length-grouped batches.
* :mod:`~trilora.train.model`: model loading (HF folder, bitsandbytes 4-bit, GGUF), LoRA /
  other PEFT methods / full fine-tuning, trilora's memory options.
* :mod:`~trilora.train.optim`: the one place optimizers and LR schedules are built.
* :mod:`~trilora.train.loop`: the training loop, evaluation, resume.
* :mod:`~trilora.train.stop`: SIGTERM / Ctrl-C: a checkpoint at the next step boundary, one
  line, exit 143 / 130 (every rank stops at the same step).
* :mod:`~trilora.train.methods`: one module per training method (``sft``, ``dpo``) behind
  :class:`~trilora.train.methods.base.Method`: how its records are read, how a batch is
  built, its loss, statistics and evaluation; the loop never branches on the method.
* :mod:`~trilora.train.losses`: per-token losses and sequence log-probabilities through the
  fused head (:class:`trilora.patches.fused_loss.HeadScorer`).
* :mod:`~trilora.train.checkpoints`: run checkpoints (atomic, last K kept, resumable on any
  process count) and RNG state.
* :mod:`~trilora.train.launch`: several processes (``--nproc``); ``python -m trilora.train``
  (:mod:`trilora.train.__main__`) is the worker entry point under torchrun / accelerate launch.
* :mod:`~trilora.train.collectives`: the process group, wrapping, each rank's rows,
  cross-rank agreement.
* :mod:`~trilora.train.reporting`: progress bar, metrics.jsonl, TensorBoard, loss curve,
  base-vs-tuned comparison, summary.
* :mod:`~trilora.train.demo`, :mod:`~trilora.train.demo_data`: ``trilora train --demo``.
* :mod:`~trilora.commands.train`, :mod:`~trilora.commands.data`: the commands.

Importing this package is cheap (no torch): the CLI imports it for ``--help``.
"""
