"""The per-rank memory model (trilora.memory.distributed) in one process.

Its FSDP shard sizes are checked against what two real ranks hold in
``test_training.py::test_memory_model_matches_the_real_shards``; here: the other
strategies, CPU offload, sequence parallelism and the CLI.
"""

from __future__ import annotations

import json

import pytest
import torch

from trilora.cli import main
from trilora.memory.distributed import COMM_OVERHEAD, per_rank_memory, sharding_groups
from trilora.memory.report import MemOptions
from trilora.memory.trace import build_meta_model, load_config, static_breakdown

TINY = dict(
    model_type="llama",
    hidden_size=96,
    intermediate_size=200,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=4096,
)


@pytest.fixture(scope="module")
def model():
    return build_meta_model(load_config(TINY), MemOptions(r=4))


def _static(report):
    keys = ("base_weights", "lora_params", "other_frozen", "quant_state")
    return {k: report.device.get(k, 0) + report.host.get(k, 0) for k in keys}


def test_one_rank_holds_what_one_process_holds(model):
    """N = 1: every category equals the single-device profiler's static breakdown."""
    single = static_breakdown(model)
    for strategy in ("fsdp", "ddp"):
        rep = per_rank_memory(model, world_size=1, strategy=strategy)
        assert _static(rep) == {k: single[k] for k in _static(rep)}
        assert "communication" not in rep.device


