"""Correctness section: every op and kernel against a float64 torch reference.

The section is a registry of cases. :data:`FAMILIES` lists builder functions; each takes
the :class:`Shapes` of the run (real Llama-3.1-8B shapes on the GPU, the same shape
classes scaled down for the Triton interpreter on the CPU) and returns its cases, each a
:class:`~trilora.selfcheck.units.Unit` that names its kernel, config, shape and dtype and
returns its checks (measured error against tolerance). Adding a family is one builder
function appended to :data:`FAMILIES`; see :func:`optimizer_cases` for the pattern.

Families and the kernels they launch:

* ``quantize_4bit`` / ``dequantize_4bit``: ``_quantize_4bit_kernel`` (full and partial
  blocks), ``_dequantize_4bit_kernel``; bytes must equal the format's definition
  (:func:`trilora.ops.quantize.quantize_4bit_reference`) and bitsandbytes' when it imports
  (its CPU dequantizer is wrong on some CPUs, docs/bitsandbytes-cpu.md, so that comparison
  is GPU-only).
* ``qlora_linear.splitk`` (M <= 16: ``_qlora_fwd_splitk_kernel``, its epilogue,
  ``_qlora_bwd_input_kernel``, ``_lora_tn_grad_kernel``), ``qlora_linear.tiled``
  (``_qlora_fwd_tiled_kernel`` instead) and ``qlora_linear.scratch`` (above
  ``fused_max_tokens``: ``_dequantize_4bit_kernel`` + cuBLAS, and ``_lora_tn_grad_kernel``),
  forward and backward through autograd, with dropout, bias and rsLoRA; three odd-shape
  cases run the int8 format (the same kernels with ``WEIGHT_FORMAT=1``).
* ``cross_entropy`` (``_cross_entropy_kernel``) and ``linear_cross_entropy`` (its chunk
  loop and autograd), ``rms_norm`` (``_rms_norm_fwd_kernel``, ``_rms_norm_bwd_kernel``),
  ``grouped_attention`` (PyTorch's flash kernels, one key/value group at a time),
  ``adamw_fused`` (``_adamw32_kernel``, ``_adamw8bit_kernel`` through
  ``trilora.optim.AdamW`` with 32- and 8-bit state) and ``CPUOffloadAdamW``.
* ``grouped_qlora`` (MoE experts: ``kernels/grouped_qlora.py``'s forward, input-backward and
  LoRA-gradient kernels through :func:`trilora.ops.grouped_qlora.grouped_lora_linear`).

Tolerances reflect what the hardware does, not only what the interpreter does: the kernels
round the dequantized weight to the activation dtype before ``tl.dot`` (the reference
does too), accumulate in fp32, round outputs once, and on the GPU fp32 ``tl.dot`` operands
are tf32 (10-bit mantissa, like fp16). Errors are ``max|out - ref| / max|ref|``:

* bf16 outputs: 1.6e-2 (output rounding 2^-9 = 2e-3, bf16 rounding of dropout-scaled ``x``
  and of ``xa`` on the LoRA branch, ~3x margin); fp16 / tf32: 4e-3 (2^-11 per rounding).

On the CPU, ``tl.dot`` with bf16 operands is wrong under the interpreter (triton#11584), so
bf16 cases of the dot kernels are listed as skipped there and run on the GPU only; fp16
dot cases, and bf16 everywhere there is no dot (quantize, dequantize, cross-entropy,
RMSNorm), run on both.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trilora.config import config, override
from trilora.formats import QuantConfig, get_format
from trilora.ops.attention import grouped_causal_attention
from trilora.ops.int8_linear import int8_lora_linear
from trilora.ops.linear_cross_entropy import cross_entropy_inplace_, linear_cross_entropy
from trilora.ops.qlora_linear import qlora_linear
from trilora.ops.quantize import dequantize_4bit_reference, quantize_4bit, quantize_4bit_reference
from trilora.ops.rms_norm import rms_norm
from trilora.optim import AdamW, CPUOffloadAdamW, UnclippedGradientsWarning
from trilora.optim.blockwise import QBLOCK, dequantize_blockwise, quant_maps
from trilora.quant import QuantizedWeight, code_table, quantize
from trilora.selfcheck.units import Context, Unit, check, describe_exception, verdict_of_checks

# Max error relative to the reference's largest magnitude, per output dtype (see above).
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3, torch.float32: 1e-5}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAMES = {v: k for k, v in _DTYPES.items()}
INTERPRETER_BF16_DOT = (
    "bf16 tl.dot is wrong under the Triton interpreter (triton#11584); this case runs "
    "with --gpu only"
)


@dataclass(frozen=True)
class Shapes:
    """Sizes of one run. ``gpu``: Llama-3.1-8B projections at M = 1, 16, 512, 4096. CPU:
    q, gate and down divided by 64 at M = 1, 16, 40, 80 (interpreter speed)."""

    gpu: bool
    projections: tuple[tuple[str, int, int], ...]  # (name, N = out, K = in)
    tokens: tuple[int, int, int, int]  # decode, split-K limit, tiled, above fused_max_tokens
    vocab: int
    hidden: int
    attention: tuple[int, int, int, int, int]  # B, Hq, Hkv, T, D
    ce_rows: int


def shapes_for(ctx: Context) -> Shapes:
    from trilora.bench.kernels import projection_shapes

    # On the CPU k_proj is left out: its aspect (N < K) is down_proj's, scaled down.
    layers = (
        ("q_proj", "k_proj", "gate_proj", "down_proj")
        if ctx.gpu
        else ("q_proj", "gate_proj", "down_proj")
    )
    projections = tuple(
        (s.layer, s.n_out, s.k_in)
        for s in projection_shapes("llama-3.1-8b", 1 if ctx.gpu else 64, layers)
    )
    if ctx.gpu:
        return Shapes(
            True, projections, (1, 16, 512, 4096), 128256, 4096, (1, 32, 8, 2048, 128), 512
        )
    return Shapes(False, projections, (1, 16, 40, 80), 128256 // 64, 64, (1, 8, 2, 64, 32), 16)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _generator(ctx: Context, case_id: str) -> torch.Generator:
    g = torch.Generator(device=ctx.device)
    g.manual_seed((ctx.seed * 1_000_003 + zlib.crc32(case_id.encode())) % (2**31))
    return g


def rel_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|actual - ref| / max|ref|`` in float64 (inf for NaN/inf or a shape mismatch)."""
    if tuple(actual.shape) != tuple(ref.shape):
        return math.inf
    a = actual.detach().double()
    r = ref.detach().double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    scale = float(r.abs().max()) if r.numel() else 0.0
    diff = float((a - r).abs().max()) if r.numel() else 0.0
    return diff / max(scale, 1e-30)


