"""Load any transformers causal LM with its linear layers in trilora's 4-bit format, and
save such a model as a checkpoint that transformers + bitsandbytes load as-is.

Loading never materializes the full-precision model: the model is built from its config
with parameters on the meta device (buffers such as rotary tables are real), every
``nn.Linear`` that is to be quantized becomes a :class:`trilora.nn.Linear4bit` shell, and
the safetensors shards are then read one tensor at a time (plain file reads, no mmap, so
untouched parts of a shard never count toward resident memory). A linear weight is
quantized as soon as it is read and the full-precision copy is dropped, so the peak host
memory is the final 4-bit footprint plus about one layer's weight and its quantization
temporaries.

A checkpoint that bitsandbytes already quantized (``quantization_config.quant_method ==
"bitsandbytes"``, 4-bit) loads its packed bytes directly, bit-identical to what was saved.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from trilora.formats import QuantConfig, QuantConfigError, format_for_state_dict, get_format
from trilora.io import UserError, atomic_directory, check_output
from trilora.moe import QuantizedExperts, experts_modules, experts_tensors, use_trilora_experts
from trilora.moe.checkpoint import checkpoint_conversions
from trilora.nn import QuantizedLinear

__all__ = ["CheckpointError", "SafetensorsFile", "from_pretrained", "save_quantized"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_QUANT_STATE = ".quant_state.bitsandbytes__"
_BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# The largest header we accept; real headers are kilobytes to a few MB.
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(UserError):
    """A checkpoint on disk is missing, corrupt, or inconsistent with the model.

    A :class:`trilora.io.UserError` (so also a ``ValueError``): the CLI prints it as one line.
    """


# ---------------------------------------------------------------------------------------
# safetensors reading without mmap
# ---------------------------------------------------------------------------------------


class SafetensorsFile:
    """One ``.safetensors`` file, header parsed and validated up front; tensors are read one
    at a time with ordinary file reads.

    Raises:
        CheckpointError: the file is missing, truncated, or its header is not valid.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"safetensors file {self.path} does not exist")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{self.path} is not a safetensors file: {size} bytes, no header"
                )
            n = int.from_bytes(head, "little")
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{self.path} is corrupt: header claims {n} bytes but the file has {size - 8} after the length"
                )
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(
                    f"{self.path} is corrupt: header is not valid JSON ({exc})"
                ) from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} is corrupt: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for key, entry in header.items():
            try:
                dtype = _ST_DTYPES[entry["dtype"]]
                shape = [int(s) for s in entry["shape"]]
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(
                    f"{self.path} is corrupt: bad header entry for {key!r}: {entry!r}"
                ) from exc
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if not 0 <= begin <= end <= data_size or end - begin != nbytes:
                raise CheckpointError(
                    f"{self.path} is corrupt or truncated: tensor {key!r} ({entry['dtype']} {shape}) "
                    f"spans bytes [{begin}, {end}) but needs {nbytes} bytes within {data_size}"
                )
            self._entries[key] = (dtype, shape, begin, end)

    def shapes(self) -> dict[str, list[int]]:
        """Tensor name -> shape, from the header alone (no tensor data is read)."""
        return {key: list(entry[1]) for key, entry in self._entries.items()}

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return sorted(self._entries, key=lambda k: self._entries[k][2])

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor:
        """Read tensor ``key`` into a fresh CPU tensor of its stored dtype and shape."""
        dtype, shape, begin, end = self._entries[key]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            with open(self.path, "rb") as f:
                f.seek(self._data_start + begin)
                got = f.readinto(memoryview(raw.numpy()))
            if got != end - begin:
                raise CheckpointError(f"{self.path} is truncated: short read for tensor {key!r}")
        return raw.view(dtype).reshape(shape)


def checkpoint_files(path: str | Path) -> dict[str, SafetensorsFile]:
    """Map every tensor name of the checkpoint in directory ``path`` to its file.

    Reads ``model.safetensors.index.json`` when present (every shard it names must exist
    and hold the tensors it says), otherwise ``model.safetensors``.
    """
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
        shards: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise CheckpointError(
                    f"{index} names shard {shard!r}, which is missing from {path}"
                )
            shards[shard] = SafetensorsFile(path / shard)
        files = {}
        for key, shard in weight_map.items():
            if key not in shards[shard]:
                raise CheckpointError(
                    f"{index} places {key!r} in {shard!r}, but that shard does not hold it"
                )
            files[key] = shards[shard]
        return files
    if (path / SINGLE_NAME).is_file():
        f = SafetensorsFile(path / SINGLE_NAME)
        return dict.fromkeys(f.keys(), f)
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise CheckpointError(
        f"expected {SINGLE_NAME} or {INDEX_NAME} in {path}; found {found or 'nothing'} "
        "(only safetensors checkpoints are supported)"
    )


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device while buffers stay real.

    Non-persistent buffers (rotary tables) are computed in ``__init__`` and never stored in
    checkpoints, so they must be real; parameters are replaced by checkpoint tensors.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _matches(name: str, patterns: list[str]) -> bool:
    # Same rule as transformers' should_convert_module, so skip lists mean the same thing
    # in both: a prefix up to a module boundary, a regex with that boundary, or a suffix.
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)


