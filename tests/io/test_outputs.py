"""trilora.io: refuse to clobber, write atomically, follow the umask (no torch needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers_files import cwd, mode, umask

from trilora.io import (
    UsageError,
    UserError,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    check_output,
    follow_umask,
)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_usage_error_is_a_user_error_and_a_value_error():
    assert issubclass(UsageError, UserError) and issubclass(UserError, ValueError)
    assert UsageError.exit_code == 2 and UserError.exit_code == 1


def test_check_output_refuses_non_empty_without_overwrite(tmp_path):
    out = tmp_path / "out"
    assert check_output(out) == out  # missing: fine
    out.mkdir()
    assert check_output(out) == out  # empty folder: fine
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty; pass --overwrite"):
        check_output(out)
    assert check_output(out, overwrite=True) == out
    with pytest.raises(UsageError, match="pass overwrite=True"):
        check_output(out, flag="path", overwrite_hint="pass overwrite=True to replace it")
    f = tmp_path / "r.json"
    f.write_text("{}")
    with pytest.raises(UsageError, match="file exists"):
        check_output(f, kind="file", flag="--json")
    assert check_output(f, kind="file", overwrite=True) == f
    with pytest.raises(UsageError, match="is a folder"):
        check_output(out, kind="file", overwrite=True)
    with pytest.raises(UsageError, match="not a folder"):
        check_output(f, kind="dir", overwrite=True)


def test_check_output_never_the_cwd_its_parents_or_an_input(tmp_path):
    work = tmp_path / "work"
    (work / "adapter").mkdir(parents=True)
    with cwd(work):
        for path in (".", "..", str(work), str(tmp_path), "/", str(Path.home())):
            with pytest.raises(UsageError, match="current directory"):
                check_output(path, overwrite=True)
        # even an empty current folder is never the output
        with pytest.raises(UsageError, match="current directory"):
            check_output(".", overwrite=True, inputs=[])
    for target, item in [
        (work, work / "adapter"),  # holds the input
        (work / "adapter", work / "adapter"),  # is the input
        (tmp_path, work / "adapter" / "x.json"),  # holds it deeper down
    ]:
        with pytest.raises(UsageError, match="holds an input"):
            check_output(target, overwrite=True, inputs=[None, item])
    # a file output that is one of the inputs
    cfg = tmp_path / "config.json"
    cfg.write_text("{}")
    with pytest.raises(UsageError, match="holds an input"):
        check_output(cfg, overwrite=True, inputs=[cfg], kind="file")
    # a sibling of the input is fine
    assert check_output(work / "merged", inputs=[work / "adapter"]) == work / "merged"


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_directory_follows_the_umask(tmp_path, mask):
    out = tmp_path / "out"
    with umask(mask), atomic_directory(out) as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        # what safetensors' save_file and mkstemp leave behind: owner-only files
        private = tmp / "sub" / "model.safetensors"
        private.write_bytes(b"x")
        os.chmod(private, 0o600)
        script = tmp / "run.sh"
        script.write_text("#!/bin/sh\n")
        os.chmod(script, 0o700)
    assert mode(out) == 0o777 & ~mask
    assert mode(out / "sub") == 0o777 & ~mask
    assert mode(out / "sub" / "model.safetensors") == 0o666 & ~mask
    assert mode(out / "run.sh") == 0o777 & ~mask
    assert leftovers(tmp_path) == []


def test_follow_umask_leaves_symlinks_alone(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("x")
    os.chmod(target, 0o600)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "link").symlink_to(target)
    with umask(0o022):
        follow_umask(tree)
    assert mode(target) == 0o600
    assert mode(tree) == 0o755


def test_atomic_directory_refuses_and_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UsageError, match="--overwrite"), atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert leftovers(tmp_path) == []
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_directory_failure_keeps_the_old_content(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_directory_over_a_file_leaves_no_backup(tmp_path):
    # The bug in the old trilora.loading.atomic_directory: the file was moved to
    # .out.old-XXXX and shutil.rmtree(ignore_errors=True) silently left it there.
    out = tmp_path / "out"
    out.write_text("a file")
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
    assert out.is_dir() and [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert leftovers(tmp_path) == []


def test_atomic_write_bytes_and_json(tmp_path):
    path = tmp_path / "deep" / "r.json"
    with umask(0o002):
        atomic_write_json(path, {"a": Path("x")})
    assert path.read_text() == '{\n  "a": "x"\n}\n'
    assert mode(path) == 0o664
    with pytest.raises(UsageError, match="--overwrite"):
        atomic_write_bytes(path, b"new", overwrite=False)
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert leftovers(path.parent) == []
