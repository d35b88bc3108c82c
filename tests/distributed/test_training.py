"""Training under DDP and FSDP2 on 2 CPU ranks (gloo) equals training in one process.

One spawned pair of processes runs every 2-rank scenario of ``dist_workers`` (start-up is
most of the cost on a 2-core machine: ~10 s per process importing torch, transformers and
PEFT); the tests then compare each scenario with the same training loop run here in a
single process, with the same global batch of 4 sequences. The suite's other FSDP2 checks
of the library (``fully_shard`` on a bf16-stored layer, trilora.optim through torch's
distributed checkpoint API) are scenarios of the same pair.

Tolerances: the 2-rank runs differ from one process only in the order of floating-point
sums (each rank reduces its 2 rows, then the ranks average), so fp32 losses agree to ~1e-6
relative; Adam's normalization can amplify a last-bit difference in a tiny gradient entry
over 10 steps, so adapters are compared to 1e-4 of their largest entry. The bf16
mixed-precision run is compared with bf16's resolution (2^-8).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_workers import (
    LR,
    MODEL,
    MOE_FOLDER,
    MOE_MODEL,
    MOE_QUANT,
    MOE_STEPS,
    SAVE_AT,
    STEPS,
    BlockwiseSGD,
    adapter_tensors,
    batches,
    load_peft,
    train,
    worker,
)
from helpers_models import assert_adapters_close, save_tiny_model

from trilora.distributed import DistEnv, load_state, save_adapter
from trilora.io import UserError

pytestmark = [
    pytest.mark.distributed,
    # the single-process reference runs CPUOffloadAdamW as a user would, unclipped
    pytest.mark.filterwarnings("ignore::trilora.optim.UnclippedGradientsWarning"),
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

WORLD = 2
LOSS_RTOL = 1e-5
BF16_RTOL = 2**-8 * 4  # a few bf16 roundings of the LoRA path per step


@dataclass
class Run:
    root: Path
    model: Path
    out: Path
    seed: int
    reports: dict[int, dict]

    def scenario(self, name: str) -> list[dict]:
        rows = [self.reports[r][name] for r in range(WORLD)]
        for rank, row in enumerate(rows):
            assert "crash" not in row, f"rank {rank} crashed in {name}:\n{row['crash']}"
        return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    seed = int(os.environ.get("TRILORA_TEST_SEED", torch.seed() % (2**31)))
    print(f"seed={seed}")
    root = tmp_path_factory.mktemp("distributed")
    model = save_tiny_model(root / "model", seed=seed, **MODEL)
    save_tiny_model(root / MOE_FOLDER, seed=seed, **MOE_MODEL)
    out = root / "out"
    out.mkdir()
    # Forked, not spawned: the ranks inherit this process's imports of torch, transformers
    # and PEFT instead of paying ~10 s of CPU each for them (what the ranks run does not
    # depend on how they were started; DataLoader workers are forked the same way).
    import peft  # noqa: F401  (imported here so that the ranks inherit it)

    import trilora.distributed  # noqa: F401

    results = mp.get_context("fork").SimpleQueue()
    names = [
        "ddp",
        "fsdp",
        "fsdp_int8",
        "fsdp_moe",
        "ddp_moe",
        "fsdp_checkpointing",
        "fsdp_bf16",
        "cpu_offload",
        "mixed_storage",
        "blockwise_state",
        "ulysses",
        "missing_checkpoint",
        "trilora_optim",
        "fully_shard_bf16",
        "optim_dcp_resume",
    ]
    mp.start_processes(
        worker,
        args=(WORLD, str(root / "init"), str(model), str(out), seed, names, results),
        nprocs=WORLD,
        start_method="fork",
    )
    reports = dict(results.get() for _ in range(WORLD))
    for name in names:
        print(name, [f"{reports[r][name]['seconds']:.1f}s" for r in range(WORLD)])
    return Run(root, model, out, seed, reports)


def _reference(
    run: Run, optimizer: str, steps: int = STEPS, quant_type: str = "nf4"
) -> tuple[list[float], Path]:
    """One process, the whole batch: losses and the saved adapter."""
    folder = run.root / f"reference_{optimizer}_{steps}_{quant_type}"
    cache = folder / "losses.pt"
    if cache.exists():
        return torch.load(cache), folder / "adapter"
    from trilora.distributed import build_optimizer
    from trilora.optim import CPUOffloadAdamW

    model = load_peft(run.model, run.seed, quant_type=quant_type)
    cls = CPUOffloadAdamW if optimizer == "offload" else torch.optim.AdamW
    opt = build_optimizer(model, cls, lr=1e-2)
    losses = train(model, opt, batches(run.seed, steps), DistEnv())
    save_adapter(model, folder / "adapter")
    torch.save(losses, cache)
    return losses, folder / "adapter"


def _close_losses(got: list[float], want: list[float], rtol: float) -> None:
    assert len(got) == len(want)
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    print(f"losses: {len(got)} steps, worst relative difference {worst:.2e} (rtol {rtol:.0e})")
    for step, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= rtol * abs(b), f"step {step}: {a} vs {b} (rtol {rtol})"


def _close_adapters(got: Path, want: Path) -> None:
    worst = assert_adapters_close(adapter_tensors(got), adapter_tensors(want))
    print(
        f"adapter: relative L2 {worst['adapter']:.2e}, worst tensor {worst['adapter_tensor']:.2e}"
    )


def test_ddp_matches_one_process(run):
    rows = run.scenario("ddp")
    want, adapter = _reference(run, "offload")
    assert rows[0]["losses"] == rows[1]["losses"]
    _close_losses(rows[0]["losses"], want, LOSS_RTOL)
    assert want[-2] < want[0] and want[-1] < want[1]  # it trained (two alternating batches)
    _close_adapters(run.out / "ddp_adapter", adapter)


def test_fsdp_matches_one_process_and_halves_the_base(run):
    rows = run.scenario("fsdp")
    want, adapter = _reference(run, "adamw")
    _close_losses(rows[0]["losses"], want, LOSS_RTOL)
    _close_adapters(run.out / "fsdp_adapter", adapter)
    for row in rows:
        assert row["bytes_untouched"]  # the all-gather returned the loaded bytes exactly
        assert row["odd_row_layers"] > 0  # some packed weights had rows 2 does not divide
    single = rows[0]["resident_single"]
    base = [row["resident"]["base_weights"] for row in rows]
    assert sum(base) == single["base_weights"]  # shards partition the bytes, padding excluded
    for b in base:
        assert 0.45 <= b / single["base_weights"] <= 0.55, (base, single)
    # the quantization state is replicated (module buffers), as documented: not halved
    # (each rank keeps one copy of the small code tables per layer where one process
    # shares them, hence >=)
    quant = [row["resident"]["quant_state"] for row in rows]
    assert quant[0] == quant[1] >= single["quant_state"]
    trainable = [row["resident"]["trainable"] for row in rows]
    assert sum(trainable) == single["trainable"]


def test_fsdp_on_int8_matches_one_process_and_halves_the_codes(run):
    rows = run.scenario("fsdp_int8")
    if not rows[0]["integer_params"]:
        # torch < 2.13: FSDP2 cannot hold int8 parameters; one clear line on every rank
        for row in rows:
            assert "int8" in row["refused"] and "2.13" in row["refused"]
        return
    want, adapter = _reference(run, "adamw", quant_type="int8")
    _close_losses(rows[0]["losses"], want, LOSS_RTOL)
    _close_adapters(run.out / "fsdp_int8_adapter", adapter)
    single = rows[0]["resident_single"]
    base = [row["resident"]["base_weights"] for row in rows]
    assert sum(base) == single["base_weights"]  # the codes, sharded by rows
    for b in base:
        assert 0.45 <= b / single["base_weights"] <= 0.55, (base, single)
    for row in rows:
        assert row["codes_untouched"]  # gathered: the loaded int8 codes, bit for bit
        # SCB (fp32 per row) is replicated, as the 4-bit state is
        assert row["resident"]["quant_state"] == single["quant_state"]


def _moe_reference(run: Run) -> tuple[list[float], Path]:
    """The MoE scenarios' loop in one process: losses and the saved adapter."""
    folder = run.root / "moe_reference"
    if (folder / "losses.pt").exists():
        return torch.load(folder / "losses.pt"), folder / "adapter"
    from trilora.distributed import build_optimizer

    model = load_peft(run.root / MOE_FOLDER, run.seed, quantization_config=MOE_QUANT)
    experts_lora = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and ".experts." in n
    }
    opt = build_optimizer(model, torch.optim.AdamW, lr=LR)
    losses = train(model, opt, batches(run.seed, MOE_STEPS), DistEnv())
    # the experts' LoRA factors trained (their gradients flow through the experts forward)
    trained = dict(model.named_parameters())
    assert experts_lora and all(not torch.equal(trained[n], p) for n, p in experts_lora.items())
    save_adapter(model, folder / "adapter")
    torch.save(losses, folder / "losses.pt")
    return losses, folder / "adapter"


