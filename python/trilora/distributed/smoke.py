"""A short distributed QLoRA run on random tokens: checks a multi-GPU setup end to end.

    torchrun --nproc-per-node 2 -m trilora.distributed.smoke MODEL_DIR OUT_DIR [--fsdp]

Rank 0 loads ``MODEL_DIR`` (the other ranks build on the meta device and receive their
shards), LoRA goes on every linear layer, the model is wrapped in DDP or FSDP2, trains
``--steps`` steps on random tokens with activation checkpointing, and writes
``OUT_DIR/state`` (resumable on any number of ranks) and ``OUT_DIR/adapter`` (PEFT format).
With ``--resume`` it first loads ``OUT_DIR/state`` and continues. It prints one line per
step from rank 0: the loss averaged over the ranks and the peak device memory.

This is the sequence of calls ``trilora train`` makes under ``--nproc`` (or ``torchrun -m
trilora.train``), without data: a quick check of a cluster before a real run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig

import trilora.distributed as td
from trilora.io import UserError
from trilora.patches.activation_checkpointing import enable_checkpointing
from trilora.peft import get_peft_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m trilora.distributed.smoke",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="folder of a transformers causal LM (safetensors)")
    p.add_argument("out", help="output folder (state/ and adapter/ are written in it)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP")
    p.add_argument("--cpu-offload", action="store_true", help="FSDP2 CPUOffloadPolicy")
    p.add_argument("--steps", type=int, default=4, help="training steps")
    p.add_argument("--batch", type=int, default=1, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("-r", "--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="compute and mixed-precision dtype",
    )
    p.add_argument("--resume", action="store_true", help="load OUT/state first")
    p.add_argument("--overwrite", action="store_true", help="replace OUT/state and OUT/adapter")
    return p


def run(args: argparse.Namespace) -> int:

    env = td.init_distributed()
    dtype = getattr(torch, args.dtype)
    model = td.load_pretrained(args.model, env=env, compute_dtype=dtype, dtype=dtype)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    model = get_peft_model(model, lora, compute_dtype=dtype)
    if args.fsdp:
        model = td.wrap_fsdp(
            model,
            env=env,
            cpu_offload=args.cpu_offload,
            mixed_precision=dtype if dtype != torch.float32 else None,
        )
    else:
        model = td.wrap_ddp(model, env=env)
    enable_checkpointing(td.unwrap(model), offload=env.device.type == "cuda")
    model.train()
    opt = td.build_optimizer(model, torch.optim.AdamW, lr=args.lr)
    out = Path(args.out)
    start = 0
    if args.resume:
        start = int(td.load_state(out / "state", model, opt).get("step", 0))
    vocab = td.unwrap(model).get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(1000 + env.rank)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    for step in range(start, start + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(env.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = td.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad()
        value = loss.detach().float()
        if env.distributed:
            dist.all_reduce(value)
            value /= env.world_size
        if env.is_main:
            peak = (
                f", peak {torch.cuda.max_memory_allocated(env.device) / 2**30:.2f} GiB"
                if env.device.type == "cuda"
                else ""
            )
            print(
                f"step {step + 1}: loss {value.item():.4f}, grad norm {float(norm):.3f}{peak}",
                flush=True,
            )
    td.save_state(
        out / "state",
        model,
        opt,
        extra={"step": start + args.steps},
        overwrite=args.overwrite or args.resume,
    )
    td.save_adapter(model, out / "adapter", overwrite=args.overwrite or args.resume)
    if env.is_main:
        print(f"wrote {out / 'state'} and {out / 'adapter'} ({env.world_size} rank(s))")
    td.destroy_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"trilora.distributed.smoke: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