def _differing(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of elements whose bits differ (shapes must match)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return max(a.numel(), b.numel())
    if a.dtype.is_floating_point:
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(ints), b.view(ints)
    return int((a != b).sum())


def _case(
    kernel: str,
    config: str,
    shape: str,
    dtype: str,
    fn: Callable[[Context, torch.Generator], list[dict] | dict[str, Any]],
    *,
    uses_dot: bool = False,
    tier: int = 0,
) -> Unit:
    case_id = f"{kernel}[{config}] {shape} {dtype}"

    def run(ctx: Context) -> dict[str, Any]:
        if uses_dot and dtype == "bf16" and not ctx.gpu:
            return {"status": "skipped", "message": INTERPRETER_BF16_DOT}

        # "triton": the kernels on CUDA tensors, and on CPU tensors through the interpreter,
        # whatever TRILORA_BACKEND says.
        with override(backend="triton"):
            out = fn(ctx, _generator(ctx, case_id))
        if not isinstance(out, dict):
            return verdict_of_checks(out)
        res = {**verdict_of_checks(out["checks"]), "info": out.get("info", {})}
        if res["status"] != "pass" and res["info"].get("note"):
            res["message"] += f" ({res['info']['note']})"
        return res

    return Unit(case_id, run, kernel, config, shape, dtype, tier=tier)


# ---------------------------------------------------------------------------------------
# quantize / dequantize
# ---------------------------------------------------------------------------------------


def _random_weight(ctx: Context, g: torch.Generator, rows: int, cols: int, dtype: torch.dtype):
    w = torch.randn(rows, cols, generator=g, device=ctx.device) * 0.02
    w.view(-1)[: min(64, w.numel())] = 0.0  # an all-zero first block (absmax 0)
    w.view(-1)[-1] = 0.5  # one outlier
    return w.to(dtype)


def _quantize_checks(ctx, g, rows, cols, dtype, quant_type, blocksize, double) -> list[dict]:

    w = _random_weight(ctx, g, rows, cols, dtype)
    code = code_table(quant_type, ctx.device)
    packed, absmax = quantize_4bit(w, code, blocksize)
    ref_packed, ref_absmax = quantize_4bit_reference(w, code, blocksize)
    checks = [
        check("packed bytes differing from the definition", _differing(packed, ref_packed), 0),
        check("absmax values differing from the definition", _differing(absmax, ref_absmax), 0),
    ]
    bnbf = _bitsandbytes_functional()
    info: dict[str, Any] = {"bitsandbytes": "not importable"} if bnbf is None else {}
    try:
        b_packed, st = (
            bnbf.quantize_4bit(
                w, blocksize=blocksize, compress_statistics=double, quant_type=quant_type
            )
            if bnbf is not None
            else (None, None)
        )
    except Exception as exc:  # a baseline limitation is not a trilora failure
        b_packed = None
        info["bitsandbytes"] = f"quantize_4bit raised {describe_exception(exc)}"
    if b_packed is not None:
        qw = quantize(w, quant_type, blocksize, double)
        checks.append(
            check(
                "packed bytes differing from bitsandbytes",
                _differing(
                    qw.packed.reshape(-1).view(torch.uint8), b_packed.reshape(-1).view(torch.uint8)
                ),
                0,
            )
        )
        checks.append(
            check("absmax differing from bitsandbytes", _differing(qw.absmax, st.absmax), 0)
        )
        if double:
            checks.append(
                check(
                    "nested absmax/offset differing from bitsandbytes",
                    _differing(qw.nested_absmax, st.state2.absmax)
                    + _differing(qw.offset.reshape(1).float(), st.offset.reshape(1).float()),
                    0,
                )
            )
        if ctx.gpu and not all(c["ok"] for c in checks):
            info["note"] = _bnb_cuda_vs_cpu(bnbf, w, blocksize, double, quant_type, b_packed, st)
    return {"checks": checks, "info": info}


def _bnb_cuda_vs_cpu(bnbf, w, blocksize, double, quant_type, b_packed, st) -> str:
    """Whose rounding differs: bitsandbytes' CUDA quantizer against its own CPU path (which
    matches the format's definition, docs/architecture.md)."""
    try:
        c_packed, c_st = bnbf.quantize_4bit(
            w.cpu(), blocksize=blocksize, compress_statistics=double, quant_type=quant_type
        )
    except Exception as exc:
        return f"bitsandbytes on the CPU raised {describe_exception(exc)}"
    n_packed = _differing(b_packed.reshape(-1).cpu(), c_packed.reshape(-1))
    n_absmax = _differing(st.absmax.cpu(), c_st.absmax)
    return (
        f"bitsandbytes' CUDA quantizer differs from its own CPU path in {n_packed} packed "
        f"bytes and {n_absmax} absmax values"
    )


def _dequantize_checks(ctx, g, rows, cols, dtype, quant_type, blocksize, double) -> list[dict]:

    w = _random_weight(ctx, g, rows, cols, dtype)
    qw = quantize(w, quant_type, blocksize, double)
    out = qw.dequantize(dtype)
    # The definition: code * scale in fp32, then one round-to-nearest-even cast.
    ref = dequantize_4bit_reference(
        qw.packed,
        qw.absmax,
        qw.code,
        qw.nested_absmax,
        qw.nested_code,
        qw.offset,
        qw.blocksize,
        list(qw.shape),
        torch.float32,
    ).to(dtype)
    checks = [check("values differing from the definition (bits)", _differing(out, ref), 0)]
    bnbf = _bitsandbytes_functional()
    info: dict[str, Any] = {}
    # bitsandbytes' CPU dequantizer is wrong on AVX-512 CPUs when a block crosses a row end
    # (docs/bitsandbytes-cpu.md): compare with it on the GPU only.
    if bnbf is None:
        info["bitsandbytes"] = "not importable"
    elif not ctx.gpu:
        info["bitsandbytes"] = "not compared on the CPU (its CPU dequantizer is wrong on some CPUs)"
    else:
        try:
            b_packed, st = bnbf.quantize_4bit(
                w, blocksize=blocksize, compress_statistics=double, quant_type=quant_type
            )
            theirs = bnbf.dequantize_4bit(b_packed, st)
        except Exception as exc:  # a baseline limitation is not a trilora failure
            info["bitsandbytes"] = f"raised {describe_exception(exc)}"
        else:
            ours = QuantizedWeight.from_bnb(b_packed, st).dequantize(dtype)
            checks.append(
                check("values differing from bitsandbytes (bits)", _differing(ours, theirs), 0)
            )
    return {"checks": checks, "info": info}


def _bitsandbytes_functional():
    try:
        import bitsandbytes.functional as bnbf
    except Exception:
        return None
    return bnbf


def quantize_cases(s: Shapes) -> list[Unit]:
    """quantize_4bit and dequantize_4bit: bytes and values exactly, bf16 / fp16 / fp32."""
    gate = next(p for p in s.projections if p[0] == "gate_proj")
    configs = [
        # (shape label, rows, cols, dtype, quant type, blocksize, double quant, tier)
        (f"llama-3.1-8b gate_proj {gate[1]}x{gate[2]}", gate[1], gate[2], "bf16", "nf4", 64, True),
        (f"llama-3.1-8b gate_proj {gate[1]}x{gate[2]}", gate[1], gate[2], "fp16", "nf4", 64, True),
        # odd element count (padding nibble), partial block, blocks across row ends
        ("333x201", 333, 201, "bf16", "fp4", 128, False),
        ("77x100", 77, 100, "fp16", "nf4", 4096, True),
        ("33x96", 33, 96, "fp32", "nf4", 32, True),
    ]
    units = []
    for label, rows, cols, dt, qt, bs, dq in configs:
        config = f"{qt},bs{bs},{'dq' if dq else 'fp32-absmax'}"

        def q(ctx, g, rows=rows, cols=cols, dt=dt, qt=qt, bs=bs, dq=dq):
            return _quantize_checks(ctx, g, rows, cols, _DTYPES[dt], qt, bs, dq)

        def d(ctx, g, rows=rows, cols=cols, dt=dt, qt=qt, bs=bs, dq=dq):
            return _dequantize_checks(ctx, g, rows, cols, _DTYPES[dt], qt, bs, dq)

        units.append(_case("quantize_4bit", config, label, dt, q))
        units.append(_case("dequantize_4bit", config, label, dt, d))
    return units


# ---------------------------------------------------------------------------------------
# fused QLoRA linear
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QLoraConfig:
    """One fused QLoRA linear case: ``y = x @ W.T + s * drop(x) @ A.T @ B.T + bias``."""

    path: str  # "splitk", "tiled" or "scratch"
    r: int = 16
    lora_dtype: str = "fp32"  # "fp32" (PEFT after prepare_model_for_kbit_training) or "act"
    bias: bool = False
    dropout: float = 0.05
    rslora: bool = False
    quant_type: str = "nf4"
    blocksize: int = 64
    double: bool = True
    transposed_x: bool = False  # x with strides (1, M): a column-major view

    def label(self) -> str:
        parts = [f"r{self.r}" if self.r else "no-lora"]
        if self.r:
            parts.append(f"lora-{self.lora_dtype}")
        if self.quant_type == "int8":
            parts.append("int8")
        else:
            parts.append(f"{self.quant_type}{'-dq' if self.double else ''}-bs{self.blocksize}")
        if self.dropout:
            parts.append(f"dropout{self.dropout:g}")
        if self.bias:
            parts.append("bias")
        if self.rslora:
            parts.append("rslora")
        if self.transposed_x:
            parts.append("x-transposed")
        return ",".join(parts)


def _qlora_checks(ctx, g, cfg: QLoraConfig, m: int, n: int, k: int, dtype) -> list[dict]:

    dev = ctx.device
    w = (torch.randn(n, k, generator=g, device=dev) / math.sqrt(k)).to(dtype)
    int8 = cfg.quant_type == "int8"
    if int8:
        qw = get_format("int8").quantize(w, QuantConfig("int8"))
    else:
        qw = quantize(w, cfg.quant_type, cfg.blocksize, cfg.double)
    if cfg.transposed_x:
        x_leaf = torch.randn(k, m, generator=g, device=dev).to(dtype).requires_grad_()
        x = x_leaf.t()
    else:
        x_leaf = torch.randn(m, k, generator=g, device=dev).to(dtype).requires_grad_()
        x = x_leaf
    r = cfg.r
    lora_dtype = torch.float32 if cfg.lora_dtype == "fp32" else dtype
    a = b = bias = mask = None
    # Magnitudes: the base output, the LoRA term and the bias are all O(1), so an error in
    # any one of them shows at the scale of the whole output.
    if r:
        a = (torch.randn(r, k, generator=g, device=dev) / math.sqrt(k)).to(lora_dtype)
        b = (torch.randn(n, r, generator=g, device=dev) / math.sqrt(r)).to(lora_dtype)
        a.requires_grad_()
        b.requires_grad_()
    if cfg.bias:
        bias = torch.randn(n, generator=g, device=dev).to(dtype).requires_grad_()
    p = cfg.dropout if r else 0.0
    if p:
        mask = torch.rand(m, k, generator=g, device=dev) >= p
    dy = torch.randn(m, n, generator=g, device=dev).to(dtype)
    alpha = 2.0 * max(r, 1)
    scale = alpha / math.sqrt(r) if cfg.rslora and r else alpha / max(r, 1)
    limit = {
        "scratch": 0,
        "splitk": max(m, config.fused_max_tokens),
        "tiled": max(m, config.fused_max_tokens),
    }
    with override(fused_max_tokens=limit[cfg.path]):
        if int8:
            y = int8_lora_linear(
                x, qw.codes, qw.scb, a, b, scale, bias, p, training=bool(p), dropout_mask=mask
            )
        else:
            y = qlora_linear(
                x, qw, a, b, scale, bias, dropout_p=p, training=bool(p), dropout_mask=mask
            )
        y.backward(dy)

    # float64 reference on the weight the kernels see: the definition's fp32 value rounded
    # to the activation dtype (the fused kernels cast each tile, the scratch path the buffer).
    if int8:  # bitsandbytes' int8_vectorwise_dequant: codes * SCB[row] / 127, in fp32
        w32 = qw.codes.float() * qw.scb[:, None] * (1.0 / 127.0)
    else:
        w32 = dequantize_4bit_reference(
            qw.packed,
            qw.absmax,
            qw.code,
            qw.nested_absmax,
            qw.nested_code,
            qw.offset,
            qw.blocksize,
            [n, k],
            torch.float32,
        )
    w_ref = w32.to(dtype).double()
    x64, dy64 = x.detach().double(), dy.double()
    keep = mask.double() / (1.0 - p) if mask is not None else 1.0
    y_ref = x64 @ w_ref.t()
    dx_ref = dy64 @ w_ref
    if r:
        a64, b64 = a.detach().double(), b.detach().double()
        xd = x64 * keep
        xa = xd @ a64.t()
        dyb = dy64 @ b64
        y_ref = y_ref + scale * xa @ b64.t()
        dx_ref = dx_ref + scale * (dyb @ a64) * keep
    if cfg.bias:
        y_ref = y_ref + bias.detach().double()
    tol = TOL[dtype]
    dx = x_leaf.grad.t() if cfg.transposed_x else x_leaf.grad
    checks = [check("y", rel_err(y, y_ref), tol), check("dx", rel_err(dx, dx_ref), tol)]
    if r:
        checks.append(check("dA", rel_err(a.grad, scale * dyb.t() @ xd), tol))
        checks.append(check("dB", rel_err(b.grad, scale * dy64.t() @ xa), tol))
    if cfg.bias:
        checks.append(check("dbias", rel_err(bias.grad, dy64.sum(0)), tol))
    return checks


def qlora_cases(s: Shapes) -> list[Unit]:
    """Forward + backward of the QLoRA linear on every path, real and odd shapes."""
    decode, small, mid, large = s.tokens
    units: list[Unit] = []

    def add(cfg: QLoraConfig, m: int, n: int, k: int, dt: str, label: str, tier: int) -> None:
        def fn(ctx, g, cfg=cfg, m=m, n=n, k=k, dt=dt):
            return _qlora_checks(ctx, g, cfg, m, n, k, _DTYPES[dt])

        units.append(
            _case(f"qlora_linear.{cfg.path}", cfg.label(), label, dt, fn, uses_dot=True, tier=tier)
        )

    # Real shapes, the PEFT-typical adapter: r=16, fp32 factors, dropout, NF4 + double quant.
    paths = [
        ("splitk", decode),
        ("splitk", small),
        ("tiled", mid),
        ("tiled", large),
        ("scratch", large),
    ]
    for dt in ("bf16", "fp16"):
        for i, (name, n, k) in enumerate(s.projections):
            for path, m in paths:
                add(
                    QLoraConfig(path),
                    m,
                    n,
                    k,
                    dt,
                    f"llama-3.1-8b {name} M={m} N={n} K={k}",
                    0 if i == 0 else 1,
                )
    # Odd shapes: sizes off every block, K not a multiple of the quantization blocksize,
    # blocks across row ends, ranks that pad, every feature; bf16 on the GPU, fp16 on both.
    odd = [
        (
            QLoraConfig(
                "splitk",
                r=33,
                lora_dtype="act",
                bias=True,
                dropout=0.1,
                rslora=True,
                quant_type="fp4",
                blocksize=128,
                double=False,
            ),
            3,
            333,
            200,
        ),
        (QLoraConfig("tiled", r=8, bias=True, dropout=0.1, rslora=True), 37, 130, 200),
        (
            QLoraConfig("scratch", r=16, lora_dtype="act", bias=True, dropout=0.1, double=False),
            50,
            70,
            136,
        ),
        (QLoraConfig("tiled", r=256, dropout=0.0, blocksize=32), 24, 72, 96),
        (QLoraConfig("splitk", r=0, bias=True, dropout=0.0), 5, 48, 64),
        (QLoraConfig("tiled", r=0, bias=True, dropout=0.0), 40, 24, 72),
        (QLoraConfig("splitk", r=4, lora_dtype="act", dropout=0.0, transposed_x=True), 6, 20, 96),
        # int8 (bitsandbytes LLM.int8 bytes): the same kernels with WEIGHT_FORMAT=1
        (QLoraConfig("splitk", r=16, bias=True, dropout=0.1, quant_type="int8"), 3, 70, 136),
        (QLoraConfig("tiled", r=8, bias=True, dropout=0.1, quant_type="int8"), 37, 130, 200),
        (QLoraConfig("scratch", r=16, lora_dtype="act", quant_type="int8"), 50, 70, 136),
    ]
    for i, (cfg, m, n, k) in enumerate(odd):
        for dt in ("bf16", "fp16"):
            # fp16 for the first three on the GPU (the interpreter already covers fp16 of
            # all), to keep the number of Triton compilations within the budget.
            if dt == "fp16" and s.gpu and i >= 3:
                continue
            add(cfg, m, n, k, dt, f"M={m} N={n} K={k}", 2)
    return units


# ---------------------------------------------------------------------------------------
# cross-entropy
# ---------------------------------------------------------------------------------------


def _ce_kernel_checks(ctx, g, rows, vocab, dtype, per_row, z_loss) -> list[dict]:

    dev = ctx.device
    logits = (torch.randn(rows, vocab, generator=g, device=dev) * 2.0).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g, device=dev)
    labels[:: max(1, rows // 4)] = -100  # some ignored rows
    valid = labels != -100
    if per_row:
        scale = torch.rand(rows, generator=g, device=dev) + 0.5
    else:
        scale = (1.0 / valid.sum().float()).reshape(1)
    x = logits.double()
    loss, lse = cross_entropy_inplace_(logits, labels, scale, -100, z_loss)
    lse_ref = torch.logsumexp(x, dim=-1)
    safe = torch.where(valid, labels, 0)
    loss_ref = lse_ref - x.gather(1, safe[:, None]).squeeze(1) + z_loss * lse_ref**2
    grad_ref = torch.softmax(x, dim=-1) * (1.0 + 2.0 * z_loss * lse_ref)[:, None]
    grad_ref[torch.arange(rows, device=dev), safe] -= 1.0
    grad_ref = grad_ref * scale.double().reshape(-1, 1)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    loss_ref = torch.where(valid, loss_ref, zero)
    lse_ref = torch.where(valid, lse_ref, zero)
    grad_ref = torch.where(valid[:, None], grad_ref, zero)
    # One rounding of the gradient and nothing on the way (fp32: exp/log approximations and
    # fp32 sums over up to 128k entries, a few 1e-6).
    tol = max(TOL[dtype] / 4, 1e-5)
    # Row sums are scale * 2 z lse: a softmax normalization error shows here even where
    # the tiny probabilities are invisible next to the label's entry. They are compared with
    # the reference rounded to the output dtype: with a 128k vocabulary and a 1/n scale most
    # entries are below fp16's smallest subnormal, and 0 is their correctly rounded value.
    rounded = grad_ref.to(dtype).double()
    row_sum = float((logits.double().sum(1) - rounded.sum(1)).abs().max() / scale.abs().max())
    return [
        check("loss", rel_err(loss, loss_ref), 1e-4),
        check("lse", rel_err(lse, lse_ref), 1e-4),
        check("dlogits", rel_err(logits, grad_ref), tol),
        check("dlogits row sums / scale", row_sum, 2 * tol),
    ]


def _linear_ce_checks(ctx, g, rows, hidden, vocab, dtype, chunk, reduction, z_loss) -> list[dict]:

    dev = ctx.device
    h = torch.randn(rows, hidden, generator=g, device=dev).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, device=dev) / math.sqrt(hidden) * 3).to(dtype)
    w.requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=g, device=dev)
    labels[1::5] = -100
    loss = linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=chunk, z_loss=z_loss)
    loss.backward()
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    logits = h64 @ w64.t()
    shifted = torch.nn.functional.pad(labels[1:], (0, 1), value=-100)
    per = torch.nn.functional.cross_entropy(logits, shifted, ignore_index=-100, reduction="none")
    valid = shifted != -100
    per = per + z_loss * torch.logsumexp(logits, -1) ** 2 * valid
    ref = per.sum() / valid.sum() if reduction == "mean" else per.sum()
    ref.backward()
    # The op computes each chunk's logits in the activation dtype (like the model's lm_head):
    # bf16 logits of magnitude ~5 are off by up to ~0.01, i.e. 1% in a softmax probability.
    tol = {torch.bfloat16: 3e-2, torch.float16: 8e-3, torch.float32: 1e-5}[dtype]
    return [
        check("loss", rel_err(loss.detach().reshape(1), ref.detach().reshape(1)), tol / 3),
        check("dhidden", rel_err(h.grad, h64.grad), tol),
        check("dweight", rel_err(w.grad, w64.grad), tol),
    ]


