"""The real launcher: ``torchrun`` starts 2 processes of ``trilora.distributed.smoke``,
which set themselves up from torchrun's environment, train, save, and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from helpers_models import save_tiny_model

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "trilora.distributed.smoke", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_fsdp_then_resume_on_one_rank(tmp_path):
    model = save_tiny_model(tmp_path / "model", seed=2)
    out = tmp_path / "out"
    common = [str(model), str(out), "--dtype", "float32", "--seq-len", "16", "-r", "4"]
    done = _torchrun(*common, "--fsdp", "--steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 2: loss" in done.stdout and "(2 rank(s))" in done.stdout
    meta = json.loads((out / "state" / "trilora_state.json").read_text())
    assert (meta["world_size"], meta["strategy"], meta["extra"]["step"]) == (2, "fsdp", 2)
    assert (out / "adapter" / "adapter_config.json").is_file()
    # one rank, DDP wrapper (a no-op on one rank): continues at step 3
    again = _torchrun(*common, "--steps", "1", "--resume", nproc=1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step 3: loss" in again.stdout
    assert json.loads((out / "state" / "trilora_state.json").read_text())["world_size"] == 1
    # a user error: one line from each rank, no worker traceback
    bad = _torchrun(str(tmp_path / "missing"), str(tmp_path / "o2"), "--dtype", "float32",
                    nproc=1)  # fmt: skip
    assert bad.returncode != 0
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("trilora.distributed.smoke: ")]
    assert len(lines) == 1 and "could not load" in lines[0] and "missing" in lines[0], bad.stderr
    # torchrun's agent prints its own summary afterwards
    assert "Traceback" not in bad.stderr.split("failed (exitcode")[0]
