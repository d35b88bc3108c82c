"""The real launcher: ``torchrun`` starts 2 processes of ``trilora.distributed.smoke``,
which set themselves up from torchrun's environment, train with FSDP2 and save; the state
then resumes on one rank.

One launch (~30 s of CPU on 2 cores, most of it three interpreters importing torch,
transformers and PEFT): the resume on one rank and the user error run ``smoke.main`` in
this process, with no launcher variables (a plain single-process run, as torchrun
``--nproc-per-node 1`` gives it the same one-rank environment); resuming a 2-rank state on
one rank through the library is tests/distributed/test_training.py's job too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from helpers_models import save_tiny_model

from trilora.distributed import smoke

pytestmark = [
    pytest.mark.distributed,
    # slow: a launch of three interpreters; the lanes without slow tests see FSDP2 and
    # torch's distributed checkpoint in tests/distributed/test_training.py and torch's
    # launcher in tests/train/test_distributed_train.py::test_a_worker_error_is_one_line
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "trilora.distributed.smoke",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_fsdp_then_resume_on_one_rank(tmp_path, capsys, monkeypatch):
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
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    capsys.readouterr()
    assert smoke.main([*common, "--steps", "1", "--resume"]) == 0
    assert "step 3: loss" in capsys.readouterr().out
    assert json.loads((out / "state" / "trilora_state.json").read_text())["world_size"] == 1
    # a user error: one line, no traceback
    missing = tmp_path / "missing"
    status = smoke.main([str(missing), str(tmp_path / "o2"), "--dtype", "float32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status != 0
    assert len(err) == 1 and err[0].startswith("trilora.distributed.smoke: "), err
    assert "could not load" in err[0] and "missing" in err[0]