def test_ddp_on_moe_matches_one_process(run):
    rows = run.scenario("ddp_moe")
    want, adapter = _moe_reference(run)
    assert rows[0]["losses"] == rows[1]["losses"]
    _close_losses(rows[0]["losses"], want, LOSS_RTOL)
    _close_adapters(run.out / "ddp_moe_adapter", adapter)


def test_fsdp_on_moe_shards_the_experts_and_matches_one_process(run):
    rows = run.scenario("fsdp_moe")
    want, adapter = _moe_reference(run)
    assert rows[0]["losses"] == rows[1]["losses"]
    _close_losses(rows[0]["losses"], want, LOSS_RTOL)
    _close_adapters(run.out / "fsdp_moe_adapter", adapter)
    # 3 experts over 2 ranks: whole experts per rank (torch.chunk: 2 and 1)
    assert [row["local_experts"] for row in rows] == [[2], [1]]
    for row in rows:
        assert row["experts_modules"] == 2 * MOE_MODEL["layers"]  # gate_up_proj, down_proj
        assert row["storages"] == ["torch.float32"]  # bf16-stored codes re-viewed, not cast
        assert row["bytes_untouched"]  # gathered: each expert's loaded bytes exactly
        # the experts forward read full, gathered codes every time it ran
        assert row["gathered_in_forward"] and all(row["gathered_in_forward"])
    single = rows[0]["resident_single"]
    base = [row["resident"]["base_weights"] for row in rows]
    assert sum(base) == single["base_weights"]  # codes of linears and experts, partitioned
    quant = [row["resident"]["quant_state"] for row in rows]
    assert quant[0] == quant[1] >= single["quant_state"]  # replicated, experts' state too


