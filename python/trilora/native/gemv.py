"""The 4-bit decode GEMV of the CUDA extension, as the QLoRA linear's forward uses it.

:func:`decode_gemv_4bit` returns ``None`` whenever the GEMV does not apply (not CUDA, more
than ``trilora.config.decode_gemv_max_tokens`` tokens, K not a multiple of 32, a dropout
mask, misaligned bytes, or no extension), and the caller runs its Triton path instead. See
``csrc/cuda/gemv_4bit.cu`` for the kernel and :mod:`trilora.config` for the crossover.
"""

from __future__ import annotations

import torch

from trilora.config import config
from trilora.native import cuda_ext

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def applies(x: torch.Tensor, k: int, n_out: int, packed: torch.Tensor, blocksize: int) -> bool:
    """Whether the GEMV can serve this call (shapes, dtypes, alignment; not the extension)."""
    m = x.shape[0] if x.dim() == 2 else 0
    return (
        x.is_cuda
        and x.dim() == 2
        and 0 < m <= min(4, config.decode_gemv_max_tokens)
        and x.dtype in _ACT_DTYPES
        and k % 32 == 0
        and blocksize >= 32
        and blocksize & (blocksize - 1) == 0
        and packed.numel() * packed.element_size() == n_out * k // 2
        and packed.data_ptr() % 16 == 0
    )


def decode_gemv_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    n_out: int,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(y, xa)`` of the QLoRA forward for ``M <= 4`` tokens, or ``None`` (see the module).

    Args:
        x: ``[M, K]`` fp16/bf16/fp32 on CUDA.
        packed, absmax, code, nested_absmax, nested_code, offset, blocksize: the 4-bit weight
            ``[n_out, K]`` in bitsandbytes' layout.
        lora_a ``[r, K]``, lora_b ``[n_out, r]``, scale: the adapter, or ``None``.
        bias: ``[n_out]`` or ``None``.

    Returns:
        ``y`` ``[M, n_out]`` in x's dtype and ``xa = x @ lora_a.T`` as fp32 ``[M, r]``
        (``[M, 0]`` without an adapter), as ``trilora::qlora_linear_fwd`` returns them.
    """
    k = x.shape[-1]
    if not applies(x, k, n_out, packed, blocksize):
        return None

    ext = cuda_ext.load()
    if ext is None:
        return None
    itemsize = x.element_size()
    if x.stride(1) != 1 or (x.stride(0) * itemsize) % 16 or x.data_ptr() % 16:
        x = x.contiguous()
    if lora_a is not None:
        xa = (x.to(lora_a.dtype) @ lora_a.t()).float().contiguous()
        b = lora_b if lora_b.dtype in (torch.float32, x.dtype) else lora_b.to(x.dtype)
        b = b.contiguous()
    else:
        xa, b = None, None
    y = ext.gemv_4bit(
        x,
        packed.reshape(-1).view(torch.uint8),
        absmax.contiguous(),
        code.contiguous(),
        nested_absmax,
        nested_code,
        offset.reshape(1) if offset is not None else None,
        blocksize,
        n_out,
        None if bias is None else bias.to(x.dtype).contiguous(),
        xa,
        b,
        float(scale),
    )
    return y, (xa if xa is not None else x.new_empty((x.shape[0], 0), dtype=torch.float32))


__all__ = ["applies", "decode_gemv_4bit"]
