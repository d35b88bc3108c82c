"""``trilora train`` on several processes: launching, the rank's rows, agreeing on results.

Three ways start a distributed run, all ending in the same processes:

* ``trilora train ... --nproc N`` (:func:`launch`): torch's own launcher
  (``torch.distributed.run --standalone --nproc-per-node N -m trilora.train``) called in
  this process, with the resolved settings handed over as a config file. Each worker's
  error comes back as one line, printed once however many ranks hit it.
* ``torchrun --nproc-per-node N -m trilora.train ...`` and ``accelerate launch
  --multi_gpu --num_processes N -m trilora.train ...`` (:func:`worker_main`, the module's
  ``__main__``): the launcher's environment (``RANK``, ``WORLD_SIZE``, ...) is read by
  :func:`trilora.distributed.init_distributed`.

The data rule (:func:`rank_rows`): ``--batch-size`` is the *global* micro-batch; rank ``r``
of ``N`` takes rows ``r, r + N, ...`` of every micro-batch. The loss is normalised by the
loss-token count of the whole step over all ranks (an all-reduce), times ``N`` because DDP
and FSDP2 average gradients over the ranks, so ``N`` processes at batch ``B`` follow the
trajectory of one process at batch ``B`` (to fp32 rounding). A rank left without a row (the
last, short micro-batch of an epoch) runs one row at weight 0, so every rank takes part in
every collective.

Everything here is the identity in a single process (no process group), so the loop has one
code path.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from trilora.io import RunStopped, UsageError, UserError

__all__ = [
    "ERROR_DIR_ENV",
    "all_reduce",
    "check_launch",
    "gather_objects",
    "gradient_sync",
    "inference_model",
    "launch",
    "on_main",
    "rank_rows",
    "setup",
    "strategy",
    "worker_main",
    "wrap",
]

# Set by `trilora train --nproc` for its workers: each writes its one-line error there
# instead of stderr, and the launcher prints every distinct line once.
ERROR_DIR_ENV = "TRILORA_TRAIN_ERROR_DIR"
# Launchers that start processes without torchrun's variables (MPI): each process would
# believe it is alone and train the whole run by itself.
_MPI_WORLD_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")

T = TypeVar("T")


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
        raise UsageError("--nproc: this process was already started by a launcher (torchrun, "
                         "accelerate launch); leave --nproc out, the launcher sets the "
                         "process count")  # fmt: skip
    if batch_size < nproc:
        raise UsageError(f"--batch-size {batch_size} is the global micro-batch, split across "
                         f"the {nproc} processes: give at least {nproc} rows (one per "
                         "process) or start fewer processes")  # fmt: skip
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = torch.device(kind).type
    if kind == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError("--device cuda: no CUDA GPU is visible")
        if nproc > count:
            raise UserError(f"--nproc {nproc}: this machine shows {count} GPU(s); start at most "
                            f"{count} processes per machine (several machines: torchrun "
                            "--nnodes, see docs/distributed.md)")  # fmt: skip
    elif kind == "cpu":
        cores = _cpu_count()
        if nproc > cores:
            raise UserError(f"--nproc {nproc} on the CPU: this machine has {cores} core(s) for "
                            f"this process; start at most {cores} (CPU runs of several "
                            "processes are for testing; train on GPUs)")  # fmt: skip
    else:
        raise UserError(f"--device {device}: distributed runs use cuda or cpu")
    return kind


def _quiet_launcher_logs() -> None:
    # torchrun's agent logs OMP_NUM_THREADS notes, SIGTERMs and each failed worker on its
    # own loggers; the workers' one-line errors (printed by launch()) are what the user
    # needs. Its loggers take their level from LOGLEVEL when they are created.
    import logging

    os.environ.setdefault("LOGLEVEL", "CRITICAL")
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launch(nproc: int, worker_args: list[str], config_yaml: str, debug: bool = False,
           resume_command: str | None = None, stop_grace: float = 20.0) -> int:  # fmt: skip
    """Run ``trilora train`` on ``nproc`` local processes; return the exit status.

    ``config_yaml`` (the resolved settings) is written to a temporary file handed to every
    worker as ``--config``, followed by ``worker_args`` (run controls: ``--resume``, ...).
    A SIGTERM or Ctrl-C of this process reaches every worker (torch's launcher passes it
    on); they stop together at the next step boundary with a checkpoint, rank 0's line is
    printed (it names ``resume_command``), and the status is 128 + the signal's number. The
    launcher waits ``stop_grace`` plus a minute for that before it kills them.
    """
    from trilora.train.cli import COMMAND_ENV

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
        argv = ["--standalone", f"--nproc-per-node={nproc}", "-m", "trilora.train",
                "--config", str(config), *worker_args]  # fmt: skip
        args = get_args_parser().parse_args(argv)
        shutdown = str(max(30, math.ceil(stop_grace) + 60))
        settings = {ERROR_DIR_ENV: str(errors), COMMAND_ENV: resume_command,
                    # how long torch's launcher waits for stopping workers before SIGKILL
                    # (read by torch >= 2.12; older ones wait 30 s)
                    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get(
                        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", shutdown)}  # fmt: skip
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
    print(f"trilora train: error: a process failed without a message "
          f"({', '.join(parts) or exc}); {hint}", file=sys.stderr)  # fmt: skip
    return 1


def worker_main(argv: list[str] | None = None) -> int:
    """``python -m trilora.train ARGS`` (what torchrun and accelerate launch start): the
    ``trilora train`` command, with one-line errors per rank."""
    from trilora.cli import build_parser, quiet_third_party_notices, report_error
    from trilora.train.cli import run

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("TRILORA_DEBUG", "") not in ("", "0")
    args = build_parser(["train", *argv]).parse_args(["train", *argv])
    args._argv = ["train", *argv]
    if not debug:
        quiet_third_party_notices()
    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        return int(run(args) or 0)
    except RunStopped as exc:  # every rank stopped at the same step; rank 0 says so
        if rank == 0:
            _report_line(f"trilora train: {exc}", exc.exit_code, rank)
        return exc.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        if rank == 0:
            print("trilora train: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            status = report_error("trilora train", exc)
        _report_line(buf.getvalue().strip(), status, rank)
        return status


def _report_line(line: str, status: int, rank: int) -> None:
    """A worker's one line: into the launcher's folder (``trilora train --nproc`` prints
    each distinct line once), else on stderr, tagged with the rank past rank 0."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder and Path(folder).is_dir():
        from trilora.io import atomic_write_text

        atomic_write_text(Path(folder) / f"rank-{rank}", f"{status}\n{line}\n")
        return
    if rank > 0 and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        line = line.replace("trilora train: ", f"trilora train [rank {rank}]: ", 1)
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# the process group
# ---------------------------------------------------------------------------------------


