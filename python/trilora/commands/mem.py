"""``trilora mem``: the memory ceiling of a QLoRA run, computed without a GPU.

This module imports no torch at import time (``trilora mem --help`` stays instant); the
profiler is imported when the command runs.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace

_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
# What a --budget search costs today (Llama-3.1-8B at 24GB, 2-core CPU shared with other
# work: 13.1 s at load 4.5, 42.6 s at load 14-17; bench/results/mem); said in --help.
_SEARCH_TIME = "13-43 seconds for llama-3.1-8b at 24GB on a shared 2-core CPU"


def parse_bytes(text: str) -> int:
    """``"24GiB"``, ``"80GB"``, ``"512MiB"``, ``"1e9B"`` -> bytes (GB = 10**9, GiB = 2**30).

    The unit is required: a bare ``24`` is refused rather than read as 24 bytes.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        hint = f" (did you mean {text.strip()}GB or {text.strip()}GiB?)" if m and not unit else ""
        raise argparse.ArgumentTypeError(
            f"expected a size with a unit, like 24GB (10^9 bytes) or 24GiB (2^30 bytes); "
            f"got {text!r}{hint}"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def preset_names() -> list[str]:
    """The bundled model configs (:mod:`trilora.presets`), listed without importing torch."""
    from trilora import presets

    return presets.names()


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


def _world_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of ranks >= 1, got {text!r}")
    return value


def add_parser(subparsers) -> None:
    from trilora.optim import OPTIMIZERS  # names only: no torch

    presets = ", ".join(preset_names())
    p = subparsers.add_parser(
        "mem",
        help="peak GPU memory of a QLoRA training step, traced on fake tensors (no GPU, no weights)",
        description="Trace one training step (forward, loss, backward, optimizer step) of trilora's "
        "real code path on fake tensors and report peak device memory by category. "
        f"Presets: {presets}. By default the answer comes from the fast model (five short "
        "traces, extrapolated in depth and length; exact on multiples of 2,048 tokens with auto "
        f"MLP chunks): a --budget search takes {_SEARCH_TIME}. --confirm traces every layer "
        "instead (minutes per long-context trace). See docs/memory.md.",
    )
    p.add_argument("model", help=f"a preset ({presets}), a config.json, or a model folder")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("-r", "--rank", type=int, default=32, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument(
        "--targets", default="all-linear", help="comma-separated module names, or all-linear"
    )
    p.add_argument(
        "--optimizer",
        choices=tuple(OPTIMIZERS),
        default="adamw",
        help="trilora.optim optimizer (default: adamw, 32-bit state on the device): "
        "*_8bit 8-bit state; paged_* resident until memory is tight; *_host / *_uvm "
        "state in host / managed memory (the device holds two pages); *_cpu_offload "
        "state and gradients on the host; host bytes are reported as 'host "
        "optimizer'",
    )
    p.add_argument("--no-checkpointing", action="store_true", help="keep every activation")
    p.add_argument(
        "--no-offload", action="store_true", help="keep checkpointed layer inputs on the GPU"
    )
    p.add_argument(
        "--mlp-chunks",
        type=_mlp_chunks,
        default="auto",
        help="MLP sequence chunks: a count, 0 (off) or auto (2,048-token pieces; default)",
    )
    p.add_argument("--no-fused-ce", action="store_true", help="materialize logits (stock loss)")
    p.add_argument(
        "--grouped-attention",
        action="store_true",
        help="flash attention one key/value head group at a time "
        "(trilora.enable_grouped_attention)",
    )
    p.add_argument(
        "--no-fused-norm",
        action="store_true",
        help="keep transformers' eager RMSNorm (trilora.patches.fused_norm off)",
    )
    p.add_argument(
        "--offload-embeddings",
        action="store_true",
        help="keep the frozen input-embedding table in host memory (trilora.patches.embedding_offload)",
    )
    p.add_argument(
        "--pin-memory-budget",
        type=parse_bytes,
        default=None,
        help="cap on pinned host memory for offloaded layer inputs, e.g. 64GiB (default: no cap)",
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16"),
        default="bfloat16",
        help="activation and LoRA dtype",
    )
    p.add_argument(
        "--quant",
        choices=("nf4", "fp4", "int8"),
        default="nf4",
        help="base weight format: nf4 / fp4 (bitsandbytes 4-bit, blocksize 64, double "
        "quantization) or int8 (bitsandbytes LLM.int8 bytes: int8 codes plus one fp32 "
        "scale per row); default nf4. --baseline models 4-bit only",
    )
    p.add_argument(
        "--budget",
        type=parse_bytes,
        help="find the largest --search value that fits this much device memory; "
        f"a unit is required: 24GB (10^9 bytes) or 24GiB (2^30). Takes {_SEARCH_TIME} "
        "(default: no search, one report)",
    )
    p.add_argument(
        "--search",
        choices=("seq_len", "batch"),
        default="seq_len",
        help="what --budget searches for",
    )
    p.add_argument(
        "--confirm",
        action="store_true",
        help="trace every layer (the slow, direct check): --budget re-searches on "
        "full-depth traces at 1,024-token precision, seeded with the fast answer; a "
        "single report, --sweep or --world-size traces each length at full depth. "
        "Default: the fast model (depth- and length-extrapolated from short traces; "
        "exact on multiples of 2,048 tokens with auto MLP chunks), seconds instead "
        "of minutes",
    )
    p.add_argument(
        "--sweep",
        nargs="?",
        const="1024,2048,4096,8192,16384,32768,65536,131072",
        metavar="LENGTHS",
        help="peak memory vs sequence length (comma-separated lengths; default when "
        "given without a value: 1024,2048,...,131072)",
    )
    p.add_argument("--plot", default="mem_sweep.png", help="PNG written by --sweep")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also trace transformers + bitsandbytes + PEFT, with and without checkpointing",
    )
    p.add_argument(
        "--json", metavar="PATH", help="write the reports as JSON (default: not written)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing --json / --plot files (refused otherwise)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="CUDA only: run the real step and print torch.cuda.max_memory_allocated",
    )
    p.add_argument(
        "--world-size",
        type=_world_size,
        default=1,
        help="ranks of a data-parallel run: report one rank's memory (--batch is "
        "per rank; default: 1, a single GPU)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="with --world-size: FSDP2 shards the model over the ranks "
        "(default: DDP, a full copy per rank)",
    )


def options_from_args(args):
    from trilora.memory.report import MemOptions

    targets = (
        None if args.targets == "all-linear" else tuple(t.strip() for t in args.targets.split(","))
    )
    return MemOptions(
        seq_len=args.seq_len,
        batch=args.batch,
        r=args.rank,
        lora_alpha=args.alpha,
        targets=targets,
        optimizer=args.optimizer,
        checkpointing=not args.no_checkpointing,
        offload=not args.no_offload,
        mlp_chunks=args.mlp_chunks or None,
        fused_ce=not args.no_fused_ce,
        fused_norm=not args.no_fused_norm,
        grouped_attention=args.grouped_attention,
        offload_embeddings=args.offload_embeddings,
        pin_memory_budget=args.pin_memory_budget,
        dtype=args.dtype,
        quant_type=args.quant,
    )


def format_reports(reports) -> str:
    """Side-by-side table of one or more :class:`MemReport`, each value in its own unit
    (B, KiB, MiB or GiB, whichever keeps it >= 1: a tiny model's categories stay readable)."""
    from trilora.memory.report import format_bytes

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
        lines.append(row("host optimizer", [r.host_optimizer for r in reports]))
    if any(r.host_embedding for r in reports):
        lines.append(row("host embedding table", [r.host_embedding for r in reports]))
    return "\n".join(lines)


def _check_outputs(args) -> None:
    """Refuse outputs that would clobber a file (or an input) before any tracing."""
    from trilora.io import check_output

    inputs = [args.model] if _exists(args.model) else []
    if args.json:
        check_output(args.json, overwrite=args.overwrite, inputs=inputs, kind="file", flag="--json")
    if args.sweep and args.budget is None:  # --budget wins over --sweep
        check_output(args.plot, overwrite=args.overwrite, inputs=inputs, kind="file", flag="--plot")


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)