def default_skip_modules(model: nn.Module) -> list[str]:
    """bitsandbytes' default skip list: the output embeddings, tied weights, last module."""
    skip = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    skip |= set(tied.keys()) | set(tied.values())
    params = list(model.named_parameters())
    if params:
        skip.add(params[-1][0])
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        skip |= {name for name, m in model.named_modules() if m is out}
    return sorted({k.removesuffix(".weight") for k in skip})


def quant_config(quantization_config, defaults: QuantConfig) -> QuantConfig:
    """The :class:`QuantConfig` of a ``BitsAndBytesConfig``-like object or dict (options it
    leaves unset from ``defaults``), or ``defaults`` when there is none.

    Raises:
        CheckpointError: a config trilora cannot honour (one line naming the setting).
    """
    if quantization_config is None:
        return defaults
    try:
        return QuantConfig.from_bnb(quantization_config, defaults)
    except QuantConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def _resolve(name_or_path: str | Path, hf_kwargs: dict) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{name_or_path} is a file; expected a model folder (config.json + safetensors)"
        )
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise CheckpointError(f"model folder {name_or_path} does not exist")

    try:
        return Path(
            snapshot_download(
                str(name_or_path),
                revision=hf_kwargs.pop("revision", None),
                allow_patterns=["*.json", "*.safetensors"],
            )
        )
    except Exception as exc:  # offline, unknown repo, gated, bad id: all mean "not found"
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(
            f"{name_or_path} is not a local folder, and downloading it from the Hugging Face Hub "
            f"failed ({type(exc).__name__}: {reason})"
        ) from exc


