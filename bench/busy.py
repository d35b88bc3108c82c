"""Busy level: how much a busy machine slows a CPU training step, trilora against
bitsandbytes + PEFT.

People fine-tune on laptops and shared servers, where other processes want the same cores.
This level trains the e2e level's CPU case (same checkpoint, batches, LoRA and optimizer;
:mod:`trilora.bench.e2e`) on an idle machine and beside ``competitors`` CPU-bound processes
(``python -c "while True: pass"``; as many as the machine has cores by default, ``trilora
bench --competitors N``), and reports each provider's **slowdown**: its median busy step
time over its median idle step time. The reference is the **fair share**: with ``C``
cores, ``T`` torch threads and ``N`` competitors all runnable, a thread gets ``C / (N + T)``
of a core, so a step that used ``min(T, C)`` cores slows down by ``min(T, C) (N + T) /
(C T)`` (2x for 2 competitors beside 2 threads on 2 cores).

Each provider runs in a process of its own, started with the environment a user gets:

* ``trilora``: the environment the ``trilora`` command gives itself: ``OMP_WAIT_POLICY=PASSIVE``
  unless the user chose a wait policy (:mod:`trilora._openmp`), and ``import trilora``
  before torch, as a user's script would;
* ``bnb_peft``: plain Python: the user's environment as ``trilora bench`` was started
  with it (without what trilora added), torch imported first.

The process loads its model, trains warm-up steps, then ``rounds`` times ``steps`` steps
idle and ``steps`` steps beside the competitors (the parent starts them, waits until each
runs, and stops them after), so that a change of the machine's own load falls on both
phases. The providers run one after the other, never at the same time. CPU only: on a CUDA
device the rows are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trilora._openmp import prefer_passive_wait, user_environment
from trilora.bench import e2e
from trilora.bench.harness import Stats, guarded, make_row, provider_status

LEVEL = "busy"
PROVIDERS = ("trilora", "bnb_peft")
_TAG = "@@trilora-busy "  # prefixes the worker's protocol lines on stdout


@dataclass
class BusyPlan:
    """What the busy level runs: an e2e random-weight preset on the CPU (fp32, LoRA r=16,
    checkpointing, AdamW), ``warmup`` untimed steps, then ``rounds`` x (``steps`` idle,
    ``steps`` busy), with ``competitors`` CPU-bound processes in the busy phases."""

    preset: str
    batch: int
    seq_len: int
    steps: int
    warmup: int
    rounds: int
    competitors: int

    def __post_init__(self) -> None:
        if self.preset not in e2e.PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid presets: {list(e2e.PRESETS)}")
        if min(self.batch, self.seq_len, self.steps, self.rounds) < 1 or self.warmup < 0:
            raise ValueError(
                "batch, seq_len, steps and rounds must be >= 1 and warmup >= 0, got "
                f"{self.batch}, {self.seq_len}, {self.steps}, {self.rounds}, {self.warmup}"
            )
        if self.competitors < 1:
            raise ValueError(f"competitors must be >= 1, got {self.competitors}")

    def e2e_plan(self) -> e2e.E2EPlan:
        """The e2e level's plan for the same model, batches and training settings."""
        return e2e.E2EPlan(
            self.preset,
            batch=self.batch,
            seq_len=self.seq_len,
            steps=self.steps,
            warmup_steps=self.warmup,
            dtype=torch.float32,
        )


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_plan(quick: bool, competitors: int | None = None) -> BusyPlan:
    """The e2e level's CPU case (small preset, 4 x 256 tokens), 2 rounds of 3 steps; quick:
    the tiny preset, 2 x 64 tokens, one round of 2 steps. ``competitors``: default, one per
    core."""
    n = cores() if competitors is None else competitors
    if quick:
        return BusyPlan("tiny", batch=2, seq_len=64, steps=2, warmup=1, rounds=1, competitors=n)
    return BusyPlan("small", batch=4, seq_len=256, steps=3, warmup=1, rounds=2, competitors=n)


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def fair_slowdown(threads: int, competitors: int, ncores: int) -> float:
    """The slowdown a step gets from its fair share of the CPU (see the module docstring)."""
    return min(threads, ncores) * (competitors + threads) / (ncores * threads)


def provider_environment(provider: str) -> dict[str, str]:
    """The environment ``provider``'s process starts with (see the module docstring)."""

    env = user_environment()
    env.pop("TRITON_INTERPRET", None)  # a test run's setting; neither provider is a test
    if provider == "trilora":
        prefer_passive_wait(env)
    return env