def _sweep_lengths(text: str) -> list[int]:
    from trilora.io import UsageError

    try:
        lens = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        lens = []
    if not lens or min(lens) < 2:
        raise UsageError(
            f"--sweep expects comma-separated sequence lengths >= 2, like 1024,2048; got {text!r}"
        )
    return lens


_HOW = {
    "analytical": "analytical MoE model",
    "full": "full-depth trace",
    "extrapolated": "depth-extrapolated trace",
    "lattice": "fast model (exact on its lattice of lengths)",
}


def run(args) -> int:
    from trilora.io import UsageError, atomic_write_json, require

    _check_outputs(args)
    # Optional packages are checked before minutes of tracing, not after.
    if args.baseline:
        if args.quant == "int8":
            raise UsageError(
                "--baseline traces bitsandbytes 4-bit + PEFT only; drop --baseline or use "
                "--quant nf4"
            )
        require("bitsandbytes", "trilora mem --baseline (the bitsandbytes + PEFT trace)")
    lens = _sweep_lengths(args.sweep) if args.sweep and args.budget is None else None
    if lens:
        require("matplotlib", "trilora mem --sweep (it plots to --plot)")

    # A mistyped model is rejected before the profiler's imports (transformers, PEFT: ~10 s
    # of CPU).
    from trilora.presets import read_model_config

    try:
        raw_config = read_model_config(args.model)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc

    from trilora.memory.progress import BarProgress
    from trilora.memory.report import byte_unit, format_bytes
    from trilora.memory.search import find_max, profile, sweep
    from trilora.memory.trace import check_supported, load_config

    try:
        config = load_config(raw_config)
        opts = options_from_args(args)
        opts.validate()
        check_supported(config, opts)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    from trilora.memory.moe import check_traceable, experts_line, is_moe

    moe = is_moe(config)
    if moe and (args.confirm or args.world_size > 1 or args.fsdp or args.measure):
        try:
            check_traceable(config)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    name = str(args.model)
    depth = "full" if args.confirm else "fast"
    progress = BarProgress()  # a bar on a terminal; the result lines always, on stderr
    out: dict = {"model": name}
    try:
        if args.world_size > 1 or args.fsdp:
            from trilora.memory.distributed import run_cli

            return run_cli(args, config, opts, name, depth=depth, progress=progress)
        if args.budget is not None:
            try:
                value, rep = find_max(
                    config,
                    opts,
                    args.budget,
                    args.search,
                    name=name,
                    progress=progress,
                    confirm=args.confirm,
                )
            except ValueError as exc:
                raise UsageError(str(exc)) from exc
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
                    + (
                        f"; the fast model answered {info['fast_answer']:,}"
                        if "fast_answer" in info
                        else ""
                    )
                )
                print(format_reports([rep]))
                if moe:
                    print(experts_line(rep))
                    _print_moe_baseline(args, config, opts, name, value, out)
                    print(f"{_MOE_NOTE}; see docs/memory.md")
                out["search"] = {
                    "budget": args.budget,
                    "dimension": args.search,
                    "value": value,
                    "report": rep.to_dict(),
                }
        elif lens:
            reps = sweep(config, opts, lens, name=name, depth=depth, progress=progress)
            progress.close()
            unit, size = byte_unit(max(max(r.total, r.host_pinned) for r in reps))
            print(f"{'seq_len':>10} {'device ' + unit:>12} {'pinned host ' + unit:>16}  how")
            for t, r in zip(lens, reps):
                print(
                    f"{t:>10,} {r.total / size:>12.2f} {r.host_pinned / size:>16.2f}  "
                    f"{_HOW[r.method]}"
                )
            _plot(lens, reps, args.plot, name)
            print(f"plot: {args.plot}")
            out["sweep"] = [r.to_dict() for r in reps]
        else:
            reps = [profile(config, opts, depth=depth, name=name, progress=progress)]
            if args.baseline:
                base = replace(
                    opts,
                    offload=False,
                    mlp_chunks=None,
                    fused_ce=False,
                    fused_norm=False,
                    offload_embeddings=False,
                )
                reps.append(profile(config, base, "bnb_peft", depth, name, progress))
                reps.append(
                    profile(
                        config,
                        replace(base, checkpointing=False),
                        "bnb_peft",
                        depth,
                        name,
                        progress,
                    )
                )
            progress.close()
            print(
                f"{name}: batch {opts.batch} x {opts.seq_len} tokens, LoRA r={opts.r}, "
                f"{opts.optimizer} ({_HOW[reps[0].method]})"
            )
            print(format_reports(reps))
            if moe:
                for r in reps:
                    print(
                        f"{r.provider}{'' if r.options['checkpointing'] else ' (no ckpt)'} "
                        + experts_line(r)
                    )
                print(f"{_MOE_NOTE}; see docs/memory.md")
            out["reports"] = [r.to_dict() for r in reps]
            if args.measure:
                from trilora.memory.measure import measure_cuda

                measured = measure_cuda(config, opts)
                print(
                    f"measured torch.cuda.max_memory_allocated: {format_bytes(measured)} "
                    f"(predicted traced peak {format_bytes(reps[0].traced_peak)})"
                )
                out["measured_max_memory_allocated"] = measured
    finally:
        progress.close()
    if args.json:  # checked before tracing (_check_outputs: --overwrite)
        atomic_write_json(args.json, out)
    return 0


