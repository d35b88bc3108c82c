"""trilora.distributed in one process: launcher errors, the optimizer adapter, saving and
resuming without a process group (what a single-GPU run of the same trainer does)."""

from __future__ import annotations

import pytest
import torch
from dist_workers import MODEL, batches, fill_lora, lora_config, train
from helpers_models import save_tiny_model

import trilora
from trilora.distributed import (
    DistEnv,
    ShardedOptimizer,
    build_optimizer,
    init_distributed,
    load_state,
    model_fingerprint,
    resident_bytes,
    save_adapter,
    save_state,
    wrap_ddp,
    wrap_fsdp,
)
from trilora.io import UsageError, UserError
from trilora.optim import CPUOffloadAdamW

pytestmark = pytest.mark.filterwarnings("ignore::trilora.optim.UnclippedGradientsWarning")

_LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("api") / "model", seed=3, **MODEL)


def _peft(path, seed=0):
    model = trilora.from_pretrained(
        path, compute_dtype=torch.float32, dtype=torch.float32, device="cpu"
    )
    peft_model = trilora.get_peft_model(model, lora_config(), compute_dtype=torch.float32)
    fill_lora(peft_model, seed)
    peft_model.train()
    return peft_model


# --- launcher environment ------------------------------------------------------------


def test_no_launcher_means_one_process(monkeypatch):
    for var in _LAUNCH:
        monkeypatch.delenv(var, raising=False)
    env = init_distributed()
    assert (env.rank, env.world_size, env.has_group, env.distributed) == (0, 1, False, False)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"WORLD_SIZE": "2"}, "RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
        ({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE must be an integer"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "need 0 <= RANK < WORLD_SIZE"),
    ],
)
def test_launcher_mistakes_are_user_errors(monkeypatch, values, message):
    for var in _LAUNCH:
        monkeypatch.delenv(var, raising=False)
    if "RANK" in values:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "29500")
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=message):
        init_distributed()


def test_unknown_backend(monkeypatch):
    for key, value in dict(
        WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="x", MASTER_PORT="1"
    ).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="backend must be 'nccl' or 'gloo'"):
        init_distributed(backend="mpi")


# --- wrappers without a process group ---------------------------------------------------


def test_wrappers_are_the_identity_without_a_group(model_dir):
    model = _peft(model_dir)
    assert wrap_fsdp(model, env=DistEnv()) is model
    assert wrap_ddp(model, env=DistEnv()) is model
    sizes = resident_bytes(model)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    assert sum(sizes.values()) == total
    assert sizes["base_weights"] > 0 and sizes["trainable"] > 0


def test_ddp_needs_trainable_parameters(model_dir):
    model = trilora.from_pretrained(model_dir, compute_dtype=torch.float32, device="cpu")
    model.requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        wrap_ddp(model, env=DistEnv())


# --- optimizers -----------------------------------------------------------------------------


