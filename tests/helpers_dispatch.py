"""What the dispatcher sees: a recorder of the aten/custom ops a block of code runs.

The one place the tests import torch's ``TorchDispatchMode`` (``torch.utils._python_dispatch``:
private, with no public alias yet).
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class OpRecorder(TorchDispatchMode):
    """``with OpRecorder() as rec: ...`` then ``rec.ops``: the names of the ops dispatched, in
    order (``"aten.mm.default"``, ``"trilora.qlora_linear_fwd.default"``, ...)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
