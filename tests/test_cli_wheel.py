"""The wheel built from the repo's tracked files holds everything the commands need.

The wheel is built from a copy of the tracked files (what a fresh clone has), installed with
``pip install --no-deps --target`` into a folder (dependencies come from this environment),
and the commands run from that copy in a folder outside the source tree. `.ci/run` does the
full check: a clean venv, dependencies resolved by pip, `trilora --help`, `demo` and `mem`.
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
        cwd=src, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
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
    assert any(n.startswith("trilora/presets/") and n.endswith(".json") for n in expected)
    assert sorted(expected - names) == []
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "trilora = trilora.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_runs_the_commands(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
         "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["PYTHONPATH"] = str(target)

    def trilora(*argv: str) -> subprocess.CompletedProcess:
        code = (
            "import sys, trilora, trilora.cli\n"
            f"assert trilora.__file__.startswith({str(target)!r}), trilora.__file__\n"
            "sys.exit(trilora.cli.main(sys.argv[1:]))"
        )
        return subprocess.run([sys.executable, "-c", code, *argv], cwd=outside, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    for argv in (["--help"], ["--version"], ["mem", "--help"], ["demo", "--help"]):
        result = trilora(*argv)
        assert result.returncode == 0, (argv, result.stderr)
    assert "llama-3.1-8b" in trilora("mem", "--help").stdout  # the presets are in the wheel
    mem = trilora("mem", "qwen2.5-7b", "--seq-len", "256", "-r", "8")
    assert mem.returncode == 0, mem.stderr
    assert "device total" in mem.stdout
    demo = trilora("demo", "--in-features", "64", "--out-features", "64", "--tokens", "2",
                   "--repeats", "1")  # fmt: skip
    assert demo.returncode == 0, demo.stderr
    assert "trilora" in demo.stdout
