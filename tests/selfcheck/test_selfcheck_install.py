"""The offline install of docs/gpu-check.md: ``pip install --no-index --no-deps
--no-build-isolation -e .`` over an environment that already has torch, triton,
transformers and peft, then ``trilora selfcheck``.

The GPU machine's image is simulated by a fresh virtual environment without pip that sees
this interpreter's torch, triton, transformers, peft, numpy, safetensors, setuptools and
pip through a ``.pth`` file (torch requires setuptools on Python 3.12, so the image has it).
``--no-index`` makes any attempt to reach a package index fail at once.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PREINSTALLED = (
    "torch",
    "triton",
    "transformers",
    "peft",
    "numpy",
    "safetensors",
    "setuptools",
    "pip",
)


def _site_dirs() -> list[str]:
    dirs = []
    for name in PREINSTALLED:
        module = importlib.import_module(name)
        site = str(Path(module.__file__).resolve().parent.parent)
        if site not in dirs:
            dirs.append(site)
    return dirs


@pytest.mark.slow  # pip and our packaging (~16 s of CPU); no upstream library under test
def test_offline_editable_install_runs_selfcheck(tmp_path):
    env_dir = tmp_path / "image"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "zz_preinstalled.pth").write_text("\n".join(_site_dirs()) + "\n")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "TRITON_INTERPRET"))
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    install = subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--no-build-isolation",
            "-e",
            str(REPO),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    where = subprocess.run(
        [
            python,
            "-c",
            "import trilora, trilora.kernels, trilora.bench, trilora.selfcheck.worker; print(trilora.__file__)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(REPO), where
    trilora = env_dir / "bin" / "trilora"
    helped = subprocess.run(
        [trilora, "selfcheck", "--help"], capture_output=True, text=True, env=env
    )
    assert helped.returncode == 0 and "--budget-s" in helped.stdout
    out = tmp_path / "report"
    ran = subprocess.run(
        [trilora, "selfcheck", "--sections", "environment", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    info = data["sections"][0]["units"][0]["info"]
    assert data["sections"][0]["status"] == "pass" and info["trilora"] == "0.1.0"
    # The run used the image's interpreter, not the test's.
    assert Path(data["meta"]["python"]).parent == python.parent
