"""FSDP2 checkpoint resume with trilora's AdamW (two CPU ranks over gloo).

bitsandbytes #1381: a paged AdamW broke FSDP checkpoint resume (its ``step`` is an ``int``
that the checkpoint code calls ``.cpu()`` on, and its quantization state is not sharded like
the parameters). Here every flavour saves mid-run through torch's distributed checkpoint
(``get_state_dict`` + ``torch.distributed.checkpoint.save``), loads into a fresh model and
optimizer, and must continue bit for bit like an uninterrupted run; a per-rank
``torch.save`` of ``optimizer.state_dict()`` must round-trip too.
"""

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

KINDS = {
    "32": ({}, "auto"),
    "8": ({"state_bits": 8, "min_8bit_size": 1024}, "auto"),
    "8-paged": (
        {"state_bits": 8, "min_8bit_size": 1024, "paging": "host", "page_bytes": 8192},
        "triton",
    ),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, seed: int, tmp: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for kind in KINDS:
            results.put(_resume(rank, seed, kind, os.path.join(tmp, kind)))
    except Exception as exc:  # report instead of leaving the test waiting
        import traceback

        results.put({"rank": rank, "error": f"{exc!r}\n{traceback.format_exc()}"})
        raise
    finally:
        dist.destroy_process_group()


def _resume(rank: int, seed: int, kind: str, tmp: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    from trilora.config import override
    from trilora.optim import AdamW

    settings, backend = KINDS[kind]

    def build(init_seed: int):
        torch.manual_seed(init_seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(40, 67), torch.nn.Tanh(), torch.nn.Linear(67, 33)
        )
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        return model, AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, **settings)

    def train(model, opt, steps):
        with override(backend=backend):
            for t in steps:
                gen = torch.Generator().manual_seed(seed + 100 * t + rank)
                model(torch.randn(6, 40, generator=gen)).square().mean().backward()
                opt.step()
                opt.zero_grad()

    def full(model):
        return [p.full_tensor().detach().clone() for p in model.parameters()]

    model, opt = build(seed)
    train(model, opt, range(6))
    want = full(model)

    model, opt = build(seed)
    train(model, opt, range(3))
    msd, osd = get_state_dict(model, opt)
    step_types = sorted({type(e["step"]).__name__ for e in osd["state"].values()})
    bits = sorted({8 if "state1" in e else 32 for e in osd["state"].values()})
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(tmp, "dcp"))
    torch.save(opt.state_dict(), os.path.join(tmp, f"rank{rank}.pt"))

    model, opt = build(seed + 1)  # other weights: everything must come from the checkpoint
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=os.path.join(tmp, "dcp"))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    train(model, opt, range(3, 6))
    dcp_ok = all(torch.equal(a, b) for a, b in zip(full(model), want))

    # Per-rank torch.save / torch.load of the optimizer's own (sharded) state dict.
    _, opt2 = build(seed + 2)
    saved = torch.load(os.path.join(tmp, f"rank{rank}.pt"), weights_only=False)
    opt2.load_state_dict(saved)

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    local_ok = all(
        torch.equal(local(a), local(b))
        for e1, e2 in zip(saved["state"].values(), opt2.state_dict()["state"].values())
        for a, b in zip(e1.values(), e2.values())
    )
    return {"rank": rank, "kind": kind, "dcp_ok": dcp_ok, "local_ok": local_ok,
            "steps": step_types, "bits": bits}  # fmt: skip


def test_fsdp2_checkpoint_resume_continues_exactly(tmp_path, seed):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    world = 2
    for kind in KINDS:
        os.makedirs(tmp_path / kind)
    mp.start_processes(
        _worker, args=(world, _free_port(), seed, str(tmp_path), results), nprocs=world,
        start_method="spawn",
    )  # fmt: skip
    rows = [results.get(timeout=300) for _ in range(world * len(KINDS))]
    for row in rows:
        assert "error" not in row, row.get("error")
    for row in rows:
        where = f"{row['kind']} rank {row['rank']}"
        assert row["steps"] == ["Tensor"], where  # a tensor step, as torch's checkpointing expects
        assert row["bits"] == ([32] if row["kind"] == "32" else [8, 32]), where  # biases: 32
        assert row["dcp_ok"], f"{where}: the resumed run departed from the uninterrupted one"
        assert row["local_ok"], f"{where}: the torch.save round trip changed the state"
