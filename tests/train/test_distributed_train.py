"""``trilora train`` on 2 CPU processes (gloo) against 1 process with the same global batch.

Real launches, one per way of starting the workers: ``trilora train --nproc 2 --fsdp
--gradient-checkpointing`` (torch.distributed.run called by the CLI) and ``accelerate launch
--multi_gpu -m trilora.train`` (DDP; accelerate runs torch.distributed.run in its own
process, so the workers get what ``torchrun -m trilora.train`` gives them: a plain torchrun
launch was a third launch until the suite was cut down). Each 2-process run trains 10
steps of 2 micro-batches of a global batch of 4 rows and is compared with one process on
the same settings: every logged loss, gradient norm and held-out loss, and the final
adapter. The FSDP run's step-5 checkpoint then resumes in one process.

The data are chosen so that the last micro-batch of each epoch holds one row: rank 1 then
joins the step with a stand-in row at weight 0, and the evaluation's last batch likewise.
The gradient norm is clipped (``--max-grad-norm 0.5``, below the norms seen), so the norm
must be the global one; with ``adamw_cpu_offload`` under FSDP2 it is computed by the
optimizer over host copies of each rank's shards.

Cost: each launch is three interpreters importing torch, transformers and PEFT (~30 s of
CPU on 2 cores), so the training launches are slow tests: the lanes without slow tests see
FSDP2, DDP and torch's distributed checkpoint through tests/distributed/test_training.py
(one spawned pair for all of the library's 2-rank scenarios), and the ``--nproc`` launch
through torch.distributed.run's API in ``test_a_worker_error_is_one_line``.

Tolerances: 2 ranks differ from 1 process in the order of fp32 sums (each rank sums its
rows, then the ranks average), ~1e-7 relative in the losses; Adam's normalisation can
amplify a last-bit difference of a tiny gradient entry over 10 steps, so adapters are
compared to 1e-4 of their largest entry (as in tests/distributed/test_training.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers_models import assert_adapters_close
from train_helpers import save_tiny_lm, sft_records, write_jsonl

from trilora.cli import main

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    # the single-process reference runs CPUOffloadAdamW through the trainer (which clips)
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

STEPS = 10
SAVE_AT = 5
LOSS_RTOL = 1e-5
# 3 query heads of 10 over 1 KV head, MLP width 43: the packed 4-bit MLP weights have an
# odd number of rows (30 * 43 / 2 = 645), so FSDP2 pads the second rank's shards.
MODEL = dict(
    layers=2, hidden=30, intermediate=43, num_attention_heads=3, num_key_value_heads=1, head_dim=10
)
# 37 records: 4 held out (eval batches of 3 and 1), 33 train rows = 8 batches of 4 and
# one of 1 per epoch
RECORDS = 37


def _settings(root: Path, seed: int, optim: str) -> list[str]:
    return [
        "--model",
        str(root / "model"),
        "--data",
        str(root / "data.jsonl"),
        "--max-steps",
        str(STEPS),
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--lora-r",
        "4",
        "--lora-dropout",
        "0",
        "--lr",
        "0.01",
        "--seed",
        str(seed),
        "--val-fraction",
        "0.1",
        "--eval-batch-size",
        "3",
        "--eval-every",
        "5",
        "--max-grad-norm",
        "0.5",
        "--optim",
        optim,
        "--save-every",
        str(SAVE_AT),
        "--keep-last",
        "5",
        "--compare",
        "1",
        "--max-new-tokens",
        "3",
        "--no-progress",
    ]


def _env(**extra: str) -> dict[str, str]:
    # one thread per process: 2 processes on a 2-core machine
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=600)
    print(f"{' '.join(cmd[:6])} ...: {time.perf_counter() - t0:.1f} s")
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _single(out: Path, settings: list[str], *extra: str) -> None:
    """One process, in this process (no launcher), one thread as each rank has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        assert main(["train", *settings, "--out", str(out), *extra]) == 0
    finally:
        torch.set_num_threads(threads)
    print(f"single process {out.name}: {time.perf_counter() - t0:.1f} s")


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _close(got: float, want: float, rtol: float, what: str) -> float:
    diff = abs(got - want) / max(abs(want), 1e-12)
    assert diff <= rtol, f"{what}: {got} vs {want} (relative {diff:.2e} > {rtol})"
    return diff


