"""4-bit quantize/dequantize kernels under the interpreter: the quantized bytes against
bitsandbytes' quantizer, the dequantized values against the format's definition
(``reference_format``; bitsandbytes' CPU dequantizer is wrong on some machines)."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import reference_format as ref
import torch

from trilora.kernels.quantize import Weight4bit, dequantize_4bit, quantize_4bit, quantize_bounds

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (3, 5001): several programs of GROUP blocks, the last one part-filled, plus a partial block.
SHAPES = ((7, 33), (5, 96), (3, 1), (2, 100), (1, 4099), (3, 5001))


def _input(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x.view(-1)[: min(40, x.numel())] = 0  # an all-zero block for the small blocksizes
    return x.to(dtype)


# Every blocksize (each sets the kernel's tile: GROUP blocks of BLOCKSIZE/2 pairs) in fp32,
# and every input dtype at the smallest and the largest blocksize: the dtype enters only
# through the load's conversion to fp32, the same at every blocksize. (The full cross
# product, 48 cases, ran until the suite was cut down.)
DTYPE_CASES = sorted(
    {(b, torch.float32) for b in BLOCKSIZES} | {(b, d) for b in (32, 4096) for d in DTYPES},
    key=lambda case: (case[0], str(case[1])),
)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("blocksize", "dtype"), DTYPE_CASES, ids=str)
def test_quantize_matches_bnb(quant_type, dtype, blocksize):
    for i, shape in enumerate(SHAPES):
        x = _input(shape, dtype, seed=blocksize + i)
        packed, st = bnbf.quantize_4bit(
            x, blocksize=blocksize, quant_type=quant_type, compress_statistics=False
        )
        pk, ak = quantize_4bit(x, st.code, blocksize)
        assert pk.dtype == torch.uint8 and ak.dtype == torch.float32
        assert torch.equal(pk, packed.view(-1)), (shape, (pk != packed.view(-1)).sum())
        assert torch.equal(ak, st.absmax), shape


def test_quantize_precomputed_bounds_and_all_zero():
    code = bnbf.get_4bit_type("nf4", device="cpu")
    bounds, order = quantize_bounds(code)
    x = torch.zeros(3, 50)  # full zero blocks keep absmax 0; the zero tail block gets 1e-38
    pk, ak = quantize_4bit(x, code, 64, bounds=bounds, order=order)
    packed, st = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(pk, packed.view(-1)) and torch.equal(ak, st.absmax)


@pytest.mark.parametrize("double", [False, True], ids=["fp32absmax", "double"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
def test_dequantize_matches_reference(double, quant_type, blocksize):
    for i, (n, k) in enumerate(((7, 33), (5, 96), (33, 96), (40, 200))):
        x = _input((n, k), torch.float32, seed=i)
        packed, st = bnbf.quantize_4bit(
            x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double
        )
        w = Weight4bit(
            packed.view(-1),
            st.absmax,
            st.code,
            st.state2.absmax if double else None,
            st.state2.code if double else None,
            st.offset.reshape(1) if double else None,
            blocksize,
            n,
            k,
        )
        values = ref.dequantize_bnb(packed, st)
        for dtype in DTYPES:
            out = dequantize_4bit(w, dtype)
            assert out.shape == (n, k) and out.dtype == dtype
            err = (out.double() - values).abs().max().item()
            assert torch.equal(out, ref.expected(values, dtype)), (n, k, dtype, err)


def test_bad_inputs():
    code = bnbf.get_4bit_type("nf4", device="cpu")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_4bit(torch.randn(10), code, 48)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        quantize_4bit(torch.arange(10), code, 64)
    with pytest.raises(ValueError, match="code must be an fp32 tensor of 16"):
        quantize_4bit(torch.randn(10), code[:8], 64)
    packed, absmax = quantize_4bit(torch.randn(4, 8), code, 32)
    w = Weight4bit(packed, absmax, code, None, None, None, 32, 4, 8)
    with pytest.raises(ValueError, match="dtype must be fp32, fp16 or bf16"):
        dequantize_4bit(w, torch.int8)
    with pytest.raises(ValueError, match=r"\(N\*K\+1\)//2 = 17"):
        dequantize_4bit(w._replace(n_rows=3, n_cols=11), torch.float32)
    with pytest.raises(ValueError, match="nested_absmax, nested_code and offset"):
        dequantize_4bit(w._replace(absmax=absmax.to(torch.uint8)), torch.float32)
