"""The run configuration: one dataclass, read from YAML and/or flags (flags win).

Every field of :class:`TrainConfig` is a ``trilora train`` flag (``lora_r`` -> ``--lora-r``;
booleans get ``--x`` / ``--no-x``) and a YAML key; the help text and default live in the
field's metadata, so ``--help``, ``--print-config`` and docs/train.md come from one place.

Built on dataclasses + argparse + PyYAML rather than a CLI framework: the whole module
imports in a few milliseconds (``trilora train --help`` must answer in well under 0.5 s),
and no torch is imported here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from trilora.io import UsageError, UserError
from trilora.optim import OPTIMIZERS as _OPTIMIZER_FAMILY  # names only: no torch
from trilora.train.methods.settings import METHODS, check_settings

OPTIMIZER_CHOICES = (*_OPTIMIZER_FAMILY, "torch_adamw")


def cache_dir() -> Path:
    """trilora's cache (``$TRILORA_CACHE``, default ``~/.cache/trilora``): the demo's model
    file and the Hugging Face folders converted from GGUF files."""
    return Path(os.environ.get("TRILORA_CACHE") or Path.home() / ".cache" / "trilora")


__all__ = [
    "RESUME_MAY_CHANGE",
    "TrainConfig",
    "add_config_arguments",
    "config_from_sources",
    "dump_yaml",
    "load_yaml",
]


def _f(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    group: str = "",
    metavar: str | None = None,
) -> Any:
    meta = {"help": help, "choices": choices, "group": group, "metavar": metavar}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` means "not set" where the help says so."""

    # --- model -------------------------------------------------------------------------
    model: str | None = _f(
        None,
        "base model: a local Hugging Face folder (full precision or "
        "bitsandbytes 4-bit) or a .gguf file",
        group="model",
        metavar="PATH",
    )
    quant: str = _f(
        "nf4",
        "base weights: nf4 / fp4 (4-bit), int8 (bitsandbytes 8-bit, weight-only compute) "
        "or none (16-bit base)",
        choices=("nf4", "fp4", "int8", "none"),
        group="model",
    )
    finetune: str = _f(
        "lora",
        "what trains: lora (adapters), peft (the PEFT config given by "
        "--peft-config, e.g. (IA)3 or prefix tuning) or full (every weight; "
        "needs --quant none)",
        choices=("lora", "peft", "full"),
        group="model",
    )
    peft_config: str | None = _f(
        None,
        "PEFT config file (JSON or YAML, as PeftConfig.to_dict() "
        "writes it, with peft_type) for --finetune peft",
        group="model",
        metavar="FILE",
    )
    lora_r: int = _f(16, "LoRA rank", group="model")
    lora_alpha: float = _f(
        32.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)", group="model"
    )
    lora_dropout: float = _f(0.05, "dropout on the LoRA input", group="model")
    lora_targets: str = _f(
        "all-linear",
        "LoRA target modules: all-linear, or comma-separated module names (q_proj,v_proj)",
        group="model",
    )
    rslora: bool = _f(False, "rank-stabilized LoRA scale alpha / sqrt(r)", group="model")
    dtype: str = _f(
        "auto",
        "compute dtype: auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp32",
        choices=("auto", "bf16", "fp32"),
        group="model",
    )
    # --- data --------------------------------------------------------------------------
    data: str | None = _f(
        None, "training data, JSONL (shapes: docs/train.md)", group="data", metavar="FILE"
    )
    val_data: str | None = _f(
        None,
        "held-out data, JSONL (default: --val-fraction of --data)",
        group="data",
        metavar="FILE",
    )
    val_fraction: float = _f(
        0.05,
        "fraction of --data held out when --val-data is not given (0 disables evaluation)",
        group="data",
    )
    max_seq_len: int = _f(
        1024, "tokens per example; longer ones are truncated (counted and reported)", group="data"
    )
    packing: bool = _f(
        False,
        "pack short examples into max_seq_len rows (positions and attention stay per example)",
        group="data",
    )
    group_by_length: bool = _f(
        True, "batch examples of similar length together (less padding)", group="data"
    )
    skip_bad_lines: bool = _f(
        False, "skip (and count) malformed JSONL lines instead of failing", group="data"
    )
    # --- loop --------------------------------------------------------------------------
    method: str = _f(
        "sft",
        "sft (instruction tuning), dpo (preference pairs {prompt, chosen, rejected}) or "
        "grpo (prompts, sampled completions scored by --reward functions)",
        choices=METHODS,
        group="loop",
    )
    epochs: float = _f(3.0, "passes over the training data (fractions allowed)", group="loop")
    max_steps: int | None = _f(
        None, "stop after this many optimizer steps (overrides --epochs)", group="loop"
    )
    batch_size: int = _f(
        4, "rows per micro-batch (packed rows with --packing; GRPO: prompts)", group="loop"
    )
    grad_accum: int = _f(
        1,
        "micro-batches per optimizer step; the loss is normalised by the "
        "real token count across them",
        group="loop",
    )
    lr: float = _f(2e-4, "peak learning rate", group="loop")
    weight_decay: float = _f(0.0, "AdamW weight decay", group="loop")
    warmup_ratio: float = _f(0.03, "fraction of the steps spent in linear warmup", group="loop")
    warmup_steps: int | None = _f(None, "warmup steps (overrides --warmup-ratio)", group="loop")
    scheduler: str = _f(
        "cosine", "decay after warmup", choices=("cosine", "linear", "constant"), group="loop"
    )
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0 disables)", group="loop")
    optim: str = _f(
        "adamw",
        "optimizer: trilora's AdamW family (adamw: fused, 32-bit state; "
        "*_8bit: 8-bit state; paged_*: resident until memory is tight; *_host / "
        "*_uvm: state in host / managed memory; *_cpu_offload: state and gradients "
        "on the host, update on the CPU; docs/optimizer.md) or torch_adamw",
        choices=OPTIMIZER_CHOICES,
        group="loop",
    )
    seed: int = _f(42, "seed of every random draw (init, shuffling, dropout)", group="loop")
    gradient_checkpointing: bool = _f(
        False,
        "recompute each decoder layer in backward (trilora.enable_checkpointing)",
        group="loop",
    )
    offload: bool = _f(
        False, "with checkpointing: keep layer inputs in pinned host memory (CUDA)", group="loop"
    )
    mlp_chunks: int | None = _f(
        None, "with checkpointing: run each MLP in this many sequence chunks", group="loop"
    )
    fused_loss: bool = _f(
        True, "fused linear cross-entropy (no [tokens, vocab] logits)", group="loop"
    )
    grouped_attention: bool = _f(
        False, "grouped flash attention (CUDA; less backward workspace)", group="loop"
    )
    eval_every: int = _f(
        0, "evaluate held-out loss every N steps (0: at the end only)", group="loop"
    )
    eval_batch_size: int = _f(8, "rows per evaluation batch", group="loop")
    # --- several processes (--nproc, torchrun, accelerate launch) -----------------------
    fsdp: bool = _f(
        False,
        "with several processes: shard the model with FSDP2 (each holds 1/N "
        "of the 4-bit base, the adapters and the optimizer state) instead of DDP (a "
        "full copy each); a single process ignores it",
        group="distributed",
    )
    cpu_offload: bool = _f(
        False,
        "with --fsdp: FSDP2's CPUOffloadPolicy (sharded parameters, "
        "gradients and optimizer state in host memory)",
        group="distributed",
    )
    # --- DPO ---------------------------------------------------------------------------
    beta: float | None = _f(
        None,
        "DPO: the temperature of the preference loss (IPO's tau), default 0.1; GRPO: the "
        "weight of the KL term to the reference (the model with its adapters disabled), "
        "default 0 (as TRL's)",
        group="dpo",
    )
    loss_type: str | None = _f(
        None,
        "DPO: sigmoid, ipo (length-normalised, squared) or robust (with "
        "--label-smoothing); GRPO: dapo (token mean over the step), grpo (per-completion "
        "mean) or dr_grpo (over completions x --max-completion-length) (TRL's names; "
        "none: sigmoid / dapo)",
        group="dpo",
    )
    rpo_alpha: float | None = _f(
        None,
        "DPO: add this times the NLL of the chosen answers (RPO, TRL's rpo_alpha; keeps "
        "the chosen answer likely)",
        group="dpo",
    )
    label_smoothing: float = _f(
        0.0,
        "DPO robust loss: the probability that a preference is flipped, in [0, 0.5)",
        group="dpo",
    )
    precompute_ref: bool = _f(
        False,
        "compute the reference log-probs once before training "
        "(then the reference costs nothing per step)",
        group="dpo",
    )
    # --- GRPO --------------------------------------------------------------------------
    reward: str | None = _f(
        None,
        "GRPO reward functions, ;-separated: json[:a|b] (parses as JSON, optionally an "
        "object with fields a, b), regex:PATTERN, equals:FIELD / contains:FIELD (the record's "
        "FIELD), length:MIN-MAX (characters), path/to/file.py:function or module:function "
        "(TRL's calling convention; docs/train.md)",
        group="grpo",
        metavar="SPEC",
    )
    reward_weights: str | None = _f(
        None, "GRPO: one weight per reward function, ,-separated (default: 1 each)", group="grpo"
    )
    num_generations: int = _f(
        4,
        "GRPO: completions sampled per prompt (the group); --batch-size counts prompts",
        group="grpo",
    )
    max_completion_length: int = _f(256, "GRPO: tokens per sampled completion", group="grpo")
    temperature: float = _f(1.0, "GRPO: sampling temperature", group="grpo")
    top_p: float = _f(1.0, "GRPO: nucleus sampling probability mass", group="grpo")
    epsilon: float = _f(0.2, "GRPO: the clip range's low side, ratio >= 1 - epsilon", group="grpo")
    epsilon_high: float | None = _f(
        None,
        "GRPO: the clip range's high side, ratio <= 1 + epsilon_high (none: --epsilon)",
        group="grpo",
    )
    scale_rewards: str = _f(
        "group",
        "GRPO: group (divide advantages by the group's reward std) or none (Dr. GRPO)",
        choices=("group", "none"),
        group="grpo",
    )
    mask_truncated_completions: bool = _f(
        False, "GRPO: completions cut at --max-completion-length add no loss", group="grpo"
    )
    num_iterations: int = _f(
        1,
        "GRPO: optimizer steps per generation batch (the importance ratio corrects for the "
        "policy moving)",
        group="grpo",
    )
    generation_batch_size: int = _f(
        32, "GRPO: sequences generated at once (memory of the KV cache)", group="grpo"
    )
    # --- outputs -----------------------------------------------------------------------
    out: str = _f(
        "trilora-run",
        "run folder: config, metrics.jsonl, checkpoints, adapter",
        group="output",
        metavar="DIR",
    )
    save_every: int = _f(
        100, "write a resumable checkpoint every N steps (0: never)", group="output"
    )
    keep_last: int = _f(2, "checkpoints kept (older ones are deleted)", group="output")
    stop_grace: float = _f(
        20.0,
        "on SIGTERM or SIGINT (Ctrl-C): seconds allowed for the step in "
        "progress to end and its checkpoint to start; past them the run "
        "exits without one (0: at once)",
        group="output",
    )
    log_every: int = _f(1, "append a metrics.jsonl line every N steps", group="output")
    tensorboard: bool = _f(
        False, "also write TensorBoard logs (needs the tensorboard package)", group="output"
    )
    compare: int = _f(
        3,
        "held-out prompts answered by the base and the tuned model at the end (0: none)",
        group="output",
    )
    max_new_tokens: int = _f(96, "tokens generated per compared answer", group="output")
    merge: bool = _f(
        False, "also write the merged 16-bit model (trilora.merge) to OUT/merged", group="output"
    )
    progress: bool = _f(True, "live progress bar on stderr", group="output")

    # ------------------------------------------------------------------------------------

    def check_inputs(self) -> None:
        """That ``--model``, ``--data`` and ``--val-data`` exist, before anything heavy is
        imported or loaded: a mistyped path is one line within a second, not after the ~10 s
        that importing transformers and PEFT takes. The loaders check the contents.

        Raises:
            UserError: the path is missing or of the wrong kind, naming the flag.
        """
        problem = model_source_problem(self.model) if self.model is not None else None
        if problem is not None:
            raise UserError(problem)
        for flag, path in (("data", self.data), ("val-data", self.val_data)):
            if path is not None and not Path(path).expanduser().is_file():
                what = (
                    "is a folder; expected a JSONL file" if Path(path).is_dir() else "no such file"
                )
                raise UserError(f"--{flag} {path}: {what}")

    def validate(self) -> TrainConfig:
        """Check values and combinations; raise :class:`UsageError` naming the flag."""

        def bad(flag: str, why: str) -> UsageError:
            return UsageError(f"--{flag.replace('_', '-')}: {why}")

        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise bad(f.name, f"expected one of {', '.join(choices)}, got {value!r}")
        if self.model is None:
            raise bad("model", "no base model given (a Hugging Face folder or a .gguf file)")
        if self.data is None:
            raise bad("data", "no training data given (a JSONL file)")
        positive = (
            "lora_r",
            "max_seq_len",
            "batch_size",
            "grad_accum",
            "eval_batch_size",
            "log_every",
            "keep_last",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every", "compare", "max_new_tokens", "stop_grace"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", f"must be >= 1, got {self.max_steps}")
        if not self.epochs > 0:
            raise bad("epochs", f"must be > 0, got {self.epochs}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise bad("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if not self.lr > 0:
            raise bad("lr", f"must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise bad("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        if self.mlp_chunks is not None and self.mlp_chunks < 1:
            raise bad("mlp_chunks", f"must be >= 1, got {self.mlp_chunks}")
        if self.finetune == "full" and self.quant != "none":
            raise bad("finetune", "full fine-tuning trains 16-bit weights; add --quant none")
        if self.finetune == "peft" and not self.peft_config:
            raise bad("peft_config", "--finetune peft needs a PEFT config file")
        if self.finetune != "peft" and self.peft_config:
            raise bad("peft_config", "only used with --finetune peft")
        check_settings(self, bad)
        if self.cpu_offload and not self.fsdp:
            raise bad(
                "cpu_offload",
                "FSDP2's CPU offload shards across processes; add --fsdp "
                "(for the optimizer on the CPU: --optim adamw_cpu_offload)",
            )
        if self.fsdp and self.finetune == "peft":
            raise bad(
                "fsdp",
                "--finetune peft runs PEFT's own layers, which FSDP2 is not "
                "tested with; drop --fsdp (DDP) or train LoRA",
            )
        if self.offload and not self.gradient_checkpointing:
            raise bad(
                "offload",
                "activation offload works through checkpointing; add --gradient-checkpointing",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields a resumed run may change without changing its trajectory (the process count and
# FSDP/DDP change it only by fp32 rounding: the state is resharded on load).
RESUME_MAY_CHANGE = frozenset(
    {
        "out",
        "save_every",
        "keep_last",
        "log_every",
        "tensorboard",
        "compare",
        "max_new_tokens",
        "merge",
        "progress",
        "fsdp",
        "cpu_offload",
        "stop_grace",
    }
)

_FIELDS = {f.name: f for f in fields(TrainConfig)}
_GROUPS = {
    "model": "model",
    "data": "data",
    "loop": "training loop",
    "distributed": "several processes (--nproc N, torchrun, accelerate launch)",
    "dpo": "DPO (--beta and --loss-type serve GRPO too)",
    "grpo": "GRPO (TRL's names)",
    "output": "outputs",
}


def _kind(f: dataclasses.Field) -> type:
    text = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    return str


def parse_value(name: str, raw: Any) -> Any:
    """A YAML or flag value, converted to the field's type."""
    f = _FIELDS[name]
    kind = _kind(f)
    optional = "None" in str(f.type)
    if raw is None or (optional and isinstance(raw, str) and raw.lower() in ("none", "null")):
        if optional:
            return None
        raise UsageError(f"{name}: a value is required")
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise UsageError(
            f"{name}: expected {'true/false' if kind is bool else kind.__name__}, got {raw!r}"
        ) from None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config file (YAML or JSON); keys are :class:`TrainConfig` field names."""
    from trilora.io import require

    yaml = require("yaml", "--config")

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--config {os.fspath(path)!r}: no such file") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"--config {os.fspath(path)!r}: not UTF-8 text ({exc.reason})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UsageError(f"--config {os.fspath(path)}{where}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {os.fspath(path)}: expected a mapping of settings")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            raise UsageError(
                f"--config {os.fspath(path)}: unknown setting {key!r} (see trilora train --help)"
            )
        out[name] = parse_value(name, value)
    return out


def dump_yaml(config: TrainConfig) -> str:
    """The config as YAML, in field order, every setting spelled out."""
    from trilora.io import require

    yaml = require("yaml", "trilora train (it writes the run's config.yaml)")

    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, grouped, defaults in the help text.

    Defaults are suppressed so that :func:`config_from_sources` can tell a flag that was
    given from one that was not (flags override the config file, which overrides defaults).
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        group_key = f.metadata.get("group") or "loop"
        if group_key not in groups:
            groups[group_key] = parser.add_argument_group(_GROUPS[group_key])
        g = groups[group_key]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "none" if default is None else default
        help_text = f"{f.metadata['help']} (default: {shown})"
        help_text = help_text.replace("%", "%%")
        kind = _kind(f)
        if kind is bool:
            g.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        g.add_argument(
            flag,
            dest=f.name,
            default=argparse.SUPPRESS,
            metavar=f.metadata.get("metavar"),
            choices=f.metadata.get("choices"),
            help=help_text,
            type=(lambda raw, _name=f.name: parse_value(_name, raw)),
        )


def config_from_sources(
    args: argparse.Namespace,
    file_values: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults, then ``file_values`` (the YAML), then ``extra``, then the given flags."""
    values: dict[str, Any] = {}
    values.update(file_values or {})
    values.update(extra or {})
    for name in _FIELDS:
        if name in vars(args):
            values[name] = getattr(args, name)
    return TrainConfig(**values)


def config_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run it resumes."""
    return {k: v for k, v in config.to_dict().items() if k not in RESUME_MAY_CHANGE}


def config_differences(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """``name: saved -> current`` for every trajectory-defining setting that differs."""
    now = config_fingerprint(current)
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key in RESUME_MAY_CHANGE:
            continue
        if key not in saved and key in _FIELDS and now.get(key) == _FIELDS[key].default:
            continue  # a setting newer than the run, left at its default
        a, b = saved.get(key), now.get(key)
        if json.dumps(a) != json.dumps(b):
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def model_source_problem(source: str) -> str | None:
    """What is wrong with ``--model source`` (a Hugging Face folder or a ``.gguf`` file), or
    ``None``. Checks the path only, not the contents."""
    p = Path(source).expanduser()
    if p.is_file() and p.suffix != ".gguf":
        return (
            f"--model {source}: a file, but not .gguf; give a Hugging Face folder or a .gguf file"
        )
    if not p.exists():
        return f"--model {source}: no such folder or .gguf file"
    return None