def _compare(got: Path, want: Path, from_step: int = 0) -> dict[str, float]:
    """Every train/eval record after ``from_step`` and the adapters; the worst differences."""
    a = [r for r in _records(got) if r["step"] > from_step]
    b = [r for r in _records(want) if r["step"] > from_step]
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    worst = {"loss": 0.0, "grad_norm": 0.0, "eval_loss": 0.0}
    for x, y in zip(a, b):
        for key in worst:
            if key in y:
                worst[key] = max(
                    worst[key], _close(x[key], y[key], LOSS_RTOL, f"{key} at step {y['step']}")
                )
    worst.update(assert_adapters_close(_adapter(got), _adapter(want)))
    print(f"{got.name} vs {want.name}: worst relative differences {worst}")
    return worst


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    seed = int(os.environ.get("TRILORA_TEST_SEED", torch.seed() % (2**31)))
    print(f"seed={seed}")
    root = tmp_path_factory.mktemp("dist_train")
    save_tiny_lm(root / "model", seed=seed, **MODEL)
    write_jsonl(root / "data.jsonl", sft_records(RECORDS, seed=seed))
    return root, seed


@pytest.fixture(scope="module")
def reference(setup):
    """One process, global batch 4: with trilora's default AdamW and with the
    CPU-offloaded one."""
    root, seed = setup
    for optim in ("adamw", "adamw_cpu_offload"):
        _single(root / f"single_{optim}", _settings(root, seed, optim))
    return {optim: root / f"single_{optim}" for optim in ("adamw", "adamw_cpu_offload")}


@pytest.fixture(scope="module")
def nproc_fsdp(setup):
    """``trilora train --nproc 2 --fsdp --gradient-checkpointing`` with the CPU-offloaded
    optimizer; checkpoints at step 5."""
    root, seed = setup
    out = root / "nproc_fsdp"
    cmd = [
        sys.executable,
        "-m",
        "trilora.cli",
        "train",
        *_settings(root, seed, "adamw_cpu_offload"),
        "--out",
        str(out),
        "--nproc",
        "2",
        "--fsdp",
        "--gradient-checkpointing",
    ]
    done = _launch(cmd)
    assert "2 processes, FSDP, cpu" in done.stderr
    return out


@pytest.mark.slow  # a launch (see the module doc); test_a_worker_error_is_one_line launches --nproc too
def test_nproc_fsdp_matches_one_process(nproc_fsdp, reference):
    """FSDP2 with activation checkpointing and the CPU-offloaded optimizer: clipping over
    host copies of each rank's shards is global."""
    out = nproc_fsdp
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processes"], summary["strategy"]) == (2, "fsdp")
    worst = _compare(out, reference["adamw_cpu_offload"])
    # the norm is clipped at every step: a per-rank norm would change the trajectory
    norms = [r["grad_norm"] for r in _records(out) if r["kind"] == "train"]
    assert min(norms) > 0.5
    assert worst["grad_norm"] <= LOSS_RTOL
    # the answers and the adapter come from rank 0, once
    assert len(summary["samples"]) == 1
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and (out / "adapter" / "tokenizer_config.json").is_file()


@pytest.mark.slow  # a launch (see the module doc)
def test_accelerate_ddp_matches_one_process(setup, reference):
    """``accelerate launch --multi_gpu`` (torchrun's variables; on the CPU here), DDP."""
    pytest.importorskip("accelerate")
    root, seed = setup
    out = root / "accelerate_ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "trilora.train",
        *_settings(root, seed, "adamw"),
        "--out",
        str(out),
    ]
    # a fresh HF_HOME: no accelerate config file of this machine applies
    done = _launch(cmd, HF_HOME=str(root / "hf_home"))
    assert "2 processes, DDP, cpu" in done.stderr
    _compare(out, reference["adamw"])
    state = json.loads(
        (out / "checkpoints" / f"step-{SAVE_AT:08d}" / "trainer_state.json").read_text()
    )
    assert (state["world_size"], state["strategy"]) == (2, "ddp")


@pytest.mark.slow  # needs the --nproc launch
def test_saved_on_two_processes_resumes_on_one(setup, reference, nproc_fsdp, capsys):
    """The step-5 checkpoint of the 2-process FSDP run, resumed by one process: steps 6-10
    and the adapter are the uninterrupted single-process run's."""
    root, seed = setup
    out = root / "resumed_on_one"
    shutil.copytree(nproc_fsdp, out)
    for later in sorted((out / "checkpoints").iterdir()):
        if int(later.name.split("-")[1]) > SAVE_AT:
            shutil.rmtree(later)
    shutil.rmtree(out / "adapter")
    (out / "summary.json").unlink()
    capsys.readouterr()
    # --fsdp is allowed to change on resume; alone, it is a note
    _single(
        out,
        _settings(root, seed, "adamw_cpu_offload"),
        "--resume",
        "--gradient-checkpointing",
        "--fsdp",
    )
    err = capsys.readouterr().err
    assert f"step {SAVE_AT} of {STEPS}; saved on 2 processes" in err
    assert "note: --fsdp shards the model across processes; this run is one process" in err
    _compare(out, reference["adamw_cpu_offload"], from_step=SAVE_AT)
    # steps 1-5 of the log are the 2-process run's own
    first = [r for r in _records(out) if r["step"] <= SAVE_AT]
    assert first == [r for r in _records(nproc_fsdp) if r["step"] <= SAVE_AT]


