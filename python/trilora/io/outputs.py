"""Safe outputs: refuse to clobber, write atomically, follow the umask."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from trilora.io.errors import UsageError

PathLike = str | os.PathLike


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (the process is
    # single-threaded while it matters: at the start of a save).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """Permission bits a plain ``open(path, "w")`` would give a new file (``0o666 & ~umask``)."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """Permission bits ``mkdir`` would give a new folder (``0o777 & ~umask``)."""
    return 0o777 & ~_umask()


def _resolve(path: PathLike) -> Path:
    return Path(os.path.abspath(os.fspath(path))).resolve()


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(
    path: PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[PathLike] = (),
    kind: str = "dir",
    flag: str = "--out",
    overwrite_hint: str = "pass --overwrite to replace it",
) -> Path:
    """Check that ``path`` may be written; return it as an absolute path.

    Refused (:class:`UsageError`, one line) when:

    * ``path`` exists, is not an empty folder, and ``overwrite`` is false;
    * ``path`` exists with the wrong type (a file where a folder is written, or the reverse);
    * even with ``overwrite``: ``path`` is the current directory or one of its parents, a
      folder that holds (or is) one of ``inputs``, or the user's home or the filesystem root.

    Args:
        path: the output file or folder.
        overwrite: the user passed ``--overwrite``.
        inputs: paths the command reads (adapters, base models, data files).
        kind: ``"dir"`` or ``"file"``.
        flag: the option's name, used in messages.
        overwrite_hint: how the caller asks for a replacement, used in messages (library
            callers say ``"pass overwrite=True"``).
    """
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    target = _resolve(path)
    cwd = _resolve(os.getcwd())
    protected = {Path(target.anchor), _resolve(Path.home())}
    if _is_within(cwd, target) or target in protected:
        raise UsageError(
            f"{flag} {os.fspath(path)!r} is the current directory, one of its parents, your home "
            "or the filesystem root; choose a new folder"
        )
    for item in inputs:
        if item is None:
            continue
        source = _resolve(item)
        if _is_within(source, target):
            raise UsageError(
                f"{flag} {os.fspath(path)!r} holds an input of this command ({os.fspath(item)}); "
                "choose a folder that does not contain the inputs"
            )
    if not os.path.lexists(target):
        return target
    is_dir = target.is_dir() and not target.is_symlink()
    if kind == "dir" and not is_dir:
        raise UsageError(f"{flag} {os.fspath(path)!r} exists and is not a folder")
    if kind == "file" and is_dir:
        raise UsageError(f"{flag} {os.fspath(path)!r} is a folder; expected a file path")
    if kind == "dir" and not any(target.iterdir()):
        return target
    if not overwrite:
        what = "folder is not empty" if kind == "dir" else "file exists"
        raise UsageError(
            f"{flag} {os.fspath(path)!r}: the {what}; {overwrite_hint}, or choose another path"
        )
    return target


def follow_umask(root: PathLike) -> None:
    """Give ``root`` and everything under it the permissions the umask gives new files.

    For trees this process just created in a private temporary folder: libraries write some
    files owner-only (safetensors' ``save_file`` makes them 0600; ``mkdtemp`` makes 0700),
    which would lock other users of a shared machine out of the user's own results.
    Folders get ``0o777 & ~umask``, files ``0o666 & ~umask`` plus the umask's execute bits
    where the file was executable. Symbolic links are left alone.
    """
    umask = _umask()
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    root = Path(root)
    os.chmod(root, dir_mode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode)
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o111
            os.chmod(path, file_mode | (executable and 0o111 & ~umask))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def atomic_directory(path: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``path`` only if the block succeeds.

    Everything written into the folder gets the umask's permissions (see
    :func:`follow_umask`). If ``path`` exists it must be an empty folder, or ``overwrite``
    must be true: then the old folder (or file) is swapped out after the new one is complete
    and removed, so ``path`` is never missing or half-written. On failure the temporary
    folder is removed and ``path`` is left as it was. Call :func:`check_output` first to
    protect inputs and the working directory.

    Raises:
        UsageError: ``path`` is occupied and ``overwrite`` is false.
        OSError: the new folder is in place but the old one could not be removed (the
            message names what is left over).
    """
    path = Path(os.path.abspath(os.fspath(path)))
    occupied = os.path.lexists(path) and (
        path.is_symlink() or not path.is_dir() or any(path.iterdir())
    )
    if occupied and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        follow_umask(tmp)
        backup = None
        if os.path.lexists(path):
            backup = path.parent / f".{path.name}.old-{os.getpid()}-{tmp.name[-8:]}"
            os.replace(path, backup)
        try:
            os.replace(tmp, path)
        except BaseException:
            if backup is not None:
                os.replace(backup, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        try:
            _remove(backup)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"{path} was written, but its previous content could not be removed "
                f"({exc.strerror or exc}); delete it by hand",
                str(backup),
            ) from exc


def atomic_write_bytes(path: PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename.

    The file gets the umask's permissions (``mkstemp`` alone would give 0600). With
    ``overwrite=False`` an existing file is refused (:class:`UsageError`).
    """
    path = Path(os.path.abspath(os.fspath(path)))
    if not overwrite and os.path.lexists(path):
        raise UsageError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: PathLike, text: str, *, overwrite: bool = True) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(
    path: PathLike, data: Any, *, overwrite: bool = True, indent: int = 2
) -> Path:
    """:func:`atomic_write_bytes` for JSON (``default=str`` for paths and dtypes)."""
    text = json.dumps(data, indent=indent, default=str) + "\n"
    return atomic_write_text(path, text, overwrite=overwrite)
