"""``python -m trilora.train ARGS``: ``trilora train ARGS``, as launchers start it.

``torchrun --nproc-per-node N -m trilora.train ...`` and ``accelerate launch --multi_gpu
--num_processes N -m trilora.train ...`` start N of these; ``trilora train --nproc N``
does the same through torch's launcher. See ``docs/distributed.md``.
"""

import sys

from trilora._openmp import prefer_passive_wait

prefer_passive_wait()  # before torch loads libgomp: see trilora._openmp

from trilora.train.parallel import worker_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(worker_main())
