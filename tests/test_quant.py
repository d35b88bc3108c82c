"""The 4-bit format: bytes against the real bitsandbytes, values against the format's definition.

bitsandbytes' quantizer is right, so the bytes must equal its bytes. Its CPU dequantizer is
wrong on some machines (docs/bitsandbytes-cpu.md), so values are compared with
``reference_format.dequantize``, a float64 decoding of the bytes written from the spec.
"""

from __future__ import annotations

import json

import pytest
import reference_format as ref
import torch
import torch._dynamo

import trilora
from trilora.quant import BLOCKSIZES, QuantizedWeight

bnbf = pytest.importorskip("bitsandbytes.functional")
from bitsandbytes.functional import QuantState  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# awkward shapes: odd element counts, rows not a multiple of any blocksize, a single value,
# and more than 256 blocks so the nested absmax has several groups
SHAPES = ((1, 1), (7, 13), (33, 96), (5, 4099), (300, 65))


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    # bitsandbytes torch.compiles its CPU fallback for odd shapes; eager is the same math
    # without seconds of compilation per shape.
    with torch._dynamo.config.patch(disable=True):
        yield


def _bnb(x, quant_type, blocksize, double_quant, storage=torch.uint8):
    return bnbf.quantize_4bit(
        x,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=storage,
    )


def _random_weight(shape, dtype):
    x = torch.randn(shape, dtype=torch.float32) * torch.rand(()) * 0.2
    x = x.to(dtype)
    if x.numel() > 200:
        x.view(-1)[64:128] = 0  # an all-zero block (absmax 0)
        x.view(-1)[7] = x.abs().max() * 3  # an outlier
    return x


def _assert_same_state(qw: QuantizedWeight, packed, state, x=None) -> None:
    """Our state is bitsandbytes'. ``x``, the quantized weight, lets double-quantized absmax
    codes differ at near-ties (see _assert_nested_codes_agree); without it, bytes are equal."""
    # bytes, not values: torch.equal calls -0.0 and +0.0 equal (FP4's quant_map) and a
    # float view of packed codes can hold NaN bit patterns
    assert ref.same_bytes(qw.packed, packed)
    if state.nested and x is not None:
        _assert_nested_codes_agree(qw, state, x)
    else:
        assert ref.same_bytes(qw.absmax, state.absmax)
    assert ref.same_bytes(qw.code, state.code)
    assert qw.shape == state.shape and qw.dtype == state.dtype and qw.blocksize == state.blocksize
    if state.nested:
        assert ref.same_bytes(qw.nested_absmax, state.state2.absmax)
        assert ref.same_bytes(qw.nested_code, state.state2.code)
        assert ref.same_bytes(qw.offset.reshape(-1), state.offset.reshape(-1))
    else:
        assert qw.nested_absmax is None


def _assert_nested_codes_agree(qw: QuantizedWeight, state, x: torch.Tensor) -> None:
    """Double-quantized absmax codes equal bitsandbytes', except for a scale within one step
    of our 65,536-point rounding table (2/65535) of the midpoint between two neighbouring
    codes: there bitsandbytes' binary search and the table may round to either neighbour
    (each ~1e-5 from the value, against a code spacing of ~3e-3). Anywhere else, or two
    codes that are not neighbours, is a bug."""
    ours, theirs = qw.absmax.long(), state.absmax.long()
    differ = (ours != theirs).nonzero().flatten()
    if differ.numel() == 0:
        return
    assert ((ours[differ] - theirs[differ]).abs() == 1).all(), differ
    # The value both rounded, by the definition: (block absmax - offset) / nested absmax.
    bs = qw.blocksize
    flat = x.float().reshape(-1)
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % bs)).view(-1, bs)
    centered = blocks.abs().amax(dim=1) - qw.offset.reshape(())
    nested = qw.nested_absmax.repeat_interleave(256)[: centered.numel()]
    value = centered[differ].double() / nested[differ].double()
    code = qw.nested_code.double()
    midpoint = (code[ours[differ]] + code[theirs[differ]]) / 2
    assert ((value - midpoint).abs() <= 2 / 65535).all(), (value, midpoint)


