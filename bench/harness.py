"""The measurement harness shared by every benchmark level.

* :func:`measure` times a callable: CUDA events after warm-up on a GPU, ``time.perf_counter``
  on a CPU, and returns the median, 20th and 80th percentiles of many repeats. The callable
  receives the repeat index so that it can rotate through several input sets (small shapes
  would otherwise run from a warm cache and look faster than they are).
* :func:`guarded` runs one case and turns an out-of-memory error into an ``oom`` row and any
  other exception into an ``error`` row, so one bad case never stops the suite.
* :func:`provider_status` says whether a provider's packages import; a missing baseline is
  skipped with a note instead of crashing.
* :func:`write_json` and :func:`append_csv` write atomically (temp file + rename), so an
  interrupted run never leaves a truncated results file behind.

Every result is one row with the fixed columns :data:`CSV_FIELDS`.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import importlib
import io
import json
import math
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trilora.ops import cpu_matmul

# --- schema -----------------------------------------------------------------------------

ENV_FIELDS = (
    "device",
    "device_type",
    "driver",
    "cuda",
    "torch",
    "triton",
    "bitsandbytes",
    "peft",
    "transformers",
    "trilora",
    "git_commit",
    "host_cpu",
    "cpu_isa",
)
"""Environment columns recorded with every row (see :func:`environment`)."""

CSV_FIELDS = (
    "run_id",
    "timestamp",
    "level",
    "case",
    "metric",
    "provider",
    "status",
    "unit",
    "median",
    "p20",
    "p80",
    "repeats",
    "floor",
    "floor_frac",
    "speedup_vs_bnb_peft",
    "ratio_vs_bf16_peft",
    "model",
    "layer",
    "n_out",
    "k_in",
    "rank",
    "tokens",
    "batch",
    "seq_len",
    "dtype",
    "quick",
    "note",
    *ENV_FIELDS,
)
"""The fixed CSV schema: one row per (case, metric, provider). Documented in docs/bench.md."""

STATUSES = ("ok", "oom", "error", "skipped")

PROVIDERS = ("trilora", "bnb_peft", "bf16_peft")
"""trilora; bitsandbytes Linear4bit + PEFT LoRA; float nn.Linear + PEFT LoRA (speed of light)."""

PROVIDER_PACKAGES: dict[str, tuple[str, ...]] = {
    "trilora": (),
    "bnb_peft": ("bitsandbytes", "peft"),
    "bf16_peft": ("peft",),
}


def provider_status(provider: str, disabled: Iterable[str] = ()) -> tuple[bool, str]:
    """Whether ``provider`` can run here, and if not, why.

    A provider is unavailable when it is named in ``disabled`` (``--skip-provider``) or when
    one of its packages fails to import. The import is real: a package hidden from
    ``sys.modules`` or absent from the environment fails here exactly as it would in the
    provider itself.
    """
    if provider not in PROVIDER_PACKAGES:
        raise ValueError(
            f"unknown provider {provider!r}; valid providers: {list(PROVIDER_PACKAGES)}"
        )
    if provider in set(disabled):
        return False, f"{provider} skipped: disabled with --skip-provider"
    for package in PROVIDER_PACKAGES[provider]:
        try:
            importlib.import_module(package)
        except Exception as exc:  # ImportError, or a broken install raising anything else
            from trilora.io import install_hint

            return (
                False,
                f"{provider} skipped: cannot import {package} ({type(exc).__name__}: {exc}); "
                f"to run it: {install_hint(package)}",
            )
    return True, ""


# --- statistics -------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings or values (seconds for times)."""

    median: float
    p20: float
    p80: float
    repeats: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        """Median and 20th/80th percentiles (linear interpolation) of ``samples``."""
        if not samples:
            raise ValueError("Stats.of needs at least one sample")
        return cls(
            percentile(samples, 50), percentile(samples, 20), percentile(samples, 80), len(samples)
        )


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples`` with linear interpolation."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(float(s) for s in samples)
    if not xs:
        raise ValueError("percentile of an empty sequence")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# --- devices, memory --------------------------------------------------------------------


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory window.

    CUDA: ``torch.cuda.reset_peak_memory_stats``. CPU (Linux): writing ``5`` to
    ``/proc/self/clear_refs`` resets the process's RSS high-water mark (``VmHWM``).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device) -> float | None:
    """Peak bytes since :func:`reset_peak_memory`: ``max_memory_allocated`` on CUDA, the RSS
    high-water mark of the whole process on CPU (None where ``/proc`` is unavailable)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache that small benchmark shapes could run from."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("K")) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 32 << 20


# --- timing -----------------------------------------------------------------------------


def measure(
    fn: Callable[[int], object],
    device: torch.device,
    *,
    warmup: int = 3,
    repeats: int = 50,
    min_repeats: int = 5,
    budget_s: float | None = None,
) -> Stats:
    """Time ``fn(i)`` for ``i = 0, 1, ...`` and summarize.

    Args:
        fn: one call of the thing measured; ``i`` lets it rotate through input sets.
        device: CUDA uses CUDA events (recorded around each call, read after one final
            synchronize) after ``warmup`` calls; CPU uses ``time.perf_counter``.
        warmup: untimed calls first (autotuning, allocator warm-up, lazy init).
        repeats: timed calls at most.
        min_repeats: timed calls at least, whatever the budget.
        budget_s: stop adding repeats once the estimated total passes this many seconds
            (keeps large shapes on a CPU inside a time limit).

    Returns:
        Stats in seconds.
    """
    if repeats < 1 or min_repeats < 1 or warmup < 0:
        raise ValueError(
            f"need repeats >= 1, min_repeats >= 1, warmup >= 0; got {repeats}, {min_repeats}, {warmup}"
        )
    t0 = time.perf_counter()
    for i in range(warmup):
        fn(i)
    synchronize(device)
    per_call = (time.perf_counter() - t0) / max(warmup, 1)
    n = repeats
    if budget_s is not None and per_call > 0:
        n = max(min_repeats, min(repeats, int(budget_s / per_call)))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            starts[i].record()
            fn(warmup + i)
            ends[i].record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        samples = []
        for i in range(n):
            t = time.perf_counter()
            fn(warmup + i)
            samples.append(time.perf_counter() - t)
    return Stats.of(samples)


def measure_interleaved(
    fns: dict[str, Callable[[int], object]],
    device: torch.device,
    *,
    warmup: int = 3,
    repeats: int = 50,
    min_repeats: int = 5,
    budget_s: float | None = None,
    rounds: int = 5,
) -> dict[str, Stats]:
    """Time several callables that are to be compared, interleaved in ``rounds``.

    Each round times a slice of every callable's repeats, in a rotating order, so that a
    change in machine load during the run (other processes, clock boosts, thermal limits)
    falls on all of them alike and their ratios stay meaningful. Arguments as in
    :func:`measure`; ``budget_s`` is per callable.
    """
    if not fns:
        return {}
    if repeats < 1 or min_repeats < 1 or warmup < 0 or rounds < 1:
        raise ValueError(
            f"need repeats >= 1, min_repeats >= 1, warmup >= 0, rounds >= 1; got {repeats}, {min_repeats}, {warmup}, {rounds}"
        )
    names = list(fns)
    counts: dict[str, int] = {}
    for name in names:
        t0 = time.perf_counter()
        for i in range(warmup):
            fns[name](i)
        synchronize(device)
        per_call = (time.perf_counter() - t0) / max(warmup, 1)
        n = repeats
        if budget_s is not None and per_call > 0:
            n = max(min_repeats, min(repeats, int(budget_s / per_call)))
        counts[name] = n
    samples: dict[str, list[float]] = {name: [] for name in names}
    done = dict.fromkeys(names, 0)
    for rnd in range(rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            target = math.ceil(counts[name] * (rnd + 1) / rounds)
            chunk = range(done[name], target)
            if not chunk:
                continue
            fn = fns[name]
            if device.type == "cuda":
                events = [
                    (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                    for _ in chunk
                ]
                for (start, end), i in zip(events, chunk):
                    start.record()
                    fn(warmup + i)
                    end.record()
                torch.cuda.synchronize(device)
                samples[name].extend(s.elapsed_time(e) / 1e3 for s, e in events)
            else:
                for i in chunk:
                    t = time.perf_counter()
                    fn(warmup + i)
                    samples[name].append(time.perf_counter() - t)
            done[name] = target
    return {name: Stats.of(samples[name]) for name in names}


# --- failures ---------------------------------------------------------------------------

_OOM_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "not enough memory",
)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error: ``torch.cuda.OutOfMemoryError``,
    ``MemoryError``, or a RuntimeError from an allocator that ran out (CPU or GPU)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(
        torch.cuda, "OutOfMemoryError", None
    )
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


@dataclass
class Outcome:
    """What :func:`guarded` observed: ``status`` is ``ok``, ``oom`` or ``error``."""

    status: str
    value: Any = None
    note: str = ""


def guarded(fn: Callable[[], Any], device: torch.device | None = None) -> Outcome:
    """Run ``fn()``; an OOM becomes ``Outcome("oom")``, any other exception ``Outcome("error")``
    with the exception in the note. KeyboardInterrupt and SystemExit still propagate."""
    try:
        return Outcome("ok", fn())
    except Exception as exc:
        oom = is_oom(exc)
        note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if not oom:
            tb = traceback.extract_tb(exc.__traceback__)
            if tb:
                note += f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})"
        # Free what the failed case held before the next one starts.
        exc.__traceback__ = None
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()
        return Outcome("oom" if oom else "error", None, note)


# --- environment ------------------------------------------------------------------------


def _version(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "unknown"))
    except Exception:
        return "not installed"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features the CPU paths' speed depends on (bf16 and int8 matrix units, vector width):
# the same case can differ by 2x between an AVX2 machine and one with AMX.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_isa() -> str:
    """The CPU's relevant ISA flags (Linux ``/proc/cpuinfo``), the vector level torch's CPU
    kernels use and the dtype trilora multiplies bf16 in there, e.g.
    ``"avx2 fma (torch: AVX2; bf16 products in fp32)"``."""
    flags = cpu_matmul.cpu_flags()
    have = [f for f in _ISA_FLAGS if f in flags] or ["unknown"]
    torch_level = torch.backends.cpu.get_cpu_capability()
    bf16 = str(cpu_matmul.product_dtype(torch.bfloat16)).removeprefix("torch.")
    bf16 = bf16.replace("float32", "fp32").replace("bfloat16", "bf16")
    return f"{' '.join(have)} (torch: {torch_level}; bf16 products in {bf16})"


def environment(device: torch.device) -> dict[str, str]:
    """The :data:`ENV_FIELDS` for ``device``: device name, driver, CUDA, library versions."""
    cpu = f"{_cpu_name()} ({os.cpu_count()} cores)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        driver = ""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            driver = (
                out.stdout.strip().splitlines()[0]
                if out.returncode == 0 and out.stdout.strip()
                else ""
            )
        cuda = str(torch.version.cuda)
    else:
        name, driver, cuda = cpu, "", ""
    return {
        "device": name,
        "device_type": device.type,
        "driver": driver,
        "cuda": cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "bitsandbytes": _version("bitsandbytes"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "trilora": _version("trilora"),
        "git_commit": _git_commit(),
        "host_cpu": cpu,
        "cpu_isa": cpu_isa(),
    }


# --- rows -------------------------------------------------------------------------------


def make_row(
    level: str,
    case: str,
    metric: str,
    provider: str,
    unit: str,
    stats: Stats | None = None,
    *,
    status: str = "ok",
    note: str = "",
    **params: Any,
) -> dict[str, Any]:
    """One result row. ``params`` fill the descriptive columns (``model``, ``layer``, ...);
    the run-wide columns (``run_id``, environment) are filled by :func:`finalize_rows`."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    unknown = set(params) - set(CSV_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown row field(s) {sorted(unknown)}; the schema has {list(CSV_FIELDS)}"
        )
    row: dict[str, Any] = dict.fromkeys(CSV_FIELDS, "")
    row.update(
        level=level,
        case=case,
        metric=metric,
        provider=provider,
        unit=unit,
        status=status,
        note=note,
    )
    if stats is not None:
        row.update(median=stats.median, p20=stats.p20, p80=stats.p80, repeats=stats.repeats)
    row.update(params)
    return row