# Size fields every decoder config sets; a missing one silently takes the config class's
# default (hidden_size=4096 for Llama), and the checkpoint then fails to match in some
# unrelated-looking place (an lm_head shape). Named in the error instead.
_SIZE_FIELDS = (
    "hidden_size",
    "vocab_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _unset_size_fields(path: Path, config) -> list[str]:
    """``_SIZE_FIELDS`` that ``path/config.json`` does not set (aliases such as GPT-2's
    ``n_embd`` count; so does a nested ``text_config``)."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(raw, dict):
        return []
    nested = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    aliases = getattr(config, "attribute_map", None) or {}
    unset = []
    for name in _SIZE_FIELDS:
        names = {name, aliases.get(name, name)}
        if not any(n in raw or n in nested for n in names):
            unset.append(name)
    return unset


def _explain_mismatch(path: Path, config, exc: Exception) -> CheckpointError:
    """``exc`` (the model built from the config does not fit the checkpoint), with the
    config fields that were left to defaults named first."""
    unset = _unset_size_fields(path, config)
    if not unset:
        return exc if isinstance(exc, CheckpointError) else CheckpointError(str(exc))
    defaults = ", ".join(f"{n}={getattr(config, n, '?')}" for n in unset)
    return CheckpointError(
        f"{path / 'config.json'} does not set {', '.join(unset)}, so the model was built with "
        f"the defaults ({defaults}) and does not match the checkpoint: {exc}"
    )


def from_pretrained(
    name_or_path: str | Path,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str | None = None,
    skip_modules: list[str] | None = None,
    **hf_kwargs,
) -> nn.Module:
    """Load a transformers causal LM with its linear layers quantized (:class:`trilora.nn.Linear4bit`
    for NF4/FP4, :class:`trilora.nn.Linear8bit` for int8).

    Works for any architecture ``AutoModelForCausalLM.from_config`` builds whose checkpoint
    keys match its ``state_dict`` (no per-model code). Every ``nn.Linear`` except those in
    bitsandbytes' default skip list (output head, tied weights) and ``skip_modules`` is
    quantized while the shards stream in; a bitsandbytes 4- or 8-bit checkpoint keeps its bytes.

    Args:
        name_or_path: a local directory, or a Hub id (downloaded with ``huggingface_hub``).
        quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"`` (bitsandbytes LLM.int8 weights;
            ignored for pre-quantized checkpoints, whose config decides).
        blocksize: absmax block size, one of 32..4096 (powers of two).
        double_quant: 8-bit quantize the absmax values (bitsandbytes ``compress_statistics``).
        compute_dtype: dtype the 4-bit layers compute in (None: the input's dtype).
        device: where the model lives (default: CUDA if available, else CPU).
        skip_modules: more linear layers to keep in full precision (names, prefixes or
            regexes, as in ``BitsAndBytesConfig.llm_int8_skip_modules``).
        **hf_kwargs: ``dtype`` / ``torch_dtype`` (dtype of the unquantized parameters and of
            the weights before quantization; default ``compute_dtype`` or bf16),
            ``quantization_config`` (a 4-bit ``BitsAndBytesConfig`` or dict overriding the
            options above), ``revision``, ``trust_remote_code``, ``attn_implementation``.

    Returns:
        The model in eval mode, all tensors on ``device``.

    Raises:
        CheckpointError: missing/corrupt safetensors files, an index naming a missing shard,
            or checkpoint keys that do not match the model.
        ValueError: a quantization config trilora cannot honour (other methods, 8-bit
            with fp16 weights, unsupported blocksize or quant type).
    """

    hf_kwargs = dict(hf_kwargs)
    path = _resolve(name_or_path, hf_kwargs)
    trust = hf_kwargs.pop("trust_remote_code", False)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json (expected a transformers model folder)")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"{path / 'config.json'} is not a usable model config: {reason}"
        ) from exc
    dtype = hf_kwargs.pop("dtype", None) or hf_kwargs.pop("torch_dtype", None)
    user_qc = hf_kwargs.pop("quantization_config", None)
    saved_qc = getattr(config, "quantization_config", None)
    pre_quantized = saved_qc is not None
    qconfig = quant_config(
        user_qc if user_qc is not None else saved_qc,
        QuantConfig(quant_type, blocksize, double_quant, compute_dtype),
    )
    if dtype is None or dtype == "auto":
        dtype = qconfig.compute_dtype or torch.bfloat16
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    files = checkpoint_files(path)
    if pre_quantized:
        # from_config would not quantize, but a leftover config would make transformers
        # treat the model as bitsandbytes-quantized; save_quantized writes a fresh one.
        del config.quantization_config

    try:
        return _build_and_load(
            path,
            config,
            files,
            dtype,
            trust,
            hf_kwargs,
            pre_quantized,
            skip_modules,
            device,
            qconfig,
        )
    except CheckpointError as exc:
        raise _explain_mismatch(path, config, exc) from exc


def _build_and_load(
    path, config, files, dtype, trust, hf_kwargs, pre_quantized, skip_modules, device, qconfig
):
    try:
        with params_on_meta():
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, trust_remote_code=trust, **hf_kwargs
            )
    except (ValueError, TypeError) as exc:
        if not _unset_size_fields(path, config):
            raise
        raise CheckpointError(f"the model cannot be built from its config ({exc})") from exc

    # Checkpoints saved from the bare base model lack the "model." prefix.
    expected = set(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "")
    rename = {}
    for key in files:
        if key not in expected and prefix and not key.startswith(prefix + "."):
            rename[key] = f"{prefix}.{key}"

    # Keys transformers renames or converts on load (MoE experts saved per expert).
    renamed, groups = checkpoint_conversions(model, [k for k in files if k not in rename], expected)
    rename.update(renamed)

    def model_key(k: str) -> str:
        return rename.get(k, k)

    # MoE experts (3-D parameters of transformers' experts modules) are quantized expert by
    # expert, or read back per expert where the checkpoint holds them quantized.
    skip = default_skip_modules(model) + list(skip_modules or [])
    experts: dict[str, QuantizedExperts] = {}
    for mname, module in experts_modules(model):
        for pname, p in list(experts_tensors(module)):
            full = f"{mname}.{pname}"
            if _matches(full, skip) or _matches(mname, list(skip_modules or [])):
                continue
            shell = QuantizedExperts.shell(*p.shape, qconfig, weight_dtype=dtype, device="meta")
            delattr(module, pname)
            setattr(module, pname, shell)
            experts[full] = shell

    if pre_quantized:
        # A layer is pre-quantized when its format's keys are there: the 4-bit quant_state
        # beside "weight", or the 8-bit "SCB".
        owners = {model_key(k).split(_QUANT_STATE)[0].removesuffix(".weight") for k in files}
        owners |= {model_key(k).removesuffix(".SCB") for k in files if k.endswith(".SCB")}
        # Quantized experts sit under "<experts param>.<e>"; they are not linear layers.
        owners = {o for o in owners if o.rpartition(".")[0] not in experts}
        keys = [model_key(k) for k in files]
        quantized = sorted(
            name
            for name in owners
            if format_for_state_dict(
                [k for k in keys if k.startswith(name + ".")], name + ".weight"
            )
            is not None
        )
    else:
        quantized = [
            name
            for name, m in model.named_modules()
            if type(m) is nn.Linear and not _matches(name, skip)
        ]
    for name in quantized:
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise CheckpointError(
                f"checkpoint has 4-bit weights for {name!r}, which is a {type(old).__name__}"
            )
        shell = QuantizedLinear.shell(
            old.in_features,
            old.out_features,
            old.bias is not None,
            qconfig,
            weight_dtype=dtype,
            device="meta",
        )
        if old.bias is not None:
            shell.bias = nn.Parameter(old.bias, requires_grad=False)
        model.set_submodule(name, shell)

    _stream_into(
        model,
        files,
        model_key,
        set(quantized),
        device,
        dtype,
        qconfig,
        experts,
        groups,
    )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [
        n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"
    ]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks tensors the model needs: {missing[:20]}")
    model.to(device)
    model.eval()
    if experts_modules(model):
        use_trilora_experts(model)
    model.trilora_quantized_modules = list(quantized)
    model.trilora_quantized_experts = list(experts)
    return model


def _experts_owner(name: str, experts) -> str | None:
    if name in experts:
        return name
    head, _, _ = name.partition(".weight")
    owner = head.rpartition(".")[0]
    return owner if owner in experts and head[len(owner) + 1 :].isdigit() else None


def _install_experts(name, shell, parts, fmt, qconfig, dtype, where) -> None:
    """Quantize a float ``[E, rows, cols]`` tensor, or read per-expert quantized state, into
    the experts shell ``name``."""
    if "" in parts:
        w = parts.pop("")
        if not w.is_floating_point() or tuple(w.shape) != tuple(shell.shape):
            raise CheckpointError(
                f"{name} in {where} is {w.dtype} {tuple(w.shape)}; float experts "
                f"{tuple(shell.shape)} were expected"
            )
        loaded = QuantizedExperts.quantize(w.to(dtype), qconfig)
    else:
        try:
            per_expert = []
            for e in range(shell.num_experts):
                head = f"{e}.weight"
                own = {k: v for k, v in parts.items() if k.startswith(f"{e}.")}
                expert_fmt = format_for_state_dict(own, head) or fmt
                per_expert.append(expert_fmt.from_state_dict(own, head))
            loaded = QuantizedExperts(per_expert)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"quantized experts {name!r} in {where}: {exc}") from exc
    if loaded.shape != shell.shape:
        raise CheckpointError(
            f"{name} in {where} holds experts {tuple(loaded.shape)}, the model expects "
            f"{tuple(shell.shape)}"
        )
    shell._set_experts(list(loaded.experts()))


def _stream_into(
    model, files, model_key, quantized, device, dtype, qconfig, experts=None, groups=None
) -> None:
    fmt = get_format(qconfig)
    experts = experts or {}
    groups = groups or {}
    group_of = {k: g for g in groups.values() for k in g.keys}
    group_tensors: dict[str, dict[str, torch.Tensor]] = {}
    # The checkpoint tensors of each experts tensor: the fused float tensor ("") or the
    # quantized state of every expert ("<e>.weight...").
    experts_expected: dict[str, set[str]] = {}
    for key in files:
        name = group_of[key].target if key in group_of else model_key(key)
        owner = _experts_owner(name, experts)
        if owner is not None:
            experts_expected.setdefault(owner, set()).add(name[len(owner) + 1 :])
    experts_pending: dict[str, dict[str, torch.Tensor]] = {}

    def take_experts(name: str, tensor: torch.Tensor, where) -> bool:
        owner = _experts_owner(name, experts)
        if owner is None:
            return False
        parts = experts_pending.setdefault(owner, {})
        parts[name[len(owner) + 1 :]] = tensor
        if set(parts) == experts_expected[owner]:
            del experts_pending[owner]
            _install_experts(owner, experts[owner], parts, fmt, qconfig, dtype, where)
        return True

    # The checkpoint tensors of each quantized layer's weight: just "weight" (full
    # precision, quantized on arrival) or the bitsandbytes set (assembled, then installed).
    expected: dict[str, set[str]] = {}
    for key in files:
        name = model_key(key)
        owner = _owner_of_weight(name, quantized)
        if owner is not None:
            expected.setdefault(owner, set()).add(name[len(owner) + 1 :])
    absent = sorted(set(quantized) - set(expected))
    if absent:
        raise CheckpointError(f"checkpoint has no weight for the linear layers {absent[:20]}")
    pending: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    by_file: dict[Path, list[str]] = {}
    for key, f in files.items():
        by_file.setdefault(f.path, []).append(key)
    for keys in by_file.values():
        f = files[keys[0]]
        for key in sorted(keys, key=lambda k: f._entries[k][2]):
            if key in group_of:
                group = group_of[key]
                got = group_tensors.setdefault(group.target, {})
                got[key] = f.get(key).to(device)
                if len(got) < len(group.keys):
                    continue
                del group_tensors[group.target]
                try:
                    tensor = group.convert(model, got)
                except (ValueError, RuntimeError) as exc:
                    raise CheckpointError(
                        f"converting the checkpoint tensors of {group.target} failed: {exc}"
                    ) from exc
                if not take_experts(group.target, tensor, f.path):
                    _assign(model, group.target, tensor, device, f.path, unexpected)
                continue
            name = model_key(key)
            if take_experts(name, f.get(key).to(device), f.path):
                continue
            owner = _owner_of_weight(name, quantized)
            if owner is not None:
                parts = pending.setdefault(owner, {})
                parts[name[len(owner) + 1 :]] = f.get(key).to(device)
                if set(parts) != expected[owner]:
                    continue
                del pending[owner]
                layer = model.get_submodule(owner)
                if expected[owner] == {"weight"}:
                    w = parts.pop("weight")
                    if not w.is_floating_point() or w.dim() != 2:
                        raise CheckpointError(
                            f"{key} in {f.path} is {w.dtype} {tuple(w.shape)}; a full-precision 2-D "
                            "weight or bitsandbytes 4-bit state was expected"
                        )
                    w = w.to(dtype)
                    qw = fmt.quantize(w, qconfig)
                    del w
                else:
                    try:
                        qw = fmt.from_state_dict(parts, "weight")
                    except (KeyError, ValueError) as exc:
                        raise CheckpointError(
                            f"{qconfig.bits}-bit weight of {owner!r} in {f.path}: {exc}"
                        ) from exc
                _install(owner, layer, qw)
                continue
            _assign(model, name, f.get(key), device, f.path, unexpected, key)
    if experts_pending:
        raise CheckpointError(
            f"checkpoint has incomplete experts state for {sorted(experts_pending)[:5]}"
        )
    if unexpected:
        warnings.warn(f"checkpoint tensors not used by the model: {unexpected[:20]}", stacklevel=3)


def _assign(model, name, t, device, where, unexpected, key=None) -> None:
    """Load a plain checkpoint tensor into the parameter or buffer ``name`` of ``model``."""
    key = key or name
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        unexpected.append(key)
        return
    params = dict(module.named_parameters(prefix="", recurse=False))
    buffers = dict(module.named_buffers(prefix="", recurse=False))
    if params.get(leaf) is not None:
        old = params[leaf]
        if tuple(t.shape) != tuple(old.shape):
            raise CheckpointError(
                f"{key} in {where} has shape {tuple(t.shape)}, the model expects {tuple(old.shape)}"
            )
        t = t.to(device=device, dtype=old.dtype if old.is_floating_point() else t.dtype)
        module.register_parameter(leaf, nn.Parameter(t, requires_grad=old.requires_grad))
    elif buffers.get(leaf) is not None:
        # setattr on a registered buffer replaces it and keeps its persistence
        setattr(module, leaf, t.to(device=device, dtype=buffers[leaf].dtype))
    else:
        unexpected.append(key)


def _owner_of_weight(name: str, quantized: set[str]) -> str | None:
    # bitsandbytes 8-bit keeps its extras beside the weight: "<layer>.SCB", "<layer>.weight_format".
    for extra in (".SCB", ".weight_format"):
        if name.endswith(extra) and name.removesuffix(extra) in quantized:
            return name.removesuffix(extra)
    head, sep, _ = name.partition(".weight")
    if (
        sep
        and head in quantized
        and (name == head + ".weight" or name.startswith(head + ".weight."))
    ):
        return head
    return None


def _install(name: str, shell: QuantizedLinear, qw) -> None:
    if tuple(qw.shape) != (shell.out_features, shell.in_features):
        raise CheckpointError(
            f"weight of {name!r} has shape {tuple(qw.shape)}, the model expects "
            f"({shell.out_features}, {shell.in_features})"
        )
    shell.set_quantized_weight(qw)


# ---------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += n
    if current or not shards:
        shards.append(current)
    return shards


def write_safetensors(
    state: dict[str, torch.Tensor],
    directory: Path,
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``state`` as ``model.safetensors`` or numbered shards plus an index."""
    from safetensors.torch import save_file

    shards = _shards(state, max_shard_bytes)
    names = (
        [SINGLE_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    total = 0
    for name, shard in zip(names, shards):
        out = {}
        for key, t in shard.items():
            if t.device.type == "meta":
                raise ValueError(
                    f"tensor {key!r} is on the meta device (never loaded); cannot save it"
                )
            out[key] = t.detach().to("cpu").contiguous()
            total += t.numel() * t.element_size()
            weight_map[key] = name
        save_file(out, str(directory / name), metadata={"format": "pt", **(metadata or {})})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def _dedup_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; transformers drops the tied copies (the keys of
    # all_tied_weights_keys) and re-ties them on load.
    tied = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    out, seen = {}, {}
    for key, t in state.items():
        ptr = (t.device, t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else None
        if ptr is not None and ptr in seen and t.device.type != "meta":
            if key in tied:
                continue
            if seen[ptr] in tied:
                out.pop(seen[ptr])
            else:
                t = t.clone()
        out[key] = t
        if ptr is not None:
            seen[ptr] = key
    return out


def bnb_quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` dict transformers + bitsandbytes need for ``model``.

    Every plain ``nn.Linear`` is listed in ``llm_int8_skip_modules``: transformers drops its
    default skip list when that option is given, so the list must be complete.

    Raises:
        ValueError: the layers disagree on quantization settings, or none is 4-bit.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        raise ValueError("model has no trilora quantized layers; nothing to save as quantized")
    settings = {(m.quant_config.replace(blocksize=64), m.weight.dtype) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(
            f"bitsandbytes configs hold one quant_type/double_quant/compute_dtype/storage for all layers; "
            f"this model mixes {sorted(map(str, settings))}"
        )
    qconfig, _ = settings.pop()
    skip = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
    return qconfig.to_bnb(skip_modules=skip)


def save_quantized(
    model: nn.Module,
    path: str | Path,
    max_shard_size: int = 5 * 1024**3,
    *,
    overwrite: bool = False,
    add_files=None,
) -> Path:
    """Write ``model`` (with :class:`trilora.nn.Linear4bit` layers) as a bitsandbytes 4-bit
    checkpoint: safetensors with bitsandbytes keys plus ``config.json`` carrying the
    matching ``quantization_config``.

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` with bitsandbytes installed
    loads it as-is, and so does :func:`from_pretrained`. The write is atomic: everything is
    written to a temporary sibling directory that is renamed to ``path`` at the end; on any
    failure nothing is left at ``path`` (an existing directory there stays untouched). Files
    and folders get the umask's permissions.

    Args:
        model: a transformers model (``model.config``) whose linears are trilora 4-bit.
        path: output directory; it must not exist or be empty unless ``overwrite``.
        max_shard_size: bytes per safetensors shard before an index is written.
        overwrite: replace an existing non-empty ``path`` (after the new one is complete).
            Never allowed for the current directory or one of its parents, or for the folder
            the model was loaded from (``model.config.name_or_path``).
        add_files: called with the temporary folder before it becomes ``path``, to write
            more files into it (``trilora merge`` adds the tokenizer).

    Returns:
        ``path``.

    Raises:
        trilora.io.UsageError: ``path`` is occupied and ``overwrite`` is false, or it is a
            folder that must never be replaced.
    """
    source = getattr(getattr(model, "config", None), "name_or_path", None)
    check_output(
        path,
        overwrite=overwrite,
        kind="dir",
        flag="path",
        inputs=[source] if source and Path(source).exists() else [],
        overwrite_hint="pass overwrite=True to replace it",
    )
    qc = bnb_quantization_config(model)
    state = _dedup_tied(model, model.state_dict())
    config = model.config.to_dict()
    config["quantization_config"] = qc
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        config["dtype"] = str(dtype).removeprefix("torch.")
    path = Path(path)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_safetensors(state, tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if add_files is not None:
            add_files(tmp)
    return path
