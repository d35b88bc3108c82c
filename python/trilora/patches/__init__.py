"""Model patches: what trilora installs on a transformers model (or a PeftModel) to train
it in less memory or faster, and the one entry point that installs them, :func:`apply`.

* :mod:`~trilora.patches.activation_checkpointing`: per-decoder-layer checkpointing, layer
  inputs offloaded to pinned host memory, chunked MLPs.
* :mod:`~trilora.patches.embedding_offload`: the input-embedding table in host memory.
* :mod:`~trilora.patches.fused_loss`: the causal-LM loss from the final hidden states.
* :mod:`~trilora.patches.fused_norm`: Llama-style RMSNorm through ``trilora.ops.rms_norm``.
* :mod:`~trilora.patches.grouped_attention`: grouped flash attention (opt-in).
* :mod:`~trilora.patches.introspection`: the PeftModel unwrapping the others share.

The PEFT backend (:func:`trilora.peft.patch`), the trainer (:mod:`trilora.train.model`) and
the memory model (:mod:`trilora.memory.trace`) all call :func:`apply`, so a feature is
installed the same way everywhere. A patch calls ``trilora.ops``, never a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from trilora.patches.activation_checkpointing import CheckpointState, enable_checkpointing
from trilora.patches.embedding_offload import input_embedding_bytes, offload_input_embeddings
from trilora.patches.fused_loss import enable_fused_cross_entropy
from trilora.patches.fused_norm import enable_fused_rms_norm
from trilora.patches.grouped_attention import enable_grouped_attention

__all__ = ["PatchOptions", "PatchResult", "apply"]


@dataclass(frozen=True)
class PatchOptions:
    """Which patches :func:`apply` installs (all off by default).

    Attributes:
        checkpointing: checkpoint every decoder layer (non-reentrant).
        offload: with ``checkpointing``, keep layer inputs in pinned host memory (CUDA).
        pin_memory_budget: most bytes of pinned host memory ``offload`` uses; None: no limit.
        mlp_chunks: with ``checkpointing``, run each MLP in this many pieces along the
            sequence (None or 1: whole).
        simulate_offload: a fake-tensor trace: ``offload`` only accounts its host bytes.
        fused_cross_entropy: the loss from the final hidden states (causal LMs only; a
            model without an output head is left alone).
        fused_rms_norm: Llama-style RMSNorm layers through ``trilora.ops.rms_norm``.
        grouped_attention: grouped flash attention as the attention implementation.
        offload_embeddings: the input-embedding table in host memory.
    """

    checkpointing: bool = False
    offload: bool = False
    pin_memory_budget: int | None = None
    mlp_chunks: int | None = None
    simulate_offload: bool = False
    fused_cross_entropy: bool = False
    fused_rms_norm: bool = False
    grouped_attention: bool = False
    offload_embeddings: bool = False


@dataclass
class PatchResult:
    """What :func:`apply` installed.

    Attributes:
        checkpoint_state: the checkpointing state (None without ``checkpointing``).
        host_embedding_bytes: bytes of the input-embedding table now in host memory (0 when
            not offloaded, or tied to the output head and so left on the device).
        installed: names of the installed patches, in the order they were installed.
    """

    checkpoint_state: CheckpointState | None = None
    host_embedding_bytes: int = 0
    installed: tuple[str, ...] = ()


def apply(model: nn.Module, options: PatchOptions) -> PatchResult:
    """Install on ``model`` (a transformers model, causal LM, or a PeftModel wrapping one)
    the patches ``options`` asks for; each one is the public ``enable_*`` call a user makes.

    Order: checkpointing, fused cross-entropy, fused RMSNorm, grouped attention, embedding
    offload. Returns a :class:`PatchResult`.
    """
    result = PatchResult()
    installed: list[str] = []
    if options.checkpointing:
        state = enable_checkpointing(
            model,
            offload=options.offload,
            pin_memory_budget=options.pin_memory_budget,
            mlp_chunks=options.mlp_chunks or None,
        )
        state.simulate = options.simulate_offload
        result.checkpoint_state = state
        installed.append("checkpointing")
    causal_lm = callable(getattr(model, "get_output_embeddings", None))
    if options.fused_cross_entropy and causal_lm and enable_fused_cross_entropy(model):
        installed.append("fused_cross_entropy")
    if options.fused_rms_norm:
        enable_fused_rms_norm(model)
        installed.append("fused_rms_norm")
    if options.grouped_attention:
        enable_grouped_attention(model)
        installed.append("grouped_attention")
    if options.offload_embeddings and offload_input_embeddings(model) is not None:
        result.host_embedding_bytes = input_embedding_bytes(model)
        installed.append("offload_embeddings")
    result.installed = tuple(installed)
    return result
