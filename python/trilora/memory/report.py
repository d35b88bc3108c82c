"""The memory model's core types: what one step to trace is (:class:`MemOptions`), what a
trace reports (:class:`MemReport`), the overheads fake tensors cannot see, and byte
formatting. Every other module of :mod:`trilora.memory` builds on these.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch

from trilora.formats.config import QUANT_TYPES
from trilora.memory import optimizer_model
from trilora.memory.optimizer_model import OPTIMIZER_NAMES

GiB = 1024**3
MiB = 1024**2

# --- allocator and runtime overheads that fake tensors cannot see ------------------------
OVERHEADS = {
    # CUDA context, loaded kernel images and the NCCL-free runtime of a torch 2.x process on
    # H100/A100 with lazy module loading: typically 450-600 MiB (nvidia-smi minus
    # torch.cuda.memory_reserved on an idle process).
    "cuda_context": 600 * MiB,
    # cuBLAS + cuBLASLt workspaces: torch's default CUBLAS_WORKSPACE_CONFIG on sm_90 is
    # ":4096:8" (32 MiB) per handle; one handle for the main and one for the side stream.
    "cublas_workspace": 64 * MiB,
}
# The caching allocator rounds and splits blocks; with transient activations that change
# size every layer the reserved-minus-allocated gap is a few percent (less with
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True). Charged on the dynamic part only:
# weights and optimizer state are allocated once, in exact-sized blocks.
FRAGMENTATION = 0.05
PROVIDERS = ("trilora", "bnb_peft")
DEPTHS = ("full", "extrapolate", "fast")


# "auto" MLP chunking: pieces of this many tokens per sequence. Each piece's intermediate
# activations are [2048, intermediate_size] (56 MiB per tensor for Llama-3.1-8B in bf16),
# constant in the context length; 2048 rows is also config.fused_max_tokens, so the chunk's
# projections stay on the fused dequantize-matmul kernels (no dequantized weight scratch),
# and its GEMMs (2048 x 4096 x 14336, 240 GFLOP) are still large enough to run near peak.
MLP_CHUNK_TOKENS = 2048


@dataclass
class MemOptions:
    """One training step to trace (see ``trilora mem --help`` for the meaning of each)."""

    seq_len: int = 8192
    batch: int = 1
    r: int = 32
    lora_alpha: float = 16.0
    targets: tuple[str, ...] | None = None  # None: every nn.Linear in the decoder
    optimizer: str = "adamw"
    checkpointing: bool = True
    offload: bool = True
    # MLP sequence chunks: a count, None (off) or "auto" (pieces of MLP_CHUNK_TOKENS tokens)
    mlp_chunks: int | str | None = "auto"
    fused_ce: bool = True
    # Llama-style RMSNorm layers run through trilora.ops.rms_norm (trilora.patches.fused_norm)
    fused_norm: bool = True
    # attention one key/value head group at a time (trilora.enable_grouped_attention)
    grouped_attention: bool = False
    # the frozen input-embedding table stays in host memory (trilora.patches.embedding_offload)
    offload_embeddings: bool = False
    pin_memory_budget: int | None = None
    dtype: str = "bfloat16"
    # base weight format: "nf4" / "fp4" (4-bit, blocksize and double_quant apply) or "int8"
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True

    def resolved_mlp_chunks(self) -> int | None:
        """The chunk count passed to :func:`~trilora.patches.activation_checkpointing.enable_checkpointing`."""
        if self.mlp_chunks == "auto":
            return max(1, math.ceil(self.seq_len / MLP_CHUNK_TOKENS))
        return self.mlp_chunks

    def validate(self) -> None:
        if self.mlp_chunks not in (None, "auto") and (
            not isinstance(self.mlp_chunks, int) or self.mlp_chunks < 0
        ):
            raise ValueError(
                f"mlp_chunks must be an int >= 0, None or 'auto', got {self.mlp_chunks!r}"
            )
        if self.seq_len < 2 or self.batch < 1:
            raise ValueError(
                f"need seq_len >= 2 and batch >= 1, got {self.seq_len} and {self.batch}"
            )
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)}, got {self.optimizer!r}"
            )
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"dtype must be bfloat16 or float16, got {self.dtype}")
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")


@dataclass
class MemReport:
    """Peak device memory of one step, in bytes, by category."""

    provider: str
    model: str
    options: dict
    categories: dict[str, int]  # at the moment of the peak
    overheads: dict[str, int]
    host_pinned: int
    by_module: dict[str, int] = field(default_factory=dict)  # each module's own peak
    layers_traced: int = 0
    layers: int = 0
    trace_seconds: float = 0.0
    host_embedding: int = 0  # pageable host bytes of an offloaded input-embedding table
    host_optimizer: int = 0  # pinned + pageable host bytes of a CPU-offloaded optimizer
    # how the numbers were obtained: "full" (every layer traced), "extrapolated" (depth
    # extrapolated from a few layers at this length), "lattice" (also extrapolated along the
    # length from short traces, trilora.memory.timeline)
    method: str = "full"

    @property
    def traced_peak(self) -> int:
        """Peak of the tensors the trace sees (what ``torch.cuda.max_memory_allocated`` reports)."""
        return sum(self.categories.values())

    @property
    def total(self) -> int:
        """Device memory needed: traced peak plus overheads."""
        return self.traced_peak + sum(self.overheads.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["traced_peak"] = self.traced_peak
        d["total"] = self.total
        return d


def compute_dtype(opts: MemOptions) -> torch.dtype:
    """The torch dtype of ``opts.dtype`` (the model's compute dtype)."""
    return getattr(torch, opts.dtype)


def overheads_of(categories: dict[str, int]) -> dict[str, int]:
    """:data:`OVERHEADS` plus the allocator's fragmentation of the dynamic categories."""
    dynamic = categories["activations"] + categories["temporaries"] + categories["gradients"]
    return {**OVERHEADS, "fragmentation": int(FRAGMENTATION * dynamic)}


def extrapolate_depth(a: MemReport, b: MemReport, layers: int) -> MemReport:
    """The report at ``layers`` layers, each category extrapolated linearly from ``a`` and
    ``b`` (traced at two depths, ``a.layers_traced < b.layers_traced``)."""
    la, lb = a.layers_traced, b.layers_traced

    def lin(x, y):
        return round(x + (y - x) * (layers - la) / (lb - la))

    cats = {k: max(0, lin(a.categories[k], b.categories[k])) for k in a.categories}
    return replace(
        b,
        categories=cats,
        overheads=overheads_of(cats),
        host_pinned=max(0, lin(a.host_pinned, b.host_pinned)),
        host_optimizer=max(0, lin(a.host_optimizer, b.host_optimizer)),
        host_embedding=b.host_embedding,
        by_module={},
        layers=layers,
        trace_seconds=a.trace_seconds + b.trace_seconds,
        method="lattice" if "lattice" in (a.method, b.method) else "extrapolated",
    )


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1: ``"512 B"``,
    ``"216.00 KiB"``, ``"3.25 GiB"`` (never ``"0.00 GiB"`` for a small tensor)."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def byte_unit(largest: float) -> tuple[str, int]:
    """The unit (name, bytes) :func:`format_bytes` picks for ``largest``: one unit for a column."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(largest) >= size:
            return unit, size
    return "B", 1


def provider_options(provider: str, opts: MemOptions) -> MemOptions:
    """What ``provider`` actually runs for ``opts``: bitsandbytes + PEFT has transformers'
    attention (one flash call over all heads) and a device-resident AdamW at the same state
    precision (:func:`~trilora.memory.optimizer_model.baseline_equivalent`: trilora's host,
    managed-memory and CPU-offloaded optimizers are not theirs)."""
    if provider == "bnb_peft":
        mode = optimizer_model.baseline_equivalent(opts.optimizer)
        return replace(opts, grouped_attention=False, optimizer=mode)
    return opts