def test_fsdp_with_activation_checkpointing_and_cpu_offload_adamw(run):
    rows = run.scenario("fsdp_checkpointing")
    assert rows[0]["sharded_optimizer"]
    want, adapter = _reference(run, "offload")
    _close_losses(rows[0]["losses"], want, LOSS_RTOL)
    _close_adapters(run.out / "fsdp_ckpt_adapter", adapter)
    # resumed on the same 2 ranks: the same reductions in the same order, so the same bits
    assert rows[0]["resumed_losses"] == rows[0]["losses"][SAVE_AT:]


def test_saved_on_two_ranks_resumes_on_one(run):
    run.scenario("fsdp_checkpointing")
    from trilora.distributed import build_optimizer
    from trilora.optim import CPUOffloadAdamW

    want, adapter = _reference(run, "offload")
    model = load_peft(run.model, run.seed + 1)  # other LoRA values: the state must win
    opt = build_optimizer(model, CPUOffloadAdamW, lr=0.5)  # the saved lr must win too
    extra = load_state(run.out / "state", model, opt)
    assert extra["step"] == SAVE_AT
    assert torch.equal(extra["rng"], torch.arange(3))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)
    losses = train(model, opt, batches(run.seed), DistEnv(), SAVE_AT)
    _close_losses(losses, want[SAVE_AT:], LOSS_RTOL)
    save_adapter(model, run.root / "resumed_adapter")
    _close_adapters(run.root / "resumed_adapter", adapter)


def test_bf16_mixed_precision_gathers_the_bytes_untouched(run):
    rows = run.scenario("fsdp_bf16")
    want, _ = _reference(run, "adamw", steps=3)
    for row in rows:
        assert row["storages"] == ["torch.bfloat16"]  # fp32 storage re-viewed, not cast
        assert row["bytes_untouched"]
    _close_losses(rows[0]["losses"], want, BF16_RTOL)


def test_cpu_offload_policy(run):
    rows = run.scenario("cpu_offload")
    want, _ = _reference(run, "adamw", steps=3)
    _close_losses(rows[0]["losses"], want, LOSS_RTOL)


def test_mixed_storage_dtypes_across_ranks_are_refused(run):
    rows = run.scenario("mixed_storage")
    for row in rows:
        assert row["error"] is not None and "mixed storage dtypes across ranks" in row["error"]
        assert "quant_storage" in row["error"]


def test_rank0_load_errors_reach_every_rank(run):
    for row in run.scenario("missing_checkpoint"):  # a UserError on both ranks, no hang
        assert row["error"] is not None and row["error"].startswith("rank 0 could not load")
        assert "no_such_model" in row["error"]


def test_resuming_from_another_model_is_refused(run, tmp_path):
    run.scenario("fsdp_checkpointing")
    # the same architecture with other weights
    other = save_tiny_model(tmp_path / "other", seed=run.seed + 1, **MODEL)
    with pytest.raises(UserError, match=r"another model.*checksum"):
        load_state(run.out / "state", load_peft(other, run.seed))
    # another architecture
    wider = save_tiny_model(tmp_path / "wider", seed=run.seed, **{**MODEL, "intermediate": 45})
    with pytest.raises(UserError, match="config intermediate_size is 43 there and 45 here"):
        load_state(run.out / "state", load_peft(wider, run.seed))
    # not a training state at all
    with pytest.raises(UserError, match="not a trilora training state"):
        load_state(run.model, load_peft(run.model, run.seed))


