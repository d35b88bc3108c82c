"""A selfcheck worker whose correctness section starts with one injected unit.

``python inject_worker.py KIND -- WORKER-ARGS``: the injected unit (named like a QLoRA case)
crashes its process (``crash``: SIGSEGV), hangs (``hang``), or fails a check (``fail``);
after it come two real quantize/dequantize cases, so a test can see that the worker was
restarted after a crash and carried on. Used as ``RunOptions.worker_cmd`` by the runner tests.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from trilora.selfcheck import cases, worker
from trilora.selfcheck.units import Unit, check, verdict_of_checks


def _crash(ctx):
    os.kill(os.getpid(), signal.SIGSEGV)


def _hang(ctx):
    time.sleep(3600)


def _fail(ctx):
    return verdict_of_checks([check("y", 0.5, 4e-3)])


KINDS = {"crash": _crash, "hang": _hang, "fail": _fail}


def main() -> int:
    kind, sep, *argv = sys.argv[1:]
    assert sep == "--" and kind in KINDS, sys.argv

    def injected(shapes):
        return [
            Unit(
                f"injected {kind}",
                KINDS[kind],
                kernel="qlora_linear.tiled",
                config=f"injected-{kind}",
                shape="M=3 N=5 K=7",
                dtype="bf16",
            )
        ]

    def real(shapes):
        return [u for u in cases.quantize_cases(shapes) if u.shape == "33x96"]

    cases.FAMILIES = (injected, real)
    return worker.main(argv)


if __name__ == "__main__":
    sys.exit(main())
