"""File-system helpers of the output-safety tests: a temporary umask or working directory,
and a path's permission bits."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


@contextlib.contextmanager
def umask(mask: int):
    """Run the block under ``mask`` (the process's umask), then restore the old one."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def cwd(path: Path):
    """Run the block in ``path`` as the working directory, then go back."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def mode(path: Path) -> int:
    """The permission bits of ``path`` itself (a link is not followed)."""
    return stat.S_IMODE(os.lstat(path).st_mode)
