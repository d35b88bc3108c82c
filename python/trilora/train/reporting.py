"""What the user sees: progress bar, metrics.jsonl, TensorBoard, loss curve, summary."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import textwrap
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trilora.io import atomic_write_text, require

__all__ = [
    "MetricsLog",
    "PhasePeaks",
    "Progress",
    "loss_curve_points",
    "peak_memory_bytes",
    "plot_loss_curve",
    "side_by_side",
]


def peak_memory_bytes(device_type: str) -> int:
    """Peak device memory (CUDA allocator) or the process's peak resident set (CPU)."""
    if device_type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_memory_bytes(device_type: str, cuda_device: int | None = None) -> int:
    """Memory in use now: CUDA allocator bytes (on ``cuda_device``, default the current one),
    or the process's resident set (Linux: ``/proc/self/statm``; elsewhere the peak so far,
    the best a portable call can say)."""
    if device_type == "cuda":
        return int(torch.cuda.memory_allocated(cuda_device))
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_memory_bytes(device_type)


class PhasePeaks:
    """The peak memory of each phase of a run (load, steps, save, evaluation, generation,
    merge), and how much each phase raised the process's peak.

    A phase that raised the peak has it exactly (``peak_memory_bytes`` at its end); the peak
    of one that did not comes from sampling the memory in use every ``interval`` seconds, so
    a spike shorter than that can be missed, but never one that set a new peak. Nothing is
    reset: ``peak_memory_bytes`` keeps meaning the whole process, for callers that measure a
    run from outside (``trilora bench``, ``--sweep``). Phases nest: a save inside the steps
    counts as the save's.
    """

    def __init__(self, device_type: str, interval: float = 0.01) -> None:
        self.device_type = device_type
        self.phases: dict[str, dict[str, int]] = {}
        self._label: str | None = None
        self._mark = peak_memory_bytes(device_type)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval
        self._thread: threading.Thread | None = None
        # The sampling thread's current CUDA device is device 0, not this rank's.
        self._cuda_device = torch.cuda.current_device() if device_type == "cuda" else None

    def _switch(self, label: str | None) -> None:
        with self._lock:
            now = peak_memory_bytes(self.device_type)
            if self._label is not None:
                rec = self.phases[self._label]
                rec["raised"] += max(0, now - self._mark)
                if now > self._mark:
                    rec["peak"] = max(rec["peak"], now)
                rec["peak"] = max(rec["peak"], current_memory_bytes(self.device_type))
            self._mark = now
            self._label = label
            if label is not None:
                self.phases.setdefault(label, {"peak": 0, "raised": 0})

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            used = current_memory_bytes(self.device_type, self._cuda_device)
            with self._lock:
                if self._label is not None:
                    rec = self.phases[self._label]
                    rec["peak"] = max(rec["peak"], used)

    @contextmanager
    def phase(self, name: str):
        """Attribute the memory used inside the ``with`` block to phase ``name``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._sample, name="trilora-mem", daemon=True)
            self._thread.start()
        outer = self._label
        self._switch(name)
        try:
            yield
        finally:
            self._switch(outer)

    def close(self) -> dict[str, dict[str, int]]:
        """Stop sampling; ``{phase: {"peak": bytes, "raised": bytes}}`` in the order the
        phases first ran."""
        self._switch(None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return {k: dict(v) for k, v in self.phases.items()}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


class MetricsLog:
    """``OUT/metrics.jsonl``: one JSON object per logged step or evaluation.

    On resume the lines past the checkpoint's step (written by the killed run after its
    last checkpoint) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, keep_up_to_step: int | None, tensorboard_dir: Path | None):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if keep_up_to_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the kill
                if rec.get("step", 0) <= keep_up_to_step and rec.get("kind") != "final":
                    self.records.append(rec)

        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        if tensorboard_dir is not None:
            require("tensorboard", "--tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, int | float):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def close(self) -> None:
        """Close the file (and TensorBoard); calling it again does nothing."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A live bar on stderr: step, loss, lr, tokens/s, peak memory, ETA (tqdm)."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train"):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                smoothing=0.1,
            )

    def update(self, record: dict[str, Any], extra: str = "") -> None:
        """Advance one step; ``extra``: the training method's own figures, shown after the
        loss."""
        if self.bar is None:
            return
        self.bar.set_postfix_str(
            f"loss {record['loss']:.4f} "
            + (f"{extra} " if extra else "")
            + f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s "
            f"peak {human_bytes(record['peak_memory'])}",
            refresh=False,
        )
        self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def loss_curve_points(
    records: list[dict[str, Any]], base: dict[str, Any] | None = None
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(train, held_out)`` points ``(step, loss)`` of a run's metrics records: the held-out
    curve starts at step 0 with the base model's loss (``base["eval_loss"]``, measured before
    training) and has every evaluation after it (each ``--eval-every`` and the final one)."""
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    held_out = [
        (r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval" and "eval_loss" in r
    ]
    if base and base.get("eval_loss") is not None:
        held_out.insert(0, (0, base["eval_loss"]))
    return train, held_out


def plot_loss_curve(
    records: list[dict[str, Any]], path: Path, base: dict[str, Any] | None = None
) -> bool:
    """Train and held-out loss against step as a PNG (:func:`loss_curve_points`; the base
    model's held-out loss at step 0), and the mean reward on a second axis when the records
    carry one (GRPO); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train, held_out = loss_curve_points(records, base)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="held-out loss")
        if held_out[0][0] == 0:
            ax.annotate("base", held_out[0], textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    # reward-driven methods (GRPO): the mean reward on a second axis, held-out from the base
    reward = [
        (r["step"], r["reward"]) for r in records if r.get("kind") == "train" and "reward" in r
    ]
    held_reward = [
        (r["step"], r["eval_reward"])
        for r in records
        if r.get("kind") == "eval" and "eval_reward" in r
    ]
    if base and base.get("eval_reward") is not None:
        held_reward.insert(0, (0, base["eval_reward"]))
    if reward or held_reward:
        ax2 = ax.twinx()
        if reward:
            ax2.plot(*zip(*reward), color="tab:green", linewidth=1, label="mean reward")
        if held_reward:
            ax2.plot(*zip(*held_reward), "s-", color="tab:red", label="held-out mean reward")
        ax2.set_ylabel("reward")
        ax2.legend(loc="upper right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def side_by_side(rows: list[tuple[str, str, str]], titles=("base", "tuned")) -> str:
    """``(prompt, left, right)`` triples as two columns (stacked on narrow terminals)."""
    width = shutil.get_terminal_size((120, 24)).columns
    out = []
    for i, (prompt, left, right) in enumerate(rows, 1):
        out.append(f"--- held-out question {i}: {' '.join(prompt.split())[:200]}")
        if width >= 100:
            col = (width - 3) // 2
            a = _wrap(left, col)
            b = _wrap(right, col)
            out.append(f"{titles[0]:<{col}} | {titles[1]}")
            for j in range(max(len(a), len(b))):
                la = a[j] if j < len(a) else ""
                lb = b[j] if j < len(b) else ""
                out.append(f"{la:<{col}} | {lb}")
        else:
            out += [f"[{titles[0]}]", *_wrap(left, width), f"[{titles[1]}]", *_wrap(right, width)]
    return "\n".join(out)


def _wrap(text: str, width: int) -> list[str]:
    lines = []
    for para in text.strip().splitlines() or [""]:
        lines += textwrap.wrap(para, width) or [""]
    return lines


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else float("inf")
