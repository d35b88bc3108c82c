"""4-bit blockwise quantize / dequantize as torch.library custom ops.

``trilora::quantize_4bit`` and ``trilora::dequantize_4bit`` follow the bitsandbytes
format byte for byte (see ``docs/architecture.md``). Each has a torch reference
implementation (CPU tensors, and the reference the tests compare the kernels with), a
Triton implementation (``trilora.kernels.quantize``) chosen by :func:`trilora.config.use_triton`,
and a fake implementation for FakeTensorMode, the meta device and ``torch.compile``.

On CPU tensors, dequantization to fp32/fp16/bf16 runs the native extension
(:mod:`trilora.native.cpu_ext`, ``csrc/cpu/dequantize_4bit.cpp``): one pass over the bytes
through a per-block scaled 16-entry table, the double-quantized scales decoded in the same
pass, bit-identical to the torch path (the format's definition: ``code[nibble] * scale`` in
fp32, then one cast). Where the extension cannot be built (no compiler, no ninja,
``TRILORA_NO_NATIVE=1``) one warning says so and the torch path below serves, several times
slower on large weights.

The 8-bit blockwise quantizer used for double quantization lives here too; it is small
(one value per 4-bit block) and runs as plain torch ops on any device.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F

from trilora.config import use_triton

NESTED_BLOCKSIZE = 256
"""Blocksize bitsandbytes uses for the 8-bit quantization of the absmax (double quant)."""

_LUT_SIZE = 65536


def _flat_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    return F.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize), n


def quantize_4bit_reference(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of the bitsandbytes 4-bit quantizer.

    Args:
        x: any shape, fp32/fp16/bf16.
        code: fp32 ``[16]`` code table in bit order (NF4 or FP4).
        blocksize: elements per absmax block.

    Returns:
        ``(packed, absmax)``: uint8 ``[(n+1)//2]`` (first element in the high nibble) and
        fp32 ``[ceil(n / blocksize)]``.
    """
    blocks, n = _flat_blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # bitsandbytes scales whole blocks by a reciprocal but divides the trailing partial
    # block, and stores that block's absmax clamped; both differences are reproduced so
    # the bytes match for every element count.
    full = n // blocksize
    scaled = torch.clamp(blocks[:full] * (1.0 / absmax[:full].clamp(min=1e-38)).unsqueeze(1), -1, 1)
    scaled = scaled.reshape(-1)
    if full < blocks.shape[0]:
        tail_absmax = absmax[full:].clamp(min=1e-38)
        tail = torch.clamp(blocks[full, : n - full * blocksize] / tail_absmax, -1, 1)
        scaled = torch.cat([scaled, tail])
        absmax = torch.cat([absmax[:full], tail_absmax])
    if n % 2:
        scaled = F.pad(scaled, (0, 1))
    order = torch.argsort(code)
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    q = torch.bucketize(scaled, bounds, out_int32=True)
    # NF4's table is sorted, so its order is the identity and the remap can be skipped.
    if not torch.equal(order, torch.arange(16, device=order.device)):
        q = order[q]
    q = q.to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    return packed, absmax


def dequantize_4bit_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Torch reference of the bitsandbytes 4-bit dequantizer (see :func:`dequantize_4bit`)."""
    n = math.prod(shape)
    scale = dequantize_absmax(absmax, nested_absmax, nested_code, offset)
    packed = packed.reshape(-1).view(torch.uint8)
    # One gather from a 256-entry byte -> (high, low) value table replaces unpacking the
    # nibbles and looking each up: on CPU this is the difference between dequantization
    # costing twice a same-sized GEMM and costing a fraction of one.
    byte = torch.arange(256, device=code.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).float()
    if dtype == torch.float32 or packed.numel() <= _DEQUANT_CHUNK_BYTES:
        values = pairs.index_select(0, packed.int()).view(-1)[:n]
        _scale_blocks(values, scale, blocksize, 0)
        return values.view(shape).to(dtype)
    # A narrower output goes through an fp32 scratch that stays in cache: two full-size
    # temporaries (the fp32 values and the index) cost more in page faults than the math.
    out = torch.empty(n, dtype=dtype, device=packed.device)
    index = torch.empty(_DEQUANT_CHUNK_BYTES, dtype=torch.int32, device=packed.device)
    scratch = torch.empty(2 * _DEQUANT_CHUNK_BYTES, dtype=torch.float32, device=packed.device)
    for b0 in range(0, packed.numel(), _DEQUANT_CHUNK_BYTES):
        b1 = min(b0 + _DEQUANT_CHUNK_BYTES, packed.numel())
        idx = index[: b1 - b0]
        idx.copy_(packed[b0:b1])
        e0, e1 = 2 * b0, min(2 * b1, n)
        values = torch.index_select(pairs, 0, idx, out=scratch[: 2 * (b1 - b0)].view(-1, 2))
        values = values.view(-1)[: e1 - e0]
        _scale_blocks(values, scale, blocksize, e0)
        out[e0:e1].copy_(values)
    return out.view(shape)


# 64 Ki bytes (128 Ki values): a multiple of every blocksize, and a scratch that fits L2.
_DEQUANT_CHUNK_BYTES = 1 << 16


def _scale_blocks(values: torch.Tensor, scale: torch.Tensor, blocksize: int, start: int) -> None:
    """Multiply ``values`` (flat elements ``start ...``, ``start`` block-aligned) by their
    blocks' scales in place."""
    first = start // blocksize
    full = values.numel() // blocksize
    values[: full * blocksize].view(full, blocksize).mul_(scale[first : first + full, None])
    if full * blocksize < values.numel():
        values[full * blocksize :].mul_(scale[first + full])


