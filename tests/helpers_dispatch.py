"""What the dispatcher sees: a recorder of the aten/custom ops a block of code runs.

The one place the tests import torch's ``TorchDispatchMode`` (``torch.utils._python_dispatch``:
private, with no public alias yet).
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class OpRecorder(TorchDispatchMode):
    """``with OpRecorder() as rec: ...`` then ``rec.ops``: the names of the ops dispatched, in
    order (``"aten.mm.default"``, ``"trilora.qlora_linear_fwd.default"``, ...), and
    ``rec.dtypes``: for each, the dtypes of its tensor arguments in order."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.dtypes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        self.dtypes.append(tuple(a.dtype for a in args if hasattr(a, "dtype")))
        return func(*args, **(kwargs or {}))

    def products(self) -> list[tuple[str, tuple]]:
        """The matrix products seen: ``(op name, operand dtypes)``."""
        names = ("aten.mm.", "aten.addmm", "aten.bmm.", "mkldnn._linear_pointwise")
        return [(op, dt) for op, dt in zip(self.ops, self.dtypes) if op.startswith(names)]
