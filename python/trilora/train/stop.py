"""Stopping a run cleanly on SIGTERM or SIGINT: a checkpoint at the next step boundary, one
line that says what was saved and how to resume, exit status 143 / 130.

A cluster scheduler sends SIGTERM some seconds before it kills a job (Slurm and Kubernetes
wait 30 s by default); Ctrl-C sends SIGINT. :class:`StopSignals` turns either into a
request that the loop honours where a step ends: every rank asks :meth:`StopSignals.agreed`
there (one all-reduce of the signal number), so all ranks stop after the same step and
write one checkpoint together, whichever of them got the signal. The checkpoint must start
within ``--stop-grace`` seconds of the signal; if the step in progress has not ended by
then, a watchdog thread prints the line and ends the process without writing one (never a
half-written one: the write had not begun, and checkpoint writes are atomic anyway).

Before the first step (tokenizer, data, model loading, the base model's evaluation) there
is nothing to save, so a signal stops the run at once (:class:`StopNow`). A second SIGINT
(Ctrl-C again) stops at once too; one within :data:`SAME_KEYPRESS_S` of the first counts as
the same keypress, which a launcher may pass on to a process that already got it.

Test hooks (tests/train/test_preemption.py; never set in normal use), read from
``TRILORA_TRAIN_TEST_HOOK`` (:data:`trilora.train.checkpoints.HOOK_ENV`):
``pause_in_step:N`` waits inside step N (after its backward) until this process is asked to
stop or the marker file ``OUT/.test-paused-rankR`` it writes (holding its pid) is deleted;
``stall_in_step:N`` writes the same marker and never lets step N end; ``pause_in_setup:0``
waits like ``pause_in_step`` after the run folder is written and before the model loads.

No torch at import time.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from trilora.io import RunStopped
from trilora.train.collectives import all_reduce

__all__ = ["SAME_KEYPRESS_S", "StopNow", "StopSignals", "TestHook", "signal_name"]

HOOK_ENV = "TRILORA_TRAIN_TEST_HOOK"  # == trilora.train.checkpoints.HOOK_ENV (state imports torch)
SAME_KEYPRESS_S = 1.0
_HANDLED = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    """``"SIGTERM"``, ``"SIGINT"``, ..."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopNow(RunStopped):
    """Raised by the signal handler where waiting for a step boundary makes no sense: before
    the first step, or on a second Ctrl-C (``again``). The loop turns it into a
    :class:`~trilora.io.RunStopped` that says what is left."""

    def __init__(self, signum: int, again: bool = False) -> None:
        super().__init__(f"stopped by {signal_name(signum)}", signum)
        self.again = again


class StopSignals:
    """SIGTERM and SIGINT handlers for one run (a context manager; the previous handlers
    come back on exit). Only the main thread can install handlers; elsewhere (a library
    caller's thread) signals keep their previous meaning.

    Args:
        grace_s: seconds from the first signal to the start of the checkpoint write.
        timeout_line: called by the watchdog when the grace runs out, with the signal
            number; returns the line to print (None: print nothing, e.g. on ranks > 0).
    """

    def __init__(self, grace_s: float, timeout_line: Callable[[int], str | None]) -> None:
        self.grace_s = float(grace_s)
        self.timeout_line = timeout_line
        self.signum = 0  # the first signal received (0: none)
        self.training = False  # False: stop at once; True: stop at the next step boundary
        self._first_at = 0.0
        self._disarmed = False
        self._expired = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in _HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if not self.training:
            raise StopNow(signum)
        if self.signum:
            if signum == signal.SIGINT and time.monotonic() - self._first_at >= SAME_KEYPRESS_S:
                raise StopNow(signum, again=True)
            return
        self.signum, self._first_at = signum, time.monotonic()
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            if self._disarmed:
                return
            self._expired = True
            line = self.timeout_line(self.signum)
            if line:
                # a progress bar may hold the cursor at the end of its line
                sys.stderr.write(f"\n{line}\n")
                sys.stderr.flush()
            os._exit(128 + self.signum)

    def checkpoint_starting(self) -> None:
        """A checkpoint write begins: once a stop is pending, the watchdog lets it finish
        (the run exits right after it)."""
        with self._lock:
            if self.signum and not self._expired:
                self._disarmed = True

    def agreed(self, env) -> int:
        """The signal any rank received so far (0: none); every rank must call it at the same
        point (an all-reduce; the identity in a single process)."""
        if not getattr(env, "distributed", False):
            return self.signum

        return int(all_reduce(env, [float(self.signum)], "max")[0])


class TestHook:
    """The preemption tests' pause points (see the module docstring); inert unless
    ``TRILORA_TRAIN_TEST_HOOK`` names one."""

    def __init__(self) -> None:
        action, _, at = os.environ.get(HOOK_ENV, "").partition(":")
        self.action = action
        self.at = int(at) if at.isdigit() else None

    def __call__(
        self, point: str, step: int, run_dir: Path, rank: int, stopper: StopSignals
    ) -> None:
        if self.at != step or self.action not in (f"pause_{point}", f"stall_{point}"):
            return
        marker = Path(run_dir) / f".test-paused-rank{rank}"
        marker.write_text(str(os.getpid()))
        if self.action == f"stall_{point}":
            while True:  # only the watchdog or a second Ctrl-C ends this
                time.sleep(0.05)
        while marker.exists() and not stopper.signum:
            time.sleep(0.05)
        marker.unlink(missing_ok=True)
