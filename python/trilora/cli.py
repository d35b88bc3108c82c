"""The ``trilora`` command.

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)`` (register
the subcommand and its options) and ``run(args) -> int``. Modules are imported only when
their subcommand runs, except for argument registration, which must stay cheap (no torch
work at import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module providing add_parser() and run()
COMMANDS: dict[str, str] = {
    "demo": "trilora.demo",
    "kernels": "trilora.kernel_check",
    "mem": "trilora.memory.cli",
    "merge": "trilora.merging",
    "bench": "trilora.bench.cli",
}


def build_parser() -> argparse.ArgumentParser:
    from trilora import __version__

    parser = argparse.ArgumentParser(
        prog="trilora",
        description="QLoRA fine-tuning engine: 4-bit base weights (bitsandbytes-compatible), "
        "LoRA adapters, Triton kernels.",
    )
    parser.add_argument("--version", action="version", version=f"trilora {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, module in COMMANDS.items():
        importlib.import_module(module).add_parser(subparsers)
        subparsers.choices[command].set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