def dequantize_absmax(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
) -> torch.Tensor:
    """The fp32 per-block scales: ``absmax`` itself, or its double-quantized form decoded
    as ``nested_code[q] * nested_absmax[i // 256] + offset`` (product, then sum, in fp32)."""
    if nested_absmax is None:
        return absmax.float()
    values = nested_code[absmax.long()]
    nblocks = values.numel()
    groups = nested_absmax.numel()
    values = F.pad(values, (0, groups * NESTED_BLOCKSIZE - nblocks)).view(groups, NESTED_BLOCKSIZE)
    return (values * nested_absmax[:, None]).reshape(-1)[:nblocks] + offset.reshape(())


@functools.lru_cache(maxsize=8)
def _nested_lut(code_bytes: bytes, device: str) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    grid = (torch.arange(_LUT_SIZE, dtype=torch.float32) / (_LUT_SIZE - 1)) * 2 - 1
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(grid, bounds).to(torch.uint8).to(device)


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' 8-bit blockwise quantizer, as its CPU backend computes it.

    bitsandbytes rounds a normalized value to the code through a 65,536-entry table over
    [-1, 1] (``idx = trunc((v + 1) / 2 * 65535 + 0.5)``) instead of an exact nearest
    search; values within ~1e-5 of a midpoint can land on the farther code. We use the
    same kind of table, so double-quantized scales match byte for byte except at such
    near-ties, where its binary search and our table can round to different neighbours
    (found once in thousands of random weights; tests/test_quant.py bounds it).

    Args:
        x: fp32 ``[n]``.
        code: fp32 ``[256]`` sorted dynamic map.

    Returns:
        ``(q, absmax)``: uint8 ``[n]`` and fp32 ``[ceil(n / blocksize)]``.
    """
    blocks, n = _flat_blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = (blocks / absmax[:, None]).reshape(-1)[:n].clamp(-1, 1)
    # An all-zero block normalizes to 0/0; bitsandbytes maps that NaN to the first code.
    normed = torch.nan_to_num(normed, nan=-1.0)
    idx = (((normed + 1.0) * 0.5) * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    lut = _nested_lut(code.detach().cpu().float().numpy().tobytes(), str(x.device))
    return lut[idx], absmax


@functools.lru_cache(maxsize=2)
def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (256 sorted fp32 values): the signed one is the
    ``nested_quant_map`` and the first-moment map of 8-bit AdamW, the unsigned one
    (``signed=False``, values in [0, 1]) the second-moment map. Built with the same fp32
    arithmetic as ``bitsandbytes.functional.create_dynamic_map`` so the tables are
    bit-identical."""
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def kernel_weight(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    shape: list[int] | torch.Size,
):
    """The ``trilora.kernels.quantize.Weight4bit`` the Triton launchers take: the packed bytes
    viewed flat as uint8 and the weight seen as ``[prod(shape[:-1]), shape[-1]]``."""
    from trilora.kernels.quantize import Weight4bit

    n_cols = shape[-1] if len(shape) else 1
    return Weight4bit(
        packed.reshape(-1).view(torch.uint8),
        absmax,
        code,
        nested_absmax,
        nested_code,
        offset,
        blocksize,
        math.prod(shape) // n_cols,
        n_cols,
    )