@pytest.mark.parametrize("world", [2, 3, 8])
def test_fsdp_shards_what_ddp_replicates(model, world):
    ddp = per_rank_memory(model, world_size=world, strategy="ddp")
    fsdp = per_rank_memory(model, world_size=world, strategy="fsdp")
    one = per_rank_memory(model, world_size=1, strategy="ddp")
    assert _static(ddp) == _static(one)  # DDP: a full copy per rank
    assert ddp.device["communication"] == COMM_OVERHEAD
    for key in ("base_weights", "lora_params"):
        full = _static(one)[key]
        # rank 0 holds ceil(rows / N) of every tensor: at least 1/N, at most 1/N + a row each
        assert full / world <= fsdp.device[key] < full / world + full / 10
    assert fsdp.device["quant_state"] == ddp.device["quant_state"]  # replicated buffers
    groups, _ = sharding_groups(model, world)
    layers = [g for g in groups if g.kind == "layer"]
    root = next(g for g in groups if g.kind == "root")
    assert fsdp.device["gathered_params"] == root.gathered + 2 * max(g.gathered for g in layers)
    lazy = per_rank_memory(model, world_size=world, reshard_after_forward=False)
    assert lazy.device["gathered_params"] == root.gathered + sum(g.gathered for g in layers)
    # AdamW's two fp32 moments per element of rank 0's shard of each trainable tensor
    trainable = [p for p in model.parameters() if p.requires_grad]
    local = sum(-(-p.shape[0] // world) * (p.numel() // p.shape[0]) for p in trainable)
    assert fsdp.device["optimizer_state"] == 8 * local
    assert ddp.device["optimizer_state"] == 8 * sum(p.numel() for p in trainable)
    assert fsdp.total < ddp.total


def test_mixed_precision_gathers_in_param_dtype(model):
    fp32 = sharding_groups(model, 2)[0]
    half = sharding_groups(model, 2, torch.bfloat16)[0]
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the fp32 LoRA factors are gathered as bf16; packed bytes and bf16 params are unchanged
    assert sum(g.gathered for g in fp32) - sum(g.gathered for g in half) == 2 * lora


def test_cpu_offload_keeps_only_gathered_layers_on_the_device(model):
    on = per_rank_memory(model, world_size=4, cpu_offload=True)
    off = per_rank_memory(model, world_size=4)
    for key in ("base_weights", "lora_params", "optimizer_state"):
        assert on.device.get(key, 0) == 0 and on.host[key] == off.device[key]
    assert on.device["gathered_params"] == off.device["gathered_params"]
    assert on.total < off.total
    with pytest.raises(ValueError, match="needs strategy='fsdp'"):
        per_rank_memory(model, world_size=4, strategy="ddp", cpu_offload=True)


def test_optimizers_by_their_own_rules(model):
    from trilora.memory.optimizer_model import optimizer_bytes

    trainable = [p for p in model.parameters() if p.requires_grad]
    local = [-(-p.shape[0] // 2) * (p.numel() // p.shape[0]) for p in trainable]
    for name in ("adamw_8bit", "adamw_cpu_offload", "adamw_host"):
        want = optimizer_bytes(name, local, 4)
        rep = per_rank_memory(model, world_size=2, optimizer=name)
        assert rep.device["optimizer_state"] == want.device, name
        assert rep.host.get("optimizer_state", 0) == want.host, name
    offload = per_rank_memory(model, world_size=2, optimizer="adamw_cpu_offload")
    kept = per_rank_memory(model, world_size=2, optimizer="adamw")
    # offloaded gradients leave the device (FSDP's reduce-scatter buffer stays)
    sharded_grads = sum(4 * n for n in local)
    assert kept.device["gradients"] - offload.device["gradients"] == sharded_grads
    # DDP turns gradient offload off (build_optimizer): its gradients stay on the device
    ddp = per_rank_memory(model, world_size=2, strategy="ddp", optimizer="adamw_cpu_offload")
    assert ddp.device["gradients"] == sum(4 * p.numel() for p in trainable)
    with pytest.raises(ValueError, match="unknown optimizer"):
        per_rank_memory(model, world_size=2, optimizer="sgd")


def test_sequence_parallel_buffers(model):
    kw = dict(world_size=6, seq_len=6000, batch=1)
    two = per_rank_memory(model, sequence_parallel=2, **kw)
    six = per_rank_memory(model, sequence_parallel=6, **kw)  # 2 KV heads, each on 3 ranks
    buf2, buf6 = two.device["sequence_parallel_buffers"], six.device["sequence_parallel_buffers"]
    assert buf2 == 3 * buf6  # each rank's share of the tokens
    # q, k, v of 3000 tokens (6 + 2 * 2 heads of 16), bf16, in and out of the all-to-all
    assert buf2 == 2 * 3000 * (6 + 4) * 16 * 2
    with pytest.raises(ValueError, match="must divide the head count"):
        per_rank_memory(model, sequence_parallel=4, **kw)
    with pytest.raises(ValueError, match="2 key/value heads cannot be split"):
        per_rank_memory(model, sequence_parallel=3, **kw)
    with pytest.raises(ValueError, match="global seq_len"):
        per_rank_memory(model, world_size=2, sequence_parallel=2)


@pytest.mark.slow  # a full mem run (~3 s); the per-rank model: the other tests here
def test_cli_reports_one_rank(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "mem.json"
    args = ["mem", str(cfg), "--seq-len", "64", "--rank", "4"]
    assert main([*args, "--world-size", "4", "--fsdp", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "FSDP over 4 rank(s)" in text and "gathered_params" in text
    data = json.loads(out.read_text())
    fsdp_total = data["per_rank"]["total"]
    assert data["per_rank"]["world_size"] == 4
    assert data["single_device"]["total"] > 0
    assert main([*args, "--world-size", "4", "--json", str(out)]) == 2  # exists: refused
    assert main([*args, "--world-size", "4", "--json", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["per_rank"]["strategy"] == "ddp"
    assert json.loads(out.read_text())["per_rank"]["total"] > fsdp_total
    assert main([*args, "--world-size", "2", "--budget", "24GiB"]) == 2
    with pytest.raises(SystemExit) as exc:
        main([*args, "--world-size", "0"])
    assert exc.value.code == 2


@pytest.mark.slow  # our search logic over traces the other tests here and in tests/memory run
def test_largest_context_comes_from_the_fast_model():
    from dataclasses import replace

    from trilora.memory.distributed import largest_context, rank_report

    config = load_config(TINY)
    opts = MemOptions(r=4, mlp_chunks=None, seq_len=1024)
    full = {
        t: rank_report(config, replace(opts, seq_len=t), 2, "fsdp", depth="full")[0].total
        for t in (5120, 6144)
    }
    assert full[5120] < full[6144]
    value, rep = largest_context(config, opts, 2, (full[5120] + full[6144]) // 2)
    # the per-rank report of the answer equals the full-depth one, and the next length's
    # does not fit
    assert value == 5120 and rep.total == full[5120]
