"""``trilora bench`` around its levels: the busy level's environments and competitors, the
report's cells, the exit status when a level fails, and the train level outside a source
checkout."""

from __future__ import annotations

import os
import sys
import time

import pytest

from trilora import _openmp
from trilora.bench import busy, report
from trilora.bench.cli import exit_status
from trilora.bench.harness import ENV_FIELDS, Stats, guarded, make_row
from trilora.cli import main


def _meta():
    env = dict.fromkeys(ENV_FIELDS, "test")
    env["device_type"] = "cpu"
    return {
        "run_id": "test",
        "command": "trilora bench",
        "levels": ["kernels", "busy"],
        "quick": True,
        "env": env,
        "wall_s": 1.0,
    }


def test_each_provider_gets_the_environment_a_user_gets(monkeypatch):
    for name in _openmp.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    # as after the trilora command set it in its own process
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(_openmp, "_set_by_trilora", True)
    assert busy.provider_environment("trilora")["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in busy.provider_environment("bnb_peft")
    # a user's own choice reaches both
    monkeypatch.setattr(_openmp, "_set_by_trilora", False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    for provider in busy.PROVIDERS:
        assert busy.provider_environment(provider)["OMP_WAIT_POLICY"] == "ACTIVE"


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_competitors_burn_cpu_and_are_stopped():
    n = 2
    with busy.competing(n) as procs:
        assert len(procs) == n and all(p.poll() is None for p in procs)
        start = [_cpu_seconds(p.pid) for p in procs]
        time.sleep(0.3)
        assert all(_cpu_seconds(p.pid) > s for p, s in zip(procs, start))
    assert all(p.poll() is not None for p in procs)


def test_fair_share():
    assert busy.fair_slowdown(threads=2, competitors=2, ncores=2) == 2.0
    assert busy.fair_slowdown(threads=1, competitors=1, ncores=4) == 0.5  # room to spare
    assert busy.fair_slowdown(threads=2, competitors=4, ncores=2) == 3.0
    with pytest.raises(ValueError, match="competitors"):
        busy.BusyPlan("tiny", 1, 8, 1, 0, 1, competitors=0)


def test_report_never_shows_empty_bold_cells():
    # A kernel case whose baseline was skipped has no speedup: the cell says so with "-".
    t = make_row(
        "kernels", "m/4/q_proj/r16/M1", "fwd_bwd", "trilora", "s", Stats(1e-3, 1e-3, 1e-3, 3)
    )
    b = make_row("kernels", "m/4/q_proj/r16/M1", "fwd_bwd", "bnb_peft", "s", status="skipped")
    slow = make_row("busy", "tiny/b2xs64/c2", "slowdown", "trilora", "x", Stats(2.5, 2.2, 2.9, 2))
    failed = make_row("busy", "tiny/b2xs64/c2", "slowdown", "bnb_peft", "x", status="error")
    rows = [t, b, slow, failed]
    report.add_ratios(rows)
    md = report.render_markdown(_meta(), rows, [], [])
    assert "****" not in md
    assert "| **2.50x** | 2.20 | 2.90 |" in md
    kernel_line = next(line for line in md.splitlines() if line.startswith("| m/4/q_proj"))
    assert "| - |" in kernel_line


def test_a_failed_case_fails_the_run():
    ok = make_row("e2e", "c", "step_time", "trilora", "s", Stats(1.0, 1.0, 1.0, 1))
    skipped = make_row("train", "c", "peak_memory", "trl_bnb_peft", "bytes", status="skipped")
    failed = guarded(lambda: 1 / 0)
    error = make_row(
        "train", "c", "peak_memory", "trilora", "bytes", status=failed.status, note=failed.note
    )
    nan = make_row("e2e", "c", "loss_final", "trilora", "loss", Stats(*[float("nan")] * 3, 1))
    assert exit_status([ok, skipped], check=True) == 0
    assert exit_status([ok, error], check=False) == 1
    assert exit_status([ok, nan], check=False) == 0
    assert exit_status([ok, nan], check=True) == 1


@pytest.mark.slow
def test_train_level_runs_without_the_tests_folder(tmp_path, monkeypatch):
    # A wheel install has no tests/ folder; train_helpers is what the level used to import.
    monkeypatch.setitem(sys.modules, "train_helpers", None)
    rc = main(["bench", "--level", "train", "--quick", "--out", str(tmp_path / "b"), "--check"])
    assert rc == 0
    rows = __import__("json").loads((tmp_path / "b" / "latest.json").read_text())["rows"]
    ours = [r for r in rows if r["provider"] == "trilora"]
    assert ours and ours[0]["status"] == "ok" and float(ours[0]["median"]) > 0


@pytest.mark.parametrize(
    ("flag", "want"),
    [(None, ["float32"]), ("bf16", ["bfloat16"]), ("both", ["float32", "bfloat16"])],
)
def test_compute_dtype_gives_one_case_per_dtype(flag, want):
    """``--compute-dtype`` runs every e2e case in each dtype asked for, under its own case
    name (a CPU's default, fp32, keeps the name earlier results have)."""
    import argparse

    import torch

    from trilora.bench import cli as bench_cli
    from trilora.bench.e2e import default_dtype, dtype_name

    sub = argparse.ArgumentParser().add_subparsers()
    parser = bench_cli.add_parser(sub)
    argv = ["--level", "e2e", "--quick", "--batch", "3"]
    args = parser.parse_args(argv + (["--compute-dtype", flag] if flag else []))
    cpu = torch.device("cpu")
    plans = bench_cli.e2e_plans(args, cpu)
    assert [str(p.dtype).removeprefix("torch.") for p in plans] == want
    assert all(p.batch == 3 for p in plans)
    assert len({(p.preset, p.dtype) for p in plans}) == len(plans)
    assert default_dtype(cpu) == torch.float32 and dtype_name(torch.bfloat16) == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--compute-dtype", "fp16"])


def test_decode_prompt_takes_the_first_real_tokens(seed):
    """The e2e level's decode case starts from the first row's real tokens: a padded row
    (either side) gives its unpadded start, at most DECODE_PROMPT tokens."""
    import torch

    from trilora.bench.e2e import DECODE_PROMPT, decode_prompt

    n_real = int(torch.randint(3, 2 * DECODE_PROMPT, ()))
    real = torch.randint(5, 100, (n_real,))
    pad = torch.zeros(7, dtype=torch.long)
    for ids, mask in (
        (torch.cat([pad, real]), torch.cat([torch.zeros(7), torch.ones(n_real)])),
        (torch.cat([real, pad]), torch.cat([torch.ones(n_real), torch.zeros(7)])),
    ):
        got = decode_prompt({"input_ids": ids[None], "attention_mask": mask[None].long()})
        assert torch.equal(got, real[:DECODE_PROMPT][None])
    plain = decode_prompt({"input_ids": real[None]})
    assert torch.equal(plain, real[:DECODE_PROMPT][None])