def _assert_dequantizes_exactly(qw: QuantizedWeight, dtypes=DTYPES) -> None:
    values = ref.dequantize_trilora(qw)
    for dtype in dtypes:
        out = qw.dequantize(dtype)
        assert out.dtype == dtype and out.shape == qw.shape
        assert torch.equal(out, ref.expected(values, dtype)), (
            dtype,
            (out.double() - values).abs().max().item(),
        )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_matches_bitsandbytes(seed, quant_type, dtype, double_quant, shape):
    x = _random_weight(shape, dtype)
    for blocksize in BLOCKSIZES:
        packed, state = _bnb(x, quant_type, blocksize, double_quant)
        qw = trilora.quantize(x, quant_type, blocksize, double_quant)
        _assert_same_state(qw, packed, state, x)
        _assert_dequantizes_exactly(qw, (dtype,))


@pytest.mark.parametrize(
    "storage", [torch.bfloat16, torch.float16, torch.float32, torch.int8], ids=str
)
def test_quant_storage_views_match_bitsandbytes(seed, storage):
    # bitsandbytes needs the byte count to divide by the storage itemsize: 9 x 72 -> 324 bytes
    x = _random_weight((9, 72), torch.bfloat16)
    packed, state = _bnb(x, "nf4", 64, True, storage)
    qw = trilora.quantize(x, "nf4", 64, True, quant_storage=storage)
    _assert_same_state(qw, packed, state, x)
    _assert_dequantizes_exactly(qw)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32], ids=str)
def test_quant_storage_pads_odd_byte_counts(seed, storage):
    """Where bitsandbytes refuses (315 bytes into 2- or 4-byte storage), we pad whole elements."""
    x = _random_weight((9, 70), torch.bfloat16)
    qw = trilora.quantize(x, "nf4", 64, True, quant_storage=storage)
    plain = trilora.quantize(x, "nf4", 64, True)
    assert qw.packed.dtype == storage
    assert torch.equal(qw.packed.view(-1).view(torch.uint8)[:315], plain.packed.view(-1))
    _assert_dequantizes_exactly(qw)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(40, 136), (33, 96), (32, 96)], ids=str)
def test_dequantize_bitsandbytes_state(seed, quant_type, double_quant, shape):
    """Dequantize bitsandbytes' own state (wrapped, not re-quantized). 33x96 and 32x96 at
    blocksize 64 are shapes bitsandbytes' own CPU dequantization gets wrong on AVX-512."""
    x = _random_weight(shape, torch.float32)
    packed, state = _bnb(x, quant_type, 64, double_quant)
    qw = QuantizedWeight.from_bnb(packed, state)
    values = ref.dequantize_bnb(packed, state)
    for dtype in DTYPES:
        assert torch.equal(qw.dequantize(dtype), ref.expected(values, dtype)), dtype


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_table_is_the_stored_quant_map(quant_type):
    # bytes: FP4's code 8 is stored as +0.0, and torch.equal would not see a -0.0
    table = trilora.quant.code_table(quant_type)
    assert ref.same_bytes(table, ref.quant_map(quant_type))
    assert ref.same_bytes(table, bnbf.get_4bit_type(quant_type, device="cpu"))