def cross_entropy_cases(s: Shapes) -> list[Unit]:
    units = []
    for dt in ("bf16", "fp16", "fp32"):
        units.append(
            _case(
                "cross_entropy",
                "mean-scale",
                f"M={s.ce_rows} V={s.vocab}",
                dt,
                lambda ctx, g, dt=dt: _ce_kernel_checks(
                    ctx, g, s.ce_rows, s.vocab, _DTYPES[dt], False, 0.0
                ),
            )
        )
    units.append(
        _case(
            "cross_entropy",
            "per-row-scale,z-loss",
            "M=37 V=1000",
            "bf16",
            lambda ctx, g: _ce_kernel_checks(ctx, g, 37, 1000, torch.bfloat16, True, 1e-4),
        )
    )
    rows = 256 if s.gpu else 32
    units.append(
        _case(
            "linear_cross_entropy",
            "mean,chunk64",
            f"M={rows} H={s.hidden} V={s.vocab}",
            "bf16",
            lambda ctx, g: _linear_ce_checks(
                ctx, g, rows, s.hidden, s.vocab, torch.bfloat16, 64, "mean", 0.0
            ),
        )
    )
    units.append(
        _case(
            "linear_cross_entropy",
            "sum,chunk16,z-loss",
            "M=37 H=72 V=1000",
            "fp16",
            lambda ctx, g: _linear_ce_checks(ctx, g, 37, 72, 1000, torch.float16, 16, "sum", 1e-4),
        )
    )
    return units


