"""User-facing input/output rules shared by every command and library entry point that saves.

* :class:`UserError` / :class:`UsageError`: a mistake in what the user gave us. The CLI
  prints such errors as one line (no traceback unless ``--debug``); library callers catch
  them as ``ValueError``. :class:`RunStopped`: a run stopped on request (SIGTERM, Ctrl-C);
  one line and exit status 128 + the signal's number.
* :func:`check_output` refuses to overwrite what the user owns unless asked to, and never
  replaces a folder holding one of the command's inputs, the current directory or one of
  its parents.
* :func:`atomic_directory`, :func:`atomic_write_bytes`, :func:`atomic_write_text` and
  :func:`atomic_write_json` write through a temporary sibling and a rename, so a reader sees
  the old content or the new one, never half of either; what they create follows the
  process umask, like any file the user creates by hand.
* :func:`require` imports an optional package for a feature, or raises
  :class:`MissingExtra` (a ``UserError``) naming the extra to install.

This module imports no torch: the CLI uses it before any heavy import.
"""

from trilora.io.errors import RunStopped, UsageError, UserError
from trilora.io.extras import MissingExtra, install_hint, require
from trilora.io.outputs import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_output,
    default_dir_mode,
    default_file_mode,
    follow_umask,
)

__all__ = [
    "MissingExtra",
    "RunStopped",
    "UsageError",
    "UserError",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output",
    "default_dir_mode",
    "default_file_mode",
    "follow_umask",
    "install_hint",
    "require",
]
