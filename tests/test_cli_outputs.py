"""Output safety of `trilora mem`, `trilora kernels` and `trilora bench`: an existing output is
refused unless --overwrite, never an input or the current folder, atomic, and the files get
the umask's permissions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_files import mode, umask

from trilora.cli import main
from trilora.io import UsageError

TINY = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=4096,
)


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return path


# --- trilora mem ---------------------------------------------------------------------


def test_mem_json_refuses_an_existing_file(tmp_path, tiny_config, capsys):
    out = tmp_path / "r.json"
    out.write_text("my results")
    argv = ["mem", str(tiny_config), "--seq-len", "64", "-r", "4", "--json", str(out)]
    assert main(argv) == 2
    assert "--overwrite" in one_error_line(capsys, "trilora mem")
    assert out.read_text() == "my results"
    with umask(0o002):
        assert main([*argv, "--overwrite"]) == 0
    assert json.loads(out.read_text())["reports"][0]["provider"] == "trilora"
    assert mode(out) == 0o664  # was 0600: mkstemp's mode leaked through
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "r.json"]


def test_mem_never_writes_over_its_input(tmp_path, tiny_config, capsys):
    before = tiny_config.read_bytes()
    for flag in (["--json", str(tiny_config)], ["--sweep", "64,128", "--plot", str(tiny_config)]):
        assert main(["mem", str(tiny_config), "--seq-len", "64", *flag, "--overwrite"]) == 2
        assert "holds an input" in one_error_line(capsys, "trilora mem")
    assert tiny_config.read_bytes() == before


@pytest.mark.slow  # our own output rule (~2.5 s, a full mem run); test_mem_json_refuses_an_existing_file checks the same rule
def test_mem_plot_refuses_an_existing_file_and_follows_the_umask(tmp_path, tiny_config, capsys):
    png = tmp_path / "s.png"
    png.write_bytes(b"my picture")
    argv = ["mem", str(tiny_config), "--sweep", "64,128", "--plot", str(png)]
    assert main(argv) == 2
    assert "file exists" in one_error_line(capsys, "trilora mem")
    assert png.read_bytes() == b"my picture"
    with umask(0o002):
        assert main([*argv, "--overwrite"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and mode(png) == 0o664
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "s.png"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--sweep", "64,x"], "comma-separated sequence lengths"),
        (["--budget", "1MiB"], "minimum budget"),
    ],
)
def test_mem_usage_errors_are_one_line(tiny_config, capsys, flags, expected):
    assert main(["mem", str(tiny_config), "--seq-len", "64", *flags]) == 2
    assert expected in one_error_line(capsys, "trilora mem")


def test_mem_missing_config_field_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({k: v for k, v in TINY.items() if k != "hidden_size"}))
    assert main(["mem", str(cfg)]) == 2
    assert "'hidden_size'" in one_error_line(capsys, "trilora mem")


# --- trilora kernels -----------------------------------------------------------------


def _kernels(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = "import sys; from trilora.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "kernels", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.slow  # a real process re-executed without the interpreter (~3 s); our own output rule, as the other tests here
def test_kernels_json_refuses_an_existing_file(tmp_path):
    from trilora.kernels.aot import all_aot_specs

    out = tmp_path / "k.json"
    out.write_text("mine")
    name = all_aot_specs()[0].name
    refused = _kernels("--arch", "90", "--filter", name, "--json", str(out))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"trilora kernels: error: --json {str(out)!r}: the file exists; pass --overwrite to "
        "replace it, or choose another path"
    ]
    assert out.read_text() == "mine"
    written = _kernels("--arch", "90", "--filter", name, "--json", str(out), "--overwrite")
    assert written.returncode == 0, written.stderr
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == [name] and rows[0]["ok"]
    assert mode(out) == 0o666 & ~_current_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json"]


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- trilora bench -------------------------------------------------------------------


def test_bench_refuses_a_folder_that_is_not_a_results_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main(["bench", "--quick", "--level", "mem", "--out", str(out)]) == 2
    assert "not a trilora bench results folder" in one_error_line(capsys, "trilora bench")
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_bench_overwrite_keeps_the_old_folder_when_the_run_fails(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to provoke the --device cuda error")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    argv = ["bench", "--quick", "--level", "mem", "--device", "cuda", "--out", str(out)]
    assert main([*argv, "--overwrite"]) == 2
    assert "torch.cuda.is_available() is False" in one_error_line(capsys, "trilora bench")
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_bench_output_folder_rules(tmp_path, monkeypatch):
    from trilora.bench.cli import is_results_folder, output_folder
    from trilora.bench.harness import CSV_FIELDS

    # new or empty: written in place
    with output_folder(tmp_path / "new", overwrite=False) as out:
        assert out == tmp_path / "new" and out.is_dir()
    # a results folder (CSV with the bench columns, plus anything else) is appended to
    results = tmp_path / "results"
    results.mkdir()
    (results / "results.csv").write_text(",".join(CSV_FIELDS) + "\n")
    (results / "README.md").write_text("notes kept next to the results")
    assert is_results_folder(results)
    with output_folder(results, overwrite=False) as out:
        assert out == results
    # a folder holding only bench outputs (a run that died after caching the peaks)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "device_peaks.json").write_text("{}")
    assert is_results_folder(partial)
    # a CSV of other columns is not a results folder
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.csv").write_text("a,b\n1,2\n")
    assert not is_results_folder(foreign)
    with (
        pytest.raises(UsageError, match="not a trilora bench results folder"),
        output_folder(foreign, overwrite=False),
    ):
        pass
    # --overwrite: built aside and swapped in at the end, old content gone only then
    with output_folder(foreign, overwrite=True) as out:
        assert out != foreign and (foreign / "results.csv").exists()
        (out / "results.csv").write_text("new")
    assert [p.name for p in foreign.iterdir()] == ["results.csv"]
    assert (foreign / "results.csv").read_text() == "new"
    # never the current folder or a parent, even with --overwrite
    monkeypatch.chdir(foreign)
    for path in (foreign, tmp_path):
        with (
            pytest.raises(UsageError, match="current directory"),
            output_folder(path, overwrite=True),
        ):
            pass
    # a file is never a results folder
    (tmp_path / "file").write_text("x")
    with (
        pytest.raises(UsageError, match="not a folder"),
        output_folder(tmp_path / "file", overwrite=True),
    ):
        pass
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_repo_results_folder_is_a_results_folder():
    """README: `trilora bench --out bench/results` appends to the committed results."""
    from trilora.bench.cli import is_results_folder

    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    if not (results / "results.csv").is_file():
        pytest.skip("not run from a source tree")
    assert is_results_folder(results)


def test_an_older_results_csv_is_appended_to_with_the_new_columns(tmp_path):
    import csv
    import random

    from trilora.bench.cli import is_results_folder
    from trilora.bench.harness import CSV_FIELDS, append_csv, read_csv

    # An older release's columns: some of today's left out (never the core ones).
    core = {"run_id", "level", "case", "metric", "provider", "median"}
    dropped = set(random.sample([f for f in CSV_FIELDS if f not in core], 3))
    older = [f for f in CSV_FIELDS if f not in dropped]
    table = tmp_path / "results.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=older, lineterminator="\n")
        writer.writeheader()
        writer.writerow({k: f"old-{k}" for k in older})
    assert is_results_folder(tmp_path)
    append_csv(table, [{k: f"new-{k}" for k in CSV_FIELDS}])
    rows = read_csv(table)
    assert table.read_text().splitlines()[0].split(",") == list(CSV_FIELDS)
    assert [rows[0][k] for k in sorted(dropped)] == ["", "", ""]
    assert rows[0]["case"] == "old-case" and rows[1]["case"] == "new-case"
    # a table with a column the bench never wrote is not ours
    with table.open("w") as f:
        f.write(",".join([*CSV_FIELDS, "mystery"]) + "\n")
    assert not is_results_folder(tmp_path)


def test_bench_files_follow_the_umask(tmp_path):
    from trilora.bench.harness import append_csv, write_json

    with umask(0o002):
        write_json(tmp_path / "runs" / "r.json", {"x": float("nan")})
        append_csv(tmp_path / "results.csv", [])
    assert mode(tmp_path / "runs" / "r.json") == 0o664
    assert mode(tmp_path / "results.csv") == 0o664