# --- the worker: one provider's process -------------------------------------------------

_WORKER = """
import sys
if sys.argv[1] == "trilora":
    import trilora  # before torch, as in a user's script
import torch
from trilora.bench.busy import worker
sys.exit(worker(sys.argv[1:]))
"""


def _send(message: dict) -> None:
    sys.stdout.write(_TAG + json.dumps(message) + "\n")
    sys.stdout.flush()


def worker(argv: list[str]) -> int:
    """A provider's process: ``argv`` is ``[provider, checkpoint folder, plan as JSON]``.
    Reads step counts from stdin (``0`` ends it) and answers each with the steps' times."""
    provider, checkpoint, plan_json = argv
    plan = BusyPlan(**json.loads(plan_json))
    cpu = torch.device("cpu")
    e2e_plan = plan.e2e_plan()
    model, how = e2e._make_provider(provider, e2e_plan, Path(checkpoint), cpu)
    trainer = e2e._Trainer(model, e2e_plan, e2e.random_batches(e2e_plan, cpu))
    _send(
        {
            "how": how,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        }
    )
    step = 0
    for line in sys.stdin:
        count = int(line)
        if count <= 0:
            break
        times = []
        for _ in range(count):
            times.append(trainer.step(step, cpu))
            step += 1
        _send({"times": times, "loss": trainer.losses[-1]})
    return 0


# --- the parent ------------------------------------------------------------------------

_COMPETITOR = "import sys\nsys.stdout.write('r')\nsys.stdout.flush()\nwhile True: pass"


