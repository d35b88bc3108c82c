"""FSDP2 shards the packed 4-bit weight untouched (two CPU ranks over gloo)."""

from __future__ import annotations

import gc
import queue
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available"
)


def _worker(rank: int, world: int, store: str, seed: int, results) -> None:
    # A file rendezvous: a TCP port picked by binding and releasing it can be taken by
    # another process (other test runs on a shared machine) before rank 0 binds it again.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
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
        # Tear down in step: the FSDP module graph is cyclic garbage that holds the process
        # group, so free it while the group is alive, and let no rank close its connections
        # while the other may still be communicating.
        del model, layer, shard, y, grad, full_packed
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fully_shard_with_bf16_storage(seed, tmp_path):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    world = 2
    procs = mp.start_processes(
        _worker, args=(world, str(tmp_path / "store"), seed, results), nprocs=world,
        start_method="spawn", join=False,
    )  # fmt: skip
    # Read the results while the ranks run (a rank that dies raises here, with its error).
    rows, deadline = [], time.monotonic() + 600
    while len(rows) < world and time.monotonic() < deadline:
        try:
            rows.append(results.get(timeout=1))
        except queue.Empty:
            procs.join(timeout=0)
    assert len(rows) == world, f"{len(rows)} of {world} ranks reported within 600 s"
    while not procs.join(timeout=60):
        pass
    rows.sort(key=lambda r: r["rank"])
    for r in rows:
        assert r["shard_rows"] * world == r["total_rows"], r
        assert r["bytes_untouched"], r
        assert r["y_err"] < 2e-2, r
        assert r["grad_err"] < 2e-2, r