_MOE_NOTE = (
    "mixture of experts: answered by the analytical MoE model (not traced), balanced "
    "routing assumed (each expert gets T*k/E of the T*k token copies)"
)


def _print_moe_baseline(args, config, opts, name: str, value: int, out: dict) -> None:
    """With --baseline, bitsandbytes + PEFT's largest value within the same budget (its
    experts stay 16-bit), printed beside trilora's ``value``."""
    if not args.baseline:
        return
    from trilora.memory.moe import experts_line, find_max_moe
    from trilora.memory.report import format_bytes

    base = replace(
        opts,
        offload=False,
        mlp_chunks=None,
        fused_ce=False,
        fused_norm=False,
        offload_embeddings=False,
    )
    from trilora.memory.moe import minimum_moe_bytes

    floor = minimum_moe_bytes(config, base, "bnb_peft")
    if floor >= args.budget:
        print(
            f"bitsandbytes + PEFT: nothing fits within {format_bytes(args.budget)} (its fixed "
            f"footprint, 16-bit experts included, is {format_bytes(floor)}); trilora: {value:,}"
        )
        out["baseline_search"] = {"value": 0, "minimum_bytes": floor}
        return
    b_value, b_rep = find_max_moe(config, base, args.budget, args.search, "bnb_peft", name)
    shown = format_bytes(b_rep.total) if b_rep is not None else "-"
    print(
        f"bitsandbytes + PEFT: largest {args.search} within {format_bytes(args.budget)}: "
        f"{b_value:,} ({shown}); trilora: {value:,}"
    )
    if b_rep is not None:
        print("bitsandbytes + PEFT " + experts_line(b_rep))
    out["baseline_search"] = {
        "value": b_value,
        "report": b_rep.to_dict() if b_rep is not None else None,
    }


def _plot(lens, reports, path, name) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trilora.memory.report import byte_unit

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
    import io

    from trilora.io import atomic_write_bytes

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