# ---------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("trilora::quantize_4bit", mutates_args=())
def quantize_4bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any shape, fp32/fp16/bf16) to packed 4-bit codes.

    Returns ``(packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)])``.
    """
    if use_triton(x):
        from trilora.kernels.quantize import quantize_4bit as launch

        return launch(x.contiguous(), code, blocksize)
    return quantize_4bit_reference(x, code, blocksize)


@quantize_4bit.register_fake
def _(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    return (
        x.new_empty(((n + 1) // 2,), dtype=torch.uint8),
        x.new_empty((-(-n // blocksize),), dtype=torch.float32),
    )


_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dequantize_4bit_cpu_native(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    shape: list[int] | torch.Size,
    dtype: torch.dtype,
    isa: str = "auto",
    scratch: bool = False,
) -> torch.Tensor | None:
    """CPU dequantization through the native extension (arguments as in
    :func:`dequantize_4bit`); ``None`` when the extension is unavailable or the case is not
    one it serves (a non-CPU tensor, an output dtype other than fp32/fp16/bf16).

    ``scratch=True`` writes into this thread's reusable buffer instead of a new tensor (see
    :func:`scratch_buffer`): for callers that drop the weight before they dequantize again.
    """
    if packed.device.type != "cpu" or dtype not in _NATIVE_DTYPES:
        return None
    from trilora.native import cpu_ext

    if cpu_ext.load() is None:
        return None
    if scratch:
        out = scratch_buffer(math.prod(shape), dtype).view(shape)
    else:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    state = _native_state(packed, absmax, code, nested_absmax, nested_code, offset, blocksize)
    cpu_ext.dequantize_4bit_into(out, *state, isa)
    return out


def _native_state(packed, absmax, code, nested_absmax, nested_code, offset, blocksize) -> tuple:
    # The 4-bit state as the extension's entry points take it, after their first argument:
    # flat uint8 bytes, contiguous scales and table, and the nested state's block size.
    return (
        packed.reshape(-1).view(torch.uint8).contiguous(),
        absmax.contiguous(),
        code.contiguous(),
        nested_absmax,
        nested_code,
        offset,
        blocksize,
        NESTED_BLOCKSIZE,
    )


def small_m_serves(x: torch.Tensor) -> bool:
    """Whether the native small-M products (both formats) serve ``x`` ``[M, K]``: a plain
    CPU tensor of at most ``cpu_ext.small_m_max_rows()`` rows, with the extension built."""
    from trilora.native import cpu_ext

    return (
        x.device.type == "cpu"
        and type(x) in (torch.Tensor, torch.nn.Parameter)
        and x.shape[0] <= cpu_ext.small_m_max_rows()
    )


def small_m_product_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    n_out: int,
) -> torch.Tensor | None:
    """``x @ W.T`` in fp32 ``[M, n_out]`` for a CPU ``x`` ``[M, K]`` of a few rows (decode,
    sampling), read straight from the packed codes by the native extension (weight state as
    in :func:`dequantize_4bit`); ``None`` where it does not serve the call (more rows, no
    extension, not a plain CPU tensor, a blocksize that is not a multiple of 16).

    At M <= 8 the product is bound by reading the weight: half a byte per weight here
    against 8.5 for dequantize (0.5 read, 4 written) + GEMM (4 read back)."""
    from trilora.native import cpu_ext

    if blocksize % 16 or not small_m_serves(x):
        return None
    state = _native_state(packed, absmax, code, nested_absmax, nested_code, offset, blocksize)
    return cpu_ext.small_m_linear_4bit(x.float().contiguous(), *state, n_out)


_SCRATCH = threading.local()


def scratch_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's reusable CPU buffer of at least ``numel`` elements of ``dtype``.

    A fresh tensor for every dequantized weight costs more than the dequantization: the
    allocator maps new pages (above glibc's 32 MiB mmap limit, always; below it, whenever
    the heap was trimmed) and the kernel zero-fills each one on first touch. Measured on this
    project's CPU: 0.9 ms instead of 0.14 ms for a 1536 x 576 fp32 weight, 31 ms instead of
    3.2 ms for 4096 x 4096. The buffer grows to the largest weight seen and is kept; one per
    thread, so the autograd engine's threads never share one.
    """
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buffers.pop(dtype, None)
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def dequantize_4bit_impl(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    shape: list[int] | torch.Size,
    dtype: torch.dtype,
    scratch: bool = False,
) -> torch.Tensor:
    """What :func:`dequantize_4bit` computes, without the custom-op dispatch: the ops that
    dequantize inside their own custom op (the QLoRA linear) call this directly.

    ``scratch=True``: on the CPU's native path the result is a view of a per-thread buffer
    that the next ``scratch=True`` call in this thread overwrites; use it and drop it.
    """
    if use_triton(packed):
        from trilora.kernels.quantize import dequantize_4bit as launch

        w = kernel_weight(
            packed, absmax, code, nested_absmax, nested_code, offset, blocksize, shape
        )
        return launch(w, dtype).reshape(shape)
    out = dequantize_4bit_cpu_native(
        packed,
        absmax,
        code,
        nested_absmax,
        nested_code,
        offset,
        blocksize,
        shape,
        dtype,
        scratch=scratch,
    )
    if out is not None:
        return out
    return dequantize_4bit_reference(
        packed, absmax, code, nested_absmax, nested_code, offset, blocksize, list(shape), dtype
    )


@torch.library.custom_op("trilora::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize packed 4-bit codes to ``shape`` in ``dtype``.

    Args:
        packed: the packed bytes in any storage dtype (viewed as uint8), ``(n+1)//2`` bytes.
        absmax: fp32 ``[nblocks]``, or uint8 ``[nblocks]`` when double-quantized.
        code: fp32 ``[16]``.
        nested_absmax, nested_code, offset: the double-quantization state, or ``None``.
        blocksize: elements per block.
        shape: the output shape (``n`` elements).
        dtype: fp32, fp16 or bf16 (fp64 on the torch path, for references).
    """
    return dequantize_4bit_impl(
        packed, absmax, code, nested_absmax, nested_code, offset, blocksize, shape, dtype
    )


@dequantize_4bit.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)