def setup(device: str | None):
    """The run's :class:`~trilora.distributed.DistEnv`: a process group when a launcher
    started this process (gloo for ``--device cpu`` or without CUDA, NCCL otherwise), else a
    single process. Returns ``(env, device, initialized_here)``.
    """
    import torch
    import torch.distributed as dist

    import trilora.distributed as td

    if "WORLD_SIZE" not in os.environ:
        launched = [v for v in _MPI_WORLD_VARS if int(os.environ.get(v, "1") or 1) > 1]
        if launched:
            raise UserError(f"this process was started by MPI ({launched[0]} is set) without "
                            "torchrun's variables; start trilora train with torchrun, "
                            "accelerate launch --multi_gpu, or trilora train --nproc N")  # fmt: skip
        if device is None and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
            device = "cpu"  # accelerate launch --cpu (one process)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    was_initialized = dist.is_available() and dist.is_initialized()
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible")
    env = td.init_distributed(backend="nccl" if kind == "cuda" else "gloo")
    if env.has_group:
        if env.device.type != kind:
            raise UserError(f"--device {device}: the process group ({env.backend}) computes on "
                            f"{env.device.type}; start it with the matching device")  # fmt: skip
        device = str(env.device)
    return env, torch.device(device), env.has_group and not was_initialized