def test_sharded_optimizer_equals_its_inner_optimizer(model_dir, seed):
    """On plain tensors the adapter must be invisible: bit-identical steps, schedulers and
    state round trips included."""
    a = _peft(model_dir, seed)
    b = _peft(model_dir, seed)  # not a deepcopy: trilora's patched forwards are per instance
    ours = ShardedOptimizer(
        [p for p in a.parameters() if p.requires_grad],
        CPUOffloadAdamW,
        lr=1e-2,
        weight_decay=0.1,
        offload_gradients=False,
    )
    ref = CPUOffloadAdamW(
        [p for p in b.parameters() if p.requires_grad],
        lr=1e-2,
        weight_decay=0.1,
        offload_gradients=False,
    )
    assert "offload_gradients" not in ours.param_groups[0]  # a switch, not a hyperparameter
    sched_a = torch.optim.lr_scheduler.StepLR(ours, step_size=1, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(ref, step_size=1, gamma=0.5)
    data = batches(seed, 4)
    env = DistEnv()
    for i in range(4):
        la = train(a, ours, data, env, i, i + 1)
        lb = train(b, ref, data, env, i, i + 1)
        sched_a.step()
        sched_b.step()
        assert la == lb
        if i == 1:  # round-trip the state through a fresh adapter
            state = ours.state_dict()
            ours = ShardedOptimizer(
                [p for p in a.parameters() if p.requires_grad],
                CPUOffloadAdamW,
                lr=9.0,
                offload_gradients=False,
            )
            ours.load_state_dict(state)
            sched_a = torch.optim.lr_scheduler.StepLR(ours, step_size=1, gamma=0.5)
            sched_a.load_state_dict(sched_b.state_dict())
            assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na


def test_build_optimizer_plain_model(model_dir):
    model = _peft(model_dir)
    opt = build_optimizer(model, CPUOffloadAdamW, lr=1e-3)
    assert type(opt) is CPUOffloadAdamW and opt.offload_gradients  # untouched without DDP
    n = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n


# --- saving and resuming in one process -------------------------------------------------------


def test_state_round_trip_continues_bit_for_bit(model_dir, tmp_path, seed):
    data = batches(seed, 6)
    env = DistEnv()
    model = _peft(model_dir, seed)
    opt = build_optimizer(model, torch.optim.AdamW, lr=1e-2)
    train(model, opt, data, env, 0, 3)
    save_state(tmp_path / "state", model, opt, extra={"step": 3, "note": "x"})
    want = train(model, opt, data, env, 3)

    fresh = _peft(model_dir, seed + 1)
    fresh_opt = build_optimizer(fresh, torch.optim.AdamW, lr=5.0)
    extra = load_state(tmp_path / "state", fresh, fresh_opt)
    assert extra == {"step": 3, "note": "x"}
    assert train(fresh, fresh_opt, data, env, 3) == want
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n


def test_save_state_refuses_and_overwrites(model_dir, tmp_path):
    model = _peft(model_dir)
    opt = build_optimizer(model, torch.optim.AdamW, lr=1e-2)
    target = tmp_path / "state"
    save_state(target, model, opt)
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        save_state(target, model, opt)
    save_state(target, model, opt, extra={"step": 7}, overwrite=True)
    assert load_state(target, model, opt)["step"] == 7
    with pytest.raises(UserError, match="must be a tensor or JSON-serializable"):
        save_state(tmp_path / "bad", model, opt, extra={"obj": object()})
    assert not (tmp_path / "bad").exists()


def test_load_state_mismatches(model_dir, tmp_path):
    model = _peft(model_dir)
    save_state(tmp_path / "no_opt", model)
    with pytest.raises(UserError, match="holds no optimizer state"):
        load_state(tmp_path / "no_opt", model, build_optimizer(model, torch.optim.AdamW))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": trainable[:2]}, {"params": trainable[2:]}])
    save_state(tmp_path / "two_groups", model, opt)
    with pytest.raises(UserError, match="parameter groups differ"):
        load_state(tmp_path / "two_groups", model, torch.optim.AdamW(trainable))
    from peft import LoraConfig

    other_r = trilora.get_peft_model(
        trilora.from_pretrained(
            model_dir, compute_dtype=torch.float32, dtype=torch.float32, device="cpu"
        ),
        LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"),
        compute_dtype=torch.float32,
    )
    with pytest.raises(UserError, match=r"other LoRA settings.*has shape"):
        load_state(tmp_path / "no_opt", other_r)


def test_fingerprint_is_sharding_independent_data(model_dir):
    a = model_fingerprint(_peft(model_dir, 0))
    b = model_fingerprint(_peft(model_dir, 1))  # other LoRA values, same base
    assert a == b
    assert all(v[0] > 0 and v[1] >= v[0] for v in a["frozen"].values())


def test_save_adapter_loads_in_peft(model_dir, tmp_path):
    from peft import PeftModel

    model = _peft(model_dir, 5)
    save_adapter(model, tmp_path / "adapter")
    base = trilora.from_pretrained(
        model_dir, compute_dtype=torch.float32, dtype=torch.float32, device="cpu"
    )
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    want = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    with pytest.raises(UsageError):
        save_adapter(model, tmp_path / "adapter")
    with pytest.raises(UserError, match="needs a PEFT model"):
        save_adapter(base, tmp_path / "adapter2")


_SAVE_PEAK = """
import json, resource, sys
from pathlib import Path
import torch
import torch.distributed.checkpoint  # its import is not the save's memory
from trilora.distributed import save_state

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

out, rows = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
# A frozen base much larger than what is saved (the trainable head and its AdamW state).
model = torch.nn.Sequential(torch.nn.Embedding(rows, 512), torch.nn.Linear(512, 256))
model[0].weight.requires_grad_(False)
opt = torch.optim.AdamW(model[1].parameters())
model(torch.tensor([1, 2])).sum().backward()
opt.step()
before = peak()
save_state(out, model, opt)
written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
print(json.dumps({"rise": peak() - before, "written": written}))
"""


def test_saving_raises_the_peak_by_at_most_what_it_writes(tmp_path):
    import json
    import subprocess
    import sys

    rows = int(torch.randint(96_000, 160_000, ()))  # a 190-310 MiB fp32 frozen table
    done = subprocess.run(
        [sys.executable, "-c", _SAVE_PEAK, str(tmp_path / "state"), str(rows)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # The fingerprint reads every frozen byte; it once widened 64 MiB chunks to int32 and
    # squared them (a 1 GiB spike per save).
    assert got["rise"] <= got["written"] + (8 << 20), got
