"""OpenMP threads that sleep when they wait, so that a busy machine costs trilora its share.

PyTorch's Linux wheels run their CPU kernels on libgomp, GCC's OpenMP runtime. By default a
libgomp thread that has finished its part of a parallel region spins (``GOMP_SPINCOUNT``,
300,000 iterations by default) before it sleeps. On an idle machine that saves a wake-up; on
a machine where other processes also want the cores, the spinning threads take CPU time
from the threads that still have work, and every parallel region waits for its slowest
thread. Measured on a 2-core AMD EPYC beside 4 CPU-bound processes, one SmolLM2-135M QLoRA
training step (512 tokens, 2 threads) took 30-35 s instead of 4.4 s idle, against about
14 s (the fair share) with ``OMP_WAIT_POLICY=PASSIVE``; idle, the setting cost nothing
measurable (``docs/cpu.md``).

libgomp reads the variable once, when it loads, which is when ``torch`` is imported. So
:func:`prefer_passive_wait` sets it only while torch is not imported yet, and never when the
user chose a policy (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set, to anything). The
``trilora`` command, ``python -m trilora.train`` and ``import trilora`` call it.

This module imports nothing heavy: it runs before torch on purpose.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

VARIABLE = "OMP_WAIT_POLICY"
VALUE = "PASSIVE"
USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
"""Variables through which a user chooses the wait policy; trilora leaves it to them when
either is set."""

_set_by_trilora = False


def prefer_passive_wait(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy or it is too late.

    Args:
        environ: the environment to change; ``None`` means this process's ``os.environ``,
            which is changed only while ``torch`` is not imported yet (libgomp reads the
            variable when torch loads it; later it would change only child processes).

    Returns:
        Whether the variable was set by this call.
    """
    global _set_by_trilora
    own_process = environ is None
    env = os.environ if environ is None else environ
    if any(name in env for name in USER_SETTINGS):
        return False
    if own_process and "torch" in sys.modules:
        return False
    env[VARIABLE] = VALUE
    if own_process:
        _set_by_trilora = True
    return True


def set_by_trilora() -> bool:
    """Whether trilora set ``OMP_WAIT_POLICY`` in this process (the user did not)."""
    return _set_by_trilora and os.environ.get(VARIABLE) == VALUE


def user_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default ``os.environ``) without what :func:`prefer_passive_wait`
    added to this process: the environment the user started us with, for a child process
    that must run as plain Python would (a baseline in ``trilora bench``)."""
    env = dict(os.environ if environ is None else environ)
    if set_by_trilora():
        env.pop(VARIABLE, None)
    return env


__all__ = [
    "USER_SETTINGS",
    "VALUE",
    "VARIABLE",
    "prefer_passive_wait",
    "set_by_trilora",
    "user_environment",
]
