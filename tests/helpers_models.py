"""Tiny transformers causal LMs for tests: built from configs, saved to disk, loaded back
through the real loading code (trilora's or transformers + bitsandbytes).

Other test files may import these builders; keep them side-effect free.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "mistral")


def tiny_config(arch: str = "llama", hidden: int = 64, layers: int = 2, vocab: int = 256,
                intermediate: int | None = None, tie: bool = False, **overrides):  # fmt: skip
    """A tiny ``LlamaConfig`` / ``Qwen2Config`` / ``MistralConfig`` (4 heads, 2 KV heads).

    Qwen2 has biases on q/k/v, so it exercises base-layer biases.
    """
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if arch not in classes:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
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
    kwargs.update(overrides)
    return classes[arch](**kwargs)


def save_tiny_model(path: str | Path, arch: str = "llama", dtype: torch.dtype = torch.float32,
                    seed: int = 0, max_shard_size: str | None = None, **config_kwargs) -> Path:  # fmt: skip
    """Build a randomly initialized tiny model and ``save_pretrained`` it (safetensors).

    Weights are drawn with a larger std than the default init so that logits differ
    visibly between tokens (a near-constant model would hide errors).
    """
    from transformers import AutoModelForCausalLM

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


def load_bnb_4bit(path: str | Path, quant_type: str = "nf4", double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32):  # fmt: skip
    """Load ``path`` with transformers + bitsandbytes 4-bit on the CPU (the baseline)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb, dtype=dtype, device_map="cpu"
    )


def random_batch(
    vocab: int, batch: int = 2, seq: int = 12, seed: int | None = None
) -> torch.Tensor:
    """``[batch, seq]`` int64 token ids."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen)
