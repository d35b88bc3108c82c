"""OpenMP's wait policy (trilora._openmp): trilora's entry points make idle OpenMP threads
sleep instead of spin, before torch loads libgomp, and a user's own setting wins.

What libgomp actually runs with is read from libgomp itself: ``OMP_DISPLAY_ENV=VERBOSE``
makes it print its settings when it loads (when torch is imported), and
``GOMP_SPINCOUNT = '0'`` is what ``OMP_WAIT_POLICY=PASSIVE`` turns into (300000 by
default, 30000000000 under ACTIVE). Each case is a fresh process: the variable only counts
before libgomp loads.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trilora import _openmp

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not torch.backends.openmp.is_available(),
    reason="libgomp (Linux torch wheels) only",
)


def _libgomp_settings(
    argv: list[str], env: dict[str, str] | None = None, status: int | None = None
) -> dict[str, str]:
    """Run ``argv`` with libgomp printing its settings; returns them (name -> value).
    ``status``: the exit status it must end with (any when None)."""
    full = {k: v for k, v in os.environ.items() if k not in _openmp.USER_SETTINGS}
    full.update(env or {}, OMP_DISPLAY_ENV="VERBOSE")
    full.pop("TRILORA_DEBUG", None)
    out = subprocess.run(argv, capture_output=True, text=True, env=full, timeout=300)
    settings = dict(re.findall(r"^\s+(\w+) = '([^']*)'", out.stderr, flags=re.MULTILINE))
    assert "GOMP_SPINCOUNT" in settings, (out.returncode, out.stderr[-2000:])
    assert status is None or out.returncode == status, (out.returncode, out.stderr[-2000:])
    return settings


def _trilora_command() -> list[str]:
    script = Path(sys.executable).with_name("trilora")
    if not script.is_file():
        pytest.skip(f"the trilora console script is not installed beside {sys.executable}")
    # Any command that gets as far as importing torch; this one (~2 s of CPU) then finds no
    # kernel config to compile.
    return [str(script), "kernels", "--filter", "no-such-kernel"]


def test_cli_sets_passive_before_torch_loads():
    settings = _libgomp_settings(_trilora_command())
    assert settings["OMP_WAIT_POLICY"] == "PASSIVE"
    assert settings["GOMP_SPINCOUNT"] == "0"


@pytest.mark.parametrize(
    "user, expected",
    [
        ({"OMP_WAIT_POLICY": "ACTIVE"}, ("ACTIVE", "30000000000")),
        ({"GOMP_SPINCOUNT": "12345"}, (None, "12345")),
    ],
)
@pytest.mark.slow  # real processes (~3 s of CPU each); the same libgomp settings as test_cli_sets_passive_before_torch_loads
def test_cli_leaves_a_users_setting_alone(user, expected):
    settings = _libgomp_settings(_trilora_command(), user)
    policy, spin = expected
    assert settings["GOMP_SPINCOUNT"] == spin
    if policy is not None:
        assert settings["OMP_WAIT_POLICY"] == policy


@pytest.mark.slow  # a real process; the same libgomp settings as test_cli_sets_passive_before_torch_loads
def test_launcher_entry_point_sets_passive():
    # What torchrun and accelerate launch start: `python -m trilora.train ...`
    argv = [
        sys.executable,
        "-m",
        "trilora.train",
        "--model",
        "/nonexistent-model-folder",
        "--data",
        "/nonexistent.jsonl",
        "--out",
        "/nonexistent-out",
        # The launch check imports torch, then finds no GPU (the paths are checked later,
        # by each worker, without torch).
        "--nproc",
        "2",
        "--device",
        "cuda",
    ]
    assert _libgomp_settings(argv)["GOMP_SPINCOUNT"] == "0"


@pytest.mark.slow  # a real process; the same libgomp settings as test_cli_sets_passive_before_torch_loads
def test_import_trilora_before_torch_sets_passive():
    code = "import trilora, torch"
    assert _libgomp_settings([sys.executable, "-c", code], status=0)["GOMP_SPINCOUNT"] == "0"


@pytest.mark.slow  # a real process; the same libgomp settings as test_cli_sets_passive_before_torch_loads
def test_import_after_torch_changes_nothing():
    # Too late for this process; setting it would only surprise its children.
    code = (
        "import os, torch, trilora, sys\n"
        "from trilora import _openmp\n"
        "sys.exit(0 if 'OMP_WAIT_POLICY' not in os.environ and not _openmp.set_by_trilora()"
        " else 3)"
    )
    settings = _libgomp_settings([sys.executable, "-c", code], status=0)
    assert settings["GOMP_SPINCOUNT"] == "300000"


def test_user_environment_removes_only_what_trilora_added(monkeypatch):
    env = {"PATH": "/bin"}
    assert _openmp.prefer_passive_wait(env) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    for name, value in (("OMP_WAIT_POLICY", "active"), ("GOMP_SPINCOUNT", "")):
        user = {name: value}
        assert not _openmp.prefer_passive_wait(user) and user == {name: value}
    # This process imported torch before trilora (conftest), so trilora set nothing here.
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert not _openmp.prefer_passive_wait()
    assert _openmp.user_environment()["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setattr(_openmp, "_set_by_trilora", True)
    assert "OMP_WAIT_POLICY" not in _openmp.user_environment()