@pytest.mark.slow  # needs the --nproc launch
def test_resuming_the_checkpoint_of_another_model_is_refused(setup, nproc_fsdp, capsys):
    """Weights replaced in place (same files, same sizes: the run's own fingerprint cannot
    tell) are caught by the distributed state's checksum of every base tensor."""
    root, seed = setup
    out = root / "other_model"
    shutil.copytree(nproc_fsdp, out)
    for later in sorted((out / "checkpoints").iterdir()):
        if int(later.name.split("-")[1]) > SAVE_AT:
            shutil.rmtree(later)
    weights = root / "model" / "model.safetensors"
    original = weights.read_bytes()
    other = root / "other_weights"
    save_tiny_lm(other, seed=seed + 1, **MODEL)
    assert (other / "model.safetensors").stat().st_size == len(original)
    try:
        shutil.copy(other / "model.safetensors", weights)
        capsys.readouterr()
        status = main(
            [
                "train",
                *_settings(root, seed, "adamw_cpu_offload"),
                "--out",
                str(out),
                "--resume",
                "--gradient-checkpointing",
            ]
        )
    finally:
        weights.write_bytes(original)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert "saved from another model" in err[-1] and "checksum differs" in err[-1], err[-1]


@pytest.mark.slow  # two real ranks (~10 s of CPU); our own message; the launcher on each lane's torch: tests/distributed/test_training.py::test_ddp_matches_one_process
def test_a_worker_error_is_one_line(setup):
    """The same mistake on both ranks is printed once, without tracebacks or launcher logs."""
    root, seed = setup
    cmd = [
        sys.executable,
        "-m",
        "trilora.cli",
        "train",
        *_settings(root, seed, "adamw"),
        "--model",
        str(root / "no_such_model"),
        "--out",
        str(root / "bad_model"),
        "--nproc",
        "2",
    ]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert errors == [
        f"trilora train: error: --model {root / 'no_such_model'}: no such folder or .gguf file"
    ], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        (
            ["--nproc", "2", "--batch-size", "1"],
            2,
            "--batch-size 1 is the global micro-batch, split across the 2 processes",
        ),
        (["--nproc", "0"], 2, "--nproc: must be >= 1"),
        (
            ["--nproc", "4096", "--batch-size", "4096", "--device", "cpu"],
            1,
            "--nproc 4096 on the CPU: this machine has",
        ),
        (["--cpu-offload"], 2, "--cpu-offload: FSDP2's CPU offload shards across processes"),
        (["--nproc", "2", "--sweep", "lora_r=2,4"], 2, "--sweep runs one training process"),
        (
            ["--fsdp", "--finetune", "peft", "--peft-config", "x.json"],
            2,
            "--fsdp: --finetune peft runs PEFT's own layers",
        ),
    ],
)
def test_bad_process_settings_fail_before_any_process_starts(
    tmp_path, capsys, extra, status, message
):
    argv = [
        "train",
        "--model",
        str(tmp_path / "m"),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]
    t0 = time.perf_counter()
    assert main(argv) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert time.perf_counter() - t0 < 30  # refused up front, no worker was started
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_nproc_with_cuda_on_a_machine_without_gpus(tmp_path, capsys):
    argv = [
        "train",
        "--model",
        "m",
        "--data",
        "d.jsonl",
        "--out",
        str(tmp_path / "o"),
        "--nproc",
        "2",
        "--device",
        "cuda",
    ]
    assert main(argv) == 1
    assert "--device cuda: no CUDA GPU is visible" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_nproc_beyond_the_gpus_of_this_machine(tmp_path, capsys):
    n = torch.cuda.device_count() + 1
    argv = [
        "train",
        "--model",
        "m",
        "--data",
        "d.jsonl",
        "--out",
        str(tmp_path / "o"),
        "--nproc",
        str(n),
        "--batch-size",
        str(n),
    ]
    assert main(argv) == 1
    assert f"this machine shows {n - 1} GPU(s)" in capsys.readouterr().err


def test_launched_by_mpi_without_torchrun_variables(tmp_path, capsys, monkeypatch):
    """accelerate launch --cpu --mpirun_hostfile (MPI) sets no RANK/WORLD_SIZE: each process
    would train the whole run alone; refused."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    (tmp_path / "m").mkdir()  # inputs that exist: the launch check comes next
    (tmp_path / "d.jsonl").write_text("")
    argv = [
        "train",
        "--model",
        str(tmp_path / "m"),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--out",
        str(tmp_path / "o"),
        "--max-steps",
        "1",
    ]
    assert main(argv) == 1
    assert "started by MPI (OMPI_COMM_WORLD_SIZE is set)" in capsys.readouterr().err
