"""Test configuration shared by the whole suite.

The Triton interpreter is selected when a kernel is *decorated*, so it has to be switched
on before any kernel module is imported: with no GPU, every ``@triton.jit`` kernel then
runs on CPU tensors through NumPy.

The suite runs on every core through pytest-xdist (pyproject's addopts). Each worker gets
its share of the cores as torch threads, and so do the processes tests start (through
``OMP_NUM_THREADS``), so that N workers never run N times the machine's threads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Files holding slow tests first: xdist hands out whole files in this order, so the
    longest ones start at once instead of trailing at the end of the run."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


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
