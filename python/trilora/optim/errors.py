"""Errors and warnings of :mod:`trilora.optim`.

Every error is a :class:`trilora.io.UserError` (so a ``ValueError``) with a one-sentence
message naming what was expected; the ones about a parameter's type are also ``TypeError``,
as torch's optimizers raise for those.
"""

from __future__ import annotations

from trilora.io import UserError


class OptimizerInputError(UserError):
    """An argument of a trilora optimizer is out of its range or conflicts with another."""


class ParameterTypeError(OptimizerInputError, TypeError):
    """A parameter (or gradient) is not something AdamW can optimize: not a tensor, not a
    real floating-point dtype, complex, or sparse."""


class StateDictLayoutError(OptimizerInputError):
    """A state dict does not match the optimizer's layout (groups, parameters, 8-bit or
    32-bit state, shapes, quantization maps)."""


class UnclippedGradientsWarning(UserWarning):
    """The optimizer stepped offloaded gradients that nothing could have clipped.

    Emitted once per optimizer, at the first ``step()`` with ``offload_gradients=True`` that
    was not preceded by ``clip_grad_norm``. Filter it
    (``warnings.filterwarnings("ignore", category=UnclippedGradientsWarning)``) when training
    without clipping is intended.
    """


class PagingFallbackWarning(UserWarning):
    """``paging="uvm"`` could not get managed memory (no CUDA extension, or a device without
    concurrent managed access); the optimizer pages through pinned host memory instead."""


__all__ = [
    "OptimizerInputError",
    "PagingFallbackWarning",
    "ParameterTypeError",
    "StateDictLayoutError",
    "UnclippedGradientsWarning",
]
