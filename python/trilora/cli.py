"""The ``trilora`` command.

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)`` (register
the subcommand and its options) and ``run(args) -> int``. Only the module of the subcommand
being run is imported, and its import must stay cheap (no torch at module level), so
``trilora --help``, ``--version`` and ``trilora COMMAND --help`` answer in a fraction of a
second. ``tests/test_cli.py`` holds every command module to that.

Errors: a :class:`trilora.io.UserError` (bad input; ``UsageError`` for bad flags) and an
``OSError`` (a missing file, a full disk) print one line and exit with 1, or 2 for usage
errors; anything else is a bug and prints one line that asks for ``--debug``.
``--debug`` (or ``TRILORA_DEBUG=1``) re-raises with the full traceback instead. A flag
argparse rejects also gets one line (no usage block) and exit status 2. A run stopped on
request (:class:`trilora.io.RunStopped`: SIGTERM from a scheduler, Ctrl-C) prints the one
line it carries and exits with 128 + the signal's number (143, 130).

Threads: :func:`main` sets ``OMP_WAIT_POLICY=PASSIVE`` before any command imports torch,
unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` (:mod:`trilora._openmp`), so
that OpenMP threads sleep instead of spinning while they wait; on a busy machine spinning
threads cost trilora several times its share of the CPU (``docs/cpu.md``).

Help: every option's help text ends with its default (:class:`HelpFormatter`); an option
whose default is None says in its help what happens when it is left out.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from trilora.commands import (
    ArgumentParser,
    HelpFormatter,
    RawDescriptionHelpFormatter,
    quiet_third_party_notices,
    report_error,
)

# subcommand -> (module providing add_parser() and run(), one-line help for `trilora --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "trilora.commands.demo",
        "one layer through trilora and bitsandbytes + PEFT: errors and times",
    ),
    "mem": ("trilora.commands.mem", "peak GPU memory of a training step, traced without a GPU"),
    "merge": ("trilora.commands.merge", "merge a LoRA adapter into its base and write safetensors"),
    "bench": ("trilora.commands.bench", "benchmark trilora against bitsandbytes + PEFT"),
    "kernels": (
        "trilora.commands.kernels",
        "compile every Triton kernel for sm_80/sm_90, check spills",
    ),
    "selfcheck": (
        "trilora.commands.selfcheck",
        "validate trilora here: versions, correctness, speed, memory, e2e (--gpu)",
    ),
    "train": ("trilora.commands.train", "fine-tune from JSONL (SFT, DPO); --demo runs SmolLM2"),
    "data": ("trilora.commands.data", "check a JSONL dataset: format, duplicates, token lengths"),
}

__all__ = [
    "COMMANDS",
    "VERSION",
    "ArgumentParser",
    "HelpFormatter",
    "RawDescriptionHelpFormatter",
    "build_parser",
    "main",
    "quiet_third_party_notices",
    "report_error",
]

VERSION = "0.1.0"  # == trilora.__version__ (kept here so --version imports nothing)


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("TRILORA_DEBUG", "") not in ("", "0")


def _selected_command(argv: list[str]) -> str | None:
    for token in argv:
        if token == "--":
            return None
        if not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only the subcommand named in ``argv`` gets its full options."""
    argv = sys.argv[1:] if argv is None else argv
    parser = ArgumentParser(
        prog="trilora",
        description="QLoRA fine-tuning engine: 4-bit base weights (bitsandbytes-compatible), "
        "LoRA adapters, Triton kernels.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trilora {VERSION}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback on errors (also TRILORA_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    selected = _selected_command(argv)
    for command, (module, help_text) in COMMANDS.items():
        if command == selected:
            importlib.import_module(module).add_parser(subparsers)
            sub = subparsers.choices[command]
            # `trilora merge ... --debug` works as well as `trilora --debug merge ...`
            sub.add_argument(
                "--debug",
                action="store_true",
                default=argparse.SUPPRESS,
                help="show the full traceback on errors (also TRILORA_DEBUG=1)",
            )
            # defaults in every option's help; a description laid out by hand (examples, one
            # per line) keeps its line breaks
            raw = issubclass(sub.formatter_class, argparse.RawDescriptionHelpFormatter)
            sub.formatter_class = RawDescriptionHelpFormatter if raw else HelpFormatter
        else:
            sub = subparsers.add_parser(command, help=help_text, formatter_class=HelpFormatter)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    from trilora._openmp import prefer_passive_wait

    # Before any command imports torch: idle OpenMP threads sleep instead of spinning
    # (trilora._openmp; a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins).
    prefer_passive_wait()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = _debug_requested(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    prog = f"trilora {args.command}"
    args._argv = argv  # the command as typed (trilora train repeats it in a resume hint)
    if not debug:
        quiet_third_party_notices()
    from trilora.io import RunStopped

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except RunStopped as exc:  # asked to stop (SIGTERM, Ctrl-C): not an error, --debug or not
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        return report_error(prog, exc)


if __name__ == "__main__":
    sys.exit(main())
