"""The ``trilora`` subcommands, one module each: ``add_parser(subparsers)`` registers the
subcommand and its options, ``run(args) -> int`` runs it. A command module imports no
torch at module level, so ``trilora COMMAND --help`` is instant; the library does the
work. The parser and error helpers here are shared by :mod:`trilora.cli` and the commands.
"""

from __future__ import annotations

import argparse
import sys

__all__ = [
    "ArgumentParser",
    "HelpFormatter",
    "RawDescriptionHelpFormatter",
    "quiet_third_party_notices",
    "report_error",
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help, except where it says nothing useful
    (flags, None, suppressed defaults) or the help already states the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or isinstance(default, bool)
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return super()._get_help_string(action)


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """:class:`HelpFormatter` that keeps the description's layout: indented lines (example
    commands, list items) stay one per line as written, blank lines stay, and the prose
    between them is filled to the terminal's width."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        lines: list[str] = []
        prose: list[str] = []

        def fill() -> None:
            if prose:
                lines.extend(
                    textwrap.wrap(
                        " ".join(prose), width, initial_indent=indent, subsequent_indent=indent
                    )
                )
                prose.clear()

        for line in text.splitlines():
            if line.strip() and not line[:1].isspace():
                prose.append(line.strip())
                continue
            fill()
            lines.append(indent + line if line.strip() else "")
        fill()
        return "\n".join(lines)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error style: one line naming what was expected, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


# bitsandbytes logs this at import on CPUs with AVX512-BF16 when it cannot load a CPU gemm
# from the Hugging Face `kernels` package: the package is missing (it is not a dependency),
# or, run from a source checkout with the repo root on sys.path, shadowed by the repo's own
# top-level `kernels/` folder. trilora never uses that gemm, so the notice only buries
# trilora's own output. --debug keeps it.
_BNB_HUB_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_HUB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _drop_notice(record) -> bool:
    return not str(record.msg).startswith(_BNB_HUB_KERNEL_NOTICE)


def quiet_third_party_notices() -> None:
    """Drop known, non-actionable third-party import notices (see ``_BNB_HUB_KERNEL_NOTICE``)."""
    import logging  # here, not at the top: --help does not need it

    logger = logging.getLogger(_BNB_HUB_KERNEL_LOGGER)
    if _drop_notice not in logger.filters:
        logger.addFilter(_drop_notice)


def report_error(prog: str, exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr; return the exit status."""
    from trilora.io import UserError

    if isinstance(exc, UserError):
        message, status = str(exc), exc.exit_code
    elif isinstance(exc, FileNotFoundError) and exc.filename:
        message, status = f"no such file or folder: {exc.filename}", 1
    elif isinstance(exc, OSError):
        message, status = (exc.strerror or str(exc)), 1
        if exc.filename:
            message = f"{message}: {exc.filename}"
    else:
        message = (
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
        )
        status = 1
    message = " ".join(str(message).split()) or type(exc).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status
