"""Exceptions for mistakes in user input (files, flags, settings)."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: a file, a setting or a model that is not what was expected.

    The message is one sentence that names what was expected and what was found. The CLI
    prints it on one line and exits with status 1 (``--debug`` adds the traceback). It is a
    ``ValueError`` so library callers that already catch ``ValueError`` keep working.
    """

    exit_code = 1


class UsageError(UserError):
    """A command-line usage mistake (a flag value, a missing or conflicting option): exit 2."""

    exit_code = 2


class RunStopped(KeyboardInterrupt):
    """A run stopped on request (SIGTERM from a scheduler, Ctrl-C), not by a mistake.

    The message is the one line the CLI prints (what was saved, how to resume); the exit
    status is the shell's convention for the signal: 128 + its number (143 for SIGTERM,
    130 for SIGINT). A ``KeyboardInterrupt`` so that code which lets Ctrl-C through lets
    this through too.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
