"""``python -m trilora.train ARGS``: ``trilora train ARGS``, as launchers start it.

``torchrun --nproc-per-node N -m trilora.train ...`` and ``accelerate launch --multi_gpu
--num_processes N -m trilora.train ...`` start N of these; ``trilora train --nproc N``
does the same through torch's launcher. See ``docs/distributed.md``.
"""

import contextlib
import io
import os
import sys

from trilora._openmp import prefer_passive_wait

prefer_passive_wait()  # before torch loads libgomp: see trilora._openmp

from trilora.cli import build_parser  # noqa: E402
from trilora.commands import quiet_third_party_notices, report_error  # noqa: E402
from trilora.commands.train import run  # noqa: E402
from trilora.io import RunStopped  # noqa: E402
from trilora.train.launch import report_line  # noqa: E402


def worker_main(argv: list[str] | None = None) -> int:
    """``python -m trilora.train ARGS`` (what torchrun and accelerate launch start): the
    ``trilora train`` command, with one-line errors per rank."""
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
            report_line(f"trilora train: {exc}", exc.exit_code, rank)
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
        report_line(buf.getvalue().strip(), status, rank)
        return status


if __name__ == "__main__":
    sys.exit(worker_main())
