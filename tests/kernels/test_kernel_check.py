"""``trilora kernels``: ahead-of-time compile checks for sm_80/sm_90 (no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trilora.kernels.aot import AotSpec, all_aot_specs

# A representative subset: one config of every kernel family, both absmax kinds, both
# activation dtypes, and every 16-bit quantize config (under triton 3.6 they once kept a
# 64-byte stack frame at every blocksize where fp32 inputs did not). The full set
# (`trilora kernels`, ~220 compiles) is a CI job of its own.
FILTERS = (
    "bf16,lora-bf16,dq,BM128",
    "fp16,lora-fp16,fp32abs,BM64,BN64,BK32,R128",
    "_kernel[fp16",
    "_quantize_4bit_kernel[bf16",
)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


@pytest.mark.parametrize("filt", FILTERS)
def test_aot_subset_compiles_without_spills(filt):
    expected = [s.name for s in all_aot_specs() if filt in s.name]
    assert expected, filt
    proc = subprocess.run(
        [sys.executable, "-m", "trilora.kernel_check", "--arch", "80", "90", "--filter", filt],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in expected:
        kernel, _, config = name.partition("[")
        # exact columns: "fp16,bs4096" must not also count the "fp16,bs4096,partial" rows
        rows = [
            line for line in proc.stdout.splitlines() if line.split()[:2] == [kernel, config[:-1]]
        ]
        assert len(rows) == 2, (name, proc.stdout)  # one row per arch


def test_every_kernel_has_specs():
    """Every ``_*_kernel`` of every registered kernel module ships AOT specs."""
    import importlib

    from trilora.kernels.aot import KERNEL_MODULES

    defined = set()
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"trilora.kernels.{module_name}")
        defined |= {n for n in vars(module) if n.startswith("_") and n.endswith("_kernel")}
    names = {s.name.partition("[")[0] for s in all_aot_specs()}
    assert len(defined) >= 8
    assert names == defined


_OVERSIZED = r"""
import sys
from trilora.kernel_check import check_spec
from trilora.kernels.aot import AotSpec
from trilora.kernels.quantize import AOT_SPECS

base = next(s for s in AOT_SPECS if s.name.startswith("_dequantize_4bit_kernel"))
spec = AotSpec("oversized", base.fn, base.signature, {**base.constexprs, "PAIRS": 1 << 12},
               {**base.options, "num_warps": 1})
r = check_spec(spec, int(sys.argv[1]))
print(r.ok, r.registers, r.spill_bytes, r.shared_bytes, r.error)
sys.exit(0 if not r.ok else 3)
"""


def test_oversized_config_is_reported():
    # 4096 bytes per program on one warp: 256 values per thread cannot fit in registers
    # (measured: 255 registers and 1360 spilled bytes on sm_90), and it compiles in seconds.
    proc = subprocess.run(
        [sys.executable, "-c", _OVERSIZED, "90"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("False")


def test_refuses_interpreter_in_process(monkeypatch):
    from trilora.kernel_check import check_spec

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = all_aot_specs()[0]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        check_spec(AotSpec(spec.name, spec.fn, spec.signature, spec.constexprs), 90)
