"""Test configuration shared by the whole suite.

The Triton interpreter is selected when a kernel is *decorated*, so it has to be switched
on before any kernel module is imported: with no GPU, every ``@triton.jit`` kernel then
runs on CPU tensors through NumPy.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test run, printed on failure so the case can be replayed.

    Set ``TRILORA_TEST_SEED`` to replay a failing draw.
    """
    value = int(os.environ.get("TRILORA_TEST_SEED", torch.seed() % (2**31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value
