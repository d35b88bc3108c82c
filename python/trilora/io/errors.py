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