def test_dequantize_close_to_input(seed):
    """Independent of bitsandbytes: the error is bounded by half the widest NF4 code gap."""
    x = torch.randn(64, 256, dtype=torch.float64).float()
    qw = trilora.quantize(x, "nf4", 64, double_quant=False)
    scale = x.view(-1, 64).abs().amax(1, keepdim=True)
    err = (qw.dequantize(torch.float64) - x.double()).view(-1, 64).abs() / scale
    max_gap = (qw.code.sort().values.diff().max() / 2).item()
    assert err.max().item() <= max_gap + 1e-6


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_round_trip_with_bitsandbytes(seed, quant_type, double_quant):
    x = _random_weight((24, 80), torch.bfloat16)
    qw = trilora.quantize(x, quant_type, 64, double_quant)
    sd = qw.to_state_dict("weight")
    expected = {
        "weight",
        "weight.absmax",
        "weight.quant_map",
        f"weight.quant_state.bitsandbytes__{quant_type}",
    }
    if double_quant:
        expected |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(sd) == expected
    packed, bnb_state = _bnb(x, quant_type, 64, double_quant)
    bnb_sd = {
        "weight": packed,
        **{f"weight.{k}": v for k, v in bnb_state.as_dict(packed=True).items()},
    }
    # The checkpoint bytes are bitsandbytes' own, key for key (uint8 views: FP4's quant_map
    # holds a zero whose sign torch.equal would not see).
    ref.assert_same_state_dict(sd, bnb_sd)
    # bitsandbytes reads what we write into the state it builds from its own dict. Its CPU
    # dequantization can be wrong (the value need not be right), but it is the same function
    # on the same bytes, so it must give the same result on both states.
    state = QuantState.from_dict(
        {k.removeprefix("weight."): v for k, v in sd.items() if k != "weight"}, "cpu"
    )
    for field in ("absmax", "code", "blocksize", "shape", "dtype", "quant_type", "nested"):
        a, b = getattr(state, field), getattr(bnb_state, field)
        assert ref.same_bytes(a, b) if isinstance(a, torch.Tensor) else a == b, field
    assert ref.same_bytes(
        bnbf.dequantize_4bit(sd["weight"], state), bnbf.dequantize_4bit(packed, bnb_state)
    )
    # ... and we read what it writes.
    assert set(bnb_sd) == expected
    back = QuantizedWeight.from_state_dict(bnb_sd, "weight")
    _assert_same_state(back, packed, bnb_state)
    _assert_dequantizes_exactly(back)
    # the JSON payload carries the same fields as bitsandbytes'
    ours = json.loads(bytes(sd[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    theirs = json.loads(bytes(bnb_sd[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    assert ours == theirs


def test_to_moves_every_tensor():
    qw = trilora.quantize(torch.randn(8, 64)).to("meta")
    assert all(
        t.device.type == "meta"
        for t in (qw.packed, qw.absmax, qw.code, qw.nested_absmax, qw.offset)
    )


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"blocksize": 48}, "blocksize must be one of"),
        ({"quant_type": "int4"}, "quant_type must be one of"),
        ({"quant_storage": torch.int32}, "quant_storage must be one of"),
    ],
)
def test_quantize_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        trilora.quantize(torch.randn(4, 64), **kwargs)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.uint8], ids=str)
def test_quantize_rejects_bad_dtype(dtype):
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        trilora.quantize(torch.ones(4, 64, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_rejects_non_finite(bad):
    x = torch.randn(4, 64)
    x[2, 5] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        trilora.quantize(x)


def test_quantize_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        trilora.quantize(torch.empty(0, 64))


def test_from_state_dict_missing_keys():
    sd = trilora.quantize(torch.randn(8, 64)).to_state_dict()
    del sd["weight.absmax"]
    with pytest.raises(KeyError, match=r"missing \['weight.absmax'\]"):
        QuantizedWeight.from_state_dict(sd)
    sd = trilora.quantize(torch.randn(8, 64)).to_state_dict()
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(KeyError, match="quant_state"):
        QuantizedWeight.from_state_dict(sd)
    sd = trilora.quantize(torch.randn(8, 64)).to_state_dict()
    del sd["weight.nested_quant_map"]
    with pytest.raises(KeyError, match="nested_quant_map"):
        QuantizedWeight.from_state_dict(sd)


def test_from_state_dict_inconsistent_keys():
    sd = trilora.quantize(torch.randn(8, 64)).to_state_dict()
    sd["weight.absmax"] = sd["weight.absmax"][:-1]
    with pytest.raises(ValueError, match="absmax has 7 entries"):
        QuantizedWeight.from_state_dict(sd)
    sd = trilora.quantize(torch.randn(8, 64)).to_state_dict()
    sd["weight"] = sd["weight"][:10]
    with pytest.raises(ValueError, match="needs 256"):
        QuantizedWeight.from_state_dict(sd)
    sd = trilora.quantize(torch.randn(8, 64)).to_state_dict()
    sd["weight.quant_state.bitsandbytes__fp4"] = sd.pop("weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="quant_type"):
        QuantizedWeight.from_state_dict(sd)
    sd = trilora.quantize(torch.randn(8, 64)).to_state_dict()
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="valid JSON"):
        QuantizedWeight.from_state_dict(sd)
    sd = trilora.quantize(torch.randn(8, 64), double_quant=False).to_state_dict()
    sd["weight.absmax"] = sd["weight.absmax"].to(torch.uint8)
    with pytest.raises(ValueError, match="absmax must be float32"):
        QuantizedWeight.from_state_dict(sd)


@pytest.mark.parametrize("n", [901, 900, 33 * 96 + 1])
def test_with_storage_between_any_two_storages(n):
    """Storage padding of one item size never leaks into another (fp32 -> bf16 with an odd
    byte count used to fail: 452 bytes where 450 were needed)."""
    from trilora.quant import STORAGE_DTYPES

    w = torch.randn(n, 1)
    qw = trilora.quantize(w, quant_storage=torch.float32)
    reference = qw.dequantize()
    for storage in STORAGE_DTYPES:
        moved = qw.with_storage(storage)
        assert moved.packed.dtype == storage
        assert torch.equal(moved.dequantize(), reference)
        back = moved.with_storage(torch.uint8)
        assert back.packed.numel() == (n + 1) // 2
