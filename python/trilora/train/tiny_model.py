"""Tiny causal LMs built from transformers configs, with a real (byte-level) tokenizer and a
chat template: what ``trilora bench --level train``, the README's examples and the tests
train when no real model is at hand (nothing is downloaded).

>>> from trilora.train.tiny_model import save_tiny_lm
>>> folder = save_tiny_lm("tiny-llama", hidden=64, layers=2)   # doctest: +SKIP

The folder is an ordinary Hugging Face model folder (``config.json``, safetensors weights,
``tokenizer.json`` with a chat template) that ``trilora train --model``,
``trilora.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained`` load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3MoeConfig,
)

ARCHS = ("llama", "qwen2", "mistral")
MOE_ARCHS = ("qwen3_moe", "mixtral")
"""Mixture-of-experts families :func:`tiny_config` also builds (4 experts, top-2)."""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
"""The tokenizer's special tokens, ids 256..260 after the 256 byte tokens."""


def tiny_config(
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 256,
    intermediate: int | None = None,
    tie: bool = False,
    **overrides,
):
    """A tiny ``LlamaConfig`` / ``Qwen2Config`` / ``MistralConfig`` (4 heads, 2 KV heads),
    or a mixture of experts (:data:`MOE_ARCHS`: 4 experts of ``intermediate`` each, top-2).

    Qwen2 has biases on q/k/v, so it exercises base-layer biases. ``overrides`` are further
    config fields (``max_position_embeddings`` defaults to 128).
    """

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    moe = {"qwen3_moe": Qwen3MoeConfig, "mixtral": MixtralConfig}
    if arch not in classes and arch not in moe:
        raise ValueError(f"arch must be one of {ARCHS + MOE_ARCHS}, got {arch!r}")
    kwargs = dict(
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    if arch == "qwen3_moe":
        kwargs.update(
            moe_intermediate_size=intermediate or hidden,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=hidden // 4,
            mlp_only_layers=[],
        )
    elif arch == "mixtral":
        kwargs.update(num_local_experts=4, num_experts_per_tok=2)
    kwargs.update(overrides)
    return {**classes, **moe}[arch](**kwargs)


def save_tiny_model(
    path: str | Path,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    **config_kwargs,
) -> Path:
    """Build a randomly initialized tiny model (:func:`tiny_config`) and ``save_pretrained``
    it (safetensors, weights in ``dtype``) to ``path``; no tokenizer.

    Weights are drawn with a larger std than the default init so that logits differ
    visibly between tokens (a near-constant model would hide errors).
    """

    path = Path(path)
    config = tiny_config(arch, **config_kwargs)
    gen = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def save_tokenizer(path: str | Path, chat: bool = True):
    """Save a byte-level tokenizer to ``path`` and return it: 256 byte tokens + 5 specials
    (ids 256..260), with :data:`CHAT_TEMPLATE` when ``chat``."""

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i, s in enumerate(SPECIALS):
        vocab[s] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def save_tiny_lm(path: str | Path, chat: bool = True, seed: int = 0, **config) -> Path:
    """A tiny model (vocabulary 320, default Llama, :func:`save_tiny_model` arguments in
    ``config``) plus its byte-level tokenizer in ``path``; returns ``path``."""
    config.setdefault("vocab", 320)
    config.setdefault("max_position_embeddings", 512)
    save_tiny_model(path, seed=seed, **config)
    save_tokenizer(path, chat)
    cfg = json.loads((Path(path) / "config.json").read_text())
    cfg.update(bos_token_id=256, eos_token_id=257, pad_token_id=258)
    (Path(path) / "config.json").write_text(json.dumps(cfg))
    return Path(path)


__all__ = [
    "ARCHS",
    "CHAT_TEMPLATE",
    "MOE_ARCHS",
    "SPECIALS",
    "save_tiny_lm",
    "save_tiny_model",
    "save_tokenizer",
    "tiny_config",
]
