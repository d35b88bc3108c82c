"""``trilora train`` on several processes: the launcher and the worker entry point.

Three ways start a distributed run, all ending in the same processes:

* ``trilora train ... --nproc N`` (:func:`launch`): torch's own launcher
  (``torch.distributed.run --standalone --nproc-per-node N -m trilora.train``) called in
  this process, with the resolved settings handed over as a config file. Each worker's
  error comes back as one line, printed once however many ranks hit it.
* ``torchrun --nproc-per-node N -m trilora.train ...`` and ``accelerate launch
  --multi_gpu --num_processes N -m trilora.train ...`` (:mod:`trilora.train.__main__`): the launcher's environment (``RANK``, ``WORLD_SIZE``, ...) is read by
  :func:`trilora.distributed.init_distributed`.

Each worker runs the ``trilora train`` command (:mod:`trilora.commands.train`) through the
worker entry point :mod:`trilora.train.__main__`; what the ranks do together inside a run
is :mod:`trilora.train.collectives`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import tempfile
from pathlib import Path

from trilora.io import UsageError, UserError, atomic_write_text

__all__ = ["COMMAND_ENV", "ERROR_DIR_ENV", "check_launch", "launch", "report_line"]

# Set by `trilora train --nproc` for its workers: each writes its one-line error there
# instead of stderr, and the launcher prints every distinct line once.
ERROR_DIR_ENV = "TRILORA_TRAIN_ERROR_DIR"
# Set for the workers of `trilora train --nproc`: the command as the user typed it, which a
# worker repeats in its resume hint (trilora.commands.train).
COMMAND_ENV = "TRILORA_TRAIN_COMMAND"


# ---------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_launch(nproc: int, device: str | None, batch_size: int) -> str:
    """Refuse a ``--nproc`` that cannot work here, before any process starts; return the
    device kind the workers will use (``"cuda"`` or ``"cpu"``).

    Raises:
        UsageError: ``nproc < 1``, a batch smaller than the process count, or ``--nproc``
            inside an already launched process.
        UserError: more processes than GPUs (CUDA) or than CPU cores (CPU).
    """
    import torch

    if nproc < 1:
        raise UsageError(f"--nproc: must be >= 1, got {nproc}")
    if "WORLD_SIZE" in os.environ:
        raise UsageError(
            "--nproc: this process was already started by a launcher (torchrun, "
            "accelerate launch); leave --nproc out, the launcher sets the "
            "process count"
        )
    if batch_size < nproc:
        raise UsageError(
            f"--batch-size {batch_size} is the global micro-batch, split across "
            f"the {nproc} processes: give at least {nproc} rows (one per "
            "process) or start fewer processes"
        )
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = torch.device(kind).type
    if kind == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError("--device cuda: no CUDA GPU is visible")
        if nproc > count:
            raise UserError(
                f"--nproc {nproc}: this machine shows {count} GPU(s); start at most "
                f"{count} processes per machine (several machines: torchrun "
                "--nnodes, see docs/distributed.md)"
            )
    elif kind == "cpu":
        cores = _cpu_count()
        if nproc > cores:
            raise UserError(
                f"--nproc {nproc} on the CPU: this machine has {cores} core(s) for "
                f"this process; start at most {cores} (CPU runs of several "
                "processes are for testing; train on GPUs)"
            )
    else:
        raise UserError(f"--device {device}: distributed runs use cuda or cpu")
    return kind


def _quiet_launcher_logs() -> None:
    # torchrun's agent logs OMP_NUM_THREADS notes, SIGTERMs and each failed worker on its
    # own loggers; the workers' one-line errors (printed by launch()) are what the user
    # needs. Its loggers take their level from LOGLEVEL when they are created.

    os.environ.setdefault("LOGLEVEL", "CRITICAL")
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launch(
    nproc: int,
    worker_args: list[str],
    config_yaml: str,
    debug: bool = False,
    resume_command: str | None = None,
    stop_grace: float = 20.0,
) -> int:
    """Run ``trilora train`` on ``nproc`` local processes; return the exit status.

    ``config_yaml`` (the resolved settings) is written to a temporary file handed to every
    worker as ``--config``, followed by ``worker_args`` (run controls: ``--resume``, ...).
    A SIGTERM or Ctrl-C of this process reaches every worker (torch's launcher passes it
    on); they stop together at the next step boundary with a checkpoint, rank 0's line is
    printed (it names ``resume_command``), and the status is 128 + the signal's number. The
    launcher waits ``stop_grace`` plus a minute for that before it kills them.
    """

    _quiet_launcher_logs()
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    _quiet_launcher_logs()
    with tempfile.TemporaryDirectory(prefix="trilora-train-") as tmp:
        errors = Path(tmp) / "errors"
        errors.mkdir()
        config = Path(tmp) / "config.yaml"
        config.write_text(config_yaml, encoding="utf-8")
        argv = [
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "trilora.train",
            "--config",
            str(config),
            *worker_args,
        ]
        args = get_args_parser().parse_args(argv)
        shutdown = str(max(30, math.ceil(stop_grace) + 60))
        settings = {
            ERROR_DIR_ENV: str(errors),
            COMMAND_ENV: resume_command,
            # how long torch's launcher waits for stopping workers before SIGKILL
            # (read by torch >= 2.12; older ones wait 30 s)
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get(
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", shutdown
            ),
        }
        previous = {k: os.environ.get(k) for k in settings}
        for k, v in settings.items():
            if v is not None:
                os.environ[k] = v
        try:
            torchrun(args)
        except ChildFailedError as exc:
            return _report_failures(errors, exc, debug)
        except Exception as exc:  # torch's SignalException: Ctrl-C or a kill of the launcher
            if type(exc).__name__ == "SignalException":
                signum = int(getattr(exc, "sigval", signal.SIGINT))
                # the workers stopped on the signal passed on to them; rank 0 said how
                if not _print_reported(errors):
                    print("trilora train: interrupted", file=sys.stderr)
                return 128 + signum
            raise
        finally:
            for k, v in previous.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return 0


def _print_reported(errors: Path) -> list[tuple[int, int, str]]:
    """Print each distinct line the workers left in ``errors`` once, rank 0's first; return
    ``(rank, status, line)`` of each."""
    reported: list[tuple[int, int, str]] = []
    for f in errors.glob("rank-*"):
        status, _, line = f.read_text(encoding="utf-8").partition("\n")
        reported.append((int(f.name.split("-")[1]), int(status), line.strip()))
    reported.sort()
    seen: set[str] = set()
    for _, _, line in reported:
        if line not in seen:
            seen.add(line)
            print(line, file=sys.stderr)
    return reported


def _report_failures(errors: Path, exc, debug: bool = False) -> int:
    """Print each distinct worker error once (rank 0's first); return the exit status."""
    reported = _print_reported(errors)
    if reported:
        return reported[0][1]
    # no worker reported: killed by a signal, out of memory, a crash in native code
    failures = getattr(exc, "failures", {}) or {}
    parts = []
    for rank, failure in sorted(failures.items()):
        code = getattr(failure, "exitcode", None)
        killed = isinstance(code, int) and code < 0
        parts.append(
            f"rank {rank}: {f'killed by signal {-code}' if killed else f'exit code {code}'}"
        )
    hint = "its traceback is above" if debug else "rerun with --debug for the traceback"
    print(
        f"trilora train: error: a process failed without a message "
        f"({', '.join(parts) or exc}); {hint}",
        file=sys.stderr,
    )
    return 1


def report_line(line: str, status: int, rank: int) -> None:
    """A worker's one line: into the launcher's folder (``trilora train --nproc`` prints
    each distinct line once), else on stderr, tagged with the rank past rank 0."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder and Path(folder).is_dir():
        atomic_write_text(Path(folder) / f"rank-{rank}", f"{status}\n{line}\n")
        return
    if rank > 0 and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        line = line.replace("trilora train: ", f"trilora train [rank {rank}]: ", 1)
    print(line, file=sys.stderr, flush=True)
