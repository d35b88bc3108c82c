"""``trilora mem``'s optimizer model against the optimizers' own accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trilora.config import override
from trilora.memory.optimizer_model import (
    OPTIMIZER_NAMES,
    baseline_equivalent,
    offloads_gradients,
    optimizer_bytes,
)
from trilora.optim import OPTIMIZERS, create

PAGE = 8 << 10


@pytest.mark.filterwarnings("ignore::trilora.optim.errors.UnclippedGradientsWarning")
@pytest.mark.parametrize("name", [n for n in OPTIMIZER_NAMES if "uvm" not in n])
def test_model_matches_what_the_optimizer_holds(seed, name):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(int(torch.randint(70, 90, (1,), generator=gen)), 61), (300,), (33, 17)]
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = create(name, params, page_bytes=PAGE)
    backend = "triton" if OPTIMIZERS[name]["paging"] == "host" else "auto"
    with override(backend=backend):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    model = optimizer_bytes(name, [p.numel() for p in params], 4, PAGE)
    host, dev = opt.host_memory(), opt.device_memory()
    steps = 4 * len(params)  # the step counters, 0-dim fp32 CPU tensors
    if offloads_gradients(name):
        # On CPU parameters there is no pinned staging copy (CUDA only): model it away.
        staging = 4 * sum(p.numel() for p in params)
        assert model.host - staging == host["master"] + host["grad"] + host["state"] - steps
        assert model.device == 0 and not model.gradients_on_device
    elif OPTIMIZERS[name]["paging"] == "host":
        assert model.host == host["state"] - steps and dev["state"] == 0
        assert model.device == dev["page_buffers"]
    else:
        assert model.device == dev["state"] and model.host == 0 == host["state"]


def test_eight_bit_is_a_quarter_and_baselines_are_resident():
    n = [1 << 20]
    assert optimizer_bytes("adamw", n).device == 8 << 20
    assert optimizer_bytes("adamw_8bit", n).device == (2 << 20) + 8 * (1 << 12)
    # host paging: two page buffers, each at most a page (32 MiB by default)
    assert optimizer_bytes("adamw_8bit_host", n).device == 2 * ((2 << 20) + 8 * (1 << 12))
    assert 2 * (31 << 20) < optimizer_bytes("adamw_host", [1 << 24]).device <= 2 * (32 << 20)
    small = optimizer_bytes("adamw_8bit", [4095]).device
    assert small == 8 * 4095  # under min_8bit_size: 32-bit
    assert baseline_equivalent("adamw_8bit_cpu_offload") == "adamw_8bit"
    assert baseline_equivalent("paged_adamw") == "adamw"
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizer_bytes("sgd", n)
