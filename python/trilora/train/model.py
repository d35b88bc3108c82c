"""Load the base model and tokenizer, attach what trains, switch on the memory options.

Sources: a Hugging Face folder (full precision, or bitsandbytes 4-bit: its bytes are kept),
or a ``.gguf`` file, read once through transformers' GGUF loader and cached as a bf16
Hugging Face folder (``$TRILORA_CACHE``, default ``~/.cache/trilora``), which trilora then
quantizes like any other folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from peft import get_peft_config
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import trilora.distributed as td
from trilora import patches
from trilora.distributed import unwrap
from trilora.io import UsageError, UserError, atomic_directory, atomic_write_json, require
from trilora.moe import QuantizedExperts, experts_modules
from trilora.nn import QuantizedLinear
from trilora.peft import get_peft_model
from trilora.train.config import TrainConfig, cache_dir, model_source_problem

__all__ = [
    "LoadedModel",
    "count_parameters",
    "gguf_digest",
    "gguf_to_folder",
    "load_model",
    "load_tokenizer",
    "model_fingerprint",
]

# PEFT methods whose forward drops position ids (virtual tokens shift every position).
_PROMPT_LEARNING = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")


@dataclass
class LoadedModel:
    """What :func:`load_model` returns. ``total_params`` counts the base model's weights as
    the model defines them (a 4-bit weight of shape ``[N, K]`` is ``N * K`` parameters,
    whatever its packed storage holds; tied weights once), without the adapter's;
    ``trainable_params`` what trains (the adapter, or every weight with ``--finetune
    full``)."""

    model: nn.Module
    tokenizer: Any
    folder: Path
    device: torch.device
    compute_dtype: torch.dtype
    has_adapter: bool
    trainable_params: int
    total_params: int


def _logical_numel(module: nn.Module) -> int | None:
    """Elements of ``module.weight`` as the model sees it, when its storage is packed 4-bit
    (trilora's ``Linear4bit``, or bitsandbytes' whose ``Params4bit`` keeps the shape in its
    ``quant_state``); None for an ordinary weight."""

    if isinstance(module, QuantizedLinear):
        return module.out_features * module.in_features
    if isinstance(module, QuantizedExperts):
        return module.num_experts * module.rows * module.cols
    shape = getattr(getattr(getattr(module, "weight", None), "quant_state", None), "shape", None)
    if shape is not None:
        return int(torch.Size(shape).numel())
    return None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(all, trainable)`` parameters of ``model``, 4-bit weights counted by their logical
    shape (``[N, K]``: ``N * K``), shared (tied) tensors once."""
    logical: dict[int, int] = {}
    for module in model.modules():
        n = _logical_numel(module)
        if n is not None:
            logical[id(module.weight)] = n
    total = trainable = 0
    for p in model.parameters():  # each tensor once, however many modules share it
        n = logical.get(id(p), p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def gguf_digest(gguf: Path) -> str:
    """sha256 of the file's bytes (hex), read once per file: the digest is remembered in
    ``$TRILORA_CACHE/gguf/digests.json`` under the file's absolute path, size and
    modification time, so a later run finds it without reading the file again."""

    st = gguf.stat()
    stamp = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index_path = cache_dir() / "gguf" / "digests.json"

    def read_index() -> dict[str, str]:
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            return {}
        return index if isinstance(index, dict) else {}

    known = read_index().get(stamp)
    if isinstance(known, str):
        return known
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    digest = h.hexdigest()
    index = read_index()  # another process may have added entries meanwhile
    index[stamp] = digest
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(index_path, index)
    except OSError:
        pass  # a read-only cache: the digest is computed again next time
    return digest


def gguf_to_folder(gguf: Path, log=print) -> Path:
    """A bf16 Hugging Face folder holding the model and tokenizer of ``gguf``, converted once
    and cached under the file's content (:func:`gguf_digest`): every copy of the same file,
    wherever it lies (one per virtual environment), shares one folder."""

    target = cache_dir() / "gguf" / f"{gguf.stem}-{gguf_digest(gguf)[:12]}"
    if (target / "config.json").is_file():
        return target
    check_gguf(gguf)
    log(f"reading {gguf.name} through transformers' GGUF loader (once; cached in {target})")
    try:
        extra = {}
        try:  # transformers >= 5.24 can keep GGUF blocks packed; trilora wants dense weights
            from transformers import GgufConfig

            extra["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **extra
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:  # a gguf too old for this transformers, say
        from trilora.io.extras import missing_message

        raise UserError(missing_message("gguf", "reading a .gguf model", exc)) from None
    # The config remembers the GGUF quantization; the weights are already dequantized.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("is_quantized", "hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            model.__dict__.pop(attr)
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def check_gguf(path: Path) -> None:
    """Raise :class:`UserError` (one line) unless ``path`` is a complete GGUF file: the
    ``GGUF`` magic, a header and tensor index the ``gguf`` package reads, and every tensor's
    data inside the file. A truncated download otherwise fails deep inside the loader."""

    expected = (
        "expected a complete GGUF model file (magic 'GGUF', header, tensor index and "
        "all tensor data, as llama.cpp writes it)"
    )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"--model {path}: not a GGUF file (it starts with {magic!r}); {expected}")
    gguf = require("gguf", "reading a .gguf model")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # the reader's own errors say little: ValueError, struct.error
        raise UserError(
            f"--model {path}: not a readable GGUF file, truncated or corrupt "
            f"({size:,} bytes; {type(exc).__name__}: {exc}); {expected}"
        ) from None
    if end > size:
        raise UserError(
            f"--model {path}: truncated GGUF file: its tensor data ends at byte "
            f"{end:,} but the file has {size:,} bytes; {expected}"
        )


def model_fingerprint(source: str) -> str:
    """Identity of a model source: config and weight file names and sizes (resume checks)."""
    p = Path(source)
    h = hashlib.sha256()
    if p.is_file():
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}".encode())
    elif p.is_dir():
        if (p / "config.json").is_file():
            h.update((p / "config.json").read_bytes())
        for f in sorted(p.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".gguf"):
                h.update(f"{f.name}|{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _is_prequantized(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return cfg.get("quantization_config") is not None


def resolve_source(source: str, log) -> Path:
    p = Path(source).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return gguf_to_folder(p, log)
    problem = model_source_problem(source)
    if problem is not None:
        raise UserError(problem)
    if not (p / "config.json").is_file():
        raise UserError(f"--model {source}: no config.json; expected a Hugging Face model folder")
    return p


def _attn_implementation(cfg: TrainConfig, device: torch.device) -> str:
    # Packed rows carry per-example position ids. FlashAttention-2 turns them into varlen
    # attention (transformers detects them); SDPA and eager get the block-diagonal mask
    # transformers builds from the same position ids.
    if device.type == "cuda" and cfg.packing and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _load_peft_config(path: str):

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--peft-config {path}: {exc.strerror}") from None

    yaml = require("yaml", "--peft-config")
    try:
        data = yaml.safe_load(text)
    except Exception:
        raise UsageError(f"--peft-config {path}: not valid JSON or YAML") from None
    if not isinstance(data, dict) or "peft_type" not in data:
        raise UsageError(
            f"--peft-config {path}: expected a mapping with 'peft_type' (e.g. "
            "IA3, PREFIX_TUNING, LORA), as PeftConfig.to_dict() writes it"
        )
    data.setdefault("task_type", "CAUSAL_LM")
    try:
        return get_peft_config(data)
    except Exception as exc:
        raise UsageError(f"--peft-config {path}: PEFT rejected it ({exc})") from None


def load_tokenizer(cfg: TrainConfig, log=print) -> tuple[Path, Any]:
    """The model folder (a .gguf file is converted once, see :func:`gguf_to_folder`) and its
    tokenizer, with a pad token (EOS when it has none). A second or so: the trainer reads
    and checks the data with it before the model loads."""

    folder = resolve_source(cfg.model, log)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return folder, tokenizer


def load_model(
    cfg: TrainConfig,
    device: torch.device | None = None,
    log=print,
    env=None,
    tokenizer=None,
    folder: Path | None = None,
) -> LoadedModel:
    """Base model + tokenizer + trainable part, as ``cfg`` says, on ``device``
    (``tokenizer`` and ``folder``: what :func:`load_tokenizer` returned, if it was called).

    In a distributed run (``env`` with several ranks) only rank 0 reads the 4-bit model,
    into host memory; the other ranks build it on the meta device
    (:func:`trilora.distributed.load_pretrained`) and receive rank 0's tensors, LoRA
    initialization included, when :func:`trilora.train.collectives.wrap` wraps it. A 16-bit
    base (``--quant none``) is read by every rank. The memory options
    (:func:`apply_memory_options`) come after wrapping.
    """

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    distributed = env is not None and env.distributed
    # rank 0 keeps the whole model in host memory until the wrapper hands out the shards
    load_device = torch.device("cpu") if distributed else device
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"):
        compute_dtype = torch.bfloat16
    else:
        compute_dtype = torch.float32
    if tokenizer is None or folder is None:
        folder, tokenizer = load_tokenizer(cfg, log)
    attn = _attn_implementation(cfg, device)
    prequantized = _is_prequantized(folder)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*checkpoint tensors not used.*")
        if cfg.quant == "none":
            if prequantized:
                raise UsageError(
                    f"--quant none: {cfg.model} holds 4-bit weights; use --quant "
                    "nf4 (its bytes are kept) or a full-precision checkpoint"
                )
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=compute_dtype, attn_implementation=attn
            ).to(load_device)
        else:
            model = td.load_pretrained(
                folder,
                env=env,
                quant_type=cfg.quant,
                compute_dtype=compute_dtype,
                dtype=compute_dtype,
                device=load_device,
                attn_implementation=attn,
            )
    model.config.use_cache = False
    if experts_modules(model) and hasattr(model.config, "output_router_logits"):
        # The router's load-balancing loss joins the training loss, as transformers adds it
        # (router_aux_loss_coef * aux_loss) when the model returns router logits.
        model.config.output_router_logits = True
    has_adapter = True
    if cfg.finetune == "full":
        model.requires_grad_(True)
        has_adapter = False
        patches.apply(
            model, patches.PatchOptions(fused_cross_entropy=cfg.fused_loss, fused_rms_norm=True)
        )
    else:
        model = _attach_adapter(model, cfg, compute_dtype, log)
    everything, trainable = count_parameters(model)
    base = everything - trainable if has_adapter else everything
    return LoadedModel(
        model, tokenizer, folder, device, compute_dtype, has_adapter, trainable, base
    )


