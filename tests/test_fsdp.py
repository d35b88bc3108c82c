"""FSDP2 shards the packed 4-bit weight untouched (two CPU ranks over gloo)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, seed: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        import trilora

        torch.manual_seed(seed)  # same weights and inputs on every rank
        layer = trilora.QLoraLinear.from_linear(
            torch.nn.Linear(128, 64), r=4, lora_alpha=8, compute_dtype=torch.float32,
            quant_storage=torch.bfloat16,
        )  # fmt: skip
        with torch.no_grad():
            layer.lora_B.normal_()
        packed = layer.weight.detach().clone()
        x = torch.randn(5, 128)
        ref = layer(x).detach()
        layer(x).sum().backward()
        ref_grad = layer.lora_A.grad.clone()
        layer.lora_A.grad = None

        model = torch.nn.Sequential(layer)
        fully_shard(
            model,
            mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        )
        shard = model[0].weight.to_local()
        y = model(x)
        y.sum().backward()
        grad = model[0].lora_A.grad.full_tensor()
        full_packed = model[0].weight.full_tensor()
        results.put(
            {
                "rank": rank,
                "shard_rows": shard.shape[0],
                "total_rows": packed.shape[0],
                "bytes_untouched": torch.equal(
                    full_packed.view(torch.uint8), packed.view(torch.uint8)
                ),
                # LoRA runs in bf16 under the policy; the base path is unchanged
                "y_err": ((y.float() - ref).abs().max() / ref.abs().max()).item(),
                "grad_err": ((grad.float() - ref_grad).abs().max() / ref_grad.abs().max()).item(),
            }
        )
    finally:
        dist.destroy_process_group()


def test_fully_shard_with_bf16_storage(seed):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    world = 2
    mp.start_processes(
        _worker, args=(world, _free_port(), seed, results), nprocs=world, start_method="spawn"
    )
    rows = sorted((results.get(timeout=60) for _ in range(world)), key=lambda r: r["rank"])
    for r in rows:
        assert r["shard_rows"] * world == r["total_rows"], r
        assert r["bytes_untouched"], r
        assert r["y_err"] < 2e-2, r
        assert r["grad_err"] < 2e-2, r