# ---------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------


def _rms_norm_checks(ctx, g, rows, hidden, dtype) -> list[dict]:

    dev = ctx.device
    x = (torch.randn(rows, hidden, generator=g, device=dev) * 3).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(hidden, generator=g, device=dev)).to(dtype).requires_grad_()
    dy = torch.randn(rows, hidden, generator=g, device=dev).to(dtype)
    eps = 1e-5
    y = rms_norm(x, w, eps)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps))
    y64.backward(dy.double())
    # y: two roundings (the normalized rows, then the product with the weight), as in
    # transformers' LlamaRMSNorm; dx: fp32, one rounding; dweight: fp32 sums of rounded rows.
    tol = 2 * TOL[dtype] if dtype != torch.float32 else 1e-5
    return [
        check("y", rel_err(y, y64), tol),
        check("dx", rel_err(x.grad, x64.grad), tol),
        check("dweight", rel_err(w.grad, w64.grad), tol),
    ]


def rms_norm_cases(s: Shapes) -> list[Unit]:
    real = 4096 if s.gpu else 16
    configs = [
        (f"llama-3.1-8b M={real} H=4096", real, 4096, "bf16"),
        (f"llama-3.1-8b M={real} H=4096", real, 4096, "fp16"),
        ("M=37 H=1000", 37, 1000, "bf16"),
        ("M=5 H=8192", 5, 8192, "fp16"),  # the kernels' widest row (MAX_BLOCK)
        ("M=3 H=576", 3, 576, "fp32"),
    ]
    return [
        _case(
            "rms_norm",
            "fwd+bwd,eps1e-5",
            label,
            dt,
            lambda ctx, g, m=m, h=h, dt=dt: _rms_norm_checks(ctx, g, m, h, _DTYPES[dt]),
        )
        for label, m, h, dt in configs
    ]