def finalize_rows(
    rows: list[dict[str, Any]], run_id: str, env: dict[str, str], quick: bool
) -> None:
    """Stamp run-wide columns on every row (in place)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for row in rows:
        row.update(env)
        row.setdefault("timestamp", "")
        row["run_id"] = run_id
        row["timestamp"] = row["timestamp"] or stamp
        row["quick"] = int(quick)


def new_run_id() -> str:
    """A sortable id for one ``trilora bench`` invocation."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"


def bad_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that failed (status ``error``) or hold a non-finite number while ``ok``."""
    out = []
    for row in rows:
        if row["status"] == "error":
            out.append(row)
            continue
        if row["status"] != "ok":
            continue
        for key in ("median", "p20", "p80"):
            value = row.get(key, "")
            if value == "" or value is None:
                if key == "median":
                    out.append(row)
                    break
                continue
            if not math.isfinite(float(value)):
                out.append(row)
                break
    return out


# --- atomic output ----------------------------------------------------------------------


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same directory and a rename,
    so readers see either the old file or the complete new one (:mod:`trilora.io`; the
    file gets the umask's permissions)."""
    from trilora.io import atomic_write_text as write

    write(path, text)


def write_json(path: Path | str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (non-finite floats become ``null``)."""
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=1, sort_keys=False) + "\n")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


_CORE_FIELDS = frozenset({"run_id", "level", "case", "metric", "provider", "median"})


def is_bench_header(header: Iterable[str]) -> bool:
    """Whether a CSV header is the bench schema's, today's or an older release's: the core
    columns, and no column the bench never wrote (older files lack the newer columns)."""
    names = set(header)
    return _CORE_FIELDS <= names <= set(CSV_FIELDS)


def read_csv(path: Path | str) -> list[dict[str, str]]:
    """Rows of a results CSV, each with every :data:`CSV_FIELDS` key (columns an older
    release did not write are empty); raises ValueError when the header is not a bench one."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = tuple(reader.fieldnames or ())
        if not is_bench_header(header):
            raise ValueError(
                f"{path} has columns {list(header)}, expected the trilora bench schema "
                f"{list(CSV_FIELDS)}; move it aside or pass another --out"
            )
        return [{k: row.get(k) or "" for k in CSV_FIELDS} for row in reader]


def append_csv(path: Path | str, rows: Iterable[dict[str, Any]]) -> None:
    """Append ``rows`` to the CSV at ``path`` (created with the :data:`CSV_FIELDS` header).

    The whole new file is written to a temp file and renamed over the old one, so an
    interruption leaves the previous complete file, never a half-written row.
    """
    path = Path(path)
    old = read_csv(path) if path.exists() else []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    writer.writerows(old)
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k, "")) for k in CSV_FIELDS})
    atomic_write_text(path, buf.getvalue())


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return value


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch (CPU and CUDA) for a block, restoring the CPU RNG state afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def train_interleaved(available, load, trainers, total, device, errors, log) -> list[str]:
    """Load each provider (``load(p)`` fills ``trainers[p]``), then run ``total`` training
    steps of every loaded one interleaved step by step, rotating the order each step so
    neither always runs first. Failures go to ``errors[p] = (status, note)``; a provider
    that failed stops. Returns the providers that loaded."""
    for provider in available:
        log(f"  loading {provider}")
        out = guarded(lambda p=provider: load(p), device)
        if out.status != "ok":
            errors[provider] = (out.status, f"loading failed: {out.note}")
    live = [p for p in available if p in trainers]
    for i in range(total):
        order = live[i % len(live) :] + live[: i % len(live)] if live else []
        for provider in order:
            if provider in errors:
                continue
            out = guarded(lambda p=provider, i=i: trainers[p].step(i, device), device)
            if out.status != "ok":
                errors[provider] = (out.status, f"training step {i} failed: {out.note}")
        log(
            f"  step {i + 1}/{total}: "
            + ", ".join(f"{p} {trainers[p].times[-1]:.3f}s" for p in live if p not in errors)
        )
    return live


def loss_final_row(level: str, case: str, provider: str, losses: list[float], **params) -> dict:
    """The ``loss_final`` row of a training run: its last loss, noting the first."""
    final = losses[-1]
    return make_row(
        level,
        case,
        "loss_final",
        provider,
        "loss",
        Stats(final, final, final, 1),
        note=f"loss after {len(losses)} steps (first {losses[0]:.4f})",
        **params,
    )


def paired_ratio_note(label: str, ours: list[float], theirs: list[float], warmup: int) -> str:
    """The note giving the median of per-step trilora / bnb_peft time ratios (p20, p80).

    Adjacent steps of the two providers see about the same machine load, so this resists
    load swings on a shared machine better than the ratio of the two medians."""
    paired = Stats.of([a / b for a, b in zip(ours[warmup:], theirs[warmup:])])
    return (
        f"{label}: trilora / bnb_peft step time, median of per-step ratios "
        f"{paired.median:.3f} (p20 {paired.p20:.3f}, p80 {paired.p80:.3f}), "
        f"{torch.get_num_threads()} threads"
    )
