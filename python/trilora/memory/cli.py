"""``trilora mem``: the memory ceiling of a QLoRA run, computed without a GPU."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from dataclasses import replace

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``"24GiB"``, ``"80GB"``, ``"512MiB"``, ``"1e9"`` -> bytes (GB = 10**9, GiB = 2**30)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 24GiB or 80GB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _mlp_chunks(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a chunk count >= 0 or 'auto', got {text!r}")
    return value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "mem",
        help="peak GPU memory of a QLoRA training step, traced on fake tensors (no GPU, no weights)",
        description="Trace one training step (forward, loss, backward, optimizer step) of trilora's "
        "real code path on fake tensors and report peak device memory by category.",
    )
    from trilora import presets
    from trilora.memory import optimizers

    p.add_argument(
        "model",
        help=f"a preset ({', '.join(presets.names())}), a config.json, or a model folder",
    )
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("-r", "--rank", type=int, default=32, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument(
        "--targets", default="all-linear", help="comma-separated module names, or all-linear"
    )
    p.add_argument("--optimizer", choices=optimizers.OPTIMIZERS, default="adamw",
                   help="; ".join(f"{m.name}: {m.help}" for m in optimizers.MODELS.values()))  # fmt: skip
    p.add_argument("--no-checkpointing", action="store_true", help="keep every activation")
    p.add_argument(
        "--no-offload", action="store_true", help="keep checkpointed layer inputs on the GPU"
    )
    p.add_argument("--mlp-chunks", type=_mlp_chunks, default="auto",
                   help="MLP sequence chunks: a count, 0 (off) or auto (2,048-token pieces; default)")  # fmt: skip
    p.add_argument("--no-fused-ce", action="store_true", help="materialize logits (stock loss)")
    p.add_argument("--grouped-attention", action="store_true",
                   help="flash attention one key/value head group at a time "
                   "(trilora.enable_grouped_attention)")  # fmt: skip
    p.add_argument("--no-fused-norm", action="store_true",
                   help="keep transformers' eager RMSNorm (trilora.fused_norm off)")  # fmt: skip
    p.add_argument("--offload-embeddings", action="store_true",
                   help="keep the frozen input-embedding table in host memory (trilora.offload)")  # fmt: skip
    p.add_argument("--pin-memory-budget", type=parse_bytes, default=None)
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument(
        "--budget", type=parse_bytes, help="find the largest --search value that fits, e.g. 24GiB"
    )
    p.add_argument("--search", choices=("seq_len", "batch"), default="seq_len")
    p.add_argument("--confirm", action="store_true",
                   help="trace every layer (the slow, direct check): --budget re-searches on "
                   "full-depth traces at 1,024-token precision, seeded with the fast answer; a "
                   "single report or --sweep traces each length at full depth. Default: the "
                   "fast model (depth- and length-extrapolated from short traces; exact on "
                   "multiples of 2,048 tokens with auto MLP chunks), seconds instead of minutes")  # fmt: skip
    p.add_argument("--sweep", nargs="?", const="1024,2048,4096,8192,16384,32768,65536,131072",
                   help="peak memory vs sequence length (comma-separated lengths)")  # fmt: skip
    p.add_argument("--plot", default="mem_sweep.png", help="PNG written by --sweep")
    p.add_argument("--baseline", action="store_true",
                   help="also trace transformers + bitsandbytes + PEFT, with and without checkpointing")  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="write the reports as JSON")
    p.add_argument("--measure", action="store_true",
                   help="CUDA only: run the real step and print torch.cuda.max_memory_allocated")  # fmt: skip


def options_from_args(args):
    from trilora.memory.profiler import MemOptions

    targets = (
        None if args.targets == "all-linear" else tuple(t.strip() for t in args.targets.split(","))
    )
    return MemOptions(
        seq_len=args.seq_len, batch=args.batch, r=args.rank, lora_alpha=args.alpha, targets=targets,
        optimizer=args.optimizer, checkpointing=not args.no_checkpointing, offload=not args.no_offload,
        mlp_chunks=args.mlp_chunks or None, fused_ce=not args.no_fused_ce,
        fused_norm=not args.no_fused_norm, grouped_attention=args.grouped_attention,
        offload_embeddings=args.offload_embeddings,
        pin_memory_budget=args.pin_memory_budget, dtype=args.dtype,
    )  # fmt: skip


def format_reports(reports) -> str:
    """Side-by-side table of one or more :class:`MemReport`, each value in its own unit
    (B, KiB, MiB or GiB, whichever keeps it >= 1: a tiny model's categories stay readable)."""
    from trilora.memory.profiler import format_bytes

    heads = [
        f"{r.provider}{'' if r.options.get('checkpointing', True) else ' (no ckpt)'}"
        for r in reports
    ]
    width = max(14, *(len(h) + 2 for h in heads))

    def row(label: str, values) -> str:
        return f"{label:<30}" + "".join(f"{format_bytes(v):>{width}}" for v in values)

    lines = [f"{'device memory':<30}" + "".join(f"{h:>{width}}" for h in heads)]
    for c in reports[0].categories:
        lines.append(row(c, [r.categories.get(c, 0) for r in reports]))
    lines.append(row("= traced peak", [r.traced_peak for r in reports]))
    for o in reports[0].overheads:
        lines.append(row("+ " + o, [r.overheads.get(o, 0) for r in reports]))
    lines.append(row("= device total", [r.total for r in reports]))
    lines.append(row("pinned host memory", [r.host_pinned for r in reports]))
    if any(r.host_optimizer for r in reports):
        lines.append(row("host optimizer (CPU offload)", [r.host_optimizer for r in reports]))
    if any(r.host_embedding for r in reports):
        lines.append(row("host embedding table", [r.host_embedding for r in reports]))
    return "\n".join(lines)


_HOW = {
    "full": "full-depth trace",
    "extrapolated": "depth-extrapolated trace",
    "lattice": "fast model (exact on its lattice of lengths)",
}


def run(args) -> int:
    from trilora.memory.profiler import (
        byte_unit,
        check_supported,
        find_max,
        format_bytes,
        load_config,
        profile,
        sweep,
    )
    from trilora.memory.progress import BarProgress

    try:
        config = load_config(args.model)
        opts = options_from_args(args)
        opts.validate()
    except ValueError as exc:
        print(f"trilora mem: {exc}", file=sys.stderr)
        return 2
    name = str(args.model)
    out: dict = {"model": name}
    depth = "full" if args.confirm else "fast"
    progress = BarProgress()  # a bar on a terminal; the result lines always, on stderr
    try:
        check_supported(config, opts)
    except ValueError as exc:
        print(f"trilora mem: {exc}", file=sys.stderr)
        return 2
    try:
        if args.budget is not None:
            try:
                value, rep = find_max(
                    config, opts, args.budget, args.search, name=name, progress=progress,
                    confirm=args.confirm,
                )  # fmt: skip
            except ValueError as exc:
                progress.close()
                print(f"trilora mem: {exc}", file=sys.stderr)
                return 2
            progress.close()
            print(f"largest {args.search} within {format_bytes(args.budget)}: {value:,}")
            if rep is not None:
                info = rep.options["search"]
                nxt = info["next_total"]
                print(
                    f"{_HOW[rep.method]}: {value:,} -> {format_bytes(rep.total)} (fits); "
                    f"{info['next_value']:,} -> "
                    f"{format_bytes(nxt) if nxt is not None else '?'} (exceeds); "
                    f"precision {info['precision']:,}"
                    + (f"; the fast model answered {info['fast_answer']:,}" if "fast_answer" in info else "")
                )  # fmt: skip
                print(format_reports([rep]))
                out["search"] = {
                    "budget": args.budget,
                    "dimension": args.search,
                    "value": value,
                    "report": rep.to_dict(),
                }
        elif args.sweep:
            lens = [int(x) for x in args.sweep.split(",")]
            reps = sweep(config, opts, lens, name=name, depth=depth, progress=progress)
            progress.close()
            unit, size = byte_unit(max(max(r.total, r.host_pinned) for r in reps))
            print(f"{'seq_len':>10} {'device ' + unit:>12} {'pinned host ' + unit:>16}  how")
            for t, r in zip(lens, reps):
                print(f"{t:>10,} {r.total / size:>12.2f} {r.host_pinned / size:>16.2f}  "
                      f"{_HOW[r.method]}")  # fmt: skip
            _plot(lens, reps, args.plot, name)
            print(f"plot: {args.plot}")
            out["sweep"] = [r.to_dict() for r in reps]
        else:
            reps = [profile(config, opts, depth=depth, name=name, progress=progress)]
            if args.baseline:
                base = replace(
                    opts, offload=False, mlp_chunks=None, fused_ce=False, fused_norm=False,
                    offload_embeddings=False,
                )  # fmt: skip
                reps.append(profile(config, base, "bnb_peft", depth, name, progress))
                reps.append(profile(config, replace(base, checkpointing=False), "bnb_peft",
                                    depth, name, progress))  # fmt: skip
            progress.close()
            print(
                f"{name}: batch {opts.batch} x {opts.seq_len} tokens, LoRA r={opts.r}, "
                f"{opts.optimizer} ({_HOW[reps[0].method]})"
            )
            print(format_reports(reps))
            out["reports"] = [r.to_dict() for r in reps]
            if args.measure:
                from trilora.memory.measure import measure_cuda

                measured = measure_cuda(config, opts)
                print(f"measured torch.cuda.max_memory_allocated: {format_bytes(measured)} "
                      f"(predicted traced peak {format_bytes(reps[0].traced_peak)})")  # fmt: skip
                out["measured_max_memory_allocated"] = measured
    finally:
        progress.close()
    if args.json:
        write_json_atomic(args.json, out)
    return 0


def write_json_atomic(path, data) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file and rename (never half-written)."""
    import os
    import tempfile

    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _plot(lens, reports, path, name) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trilora.memory.profiler import byte_unit

    unit, size = byte_unit(max(max(r.total, r.host_pinned) for r in reports))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(lens, [r.total / size for r in reports], marker="o", label=f"device ({unit})")
    ax.plot(
        lens, [r.host_pinned / size for r in reports], marker="s", label=f"pinned host ({unit})"
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(unit)
    ax.set_title(f"trilora mem: {name}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    import os

    tmp = f"{path}.tmp.png"  # matplotlib picks the format from the suffix
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)
