"""Frozen input-embedding offload: the embedding table lives in host memory.

In QLoRA the input embedding table is frozen and only ``batch x seq`` of its rows are read
per step, yet it is the largest 16-bit tensor left on the device (Llama-3.1-8B: 128,256 x
4,096 bf16 = 1 GiB, an eighth of the 8k-token training footprint). :func:`offload_input_embeddings`
replaces the model's input embedding (``get_input_embeddings()`` / ``set_input_embeddings()``,
so any transformers model, also through a PeftModel) by :class:`OffloadedEmbedding`, which
keeps the table in host memory and looks the rows up on the CPU; only the gathered
``[batch, seq, hidden]`` rows are copied to the device (through a pinned staging buffer,
non-blocking, when the device is CUDA).

The lookup runs the *original* embedding module's forward on the host, so subclasses that
scale or otherwise post-process (e.g. Gemma's scaled embedding) keep their semantics.
The table keeps its ``state_dict`` key (``...embed_tokens.weight``) and stays on the host
across ``model.to()`` / ``.cuda()`` / ``.half()`` (dtype changes are applied on the host).

Embeddings tied to the output head cannot be offloaded (the head needs the full table on
the device every step): the function then warns and leaves the model unchanged.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["OffloadedEmbedding", "offload_input_embeddings", "restore_input_embeddings"]


class OffloadedEmbedding(nn.Module):
    """A frozen embedding whose table stays in host memory; outputs land on ``device``.

    Args:
        embedding: the original (frozen) embedding module, any ``nn.Embedding`` or a module
            with a ``weight`` parameter of shape ``[vocab, hidden]`` whose forward maps
            integer ids to rows. Its table is moved to the CPU (pinned if ``pin``).
        device: where outputs go (the model's compute device). None: the table's device
            before offloading.
        pin: pin the table in page-locked memory. Not needed for the row gather (the rows
            are staged through a small pinned buffer), so off by default; it only costs
            host memory.

    ``forward(input_ids)``: ``input_ids`` integer ``[...]`` on any device -> rows
    ``[..., hidden]`` in the table's dtype on ``device``. No gradient flows into the table.
    """

    def __init__(
        self, embedding: nn.Module, device: torch.device | str | None = None, pin: bool = False
    ):
        super().__init__()
        weight = getattr(embedding, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                f"expected an embedding module with a 2-D weight [vocab, hidden], got "
                f"{type(embedding).__name__} with weight {getattr(weight, 'shape', None)}"
            )
        if weight.requires_grad:
            raise ValueError(
                "the input embedding is trainable (weight.requires_grad=True); only a frozen "
                "table can be offloaded (freeze it, or leave it on the device)"
            )
        self.device = torch.device(device) if device is not None else weight.device
        if weight.device.type != "cpu" or (pin and not weight.is_pinned()):
            with torch.no_grad():
                host = weight.detach().to("cpu")
                if pin and torch.cuda.is_available():
                    host = host.pin_memory()
            embedding.weight = nn.Parameter(host, requires_grad=False)
        # The original module is kept out of the module tree (in __dict__), so model.to()
        # never moves its table; the same Parameter is registered here as ``weight`` so the
        # state_dict key and parameters() are unchanged.
        self.__dict__["inner"] = embedding
        self.weight = embedding.weight

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() of the model: the table stays on the host; a dtype change is
        # applied there (so lookups match the rest of the model) and a device move only
        # redirects the outputs.
        probe = fn(torch.empty(0, dtype=self.weight.dtype, device=self.weight.device))
        if probe.dtype != self.weight.dtype:
            with torch.no_grad():
                self.weight.data = self.weight.data.to(probe.dtype)
        if probe.device.type != "meta":
            self.device = probe.device
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.is_floating_point():
            raise TypeError(f"expected integer token ids, got {input_ids.dtype}")
        host_ids = input_ids.to(self.weight.device)
        with torch.no_grad():
            rows = self.inner(host_ids)
        if self.device.type == "cuda" and rows.device.type == "cpu":
            # The caching host allocator keeps the pinned block alive until the async copy
            # has run (it records the copy's stream), so the staging buffer can go out of
            # scope right away.
            return rows.pin_memory().to(self.device, non_blocking=True)
        return rows.to(self.device)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, table on host, output on {self.device}"
        )


def _tied(model: nn.Module, weight: torch.Tensor) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_w = getattr(out, "weight", None)
    if out_w is weight:
        return True
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False)) and (
        out_w is not None and out_w.shape == weight.shape
    )


def offload_input_embeddings(
    model: nn.Module, device: torch.device | str | None = None, pin: bool = False
) -> OffloadedEmbedding | None:
    """Keep ``model``'s frozen input-embedding table in host memory.

    Args:
        model: a transformers model (or PeftModel) with ``get_input_embeddings()`` and
            ``set_input_embeddings()``.
        device: the compute device outputs are copied to; None: the table's current device.
        pin: pin the host table (see :class:`OffloadedEmbedding`).

    Returns:
        The installed :class:`OffloadedEmbedding`, or None (with a warning) when the input
        embedding is tied to the output head. Frees the table's device memory once the
        caller drops other references to the old device tensor.
    """
    get = getattr(model, "get_input_embeddings", None)
    setter = getattr(model, "set_input_embeddings", None)
    if not callable(get) or not callable(setter):
        raise ValueError(
            f"{type(model).__name__} has no get_input_embeddings()/set_input_embeddings(); "
            "expected a transformers model"
        )
    emb = get()
    if isinstance(emb, OffloadedEmbedding):
        return emb
    if emb is None or not isinstance(getattr(emb, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__}.get_input_embeddings() has no weight tensor")
    if _tied(model, emb.weight):
        warnings.warn(
            "input embeddings are tied to the output head (lm_head); not offloading them "
            "(the head needs the whole table on the device)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    wrapped = OffloadedEmbedding(emb, device=device, pin=pin)
    setter(wrapped)
    return wrapped


def restore_input_embeddings(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Undo :func:`offload_input_embeddings` (the table moves to ``device``, default: the output device)."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, OffloadedEmbedding):
        return
    inner = emb.inner
    inner.to(device if device is not None else emb.device)
    model.set_input_embeddings(inner)


def input_embedding_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s input-embedding table (offloaded or not); 0 when it is tied to
    the output head (never offloaded)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is emb.weight:
        return 0
    weight = emb.weight
    return weight.numel() * weight.element_size()
