"""Shared fixtures of the optimizer tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Small tensors: one thread is fastest, and does not fight other processes for cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
