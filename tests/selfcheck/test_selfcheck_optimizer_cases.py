"""The selfcheck's fused-AdamW cases: they run trilora.optim.AdamW's Triton kernels (the
interpreter here), pass on the real kernels and fail on a kernel that is slightly off."""

from __future__ import annotations

from pathlib import Path

import pytest

from trilora.selfcheck import cases
from trilora.selfcheck.units import Context


def _fused_units(tmp_path: Path):
    ctx = Context("cpu", seed=7, out_dir=tmp_path, log=lambda _: None)
    units = [u for u in cases.units(ctx) if u.kernel == "adamw_fused"]
    return ctx, units


def test_one_case_per_state_width_and_all_pass(tmp_path, monkeypatch):
    from trilora.kernels import optim as kernels

    ctx, units = _fused_units(tmp_path)
    assert sorted({u.config for u in units}) == ["32bit", "8bit,blocksize256"]
    launched = []
    for name in ("adamw_step_32bit", "adamw_step_8bit"):
        real = getattr(kernels, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            launched.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    for unit in units:
        res = unit.run(ctx)
        assert res["status"] == "pass", (unit.id, res.get("message"))
        assert res["checks"]
    # 3 parameters x 3 steps per case, through the fused kernels (not the CPU update)
    assert launched.count("adamw_step_32bit") == 2 * 9 and launched.count("adamw_step_8bit") == 9


@pytest.mark.parametrize("bits", [32, 8])
def test_a_kernel_slightly_off_fails(tmp_path, monkeypatch, bits):
    # The kernel's result nudged by 1e-4 per step: 1% of an update of lr = 1e-2.
    from trilora.kernels import optim as kernels

    name = f"adamw_step_{bits}bit"
    real = getattr(kernels, name)

    def off(p, *args, **kwargs):
        real(p, *args, **kwargs)
        p.add_(1e-4)

    monkeypatch.setattr(kernels, name, off)
    ctx, units = _fused_units(tmp_path)
    unit = next(u for u in units if u.config.startswith(f"{bits}bit") and u.dtype == "fp32")
    res = unit.run(ctx)
    assert res["status"] == "fail" and "update-relative" in res["message"]