@contextlib.contextmanager
def competing(count: int) -> Iterator[list[subprocess.Popen]]:
    """``count`` CPU-bound processes, each running its loop before the block starts; all
    stopped when it ends."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-S", "-c", _COMPETITOR],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                )
            )
        for p in procs:
            if p.stdout.read(1) != b"r":
                raise RuntimeError("a competing process did not start")
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
            p.stdout.close()


class _Worker:
    """The parent's side of one provider's process."""

    def __init__(self, provider: str, checkpoint: Path, plan: BusyPlan, stderr) -> None:
        self.stderr = stderr
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, provider, str(checkpoint), json.dumps(asdict(plan))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=provider_environment(provider),
        )
        self.info = self._receive()

    def _receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG) :])
        self.proc.wait()
        self.stderr.seek(0)
        lines = [ln for ln in self.stderr.read().splitlines() if ln.strip()]
        raise RuntimeError(
            f"the worker exited with status {self.proc.returncode}: "
            f"{lines[-1] if lines else 'no message'}"
        )

    def steps(self, count: int) -> list[float]:
        self.proc.stdin.write(f"{count}\n")
        self.proc.stdin.flush()
        return self._receive()["times"]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write("0\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


def measure(
    provider: str, checkpoint: Path, plan: BusyPlan, log: Callable[[str], None] = print
) -> dict:
    """One provider's idle and busy step times: ``{"idle": [s], "busy": [s], "threads",
    "omp_wait_policy", "gomp_spincount", "how"}``."""
    with tempfile.TemporaryFile("w+") as stderr:
        w = _Worker(provider, checkpoint, plan, stderr)
        try:
            if plan.warmup:
                w.steps(plan.warmup)
            idle: list[float] = []
            busy: list[float] = []
            for r in range(plan.rounds):
                idle += w.steps(plan.steps)
                with competing(plan.competitors):
                    busy += w.steps(plan.steps)
                log(
                    f"  {provider} round {r + 1}/{plan.rounds}: idle "
                    f"{' '.join(f'{t:.3f}' for t in idle[-plan.steps :])} s, busy "
                    f"{' '.join(f'{t:.3f}' for t in busy[-plan.steps :])} s"
                )
        finally:
            w.close()
    return {**w.info, "idle": idle, "busy": busy}


def run(
    plan: BusyPlan,
    device: torch.device,
    disabled: tuple[str, ...] = (),
    log: Callable[[str], None] = print,
    workdir: Path | None = None,
) -> tuple[list[dict], list[str]]:
    """Rows ``step_time_idle``, ``step_time_busy`` (s) and ``slowdown`` (x) per provider,
    and a note comparing the slowdowns with the fair share."""
    case = f"{plan.preset}/b{plan.batch}xs{plan.seq_len}/c{plan.competitors}"
    params = dict(
        model=plan.preset,
        batch=plan.batch,
        seq_len=plan.seq_len,
        tokens=plan.batch * plan.seq_len,
        dtype="float32",
        rank=16,
    )
    metrics = (("step_time_idle", "s"), ("step_time_busy", "s"), ("slowdown", "x"))
    rows: list[dict] = []
    notes: list[str] = []

    def fail(provider: str, status: str, note: str) -> None:
        rows.extend(
            make_row(LEVEL, case, m, provider, u, status=status, note=note, **params)
            for m, u in metrics
        )

    if device.type != "cpu":
        for provider in PROVIDERS:
            fail(provider, "skipped", "the busy level measures CPU training (--device cpu)")
        return rows, notes
    available = []
    for provider in PROVIDERS:
        # Both providers load through transformers + bitsandbytes + PEFT (the e2e method).
        ok, why = provider_status("bnb_peft", disabled if provider == "bnb_peft" else ())
        if not ok and provider == "trilora":
            why = why.replace(
                "bnb_peft skipped", "trilora skipped (it loads through bitsandbytes + PEFT)"
            )
        if ok and provider in disabled:
            ok, why = False, f"{provider} skipped: disabled with --skip-provider"
        if ok:
            available.append(provider)
        else:
            notes.append(why)
            fail(provider, "skipped", why)
    if not available:
        return rows, notes
    ncores = cores()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="trilora-bench-busy-", dir=workdir) as tmp:
        log(f"  building the {plan.preset} checkpoint")
        built = guarded(lambda: e2e.build_checkpoint(plan.e2e_plan(), Path(tmp) / "model"))
        if built.status != "ok":
            for provider in available:
                fail(provider, built.status, f"building the checkpoint failed: {built.note}")
            return rows, notes
        for provider in available:
            t = time.perf_counter()
            load = _load_average()
            out = guarded(lambda p=provider: measure(p, built.value, plan, log))
            if out.status != "ok":
                fail(provider, out.status, out.note)
                continue
            results[provider] = {**out.value, "load": (load, _load_average())}
            log(f"  {provider}: {time.perf_counter() - t:.0f} s")
    for provider, res in results.items():
        idle, busy = Stats.of(res["idle"]), Stats.of(res["busy"])
        slow = Stats(
            busy.median / idle.median,
            busy.p20 / idle.median,
            busy.p80 / idle.median,
            len(res["busy"]),
        )
        fair = fair_slowdown(res["threads"], plan.competitors, ncores)
        policy = res["omp_wait_policy"] or "unset"
        spin = f", GOMP_SPINCOUNT={res['gomp_spincount']}" if res["gomp_spincount"] else ""
        note = (
            f"{res['how']}; {res['threads']} torch threads, {plan.competitors} competing "
            f"processes on {ncores} cores (fair share {fair:.2f}x); OMP_WAIT_POLICY="
            f"{policy}{spin}; {plan.rounds} x {plan.steps} idle and busy steps; load average "
            f"before / after {res['load'][0]} / {res['load'][1]} (other processes than "
            "the competitors make the idle phase less idle)"
        )
        rows.append(
            make_row(LEVEL, case, "step_time_idle", provider, "s", idle, note=note, **params)
        )
        rows.append(
            make_row(LEVEL, case, "step_time_busy", provider, "s", busy, note=note, **params)
        )
        rows.append(make_row(LEVEL, case, "slowdown", provider, "x", slow, note=note, **params))
        res.update(slowdown=slow.median, fair=fair, policy=policy + spin)
    if results:
        parts = [
            f"{'bitsandbytes + PEFT' if p == 'bnb_peft' else p} {r['slowdown']:.2f}x "
            f"(OMP_WAIT_POLICY={r['policy']})"
            for p, r in results.items()
        ]
        fair = next(iter(results.values()))["fair"]
        notes.append(
            f"busy {case}: slowdown beside {plan.competitors} CPU-bound processes "
            f"(busy / idle step time): {', '.join(parts)}; fair share {fair:.2f}x"
        )
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    """``python -m trilora.bench.busy [--quick] [--competitors N]``: print the slowdowns."""

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny preset, 2 steps")
    p.add_argument(
        "--competitors",
        type=int,
        default=None,
        help="competing CPU-bound processes (default: one per core)",
    )
    args = p.parse_args(argv)
    rows, notes = run(default_plan(args.quick, args.competitors), torch.device("cpu"))
    for note in notes:
        print(note)
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