def strategy(env, fsdp: bool) -> str | None:
    """``"fsdp"``, ``"ddp"`` or None (a single process without a process group)."""
    if not env.has_group:
        return None
    return "fsdp" if fsdp else "ddp"


def wrap(model, env, cfg):
    """Wrap ``model`` for ``env``: FSDP2 with ``cfg.fsdp`` (``CPUOffloadPolicy`` with
    ``cfg.cpu_offload``), else DDP; unchanged without a process group.

    No FSDP mixed-precision policy: the parameters are gathered in their own dtypes (bf16
    base, fp32 LoRA, packed bytes untouched) and bf16 compute comes from autocast, as in a
    single process, so the numerics do not depend on the process count.
    """
    import trilora.distributed as td

    kind = strategy(env, cfg.fsdp)
    if kind == "ddp":
        return td.wrap_ddp(model, env=env)
    if kind != "fsdp":
        return model
    import torch

    model = td.wrap_fsdp(model, env=env, cpu_offload=cfg.cpu_offload)
    # FSDP2 picks its root at the first forward, which must go through the root module;
    # generation (answers before training) calls the inner causal LM. One token, no
    # gradients, eval mode (no dropout draws), through the root, settles it.
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=env.device), use_cache=False)
    model.train(was_training)
    return model


# ---------------------------------------------------------------------------------------
# agreeing across ranks
# ---------------------------------------------------------------------------------------


def on_main(env, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its error.

    For what must happen once (run-folder checks and writes, reading a file whose existence
    decides what every rank does next): the other ranks wait for rank 0 and follow it.
    """
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as exc:
            error = exc
    if env.distributed:
        import torch.distributed as dist

        box: list[Any] = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def all_reduce(env, values: list[float], op: str = "sum") -> list[float]:
    """``values`` summed (or maxed) over the ranks, in float64 (the identity alone)."""
    if not env.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    from trilora.distributed.sharding import _comm_device

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(env))
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


def gather_objects(env, obj: Any) -> list[Any]:
    """``[rank 0's obj, rank 1's obj, ...]`` on every rank (``[obj]`` alone)."""
    if not env.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def rank_rows(idx: list[int], env) -> tuple[list[int], bool]:
    """This rank's rows of a global batch ``idx`` and whether they count: rows
    ``rank, rank + N, ...``; a rank left without any row gets the batch's first row at
    weight 0 (``False``), so that it still joins the collectives of the step."""
    if not env.distributed:
        return list(idx), True
    mine = list(idx[env.rank :: env.world_size])
    if mine:
        return mine, True
    return list(idx[:1]), False


@contextlib.contextmanager
def gradient_sync(model, sync: bool) -> Iterator[None]:
    """Backward inside gets its gradients reduced across ranks only if ``sync`` (the last
    micro-batch of a step): DDP's ``no_sync()`` and FSDP2's ``set_requires_gradient_sync``
    otherwise, so accumulation costs no communication."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with contextlib.nullcontext() if sync else model.no_sync():
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)
    if callable(setter):
        setter(sync)
        try:
            yield
        finally:
            setter(True)
        return
    yield


@contextlib.contextmanager
def inference_model(model) -> Iterator[Any]:
    """The module to run evaluation or generation on: DDP's inner module (no collectives
    needed without gradients); an FSDP2 model as it is, its root group gathered for the
    duration (``generate`` calls the inner causal LM, past the root's own forward hooks)
    and every group resharded afterwards."""
    import trilora.distributed as td

    info = td.parallel_info(model)
    if info is None or info.strategy != "fsdp":
        yield td.unwrap(model)
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()