# ---------------------------------------------------------------------------------------
# grouped attention
# ---------------------------------------------------------------------------------------


def _attention_checks(ctx, g, b, hq, hkv, t, d, dtype) -> list[dict]:

    dev = ctx.device
    # q in the projections' layout, [B, T, Hq, D] viewed as [B, Hq, T, D]
    q = torch.randn(b, t, hq, d, generator=g, device=dev).to(dtype).transpose(1, 2)
    q = q.detach().requires_grad_()
    k = torch.randn(b, hkv, t, d, generator=g, device=dev).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, t, d, generator=g, device=dev).to(dtype).requires_grad_()
    scale = d**-0.5
    out = grouped_causal_attention(q, k, v, scale)
    dout = torch.randn(out.shape, generator=g, device=dev).to(dtype)
    out.backward(dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    rep = hq // hkv
    scores = (q64 @ k64.repeat_interleave(rep, 1).transpose(-1, -2)) * scale
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    ref = (probs @ v64.repeat_interleave(rep, 1)).transpose(1, 2)
    ref.backward(dout.double())
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}[dtype]
    return [
        check("out", rel_err(out, ref), tol),
        check("dq", rel_err(q.grad, q64.grad), 2 * tol),
        check("dk", rel_err(k.grad, k64.grad), 2 * tol),
        check("dv", rel_err(v.grad, v64.grad), 2 * tol),
    ]


