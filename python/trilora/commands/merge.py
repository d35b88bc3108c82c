"""``trilora merge ADAPTER_DIR --base BASE --out DIR``: merge a LoRA adapter into its base
and write a standard checkpoint (:func:`trilora.merging.merge`).

No torch at module level, so ``trilora merge --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

_CLI_DTYPES = ("bf16", "fp16", "fp32")
# == trilora.quant.BLOCKSIZES (tests/test_cli.py checks), spelled out so --help imports no torch
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def add_parser(subparsers) -> None:
    """Register ``trilora merge ADAPTER_DIR --base BASE --out DIR``."""
    p = subparsers.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model and write a standard checkpoint",
        description="Dequantize the 4-bit base, add the LoRA delta in fp32 and write safetensors "
        "that plain transformers loads. The output folder is written next to its final place "
        "and renamed at the end, so it is never half-written; an existing non-empty --out is "
        "refused unless --overwrite is given, and never replaced if it is the current folder, "
        "one of its parents, or holds the adapter or the base. The base's tokenizer (or, if it "
        "has none, the adapter folder's) is saved with it, so the folder loads and generates "
        "alone. --requantize writes a "
        "bitsandbytes 4-bit checkpoint instead (adds quantization error, see docs/peft.md).",
    )
    p.add_argument("adapter_dir", help="folder written by PeftModel.save_pretrained")
    p.add_argument(
        "--base",
        required=True,
        help="base model folder or Hub id (full precision or bitsandbytes 4-bit)",
    )
    p.add_argument("--out", required=True, help="output folder (created; see --overwrite)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing non-empty --out (only once the merge has succeeded)",
    )
    p.add_argument("--dtype", choices=_CLI_DTYPES, default="bf16", help="merged weight dtype")
    p.add_argument(
        "--requantize", action="store_true", help="write a re-quantized 4-bit checkpoint"
    )
    p.add_argument(
        "--quant-type",
        choices=["nf4", "fp4", "int8"],
        default="nf4",
        help="how the base was quantized during training (full-precision bases only)",
    )
    p.add_argument(
        "--blocksize",
        type=int,
        choices=_BLOCKSIZES,
        default=64,
        metavar="N",
        help="quantization block size of a full-precision base: 32, 64, ... 4096",
    )
    p.add_argument(
        "--no-double-quant",
        action="store_true",
        help="the base was quantized without double quantization (8-bit absmax)",
    )


def _local_path(name: str) -> Path | None:
    path = Path(name)
    return path if path.exists() else None


def _read_adapter_config(adapter: Path):
    """The adapter's LoraConfig, or a UserError naming what is wrong with the folder."""
    import json

    from trilora.io import UserError

    if not adapter.is_dir():
        raise UserError(
            f"adapter folder {adapter} does not exist (expected a folder written by "
            "PeftModel.save_pretrained)"
        )
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{adapter} has no adapter_config.json (expected a PEFT adapter folder)")
    try:
        json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_file} is not valid JSON ({exc})") from exc
    from peft import PeftConfig

    from trilora.peft import check_lora_config

    try:
        config = PeftConfig.from_pretrained(str(adapter))
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"{config_file} is not a PEFT adapter config ({exc})") from exc
    check_lora_config(config)
    return config


