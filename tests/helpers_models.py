"""Tiny transformers causal LMs for tests: built from configs, saved to disk, loaded back
through the real loading code (trilora's or transformers + bitsandbytes).

Other test files may import these builders; keep them side-effect free.
"""

from __future__ import annotations

from pathlib import Path

import torch

# The builders live in the package (trilora bench and the README's examples use them too).
from trilora.train.tiny_model import ARCHS, save_tiny_model, tiny_config  # noqa: F401


def load_bnb_4bit(
    path: str | Path,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    dtype: torch.dtype = torch.float32,
):
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


def exact_4bit_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``model`` in which every 4-bit linear layer (bitsandbytes' or
    trilora's ``Linear4bit``) is a plain ``nn.Linear`` holding the exact dequantization of its
    bytes (``reference_format``): the model the 4-bit checkpoint defines, computed in float64.

    The baseline for model-level parity: bitsandbytes' bytes are right, but its CPU
    dequantization (and its CPU inference path, which rounds the scales to bf16 on AVX-512
    machines) is not, so its outputs are not the truth. Build this before running a
    bitsandbytes model without gradients: that converts its weights to another layout.
    """
    import copy

    import reference_format as ref

    import trilora

    try:
        from bitsandbytes.nn import Linear4bit as BnbLinear4bit
    except ImportError:  # trilora-only models need no bitsandbytes
        BnbLinear4bit = ()
    exact = copy.deepcopy(model)
    for name, module in list(exact.named_modules()):
        if isinstance(module, trilora.Linear4bit):
            weight = ref.dequantize_trilora(module.quantized_weight())
        elif BnbLinear4bit and isinstance(module, BnbLinear4bit):
            state = module.weight.quant_state
            assert not getattr(state, "packing_format_for_cpu", False), (
                f"{name}: bitsandbytes already repacked this weight for CPU inference"
            )
            weight = ref.dequantize_bnb(module.weight.data, state)
        else:
            continue
        linear = torch.nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            dtype=torch.float64,
        )
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = torch.nn.Parameter(
                module.bias.detach().double(), requires_grad=module.bias.requires_grad
            )
        if not name:  # the model is one 4-bit layer
            return linear
        parent, _, child = name.rpartition(".")
        setattr(exact.get_submodule(parent) if parent else exact, child, linear)
    return exact.double()


def bnb_cpu_dequantize_wrong(shapes, quant_type: str = "nf4", blocksize: int = 64) -> list:
    """The weight shapes for which bitsandbytes' CPU ``dequantize_4bit`` is wrong on this
    machine (it is for some shapes on AVX-512 CPUs; docs/bitsandbytes-cpu.md).

    A test that compares with bitsandbytes' CPU outputs checks its shapes with this first.
    """
    import bitsandbytes.functional as bnbf
    import reference_format as ref

    wrong = []
    for shape in shapes:
        weight = torch.randn(shape)
        for double_quant in (False, True):
            packed, state = bnbf.quantize_4bit(
                weight,
                blocksize=blocksize,
                quant_type=quant_type,
                compress_statistics=double_quant,
            )
            exact = ref.expected(ref.dequantize_bnb(packed, state), torch.float32)
            if not torch.equal(bnbf.dequantize_4bit(packed, state), exact):
                wrong.append(tuple(shape))
                break
    return wrong


# Two runs of the same training that differ only in summation order (N processes against
# one): their adapters are compared as a whole, by the relative L2 norm of the difference
# over every tensor, and each tensor more loosely. An element-wise bound would test Adam,
# not the runs: where a gradient is at the level of fp32 rounding (the q/k LoRA B of a tiny
# model whose attention is still uniform), the update m / sqrt(v) is a ratio of two
# rounding-sized numbers, so a last-bit difference moves that element by a visible fraction
# of lr. Measured: one q_proj lora_B at 1.0e-4 of its largest entry while the whole adapter
# was at 1.5e-6 and the losses agreed to 1e-7.
ADAPTER_RTOL = 1e-4
ADAPTER_TENSOR_RTOL = 1e-3


def assert_adapters_close(got: dict, want: dict) -> dict[str, float]:
    """``got`` and ``want`` (name -> tensor) hold the same tensors, within
    :data:`ADAPTER_RTOL` as a whole (relative L2) and :data:`ADAPTER_TENSOR_RTOL` per tensor
    (largest error / largest entry); returns both measures."""
    assert sorted(got) == sorted(want) and want
    diff = sum(float((got[k].double() - want[k].double()).square().sum()) for k in want)
    norm = sum(float(want[k].double().square().sum()) for k in want)
    per = {k: ((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want}
    worst = {"adapter": (diff / norm) ** 0.5, "adapter_tensor": max(per.values())}
    assert worst["adapter"] <= ADAPTER_RTOL, worst
    key = max(per, key=per.get)
    assert per[key] <= ADAPTER_TENSOR_RTOL, (key, per[key])
    return worst