def attention_cases(s: Shapes) -> list[Unit]:
    b, hq, hkv, t, d = s.attention
    configs = [
        (f"B={b} Hq={hq} Hkv={hkv} T={t} D={d}", (b, hq, hkv, t, d), "bf16"),
        (f"B={b} Hq={hq} Hkv={hkv} T={t} D={d}", (b, hq, hkv, t, d), "fp16"),
        ("B=2 Hq=12 Hkv=4 T=77 D=64", (2, 12, 4, 77, 64), "bf16"),
    ]
    return [
        _case(
            "grouped_attention",
            "causal",
            label,
            dt,
            lambda ctx, g, dims=dims, dt=dt: _attention_checks(ctx, g, *dims, _DTYPES[dt]),
        )
        for label, dims, dt in configs
    ]


# ---------------------------------------------------------------------------------------
# optimizers
# ---------------------------------------------------------------------------------------


def _adamw_reference(p0, grads, lr, betas, eps, wd):
    """float64 AdamW (decoupled weight decay) from ``p0`` over the gradient sequence."""
    p = p0.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, grad in enumerate(grads, start=1):
        g64 = grad.double()
        p.mul_(1 - lr * wd)
        m.mul_(betas[0]).add_(g64, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(g64, g64, value=1 - betas[1])
        m_hat = m / (1 - betas[0] ** t)
        v_hat = v / (1 - betas[1] ** t)
        p.addcdiv_(m_hat, v_hat.sqrt().add_(eps), value=-lr)
    return p


def _offload_adamw_checks(ctx, g, n, k, r, dtype, offload_gradients) -> list[dict]:

    dev = ctx.device
    shapes = [(r, k), (n, r), (n,)]
    params = [torch.randn(sh, generator=g, device=dev).to(dtype).requires_grad_() for sh in shapes]
    start = [p.detach().clone() for p in params]
    hp = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    opt = CPUOffloadAdamW(params, **hp, offload_gradients=offload_gradients)
    grads: list[list[torch.Tensor]] = [[] for _ in params]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnclippedGradientsWarning)
        for _ in range(3):
            coeffs = [torch.randn(p.shape, generator=g, device=dev).to(dtype) for p in params]
            # d/dp sum(p * c) = c: the gradients arrive through autograd, so the offloading
            # hooks and the side-stream copies run as in training.
            loss = sum((p * c).sum() for p, c in zip(params, coeffs))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            for i, c in enumerate(coeffs):
                grads[i].append(c)
    if ctx.gpu:
        torch.cuda.synchronize()
    checks = []
    for i, (p, p0) in enumerate(zip(params, start)):
        ref = _adamw_reference(p0, grads[i], hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"])
        if dtype == torch.float32:
            # fp32 rounding of the parameter against the size of the three updates
            err = float((p.detach().double() - ref).abs().max() / (ref - p0.double()).abs().max())
            checks.append(check(f"param {i} {list(p.shape)} (update-relative)", err, 1e-3))
        else:
            # fp32 master, device copy rounded once: at most one ulp of the parameter dtype
            ulp = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)  # spacing at the top binade
            err = float((p.detach().double() - ref.to(dtype).double()).abs().max())
            checks.append(
                check(
                    f"param {i} {list(p.shape)} (ulps)", err / (ulp * float(ref.abs().max())), 1.0
                )
            )
    opt.remove_hooks()
    return checks