def _check_adapter_fits(base: nn.Module, base_name: str, adapter: Path, made_for) -> None:
    """Raise a UserError when the adapter's LoRA shapes or layers do not match ``base``.

    Reads only the adapter file's header. PEFT would otherwise fail with one size-mismatch
    line per layer, without saying which base the adapter was trained on.
    """
    from trilora.io import UserError
    from trilora.loading import SafetensorsFile

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a .bin adapter: PEFT's own loading reports problems
    shapes = SafetensorsFile(weights).shapes()
    problems: list[str] = []
    layers = 0
    for key, shape in shapes.items():
        for part, axis, attr in (("lora_A", 1, "in_features"), ("lora_B", 0, "out_features")):
            suffix = f".{part}.weight"
            if not key.endswith(suffix):
                continue
            layers += part == "lora_A"
            name = key.removesuffix(suffix).removeprefix("base_model.model.")
            try:
                module = base.get_submodule(name)
            except AttributeError:
                problems.append(f"it has LoRA weights for {name}, a layer this base does not have")
                continue
            want = getattr(module, attr, None)
            if len(shape) == 2 and want is not None and shape[axis] != want:
                what = "inputs" if part == "lora_A" else "outputs"
                problems.append(f"its {name} has {shape[axis]} {what} where this base's has {want}")
    if problems:
        made = (
            f"{made_for!r}" if made_for else "another base model (adapter_config.json names none)"
        )
        raise UserError(
            f"adapter {adapter} was made for base model {made}, not for {base_name}: "
            f"{problems[0]} ({len(problems)} mismatches over {layers} LoRA layers)"
        )


def run(args: argparse.Namespace) -> int:
    """Run ``trilora merge``; returns the exit status."""
    import warnings

    from trilora.io import check_output

    adapter = Path(args.adapter_dir)
    # Refuse a bad --out before minutes of loading: never the cwd, a parent, or a folder
    # holding the adapter or the base.
    out = check_output(
        args.out, overwrite=args.overwrite, inputs=[adapter, _local_path(args.base)], kind="dir"
    )
    config = _read_adapter_config(adapter)  # a missing folder fails before the imports below
    from transformers.utils import logging as hf_logging

    from trilora.merging import torch_dtype
    from trilora.peft import UnsupportedLoraSetting, rewrites_base_weights

    init = getattr(config, "init_lora_weights", True)
    if rewrites_base_weights(init):
        raise UnsupportedLoraSetting(
            f"adapter {adapter} was trained with init_lora_weights={init!r}, which rewrote the "
            "base weights; merge it after converting it to a plain LoRA adapter (PEFT: "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    dtype = torch_dtype(args.dtype)
    # Library chatter (deprecations inside transformers/PEFT, shard progress bars) would bury
    # the one line this command prints.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            tokenizer_from = _merge_and_write(args, adapter, out, config, dtype)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    print(f"merged {adapter} into {args.base} -> {args.out}")
    if tokenizer_from is None:
        print(
            f"note: neither {args.base} nor {adapter} holds a tokenizer, so {args.out} has "
            "none; copy one into it to load it with AutoTokenizer",
            file=sys.stderr,
        )
    return 0


def _merge_and_write(args, adapter: Path, out: Path, config, dtype) -> str | None:
    """Merge and write ``out`` (model, generation config and tokenizer, in one atomic
    folder); return where the tokenizer came from (None: nowhere)."""
    import torch

    from trilora.io import UserError, atomic_directory
    from trilora.loading import from_pretrained, save_quantized
    from trilora.merging import merge, save_tokenizer
    from trilora.peft import load_adapter

    base = from_pretrained(
        args.base,
        quant_type=args.quant_type,
        blocksize=args.blocksize,
        double_quant=not args.no_double_quant,
        compute_dtype=torch.float32,
        device="cpu",
        dtype=dtype,
    )
    made_for = getattr(config, "base_model_name_or_path", None)
    _check_adapter_fits(base, args.base, adapter, made_for)
    try:
        peft_model = load_adapter(base, adapter)
    except (RuntimeError, ValueError, KeyError) as exc:
        if isinstance(exc, UserError):
            raise
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"PEFT could not load adapter {adapter} (made for {made_for!r}) onto {args.base}: {first}"
        ) from exc
    model = merge(peft_model, dtype=dtype, requantize=args.requantize)
    tokenizer_from: list[str | None] = [None]

    def add_tokenizer(folder: Path) -> None:
        tokenizer_from[0] = save_tokenizer([args.base, adapter], folder)

    if args.requantize:
        save_quantized(model, out, overwrite=args.overwrite, add_files=add_tokenizer)
    else:
        with atomic_directory(out, overwrite=args.overwrite) as tmp:
            model.save_pretrained(tmp)
            add_tokenizer(tmp)
    return tokenizer_from[0]
