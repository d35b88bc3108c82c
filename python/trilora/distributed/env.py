"""The process group of a distributed run, set up from the launcher's environment.

``torchrun`` and ``accelerate launch`` (which runs torchrun underneath for multi-GPU jobs)
both export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
to every process; :func:`init_distributed` reads them, picks the backend (NCCL on CUDA,
gloo on the CPU), binds the process to its GPU and initializes the default process group.
Without those variables (a plain ``python`` run) it returns a single-process environment
and initializes nothing, so the same code runs on one device and on many.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from trilora.io import UserError

__all__ = ["DistEnv", "bind_device", "current_env", "destroy_distributed", "init_distributed"]

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the run.

    ``device`` is the device this process computes on (``cuda:LOCAL_RANK`` on GPUs, else
    ``cpu``); ``backend`` is ``"nccl"``, ``"gloo"`` or ``None`` for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one rank is initialized."""
        return self.world_size > 1

    @property
    def has_group(self) -> bool:
        """True when a process group is initialized (``torchrun --nproc-per-node 1`` too)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that reads checkpoints and writes outputs)."""
        return self.rank == 0


def _int_var(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name} must be an integer, got {value!r}") from None


def current_env() -> DistEnv:
    """The :class:`DistEnv` of an already initialized process group (or a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        return DistEnv(device=device)
    backend = str(dist.get_backend())
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if "nccl" in backend and torch.cuda.is_available():
        # torchrun's LOCAL_RANK names this process's GPU even if the caller did not
        # torch.cuda.set_device() it
        index = local if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, device, backend)


def init_distributed(
    backend: str | None = None, timeout: datetime.timedelta | None = None
) -> DistEnv:
    """Initialize the default process group from torchrun/accelerate environment variables.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
        timeout: collective timeout (torch's default when None).

    Returns:
        The :class:`DistEnv`. When the group is already initialized it is described, not
        re-created; when ``WORLD_SIZE`` is unset (a plain single-process run) nothing is
        initialized and the environment has ``world_size == 1``.

    Raises:
        UserError: a launcher variable is missing or malformed, the world size or rank is
            out of range, or ``LOCAL_RANK`` names a GPU this machine does not have.
    """
    if dist.is_available() and dist.is_initialized():
        return current_env()
    if "WORLD_SIZE" not in os.environ:
        return current_env()
    missing = [v for v in _LAUNCH_VARS if v not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            "not: start distributed runs with torchrun --nproc-per-node N or accelerate launch"
        )
    rank, world, local = _int_var("RANK"), _int_var("WORLD_SIZE"), _int_var("LOCAL_RANK")
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} and WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; a distributed run needs it")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise UserError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    device = torch.device("cpu")
    if backend == "nccl":
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError("backend 'nccl' needs CUDA GPUs, and none is visible")
        if local >= count:
            raise UserError(
                f"LOCAL_RANK={local} but this machine shows {count} GPU(s): start at most "
                f"{count} processes per node (torchrun --nproc-per-node {count})"
            )
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend=backend, **kwargs)
    return DistEnv(rank, world, local, device, backend)


def bind_device(env: DistEnv) -> None:
    """Make ``env.device`` the current CUDA device (NCCL's object collectives use it)."""
    if env.device.type == "cuda" and torch.cuda.current_device() != env.device.index:
        torch.cuda.set_device(env.device)


def destroy_distributed() -> None:
    """Tear down the default process group if one is initialized (idempotent).

    Call it on every rank at the end of a run: the ranks first meet at a barrier, so no rank
    tears its gloo/NCCL connections down while another still sends on them (under torch
    2.11's gloo that aborted the late rank: "terminate called without an active exception").
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
