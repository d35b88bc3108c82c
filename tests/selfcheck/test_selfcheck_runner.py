"""The selfcheck runner: failures are named and contained, budgets stop sections, crashes
and hangs of a worker process are survived, outputs are written atomically."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from trilora.selfcheck import cases, runner
from trilora.selfcheck.report import render
from trilora.selfcheck.runner import RunOptions, plan_deadlines, run_section, run_selfcheck
from trilora.selfcheck.units import Unit, check, verdict_of_checks

INJECT = Path(__file__).with_name("inject_worker.py")


def _small_real(shapes):
    """Two real cases that run in a fraction of a second under the interpreter."""
    return [u for u in cases.quantize_cases(shapes) if u.shape == "33x96"]


def _sections(results_dir: Path) -> dict[str, dict]:
    data = json.loads((results_dir / "results.json").read_text())
    return {s["name"]: s for s in data["sections"]}


def test_deadlines_are_cumulative_shares_of_the_budget():
    opts = RunOptions(gpu=True, out=Path("."), budget_s=420)
    d = plan_deadlines(opts, start=1000.0)
    assert list(d) == ["environment", "correctness", "speed", "memory", "e2e"]
    assert d["e2e"][1] == pytest.approx(1420.0)
    assert sum(share for share, _ in d.values()) == pytest.approx(420.0)
    deadlines = [dl for _, dl in d.values()]
    assert deadlines == sorted(deadlines)
    # On the CPU the GPU-only sections are dropped and the rest share the whole budget.
    cpu = plan_deadlines(RunOptions(gpu=False, out=Path("."), budget_s=100), start=0.0)
    assert list(cpu) == ["environment", "correctness"]
    assert cpu["correctness"][1] == pytest.approx(100.0)


@pytest.mark.slow  # our own runner (~3 s of CPU); a section's cases: test_selfcheck_sections.py
def test_a_broken_case_is_named_and_the_next_section_still_runs(tmp_path, monkeypatch, seed):
    def broken(shapes):
        wrong = Unit(
            "wrong",
            lambda ctx: verdict_of_checks([check("y", 0.5, 4e-3)]),
            kernel="qlora_linear.tiled",
            config="deliberately-wrong",
            shape="M=20 N=24 K=64",
            dtype="fp16",
        )

        def boom(ctx):
            raise ValueError("kernel exploded")

        raising = Unit(
            "raising",
            boom,
            kernel="rms_norm",
            config="deliberately-raising",
            shape="M=3 H=576",
            dtype="bf16",
        )
        return [wrong, raising]

    monkeypatch.setattr(cases, "FAMILIES", (broken, _small_real))
    # Make a section after correctness runnable on the CPU: e2e's CPU plan, a few steps of
    # a tiny model (the cheapest; each section's CPU plan is test_selfcheck_sections.py's).
    monkeypatch.setattr(runner, "GPU_ONLY", ())
    opts = RunOptions(
        gpu=False,
        out=tmp_path,
        budget_s=600,
        seed=seed,
        sections=("correctness", "e2e"),
        isolate=False,
    )
    status = run_selfcheck(opts, log=lambda line: None)
    assert status == 1
    sections = _sections(tmp_path)
    corr = sections["correctness"]
    assert corr["status"] == "fail"
    by_id = {u["id"]: u for u in corr["units"]}
    assert (
        by_id["wrong"]["status"] == "fail"
        and "y error 0.5 > tol 0.004" in by_id["wrong"]["message"]
    )
    assert by_id["raising"]["status"] == "error"
    assert "ValueError: kernel exploded" in by_id["raising"]["message"]
    # The real cases listed with them still ran.
    real = [u["status"] for u in corr["units"] if u["kernel"].endswith("quantize_4bit")]
    assert real == ["pass", "pass"]
    # The verdict names kernel, config, shape, dtype and error of the first failure (bf16
    # cases run first); the report's failure table lists every one.
    for part in (
        "2 of 4",
        "rms_norm",
        "deliberately-raising",
        "M=3 H=576",
        "bf16",
        "kernel exploded",
    ):
        assert part in corr["verdict"], corr["verdict"]
    report = (tmp_path / "report.md").read_text()
    failures = report.split("### Failures")[1].split("###")[0]
    assert (
        "| qlora_linear.tiled | deliberately-wrong | M=20 N=24 K=64 | fp16 | fail | y error 0.5"
        in failures
    )
    assert "| rms_norm | deliberately-raising | M=3 H=576 | bf16 | error | ValueError" in failures
    # The next section ran: its measurements are recorded.
    e2e = sections["e2e"]
    ran = [u for u in e2e["units"] if u["status"] != "skipped"]
    assert ran and all(u["status"] == "pass" and u["rows"] for u in ran)
    # the MoE step is GPU only (tests/bench runs its level on the CPU)
    assert [u["status"] for u in e2e["units"] if u["kernel"] == "MoE training step"] == ["skipped"]
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["exit_status"] == 1
    assert (tmp_path / "results.csv").read_text().startswith("run_id,")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("report.md", "results.json", "results.csv"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~mask, name


def test_the_budget_stops_a_section_and_the_next_one_runs(tmp_path, monkeypatch, seed):
    ran = []

    def slow(shapes):
        def overrun(ctx):
            ran.append("overrun")
            time.sleep(max(0.0, ctx.deadline - time.time()) + 0.2)
            return {"status": "pass"}

        def quick(ctx):
            ran.append("quick")
            return {"status": "pass"}

        return [
            Unit("overrun", overrun, kernel="slow", dtype="bf16"),
            Unit("after-1", quick, kernel="quick", dtype="bf16"),
            Unit("after-2", quick, kernel="quick", dtype="bf16"),
        ]

    monkeypatch.setattr(cases, "FAMILIES", (slow,))
    monkeypatch.setattr(runner, "GPU_ONLY", ())
    opts = RunOptions(
        gpu=False,
        out=tmp_path,
        budget_s=200,
        seed=seed,
        isolate=False,
        sections=("correctness", "e2e"),
        shares={"correctness": 0.02, "e2e": 0.98},
    )
    assert run_selfcheck(opts, log=lambda line: None) == 0  # out of time is not a failure
    sections = _sections(tmp_path)
    statuses = [u["status"] for u in sections["correctness"]["units"]]
    assert statuses == ["pass", "budget", "budget"] and ran == ["overrun"]
    assert sections["correctness"]["status"] == "incomplete"
    assert "2 of 3 units not run (out of time)" in sections["correctness"]["verdict"]
    assert sections["e2e"]["units"] and sections["e2e"]["status"] != "incomplete"


def test_a_unit_that_needs_more_time_than_is_left_is_not_started(tmp_path, monkeypatch, seed):
    def family(shapes):
        big = Unit("big", lambda ctx: pytest.fail("must not start"), kernel="big", min_s=1e6)
        small = Unit("small", lambda ctx: {"status": "pass"}, kernel="small")
        return [big, small]

    monkeypatch.setattr(cases, "FAMILIES", (family,))
    opts = RunOptions(
        gpu=False, out=tmp_path, budget_s=600, seed=seed, sections=("correctness",), isolate=False
    )
    run_selfcheck(opts, log=lambda line: None)
    units = _sections(tmp_path)["correctness"]["units"]
    assert [u["status"] for u in units] == ["budget", "pass"]
    assert "needs about 1000000 s" in units[0]["message"]


def _worker_opts(tmp_path: Path, kind: str, seed: int, **kw) -> RunOptions:
    return RunOptions(
        gpu=False,
        out=tmp_path,
        seed=seed,
        worker_cmd=(sys.executable, str(INJECT), kind, "--"),
        **kw,
    )


# The worker-process tests start real processes (~5 s of CPU each, importing torch and
# triton) to check our own process handling; the lanes without slow tests run the same
# section code in-process (the tests above).
@pytest.mark.slow  # our own process handling (see above)
def test_a_crashing_unit_is_recorded_and_the_worker_restarted(tmp_path, seed):
    lines = []
    record = run_section(
        _worker_opts(tmp_path, "crash", seed), "correctness", time.time() + 300, lines.append
    )
    units = {u["id"]: u for u in record["units"]}
    crashed = units["injected crash"]
    assert crashed["status"] == "crashed"
    assert "SIGSEGV" in crashed["message"] and crashed["kernel"] == "qlora_linear.tiled"
    assert record["restarts"] == 1
    rest = [u["status"] for uid, u in units.items() if uid != "injected crash"]
    assert rest == ["pass", "pass"]
    assert any("restarting" in line for line in lines)


@pytest.mark.slow  # our own process handling (see above); also waits 25 s for its deadline
def test_a_hanging_unit_is_stopped_at_the_deadline(tmp_path, seed):
    opts = _worker_opts(tmp_path, "hang", seed, grace_s=1.0)
    start = time.time()
    record = run_section(opts, "correctness", start + 25, lambda line: None)
    elapsed = time.time() - start
    assert elapsed < 25 + 1 + 16  # deadline + grace + at most the kill's own waits
    units = {u["id"]: u for u in record["units"]}
    assert units["injected hang"]["status"] == "budget"
    assert "ran out while this unit ran" in units["injected hang"]["message"]
    assert all(u["status"] == "budget" for u in units.values())


def test_outputs_are_written_atomically_with_the_umask(tmp_path, monkeypatch):
    results = {"meta": {"start_time": time.time(), "run_id": "r", "command": "x"}, "sections": []}
    runner.write_outputs(tmp_path, results)
    before = (tmp_path / "report.md").read_text()
    mode = stat.S_IMODE(os.stat(tmp_path / "report.md").st_mode)
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o666 & ~mask

    def broken_render(results):
        raise RuntimeError("render failed")

    monkeypatch.setattr(runner, "render", broken_render)
    results["sections"].append({"name": "environment", "units": []})
    with pytest.raises(RuntimeError):
        runner.write_outputs(tmp_path, results)
    # The old report is intact and no temporary file is left behind.
    assert (tmp_path / "report.md").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]
    assert render(json.loads((tmp_path / "results.json").read_text()))
