"""Tiny models with a real (byte-level) tokenizer and a chat template, for trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

# The builders live in the package (trilora bench and the README's examples use them too).
from trilora.train.tiny_model import CHAT_TEMPLATE, SPECIALS, save_tiny_lm, save_tokenizer  # noqa: F401


def write_jsonl(path: str | Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return Path(path)


def sft_records(n: int = 24, seed: int = 0) -> list[dict]:
    """Short instruction records of varied length, in all four SFT shapes."""
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota"]
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        kind = i % 4
        if kind == 0:
            out.append({"instruction": f"repeat {q}", "input": "", "output": a})
        elif kind == 1:
            out.append({"prompt": f"Q: {q}\nA: ", "completion": a})
        elif kind == 2:
            out.append(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            )
        else:
            out.append({"text": f"{q} -> {a}"})
    return out


def write_tiny_gguf(path: str | Path, seed: int = 0, hidden: int = 32, layers: int = 1) -> Path:
    """A tiny Llama as a GGUF file (F32 tensors, a byte-level BPE tokenizer, a chat template)
    that transformers' GGUF loader reads: the format of the demo's SmolLM2 file, in kilobytes."""
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(seed)
    tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "ĠĠ", "<s>", "</s>"]
    heads, kv_heads, inter = 2, 1, 3 * hidden // 2
    head_dim = hidden // heads
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template(CHAT_TEMPLATE)

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, (0.05 * rng.standard_normal(shape)).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", inter, hidden)
        tensor(f"blk.{i}.ffn_up.weight", inter, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, inter)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", len(tokens), hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