def test_blockwise_optimizer_state_is_not_resharded(run):
    rows = run.scenario("blockwise_state")
    assert rows[0]["optimizer"] == "ShardedOptimizer"  # not a torch.optim class
    from trilora.distributed import build_optimizer

    model = load_peft(run.model, run.seed)
    with pytest.raises(UserError, match=r"not elementwise.*saved on 2 FSDP ranks.*fsdp on 2 ranks"):
        load_state(run.out / "blockwise", model, build_optimizer(model, BlockwiseSGD))


def test_memory_model_matches_the_real_shards(run):
    """trilora mem's per-rank model against what rank 0 of the 2-rank FSDP run held."""
    from trilora.memory.distributed import per_rank_memory, sharding_groups
    from trilora.patches.activation_checkpointing import find_decoder_layers

    rows = run.scenario("fsdp")
    model = load_peft(run.model, run.seed)
    rep = per_rank_memory(model, world_size=WORLD)
    held = rows[0]["resident"]  # rank 0: the larger shard where rows do not divide
    assert rep.device["base_weights"] == held["base_weights"]
    assert rep.device["lora_params"] == held["trainable"]
    assert rep.device["quant_state"] == held["quant_state"]
    assert rep.device["other_frozen"] == held["other_params"] + held["buffers"]
    groups, _ = sharding_groups(model, WORLD)
    layer0 = next(g for g in groups if g.name == "layer 0")
    assert find_decoder_layers(model)[0] is not None
    assert rows[0]["gathered_layer0"] == layer0.gathered  # the all-gather's output, bytes


def test_ulysses_attention_matches_one_process(run):
    rows = run.scenario("ulysses")
    for rank, row in enumerate(rows):
        assert row["inner"] == "sdpa"
        errors = row["errors"]
        assert errors.pop("shift_labels_ok")
        # fp32 attention over 12-16 tokens: only the order of sums differs
        tol = {"model_logits": 1e-5 * row["scale"], "model_lora_grad": 1e-5 * row["grad_scale"]}
        for key, err in errors.items():
            assert err <= tol.get(key, 1e-5), (rank, key, err)


def test_trilora_optimizers_step_fsdp_shards_natively(run):
    rows = run.scenario("trilora_optim")
    assert rows[0]["optimizer"] == "CPUOffloadAdamW"  # no adapter: it steps DTensors itself
    want, _ = _reference(run, "offload")
    _close_losses(rows[0]["losses"], want, LOSS_RTOL)
    # 8-bit state (blockwise over each rank's shard) resumes on the same layout, bit for bit
    assert rows[0]["eight_bit_resumed"] == rows[0]["eight_bit"][2:]
    assert rows[0]["eight_bit"][2] < rows[0]["eight_bit"][0]
    # ... and is refused on another layout, with the reason
    from trilora.distributed import build_optimizer
    from trilora.optim import AdamW8bit

    model = load_peft(run.model, run.seed)
    opt = build_optimizer(model, AdamW8bit, lr=1e-2, min_8bit_size=64)
    with pytest.raises(UserError, match=r"not elementwise \(blockwise.*cannot be resharded"):
        load_state(run.out / "state8", model, opt)


def test_fully_shard_with_bf16_storage(run):
    """FSDP2 shards the packed 4-bit weight untouched: torch's ``fully_shard`` directly, on
    a layer whose packed bytes are stored as bf16, under a bf16 mixed-precision policy."""
    for row in run.scenario("fully_shard_bf16"):
        assert row["shard_rows"] * WORLD == row["total_rows"], row
        assert row["bytes_untouched"], row
        assert row["y_err"] < 2e-2, row
        assert row["grad_err"] < 2e-2, row


def test_fsdp2_checkpoint_resume_continues_exactly(run):
    """trilora.optim's 32-bit, 8-bit and host-paged 8-bit AdamW on FSDP2 shards, saved with
    ``get_state_dict`` + ``torch.distributed.checkpoint`` and loaded into a fresh model:
    the run continues bit for bit (bitsandbytes #1381); per-rank ``torch.save`` round-trips."""
    from dist_workers import OPTIM_DCP_KINDS

    for rank, row in enumerate(run.scenario("optim_dcp_resume")):
        assert sorted(row["kinds"]) == sorted(OPTIM_DCP_KINDS)
        for kind, got in row["kinds"].items():
            where = f"{kind} rank {rank}"
            assert got["steps"] == ["Tensor"], (
                where
            )  # a tensor step, as torch's checkpointing expects
            assert got["bits"] == ([32] if kind == "32" else [8, 32]), where  # biases: 32
            assert got["dcp_ok"], f"{where}: the resumed run departed from the uninterrupted one"
            assert got["local_ok"], f"{where}: the torch.save round trip changed the state"