def _adamw_fused_checks(ctx, g, n, k, r, dtype, bits) -> list[dict]:
    """``trilora.optim.AdamW`` with resident state: its fused Triton kernels (under the
    interpreter on the CPU), three steps against :func:`_adamw_reference`."""

    dev = ctx.device
    # bias [n]: at n = 64 a partial 256-element block of 8-bit state
    shapes = [(r, k), (n, r), (n,)]
    params = [torch.randn(sh, generator=g, device=dev).to(dtype).requires_grad_() for sh in shapes]
    start = [p.detach().clone() for p in params]
    hp = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    # min_8bit_size=0: every tensor gets 8-bit state, the small CPU shapes included
    opt = AdamW(params, **hp, state_bits=bits, min_8bit_size=0)
    grads: list[list[torch.Tensor]] = [[] for _ in params]
    step_errs = [0.0] * len(params)
    maps = quant_maps(dev)
    for t in range(1, 4):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g, device=dev).to(dtype)
            grads[i].append(p.grad.clone())
        before = [
            (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
            if p in opt.state
            else None
            for p in params
        ]
        opt.step()
        if bits != 8:
            continue
        # 8-bit, one step from the stored state: the definition (dequantize the moments,
        # AdamW in float64) leaves only the fp32 arithmetic of one step
        for i, (p, prev) in enumerate(zip(params, before)):
            g64 = grads[i][-1].double().reshape(-1)
            if prev is None:  # first step: zero moments
                p0, m, v = start[i].double().reshape(-1), 0.0 * g64, 0.0 * g64
            else:
                p0 = prev[0].double().reshape(-1)
                m = dequantize_blockwise(prev[1]["state1"], prev[1]["absmax1"], maps.qmap1).double()
                v = dequantize_blockwise(prev[1]["state2"], prev[1]["absmax2"], maps.qmap2).double()
            b1, b2 = hp["betas"]
            m = b1 * m + (1 - b1) * g64
            v = b2 * v + (1 - b2) * g64 * g64
            step_ref = p0 * (1 - hp["lr"] * hp["weight_decay"]) - hp["lr"] / (1 - b1**t) * m / (
                (v / (1 - b2**t)).sqrt() + hp["eps"]
            )
            got = p.detach().double().reshape(-1)
            err = float((got - step_ref).abs().max() / (step_ref - p0).abs().max())
            step_errs[i] = max(step_errs[i], err)
    if ctx.gpu:
        torch.cuda.synchronize()
    checks = []
    for i, (p, p0) in enumerate(zip(params, start)):
        ref = _adamw_reference(p0, grads[i], hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"])
        err = float((p.detach().double() - ref).abs().max() / (ref - p0.double()).abs().max())
        if bits == 32 and dtype == torch.float32:
            checks.append(check(f"param {i} {list(p.shape)} (update-relative)", err, 1e-3))
            continue
        if bits == 32:
            # fp32 moments (they do not depend on the parameter); the parameter rounded to
            # its dtype after each of the three steps: <= 1.5 ulps, 2 against the rounded
            # reference
            ulp = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)  # spacing at the top binade
            err = float((p.detach().double() - ref.to(dtype).double()).abs().max())
            checks.append(
                check(
                    f"param {i} {list(p.shape)} (ulps)", err / (ulp * float(ref.abs().max())), 2.0
                )
            )
            continue
        state = opt.state[p]
        if "state1" not in state:
            checks.append(check(f"param {i} {list(p.shape)}: 8-bit state allocated", 1.0, 0.0))
            continue
        # steps 2 and 3 use moments stored as 8-bit dynamic codes (up to ~7% off for a
        # moment a decade below its block's absmax): the parameters end 1-3% of the update
        # away from plain AdamW on random data; each single step is exact to fp32 (~2e-5)
        checks.append(check(f"param {i} {list(p.shape)} (update-relative, 3 steps)", err, 0.1))
        checks.append(
            check(
                f"param {i} {list(p.shape)} (update-relative, each step from the stored state)",
                step_errs[i],
                1e-4,
            )
        )
    return checks


def optimizer_cases(s: Shapes) -> list[Unit]:
    """Optimizers against a float64 AdamW over three steps.

    ``adamw_fused``: ``trilora.optim.AdamW``'s fused Triton kernels (``kernels/optim.py``;
    on the CPU through the interpreter), one case per state width: 32-bit (fp32 and bf16
    parameters) and 8-bit, whose blockwise-quantized moments get a looser tolerance over the
    three steps and, each step, a tight one against the definition applied to the stored
    state. ``CPUOffloadAdamW``: the host update with offloaded gradients.
    """

    k = n = 4096 if s.gpu else 64
    label = f"A[16,{k}] B[{n},16] bias[{n}]"
    fused = [(32, "fp32"), (32, "bf16"), (8, "fp32")]
    units = [
        _case(
            "adamw_fused",
            "32bit" if bits == 32 else f"8bit,blocksize{QBLOCK}",
            label,
            dt,
            lambda ctx, g, dt=dt, bits=bits: _adamw_fused_checks(
                ctx, g, n, k, 16, _DTYPES[dt], bits
            ),
        )
        for bits, dt in fused
    ]
    configs = [("fp32", True), ("bf16", True), ("fp32", False)]
    units += [
        _case(
            "CPUOffloadAdamW",
            f"offload_gradients={og}",
            label,
            dt,
            lambda ctx, g, dt=dt, og=og: _offload_adamw_checks(ctx, g, n, k, 16, _DTYPES[dt], og),
        )
        for dt, og in configs
    ]
    return units


# ---------------------------------------------------------------------------------------
# MoE experts: the grouped QLoRA linear
# ---------------------------------------------------------------------------------------


def _grouped_checks(ctx, g, experts, rows, n, k, r, dtype, transposed, quant_type) -> list[dict]:
    from trilora.moe import QuantizedExperts
    from trilora.ops.grouped_qlora import grouped_lora_linear

    dev = ctx.device
    stored = (experts, k, n) if transposed else (experts, n, k)
    w = (torch.randn(stored, generator=g, device=dev) / math.sqrt(k)).to(dtype)
    weight = QuantizedExperts.quantize(w, QuantConfig(quant_type, 64, True, None))
    # Skewed routing with empty experts: what real routers produce.
    owner = torch.randint(0, max(1, experts // 2), (rows,), generator=g, device=dev) * 2
    owner, _ = torch.sort(owner.clamp(max=experts - 1))
    ends = torch.bincount(owner, minlength=experts).cumsum(0)
    x = torch.randn(rows, k, generator=g, device=dev).to(dtype).requires_grad_()
    a = (torch.randn(experts, r, k, generator=g, device=dev) / math.sqrt(k)).requires_grad_()
    b = (torch.randn(experts, n, r, generator=g, device=dev) / math.sqrt(r)).requires_grad_()
    dy = torch.randn(rows, n, generator=g, device=dev).to(dtype)
    scale = 2.0
    y = grouped_lora_linear(x, ends, weight, a, b, scale, transposed)
    y.backward(dy)
    # float64 reference, expert by expert, on the weight the kernels see (rounded to dtype)
    x64, dy64 = x.detach().double(), dy.double()
    y_ref = torch.zeros(rows, n, dtype=torch.float64, device=dev)
    dx_ref = torch.zeros(rows, k, dtype=torch.float64, device=dev)
    da_ref = torch.zeros(a.shape, dtype=torch.float64, device=dev)
    db_ref = torch.zeros(b.shape, dtype=torch.float64, device=dev)
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            we = weight.expert(e).dequantize(torch.float32).to(dtype).double()
            we = we.t() if transposed else we
            a64, b64 = a[e].detach().double(), b[e].detach().double()
            xe, dye = x64[start:end], dy64[start:end]
            xa = xe @ a64.t()
            dyb = dye @ b64
            y_ref[start:end] = xe @ we.t() + scale * xa @ b64.t()
            dx_ref[start:end] = dye @ we + scale * dyb @ a64
            da_ref[e] = scale * dyb.t() @ xe
            db_ref[e] = scale * dye.t() @ xa
        start = end
    tol = TOL[dtype]
    return [
        check("y", rel_err(y, y_ref), tol),
        check("dx", rel_err(x.grad, dx_ref), tol),
        check("dA", rel_err(a.grad, da_ref), tol),
        check("dB", rel_err(b.grad, db_ref), tol),
    ]


def moe_cases(s: Shapes) -> list[Unit]:
    """Forward + backward of the grouped QLoRA linear of MoE experts (every expert's rows
    through its own 4-bit weight and LoRA): Qwen3-30B-A3B's expert projections (512 tokens,
    top-8 of 128 experts) and gpt-oss-20b's transposed layout on the GPU; scaled down, with
    empty experts and sizes off every block, under the interpreter."""
    if s.gpu:
        shapes = [
            ("qwen3-30b-a3b gate_up", 128, 4096, 1536, 2048, False, 0),
            ("qwen3-30b-a3b down", 128, 4096, 2048, 768, False, 0),
            ("gpt-oss-20b gate_up (transposed)", 32, 2048, 5760, 2880, True, 1),
        ]
    else:
        shapes = [
            ("gate_up", 6, 24, 40, 72, False, 0),
            ("down (transposed)", 5, 17, 72, 36, True, 1),
        ]
    units = []
    for label, experts, rows, n, k, transposed, tier in shapes:
        for dt in ("bf16", "fp16"):
            for quant_type in ("nf4",) if tier == 0 else ("fp4",):

                def fn(ctx, g, e=experts, m=rows, n=n, k=k, dt=dt, t=transposed, q=quant_type):
                    return _grouped_checks(ctx, g, e, m, n, k, 16, _DTYPES[dt], t, q)

                units.append(
                    _case(
                        "grouped_qlora",
                        f"r16,{quant_type}-dq-bs64,E={experts}",
                        f"{label} rows={rows} N={n} K={k}",
                        dt,
                        fn,
                        uses_dot=True,
                        tier=tier,
                    )
                )
    return units


# ---------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------

FAMILIES: tuple[Callable[[Shapes], list[Unit]], ...] = (
    quantize_cases,
    qlora_cases,
    cross_entropy_cases,
    rms_norm_cases,
    attention_cases,
    optimizer_cases,
    moe_cases,
)


def _order(unit: Unit) -> tuple[int, int]:
    """Run order by value: one real shape of every family in bf16 first (the dtype no
    interpreter has checked), then fp16, then the other real projections (they reuse the
    compiled kernels: seconds), then the odd shapes (each adds Triton compilations)."""
    if unit.tier == 0:
        return (0 if unit.dtype in ("bf16", "fp32") else 1, 0)
    return (1 + unit.tier, 0)


def units(ctx: Context) -> list[Unit]:
    """Every case of every family, in the order they run (stable within a rank)."""
    s = shapes_for(ctx)
    listed = [u for family in FAMILIES for u in family(s)]
    return sorted(listed, key=_order)


__all__ = ["FAMILIES", "TOL", "QLoraConfig", "Shapes", "rel_err", "shapes_for", "units"]