def apply_memory_options(model: nn.Module, cfg: TrainConfig) -> None:
    """Checkpointing (with offload and MLP chunks) and grouped attention, as ``cfg`` says;
    on the module inside a DDP wrapper, after FSDP2 has wrapped the layers."""
    options = patches.PatchOptions(
        checkpointing=cfg.gradient_checkpointing,
        offload=cfg.offload,
        mlp_chunks=cfg.mlp_chunks,
        grouped_attention=cfg.grouped_attention,
    )
    patches.apply(td.unwrap(model), options)


def _attach_adapter(
    model: nn.Module, cfg: TrainConfig, compute_dtype: torch.dtype, log=print
) -> nn.Module:
    quantized = cfg.quant != "none"
    if cfg.finetune == "lora":
        dropout = cfg.lora_dropout
        if dropout and experts_modules(model):
            # PEFT's LoRA on experts tensors (target_parameters) has no dropout and refuses a
            # config that sets one; an adapter that vanilla PEFT can load keeps it at 0.
            log(
                f"lora_dropout {dropout} -> 0: LoRA on mixture-of-experts models has no "
                "dropout (PEFT's target_parameters)"
            )
            dropout = 0.0
        targets: Any = cfg.lora_targets
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        pcfg = peft.LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=dropout,
            target_modules=targets,
            use_rslora=cfg.rslora,
            bias="none",
            task_type="CAUSAL_LM",
        )
    else:
        pcfg = _load_peft_config(cfg.peft_config)
        kind = str(getattr(pcfg.peft_type, "value", pcfg.peft_type))
        if cfg.packing and kind in _PROMPT_LEARNING:
            raise UsageError(
                f"--packing: {kind} adds virtual tokens and ignores position ids, "
                "so packed examples would see each other; drop --packing"
            )
    is_lora = isinstance(pcfg, peft.LoraConfig)
    try:
        with warnings.catch_warnings():
            # PEFT reads transformers' deprecated `is_gradient_checkpointing` (upstream, not
            # the user's doing): one line of noise at the top of every run otherwise.
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
            )
            if is_lora and quantized:
                # installs the fused loss and RMSNorm itself (trilora.peft.patch)
                pm = get_peft_model(
                    model, pcfg, compute_dtype=compute_dtype, fused_cross_entropy=cfg.fused_loss
                )
            else:
                # Other PEFT methods run over the 4-bit base unaccelerated (PEFT's own
                # layers call Linear4bit.forward); LoRA on a 16-bit base is plain PEFT LoRA.
                pm = peft.get_peft_model(model, pcfg)
                options = patches.PatchOptions(
                    fused_cross_entropy=cfg.fused_loss, fused_rms_norm=True
                )
                patches.apply(pm, options)
    except ValueError as exc:  # trilora.peft.UnsupportedLoraSetting, PEFT target errors
        raise UsageError(f"adapter setup failed: {exc}") from None
    for p in pm.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 adapters, as in QLoRA
    return pm


@contextmanager
def base_model_mode(model: nn.Module, has_adapter: bool):
    """Run ``model`` as the base: adapters disabled (no second copy of the model)."""

    inner = unwrap(model)
    if has_adapter and hasattr(inner, "disable_adapter"):
        with inner.disable_adapter():
            yield
    else:
        yield
