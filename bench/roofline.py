"""The device's speed-of-light: measured memory bandwidth and matmul rate.

The first run on a device measures both (a large device-to-device copy; a large bf16 matmul,
fp32 on a CPU, where bf16 matmuls are not the fast path) and caches them in
``<out>/device_peaks.json`` keyed by device name, so later runs reuse them. Each kernel case
then reports its analytical floor, ``max(bytes / bandwidth, flops / matmul_rate)``, and the
fraction of that floor the measured median achieves.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trilora.bench.harness import atomic_write_text, synchronize

PEAKS_FILE = "device_peaks.json"


@dataclass(frozen=True)
class DevicePeaks:
    """Measured rates of one device: bytes/s and FLOP/s (in ``matmul_dtype``)."""

    device: str
    bandwidth: float
    matmul_rate: float
    matmul_dtype: str
    copy_bytes: int
    matmul_size: int

    def floor_s(self, bytes_moved: float, flops: float) -> float:
        """Seconds a perfect kernel would need: the slower of moving the bytes and doing the FLOPs."""
        return max(bytes_moved / self.bandwidth, flops / self.matmul_rate)


def _matmul_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _best_time(
    fn, device: torch.device, budget_s: float, warmup: int = 2, max_repeats: int = 30
) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    best = float("inf")
    start = time.perf_counter()
    for i in range(max_repeats):
        t = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return best


def measure_peaks(device: torch.device, name: str, quick: bool = False) -> DevicePeaks:
    """Measure copy bandwidth and matmul rate on ``device`` (a few seconds)."""
    if device.type == "cuda":
        copy_bytes, size = (1 << 30), 8192
    else:
        # Large enough to spill out of a CPU's last-level cache, small enough to stay quick.
        copy_bytes, size = (256 << 20), 2048
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    # A copy reads and writes every byte. The best repeat, not the median, is the peak: on a
    # shared machine the slower repeats measure the neighbours, not the hardware.
    bandwidth = 2 * copy_bytes / _best_time(lambda: dst.copy_(src), device, budget_s=2.0)
    src = dst = None
    dtype = _matmul_dtype(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    matmul_time = _best_time(lambda: torch.mm(a, b, out=out), device, budget_s=3.0)
    synchronize(device)
    return DevicePeaks(
        device=name,
        bandwidth=bandwidth,
        matmul_rate=2 * size**3 / matmul_time,
        matmul_dtype=str(dtype).removeprefix("torch."),
        copy_bytes=copy_bytes,
        matmul_size=size,
    )


def load_or_measure(
    out_dir: Path, device: torch.device, name: str, quick: bool = False
) -> tuple[DevicePeaks, bool]:
    """Cached peaks for ``name`` from ``out_dir/device_peaks.json``, or measure and cache them.

    Returns ``(peaks, measured_now)``.
    """
    path = Path(out_dir) / PEAKS_FILE
    cache: dict = {}
    if path.exists():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
        entry = cache.get(name)
        if isinstance(entry, dict):
            try:
                return DevicePeaks(**entry), False
            except TypeError:
                pass  # stale format: measure again
    peaks = measure_peaks(device, name, quick)
    cache[name] = asdict(peaks)
    atomic_write_text(path, json.dumps(cache, indent=1) + "\n")
    return peaks, True
