"""``trilora bench``: trilora against bitsandbytes + PEFT, with the hardware's speed-of-light.

Installed as ``trilora.bench``. Its levels, one harness:

* ``kernels`` (:mod:`trilora.bench.kernels`): 4-bit quantize/dequantize throughput and the
  QLoRA linear's forward, backward and forward+backward at real Llama/Qwen projection shapes,
  against bitsandbytes ``Linear4bit`` + PEFT LoRA and a bf16 ``nn.Linear`` + PEFT LoRA, each
  with its analytical floor (bytes / measured bandwidth, FLOPs / measured matmul rate).
* ``e2e`` (:mod:`trilora.bench.e2e`): training steps of a Llama-architecture model, trilora
  against transformers + bitsandbytes 4-bit + PEFT.
* ``moe`` (:mod:`trilora.bench.moe`): LoRA training steps of a mixture-of-experts model
  (Qwen3-MoE) and one experts layer, trilora (4-bit experts, grouped LoRA) against
  transformers + bitsandbytes + PEFT (16-bit experts, ``target_parameters``).
* ``busy`` (:mod:`trilora.bench.busy`): the e2e level's CPU training step on an idle machine
  and beside competing CPU-bound processes: each provider's slowdown against its fair share.
* ``mem`` (:mod:`trilora.bench.mem`): rows from ``trilora.memory.bench_cases``.
* ``optim`` (:mod:`trilora.bench.optim`): optimizer step time and state memory, torch's
  fused AdamW and bitsandbytes' PagedAdamW8bit against trilora's AdamW family.
* ``train`` (:mod:`trilora.bench.train`): peak memory of a DPO step, trilora against TRL +
  bitsandbytes + PEFT with a reference model.

Results are rows of one fixed schema (:data:`trilora.bench.harness.CSV_FIELDS`), written as
JSON, appended to one CSV, and rendered as a Markdown report with plots
(:mod:`trilora.bench.report`). See ``docs/bench.md``.

The modules live in the repository's top-level ``bench/`` folder, which has no
``__init__.py`` so that no top-level package named ``bench`` can shadow an installed one; a
wheel installs them here, and a source checkout reaches them through ``__path__``.
"""

from trilora._source_tree import extend_path

__path__ = extend_path(__path__, __file__, "bench", marker="cli.py")

LEVELS = ("kernels", "e2e", "moe", "busy", "mem", "optim", "train")
"""Benchmark levels in the order ``--level all`` runs them."""

__all__ = ["LEVELS"]
