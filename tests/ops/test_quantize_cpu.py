"""CPU 4-bit dequantization (native extension and torch fallback) against the format's definition.

The reference below is written from the specification (docs/architecture.md,
"Quantized format"), not from either implementation: element ``e`` is nibble ``e`` of the packed
bytes, the first element of a byte in its high nibble, and its value is
``code[nibble] * scale[e // blocksize]``: one fp32 product, then one cast to the output dtype.
With double quantization ``scale[i] = nested_code[q[i]] * nested_absmax[i // 256] + offset``,
the product and the sum each rounded to fp32. Products of two fp32 numbers are exact in
float64, so rounding the float64 product to fp32 gives the fp32 product bit for bit.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import trilora
from trilora.native import NativeExtensionWarning, cpu_ext
from trilora.ops import dequantize_4bit
from trilora.quant import code_table

NESTED = 256
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ext():
    ext = cpu_ext.load()
    if ext is None:
        pytest.skip(f"the CPU extension cannot be built here: {cpu_ext.reason()}")
    return ext


def _isas():
    order = ["scalar", "avx2", "avx512"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NativeExtensionWarning)
        ext = cpu_ext.load()
    best = ext.best_isa() if ext is not None else "scalar"
    return order[: order.index(best) + 1]


def reference_scales(absmax, nested_absmax, nested_code, offset) -> torch.Tensor:
    """fp32 per-block scales from the definition."""
    if nested_absmax is None:
        return absmax.float()
    q = absmax.long()
    group = torch.arange(q.numel()) // NESTED
    product = (nested_code.double()[q] * nested_absmax.double()[group]).float()
    return (product.double() + offset.double()).float()


def reference_dequantize(
    packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, dtype
):
    """[n] values in dtype, from the definition."""
    packed = packed.reshape(-1).view(torch.uint8).long()
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]
    scales = reference_scales(absmax, nested_absmax, nested_code, offset)
    block = torch.arange(n) // blocksize
    fp32 = (code.double()[nibbles] * scales.double()[block]).float()
    return fp32.to(dtype)


def _random_state(n, blocksize, double_quant, code=None, gen=None):
    nblocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=gen)
    if code is None:
        code = torch.randn(16, generator=gen)
    if not double_quant:
        absmax = torch.rand(nblocks, generator=gen) * 3
        return packed, absmax, code, None, None, None
    absmax = torch.randint(0, 256, (nblocks,), dtype=torch.uint8, generator=gen)
    nested_code = torch.sort(torch.randn(256, generator=gen)).values
    nested_absmax = torch.rand(-(-nblocks // NESTED), generator=gen) * 0.1
    offset = torch.rand((), generator=gen)
    return packed, absmax, code, nested_absmax, nested_code, offset


def _assert_identical(actual, expected, what=""):
    # Bit for bit (NaN where the reference has NaN).
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=what)


# Sizes: 1 element, an odd count, a partial last block, fewer elements than one vector, a
# block that crosses a row end (33 x 96 at blocksize 64), more than one nested group, and
# enough blocks to be split across threads (tasks of 2**16 elements).
SIZES = [1, 7, 31, 97, 33 * 96, 64 * 300 + 5, (1 << 18) + 70]


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("n", SIZES)
def test_native_matches_definition_every_isa(seed, dtype, double_quant, n):
    ext = _ext()
    gen = torch.Generator().manual_seed(seed)
    for blocksize in (32, 64, 256):
        state = _random_state(n, blocksize, double_quant, gen=gen)
        expected = reference_dequantize(*state, blocksize, n, dtype)
        for isa in _isas():
            out = torch.empty(n, dtype=dtype)
            packed, absmax, code, nested_absmax, nested_code, offset = state
            off = 0.0 if offset is None else float(offset)
            ext.dequantize_4bit_out(
                packed, absmax, code, nested_absmax, nested_code, off, NESTED, blocksize, out, isa
            )
            _assert_identical(out, expected, f"isa={isa} blocksize={blocksize}")


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_op_on_quantized_weights_all_blocksizes(seed, blocksize, quant_type, double_quant):
    """trilora::dequantize_4bit on CPU (the native path when it builds) for real weights."""
    shape = (37, 3 * blocksize // 2 + 3)  # blocks cross row ends; a partial last block
    w = trilora.quantize(torch.randn(shape), quant_type, blocksize, double_quant)
    assert torch.equal(w.code, code_table(quant_type))
    n = math.prod(shape)
    for dtype in OUT_DTYPES:
        expected = reference_dequantize(
            w.packed,
            w.absmax,
            w.code,
            w.nested_absmax,
            w.nested_code,
            w.offset,
            blocksize,
            n,
            dtype,
        ).view(shape)
        _assert_identical(w.dequantize(dtype), expected, str(dtype))


@pytest.mark.parametrize(
    "storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32], ids=str
)
def test_packed_storage_dtypes(seed, storage):
    shape = (19, 70)
    w = trilora.quantize(torch.randn(shape), "nf4", 64, True, quant_storage=storage)
    assert w.packed.dtype == storage
    expected = reference_dequantize(
        w.packed,
        w.absmax,
        w.code,
        w.nested_absmax,
        w.nested_code,
        w.offset,
        64,
        math.prod(shape),
        torch.bfloat16,
    )
    _assert_identical(w.dequantize(torch.bfloat16), expected.view(shape))


def test_extreme_scales_round_like_a_cast(seed):
    """fp16 overflow to inf, fp16/bf16 subnormals and rounding ties, zero and NaN blocks."""
    ext = _ext()
    n, blocksize = 64 * 8, 64
    packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8)
    code = code_table("nf4")
    absmax = torch.tensor([1e5, 7e4, 1e-6, 3e-8, 0.0, float("nan"), 1.0 + 2**-9, 2.0**-130])
    expected = {
        dt: reference_dequantize(packed, absmax, code, None, None, None, blocksize, n, dt)
        for dt in OUT_DTYPES
    }
    assert torch.isinf(expected[torch.float16]).any() and torch.isnan(expected[torch.float32]).any()
    for isa in _isas():
        for dtype in OUT_DTYPES:
            out = torch.empty(n, dtype=dtype)
            ext.dequantize_4bit_out(
                packed, absmax, code, None, None, 0.0, NESTED, blocksize, out, isa
            )
            _assert_identical(out, expected[dtype], f"{isa} {dtype}")


def test_float64_output_uses_the_torch_path(seed):
    w = trilora.quantize(torch.randn(12, 40), "fp4", 32, True)
    expected = reference_dequantize(
        w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset, 32, 480, torch.float32
    ).double()
    _assert_identical(w.dequantize(torch.float64), expected.view(12, 40))


def test_bad_arguments_are_refused():
    ext = _ext()
    packed = torch.zeros(8, dtype=torch.uint8)
    code = torch.zeros(16)
    with pytest.raises(RuntimeError, match="blocksize"):
        ext.dequantize_4bit_out(
            packed, torch.ones(1), code, None, None, 0.0, NESTED, 3, torch.empty(16), "auto"
        )
    with pytest.raises(RuntimeError, match="packed holds"):
        ext.dequantize_4bit_out(
            packed, torch.ones(1), code, None, None, 0.0, NESTED, 32, torch.empty(32), "auto"
        )
    with pytest.raises(RuntimeError, match="fp32, fp16 or bf16"):
        out = torch.empty(16, dtype=torch.float64)
        ext.dequantize_4bit_out(
            packed, torch.ones(1), code, None, None, 0.0, NESTED, 32, out, "auto"
        )
    with pytest.raises(RuntimeError, match="isa must be"):
        ext.dequantize_4bit_out(
            packed, torch.ones(1), code, None, None, 0.0, NESTED, 32, torch.empty(16), "sse9"
        )


# --- the fallback when the extension is unavailable ---------------------------------------


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_torch_fallback_matches_definition(seed, monkeypatch, dtype, double_quant):
    monkeypatch.setattr(cpu_ext, "load", lambda: None)
    for n, blocksize in ((1, 32), (97, 64), (33 * 96, 64), (1 << 18, 4096), (300_001, 128)):
        shape = [n]
        state = _random_state(n, blocksize, double_quant)
        out = dequantize_4bit(*state, blocksize, shape, dtype)
        _assert_identical(out, reference_dequantize(*state, blocksize, n, dtype), f"n={n}")


_FALLBACK_SCRIPT = """
import warnings, torch, trilora
from trilora.native import NativeExtensionWarning
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    w = trilora.quantize(torch.randn(64, 96), "nf4", 64, True)
    a = w.dequantize(torch.float32)
    b = w.dequantize(torch.bfloat16)
    x = torch.randn(5, 96, requires_grad=True)
    from trilora.ops import qlora_linear
    qlora_linear(x, w).sum().backward()
ours = [str(c.message) for c in caught if issubclass(c.category, NativeExtensionWarning)]
print(len(ours))
print(ours[0] if ours else "")
torch.save((w, a, b), {path!r})
"""


@pytest.mark.slow  # a real process (~4 s of CPU); our own fallback; the native build: tests/native
def test_no_compiler_falls_back_with_one_warning(tmp_path):
    """A process without the extension (TRILORA_NO_NATIVE=1, as without a compiler) warns once,
    says the fallback is slower, and computes the same values."""
    path = tmp_path / "out.pt"
    env = dict(os.environ, TRILORA_NO_NATIVE="1")
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT.format(path=str(path))],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    count, message = proc.stdout.strip().splitlines()[-2:]
    assert count == "1"
    assert "TRILORA_NO_NATIVE" in message and "slower" in message
    w, a, b = torch.load(path, weights_only=False)
    n = math.prod(w.shape)
    args = (w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset, 64, n)
    _assert_identical(a.reshape(-1), reference_dequantize(*args, torch.float32))
    _assert_identical(b.reshape(-1), reference_dequantize(*args, torch.bfloat16))
