"""Environment section: the device, driver, CUDA and library versions the run used.

One unit. Its ``info`` holds ``trilora.bench.harness.environment`` (device, driver, CUDA,
torch, triton, bitsandbytes, peft, transformers, trilora, git commit, host CPU) plus the
compute capability, device memory and SM count, the Python version, whether the Triton
interpreter is on, and trilora's dispatch settings (``trilora.config``). A missing
bitsandbytes is reported with its import error: the baselines of later sections are
skipped without it.
"""

from __future__ import annotations

import os
import platform
from typing import Any

from trilora.selfcheck.units import Context, Unit


def _collect(ctx: Context) -> dict[str, Any]:
    import torch

    from trilora.bench.harness import environment
    from trilora.config import config

    if ctx.gpu and not torch.cuda.is_available():
        return {
            "status": "error",
            "message": "--gpu was given but torch.cuda.is_available() is False",
        }
    device = torch.device(ctx.device)
    info: dict[str, Any] = dict(environment(device))
    info.update(
        python=platform.python_version(),
        triton_interpreter=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        trilora_backend=config.backend,
        fused_max_tokens=config.fused_max_tokens,
        seed=ctx.seed,
    )
    if ctx.gpu:
        props = torch.cuda.get_device_properties(device)
        info.update(
            capability=f"sm_{props.major}{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            sms=props.multi_processor_count,
            device_count=torch.cuda.device_count(),
            flash_sdp=bool(torch.backends.cuda.flash_sdp_enabled()),
        )
    try:
        import bitsandbytes

        info["bitsandbytes_status"] = f"imports ({bitsandbytes.__version__})"
    except Exception as exc:
        info["bitsandbytes_status"] = f"not importable ({type(exc).__name__}: {exc})"[:300]
    return {"status": "pass", "info": info}


def units(ctx: Context) -> list[Unit]:
    return [Unit("environment", _collect, kernel="environment")]


__all__ = ["units"]
