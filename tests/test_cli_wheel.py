"""The wheel built from the repo's tracked files holds everything the commands need.

The wheel is the one named by ``TRILORA_TEST_WHEEL`` when it is set (`.ci/run` builds the
wheel once, from its fresh clone, and exports it), else one built here from a copy of the
tracked files (what a fresh clone has). It is installed with ``pip install --no-deps
--target`` into a folder (dependencies come from this environment), and the commands run
from that copy in a folder outside the source tree. That the wheel's metadata declares every
package the modules import is checked statically (tests/test_architecture.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    given = os.environ.get("TRILORA_TEST_WHEEL")
    if given:
        path = Path(given)
        assert path.is_file() and path.name.startswith("trilora-") and path.suffix == ".whl", (
            f"TRILORA_TEST_WHEEL={given}: not a trilora wheel file"
        )
        return path
    pytest.importorskip("build")
    src = tmp_path_factory.mktemp("clone")
    for name in _tracked_files():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    # --no-isolation: offline, with this environment's setuptools (the test extra pins a
    # recent one); .ci/run builds with isolation, as a user's `python -m build` does.
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), "."],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (whl,) = dist.glob("trilora-*.whl")
    return whl


def test_wheel_holds_every_source_file_and_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for name in _tracked_files():
        path = Path(name)
        kernel = path.parts[0] == "kernels" and path.suffix == ".py"
        bench = path.parts[0] == "bench" and len(path.parts) == 2 and path.suffix in (".py", ".md")
        if path.parts[:2] == ("python", "trilora"):
            expected.add(str(Path(*path.parts[1:])))
        elif kernel or bench:  # installed as trilora.kernels / trilora.bench
            expected.add(str(Path("trilora", *path.parts)))
        elif path.parts[0] == "csrc" and path.suffix in (".cpp", ".h", ".cu", ".cuh"):
            expected.add(str(Path("trilora", *path.parts)))  # built on first use
    assert any(n.startswith("trilora/presets/") and n.endswith(".json") for n in expected)
    assert any(n.startswith("trilora/csrc/cpu/") for n in expected)
    assert sorted(expected - names) == []
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "trilora = trilora.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow  # our packaging; ~30 s of CPU (mem and demo each import torch)
def test_installed_wheel_runs_the_commands(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["PYTHONPATH"] = str(target)
    # The demo runs on the torch fallback: built from the wheel's copy of csrc/, the native
    # extension would be rebuilt in the build folder the source tree's tests share (one per
    # torch version; the sources' paths differ), and again by the next test that uses it,
    # ~70 s of CPU each. That the sources are in the wheel is checked above; the build
    # itself by tests/native and tests/ops.
    env["TRILORA_NO_NATIVE"] = "1"

    def trilora(*argv: str) -> subprocess.CompletedProcess:
        code = (
            "import sys, trilora, trilora.cli\n"
            f"assert trilora.__file__.startswith({str(target)!r}), trilora.__file__\n"
            "sys.exit(trilora.cli.main(sys.argv[1:]))"
        )
        return subprocess.run(
            [sys.executable, "-c", code, *argv],
            cwd=outside,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    for argv in (["--help"], ["--version"], ["mem", "--help"], ["demo", "--help"]):
        result = trilora(*argv)
        assert result.returncode == 0, (argv, result.stderr)
    assert "llama-3.1-8b" in trilora("mem", "--help").stdout  # the presets are in the wheel
    mem = trilora("mem", "qwen2.5-7b", "--seq-len", "256", "-r", "8")
    assert mem.returncode == 0, mem.stderr
    assert "device total" in mem.stdout
    demo = trilora(
        "demo", "--in-features", "64", "--out-features", "64", "--tokens", "2", "--repeats", "1"
    )
    assert demo.returncode == 0, demo.stderr
    assert "trilora" in demo.stdout
