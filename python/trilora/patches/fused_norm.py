"""Run a transformers model's Llama-style RMSNorm layers through :func:`trilora.ops.rms_norm`.

:func:`enable_fused_rms_norm` patches the ``forward`` of every norm *instance* whose class
computes exactly Llama's RMSNorm. The test is structural, not a list of names: the class's
``forward`` must parse to the same syntax tree as the reference below (docstrings aside),
and the instance must hold a ``[hidden]`` float ``weight`` and a float ``variance_epsilon``.
In transformers 5 that matches LlamaRMSNorm and ~140 classes generated from it (Qwen2/3,
Mistral, Mixtral, Phi-3, DeepSeek-V3, ...); Gemma's ``1 + weight`` norm, norms without a
weight and anything transformers changes later do not match and keep their own forward.
Parameters, buffers and ``state_dict()`` are untouched; :func:`disable_fused_rms_norm`
restores the class forward.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

from torch import nn

from trilora.ops.rms_norm import rms_norm

__all__ = ["disable_fused_rms_norm", "enable_fused_rms_norm", "is_llama_rms_norm"]

# The forward this op reproduces, as transformers writes it for LlamaRMSNorm.
_REFERENCE_FORWARD = """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
"""


def _body_dump(source: str) -> str | None:
    try:
        fn = ast.parse(textwrap.dedent(source)).body[0]
    except (SyntaxError, IndexError):
        return None
    if not isinstance(fn, ast.FunctionDef):
        return None
    body = [
        s
        for s in fn.body
        if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))  # docstring
    ]
    args = [a.arg for a in fn.args.args]
    return repr(args) + "\n".join(ast.dump(s) for s in body)


_REFERENCE = _body_dump(_REFERENCE_FORWARD)


@functools.cache
def _class_matches(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return _body_dump(source) == _REFERENCE


def is_llama_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` computes Llama's RMSNorm (see the module docstring for the test)."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    return (
        isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and weight.is_floating_point()
        and isinstance(eps, (float, int))
        and not isinstance(eps, bool)
        and _class_matches(type(module))
    )


def _fused_forward(module: nn.Module, hidden_states):
    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


def enable_fused_rms_norm(model: nn.Module) -> int:
    """Route every Llama-style RMSNorm in ``model`` through the fused op; returns how many.

    Idempotent. Works on any module tree (a causal LM, a PeftModel, a single layer).
    """
    count = 0
    for module in model.modules():
        if is_llama_rms_norm(module):
            module.forward = functools.partial(_fused_forward, module)
            count += 1
    return count


def disable_fused_rms_norm(model: nn.Module) -> None:
    """Undo :func:`enable_fused_rms_norm` (no-op where it was not enabled)."""
    for module in model.modules():
        fwd = module.__dict__.get("forward")
        if isinstance(fwd, functools.partial) and fwd.func is _fused_forward:
            del module.forward
