"""The public surface does not move: names, every subcommand's flags, the entry points.

The lists are pinned by hand (taken from the tree before the structure refactor of issue
18): a removed or renamed name or flag fails here, an added one asks for the list to grow.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import trilora
from trilora.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = {
    "trilora": [
        "AdamW",
        "AdamW8bit",
        "CPUOffloadAdamW",
        "Linear4bit",
        "PagedAdamW",
        "PagedAdamW8bit",
        "QLoraLinear",
        "QuantizedWeight",
        "__version__",
        "config",
        "cuda_ext",
        "distributed",
        "enable_checkpointing",
        "enable_fused_rms_norm",
        "enable_grouped_attention",
        "from_pretrained",
        "get_peft_model",
        "merge",
        "offload_input_embeddings",
        "ops",
        "optim",
        "patch",
        "quantize",
        "save_quantized",
    ],
    "trilora.ops": [
        "dequantize_4bit",
        "linear_cross_entropy",
        "qlora_linear",
        "quantize_4bit",
        "rms_norm",
    ],
    "trilora.distributed": [
        "DistEnv",
        "ParallelInfo",
        "ShardedOptimizer",
        "build_optimizer",
        "check_same_model",
        "clip_grad_norm",
        "current_env",
        "destroy_distributed",
        "fsdp_holds_integer_params",
        "fsdp_storage_dtypes",
        "gather_state_dict",
        "init_distributed",
        "load_pretrained",
        "load_state",
        "match_storage",
        "model_fingerprint",
        "parallel_info",
        "read_state_meta",
        "resident_bytes",
        "save_adapter",
        "save_state",
        "unwrap",
        "wrap_ddp",
        "wrap_fsdp",
    ],
    "trilora.optim": [
        "AdamW",
        "AdamW8bit",
        "CPUOffloadAdamW",
        "OPTIMIZERS",
        "OffloadClipCallback",
        "OptimizerInputError",
        "PAGING_MODES",
        "PagedAdamW",
        "PagedAdamW8bit",
        "PagingFallbackWarning",
        "ParameterTypeError",
        "STATE_BITS",
        "StateDictLayoutError",
        "UnclippedGradientsWarning",
        "create",
        "to_bitsandbytes",
    ],
    "trilora.config": ["Config", "config", "override", "use_triton"],
}

FLAGS = {
    "bench": [
        "--batch",
        "--check",
        "--competitors",
        "--compute-dtype",
        "--debug",
        "--device",
        "--help",
        "--level",
        "--out",
        "--overwrite",
        "--preset",
        "--quant",
        "--quick",
        "--remeasure-peaks",
        "--seq-len",
        "--skip-provider",
        "--steps",
        "-h",
    ],
    "data": ["--debug", "--help", "-h", "data_command"],
    "demo": [
        "--alpha",
        "--debug",
        "--device",
        "--dtype",
        "--help",
        "--in-features",
        "--out-features",
        "--rank",
        "--repeats",
        "--seed",
        "--tokens",
        "-h",
    ],
    "kernels": ["--arch", "--debug", "--filter", "--help", "--json", "--overwrite", "-h"],
    "mem": [
        "--alpha",
        "--baseline",
        "--batch",
        "--budget",
        "--confirm",
        "--debug",
        "--dtype",
        "--fsdp",
        "--grouped-attention",
        "--help",
        "--json",
        "--measure",
        "--mlp-chunks",
        "--no-checkpointing",
        "--no-fused-ce",
        "--no-fused-norm",
        "--no-offload",
        "--offload-embeddings",
        "--optimizer",
        "--overwrite",
        "--pin-memory-budget",
        "--plot",
        "--quant",
        "--rank",
        "--search",
        "--seq-len",
        "--sweep",
        "--targets",
        "--world-size",
        "-h",
        "-r",
        "model",
    ],
    "merge": [
        "--base",
        "--blocksize",
        "--debug",
        "--dtype",
        "--help",
        "--no-double-quant",
        "--out",
        "--overwrite",
        "--quant-type",
        "--requantize",
        "-h",
        "adapter_dir",
    ],
    "selfcheck": [
        "--budget-s",
        "--debug",
        "--gpu",
        "--help",
        "--out",
        "--overwrite",
        "--quick",
        "--sections",
        "--seed",
        "-h",
    ],
    "train": [
        "--batch-size",
        "--beta",
        "--compare",
        "--config",
        "--cpu-offload",
        "--data",
        "--debug",
        "--demo",
        "--device",
        "--dtype",
        "--epochs",
        "--epsilon",
        "--epsilon-high",
        "--eval-batch-size",
        "--eval-every",
        "--finetune",
        "--fsdp",
        "--fused-loss",
        "--generation-batch-size",
        "--grad-accum",
        "--gradient-checkpointing",
        "--group-by-length",
        "--grouped-attention",
        "--help",
        "--keep-last",
        "--label-smoothing",
        "--log-every",
        "--lora-alpha",
        "--lora-dropout",
        "--lora-r",
        "--lora-targets",
        "--loss-type",
        "--lr",
        "--mask-truncated-completions",
        "--max-completion-length",
        "--max-grad-norm",
        "--max-new-tokens",
        "--max-seq-len",
        "--max-steps",
        "--merge",
        "--method",
        "--mlp-chunks",
        "--model",
        "--no-cpu-offload",
        "--no-fsdp",
        "--no-fused-loss",
        "--no-gradient-checkpointing",
        "--no-group-by-length",
        "--no-grouped-attention",
        "--no-mask-truncated-completions",
        "--no-merge",
        "--no-offload",
        "--no-packing",
        "--no-precompute-ref",
        "--no-progress",
        "--no-rslora",
        "--no-skip-bad-lines",
        "--no-tensorboard",
        "--nproc",
        "--num-generations",
        "--num-iterations",
        "--offload",
        "--optim",
        "--out",
        "--overwrite",
        "--packing",
        "--peft-config",
        "--precompute-ref",
        "--print-config",
        "--progress",
        "--quant",
        "--resume",
        "--reward",
        "--reward-weights",
        "--rpo-alpha",
        "--rslora",
        "--save-every",
        "--scale-rewards",
        "--scheduler",
        "--seed",
        "--skip-bad-lines",
        "--stop-grace",
        "--sweep",
        "--temperature",
        "--tensorboard",
        "--top-p",
        "--val-data",
        "--val-fraction",
        "--warmup-ratio",
        "--warmup-steps",
        "--weight-decay",
        "-h",
    ],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_resolve(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if getattr(mod, name, None) is None]
    assert not missing, f"{module} lost {missing}"
    if module != "trilora.config":
        exported = set(getattr(mod, "__all__", ()))
        assert set(PUBLIC[module]) <= exported | set(getattr(mod, "_LAZY", ())), module


def test_trilora_all_is_pinned():
    assert sorted(trilora.__all__) == PUBLIC["trilora"]


def test_every_subcommand_and_its_flags():
    assert sorted(COMMANDS) == sorted(FLAGS)
    for command, expected in FLAGS.items():
        parser = build_parser([command])
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub = subparsers.choices[command]
        got = sorted(s for a in sub._actions for s in (a.option_strings or [a.dest]))
        assert got == expected, f"trilora {command}: flags changed"


def test_entry_point_is_trilora_cli_main():
    text = (ROOT / "pyproject.toml").read_text()
    scripts = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert scripts.split() == ["trilora", "=", '"trilora.cli:main"']


def test_python_m_trilora_train_answers_help():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "trilora.train", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--nproc" in done.stdout and "--config" in done.stdout
