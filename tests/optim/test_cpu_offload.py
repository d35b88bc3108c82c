"""CPUOffloadAdamW against torch.optim.AdamW: step parity, accumulation, clipping, state.

The reference is torch's own AdamW on an identical copy of the model fed identical data,
using the same update kernel as the host step (torch's fused CPU AdamW where available),
so parameters must agree bit for bit at every step: any error in gradient transport,
accumulation, clipping, hyperparameter sync or state handling shows up exactly.
(Against the per-op ``fused=None`` AdamW the fused kernel differs by rounding, ~1 ulp per
step, which Adam's normalization can amplify for entries whose ``exp_avg_sq`` is tiny.)
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from trilora.optim import CPUOffloadAdamW, UnclippedGradientsWarning
from trilora.optim.adamw import host_kernel_is_fused

ignore_unclipped = pytest.mark.filterwarnings("ignore::trilora.optim.UnclippedGradientsWarning")


class Net(nn.Module):
    """Two linears on every step; ``extra`` only on even steps, so it often has no grad."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.lin1 = nn.Linear(d_in, d_hidden)
        self.lin2 = nn.Linear(d_hidden, d_out)
        self.extra = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        h = torch.tanh(self.lin1(x))
        y = self.lin2(h)
        return y + self.extra(h) if use_extra else y


def _dims(seed: int) -> tuple[int, int, int]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(int(v) for v in torch.randint(17, 61, (3,), generator=gen))


def _pair(seed: int, dtype: torch.dtype = torch.float32) -> tuple[Net, Net]:
    torch.manual_seed(seed)
    net = Net(*_dims(seed)).to(dtype)
    return net, copy.deepcopy(net)


def _batch(net: Net, seed: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randn(5, net.lin1.in_features, generator=gen, dtype=net.lin1.weight.dtype)


def _loss(net: Net, x: torch.Tensor, step: int) -> torch.Tensor:
    return net(x, use_extra=step % 2 == 0).float().square().mean()


def _groups(net: Net) -> list[dict]:
    # Different lr for lin1; lin2 and extra take the defaults.
    return [
        {"params": list(net.lin1.parameters()), "lr": 2e-2},
        {"params": list(net.lin2.parameters()) + list(net.extra.parameters())},
    ]


HPARAMS = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-7, "weight_decay": 0.05}


FUSED = host_kernel_is_fused()


def reference_adamw(params, **hparams) -> torch.optim.AdamW:
    """torch.optim.AdamW with the same kernel the host step uses."""
    return torch.optim.AdamW(params, **hparams, fused=FUSED or None)


def _assert_params_equal(ours: nn.Module, ref: nn.Module, where: str) -> None:
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), f"{where} {name}: max |diff| {(a - b).abs().max().item():.3g}"


@ignore_unclipped
@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_matches_torch_adamw_every_step(seed, offload, set_to_none):
    ours, ref = _pair(seed)
    opt = CPUOffloadAdamW(_groups(ours), **HPARAMS, offload_gradients=offload)
    ref_opt = reference_adamw(_groups(ref), **HPARAMS)

    # The scheduler writes group["lr"]; the host optimizer must follow it.
    def schedule(step: int) -> float:
        return 1.0 / (1.0 + 0.5 * step)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, schedule)
    for step in range(10):
        x = _batch(ours, seed, step)
        for net, o, s in ((ours, opt, sched), (ref, ref_opt, ref_sched)):
            o.zero_grad(set_to_none=set_to_none)
            _loss(net, x, step).backward()
            o.step()
            s.step()
        _assert_params_equal(ours, ref, f"step {step}")
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-2 * schedule(10))
    # ``extra`` had no gradient on odd steps; with set_to_none=True torch skipped it there.
    ref_steps = ref_opt.state[ref.extra.weight]["step"]
    assert float(opt.state[ours.extra.weight]["step"]) == float(ref_steps)
    assert float(ref_steps) == (10 if not set_to_none else 5)


@ignore_unclipped
def test_gradients_leave_the_parameters(seed):
    ours, _ = _pair(seed)
    opt = CPUOffloadAdamW(ours.parameters(), offload_gradients=True)
    _loss(ours, _batch(ours, seed, 0), 0).backward()
    assert all(p.grad is None for p in ours.parameters())
    host = {id(s.param): s for s in opt._slots}
    assert all(host[id(p)].has_grad for p in ours.parameters())

    kept, _ = _pair(seed)
    CPUOffloadAdamW(kept.parameters(), offload_gradients=False)
    _loss(kept, _batch(kept, seed, 0), 0).backward()
    assert all(p.grad is not None for p in kept.parameters())


@ignore_unclipped
@pytest.mark.parametrize("offload", [True, False])
def test_gradient_accumulation(seed, offload):
    ours, ref = _pair(seed)
    opt = CPUOffloadAdamW(ours.parameters(), **HPARAMS, offload_gradients=offload)
    ref_opt = reference_adamw(ref.parameters(), **HPARAMS)
    for step in range(4):
        for net, o in ((ours, opt), (ref, ref_opt)):
            # Micro-batch 2 skips ``extra``: its accumulated grad has two terms, not three.
            for micro in range(3):
                x = _batch(net, seed, 10 * step + micro)
                (_loss(net, x, micro) / 3).backward()
            o.step()
            o.zero_grad()
        _assert_params_equal(ours, ref, f"step {step}")


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_clip_grad_norm_matches_torch(seed, offload, norm_type):
    ours, ref = _pair(seed)
    opt = CPUOffloadAdamW(ours.parameters(), **HPARAMS, offload_gradients=offload)
    ref_opt = reference_adamw(ref.parameters(), **HPARAMS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnclippedGradientsWarning)  # clipping silences it
        for step in range(5):
            x = _batch(ours, seed, step)
            for net in (ours, ref):
                _loss(net, x, step).backward()
            # Clip at a fraction of the true norm (an infinite max_norm only measures it)
            # so clipping is always active.
            total = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"), norm_type)
            max_norm = 0.3 * float(total)
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)
            our_norm = opt.clip_grad_norm(max_norm, norm_type)
            assert float(ref_norm) > max_norm
            assert torch.equal(our_norm, ref_norm)
            for o in (opt, ref_opt):
                o.step()
                o.zero_grad()
            _assert_params_equal(ours, ref, f"step {step}")


def test_torch_clipping_sees_nothing_and_step_warns(seed):
    ours, _ = _pair(seed)
    opt = CPUOffloadAdamW(ours.parameters(), offload_gradients=True)
    _loss(ours, _batch(ours, seed, 0), 0).backward()
    # The pitfall this optimizer warns about: torch's clip finds no gradients.
    assert float(torch.nn.utils.clip_grad_norm_(ours.parameters(), 1e-3)) == 0.0
    with pytest.warns(UnclippedGradientsWarning, match="clip_grad_norm"):
        opt.step()
    _loss(ours, _batch(ours, seed, 1), 1).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnclippedGradientsWarning)
        opt.step()  # once per optimizer


def _train(net: Net, opt, sched, seed: int, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        _loss(net, _batch(net, seed, step), step).backward()
        opt.clip_grad_norm(10.0)
        opt.step()
        sched.step()


def _resumed(seed, dtype, offload, model_first: bool):
    """3 steps, save everything through bytes, fresh model + optimizer, 3 more steps."""

    def build(net):
        opt = CPUOffloadAdamW(_groups(net), **HPARAMS, offload_gradients=offload)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
        return opt, sched

    full, first = _pair(seed, dtype)
    opt, sched = build(full)
    _train(full, opt, sched, seed, range(6))

    opt, sched = build(first)
    _train(first, opt, sched, seed, range(3))
    buf = io.BytesIO()
    torch.save(
        {"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf
    )
    buf.seek(0)
    saved = torch.load(buf)
    snapshot = copy.deepcopy(saved["opt"])

    torch.manual_seed(seed + 1)
    resumed = Net(*_dims(seed)).to(dtype)  # different initial weights
    opt, sched = build(resumed)
    if model_first:
        resumed.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
    else:
        opt.load_state_dict(saved["opt"])
        resumed.load_state_dict(saved["model"])
    sched.load_state_dict(saved["sched"])
    _train(resumed, opt, sched, seed, range(3, 6))
    # Loading copies: training on must not have written into the loaded dict.
    for index, entry in snapshot["state"].items():
        for key, value in entry.items():
            assert torch.equal(saved["opt"]["state"][index][key], value), (index, key)
    return full, resumed, saved["opt"]


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("model_first", [True, False])
def test_state_dict_round_trip_continues_identically(seed, offload, model_first):
    full, resumed, saved = _resumed(seed, torch.float32, offload, model_first)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    # Same layout as torch.optim.AdamW's; fp32 parameters need no saved master.
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert [g["params"] for g in saved["param_groups"]] == [[0, 1], [2, 3, 4]]


def test_bf16_masters_round_trip(seed):
    # bf16 device parameters: the fp32 masters hold bits the model's weights lack, so a
    # resume is only exact if the saved masters are adopted.
    full, resumed, saved = _resumed(seed, torch.bfloat16, offload=True, model_first=True)
    assert saved["state"][0]["master"].dtype == torch.float32
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    # The masters really carry more than bf16: rounding them must lose something.
    master = saved["state"][0]["master"]
    assert not torch.equal(master, master.to(torch.bfloat16).float())


@ignore_unclipped
def test_parameters_written_from_outside_are_reread(seed):
    ours, ref = _pair(seed)
    opt = CPUOffloadAdamW(ours.parameters(), **HPARAMS)
    ref_opt = reference_adamw(ref.parameters(), **HPARAMS)
    new_weight = torch.randn_like(ours.lin2.weight)
    for step in range(5):
        if step == 2:
            with torch.no_grad():
                for net in (ours, ref):
                    net.lin2.weight.copy_(new_weight)
                    net.lin1.bias.data = torch.full_like(net.lin1.bias, 0.25)  # rebinds storage
        for net, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            _loss(net, _batch(net, seed, step), step).backward()
            o.step()
        _assert_params_equal(ours, ref, f"step {step}")


@ignore_unclipped
def test_closure_and_no_grad_step(seed):
    ours, ref = _pair(seed)
    opt = CPUOffloadAdamW(ours.parameters(), **HPARAMS)
    ref_opt = reference_adamw(ref.parameters(), **HPARAMS)
    x = _batch(ours, seed, 0)

    def closure(net, o):
        def run():
            o.zero_grad()
            loss = _loss(net, x, 0)
            loss.backward()
            return loss

        return run

    assert opt.step() is None  # no gradients yet: nothing happens
    loss = opt.step(closure(ours, opt))
    ref_loss = ref_opt.step(closure(ref, ref_opt))
    assert torch.equal(loss, ref_loss)
    _assert_params_equal(ours, ref, "closure step")


def test_host_memory_accounting(seed):
    ours, _ = _pair(seed)
    n = sum(p.numel() for p in ours.parameters())
    opt = CPUOffloadAdamW(ours.parameters())
    assert opt.host_memory() == {"master": 4 * n, "grad": 4 * n, "staging": 0, "state": 0}
    opt.clip_grad_norm(1.0)
    _loss(ours, _batch(ours, seed, 0), 0).backward()
    opt.step()
    tensors = len(list(ours.parameters()))
    state = opt.host_memory()["state"]
    assert 8 * n <= state <= 8 * n + 8 * tensors  # the moments + one scalar step each
    assert opt.host_bytes == 16 * n + (state - 8 * n)
    assert opt.pinned_bytes == 0  # pinned memory only backs CUDA parameters


@ignore_unclipped
def test_second_optimizer_takes_over_the_hooks(seed):
    ours, _ = _pair(seed)
    first = CPUOffloadAdamW(ours.parameters())
    with pytest.warns(UserWarning, match="offloaded by another"):
        second = CPUOffloadAdamW(ours.parameters())
    _loss(ours, _batch(ours, seed, 0), 0).backward()
    assert all(s.has_grad for s in second._slots)
    assert not any(s.has_grad for s in first._slots)
    # Without hooks, gradients stay on p.grad until the step moves them.
    second.remove_hooks()
    before = ours.lin1.weight.detach().clone()
    _loss(ours, _batch(ours, seed, 1), 1).backward()
    assert ours.lin1.weight.grad is not None
    second.step()
    assert ours.lin1.weight.grad is None and not torch.equal(before, ours.lin1.weight)


def test_bad_arguments():
    w = nn.Parameter(torch.randn(3, 4))
    with pytest.raises(TypeError, match="amsgrad"):
        CPUOffloadAdamW([w], amsgrad=True)
    with pytest.raises(TypeError, match="unsupported argument"):
        CPUOffloadAdamW([w], momentum=0.9)
    with pytest.raises(TypeError, match="floating-point"):
        CPUOffloadAdamW([torch.zeros(3, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="non-leaf"):
        CPUOffloadAdamW([w * 2])
    with pytest.raises(ValueError, match="requires_grad=False"):
        CPUOffloadAdamW([torch.zeros(3)])
    with pytest.raises(TypeError, match="floating-point"):
        CPUOffloadAdamW(["not a tensor"])
    with pytest.raises(ValueError, match="lr"):
        CPUOffloadAdamW([w], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        CPUOffloadAdamW([w], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="amsgrad"):
        CPUOffloadAdamW([{"params": [w], "amsgrad": True}])
    with pytest.raises(ValueError, match="weight_decay"):
        CPUOffloadAdamW([{"params": [w], "weight_decay": -0.1}])
    with pytest.raises(ValueError, match="empty"):
        CPUOffloadAdamW([])
    opt = CPUOffloadAdamW([w])
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})


def test_loads_a_torch_adamw_state_dict(seed):
    # Same layout as torch's: a run started with torch.optim.AdamW can continue here.
    ours, ref = _pair(seed)
    ref_opt = reference_adamw(ref.parameters(), **HPARAMS)
    for step in range(2):
        ref_opt.zero_grad()
        _loss(ref, _batch(ref, seed, step), step).backward()
        ref_opt.step()
    ours.load_state_dict(ref.state_dict())
    opt = CPUOffloadAdamW(ours.parameters(), **HPARAMS)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    for step in range(2, 5):
        for net, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            _loss(net, _batch(net, seed, step), step).backward()
            if o is opt:
                o.clip_grad_norm(float("inf"))
            o.step()
        _assert_params_equal(ours, ref, f"step {step}")


# ---- transformers.Trainer ---------------------------------------------------------------


STEPS = 3


def _trainer_run(tmp_path, seed, model, optimizer, callbacks):
    from transformers import Trainer, TrainingArguments

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (4 * STEPS, 12), generator=gen)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_grad_norm=0.05,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": x, "labels": x} for x in ids],
        optimizers=(optimizer, None),
        callbacks=callbacks,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == STEPS
    return [h["loss"] for h in logs], [h["grad_norm"] for h in logs]


def test_trainer_clips_through_the_callback(tmp_path, seed):
    peft = pytest.importorskip("peft")
    from helpers_models import tiny_config
    from transformers import AutoModelForCausalLM

    from trilora.optim import OffloadClipCallback

    torch.manual_seed(seed)
    config = tiny_config("llama", hidden=32, layers=1, vocab=64)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    ref = peft.get_peft_model(AutoModelForCausalLM.from_config(config), lora)
    # Non-zero B so every LoRA matrix gets a gradient from the first step.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    ours, unclipped = copy.deepcopy(ref), copy.deepcopy(ref)

    def trainable(m):
        return [p for p in m.parameters() if p.requires_grad]

    hp = {"lr": 1e-2, "weight_decay": 0.01}
    # The reference: torch AdamW, clipped by the Trainer itself (gradients on p.grad).
    ref_loss, ref_norm = _trainer_run(
        tmp_path / "ref", seed, ref, reference_adamw(trainable(ref), **hp), None
    )
    callback = OffloadClipCallback()
    our_loss, our_norm = _trainer_run(
        tmp_path / "ours", seed, ours, CPUOffloadAdamW(trainable(ours), **hp), [callback]
    )
    assert all(n > 0.05 for n in ref_norm)  # clipping was active at every step
    assert our_loss == ref_loss
    assert our_norm == ref_norm  # the callback put the true norm into the logs
    assert callback.last_grad_norm == our_norm[-1]
    _assert_params_equal(ours, ref, "after training")

    # Without the callback the Trainer's clip sees no gradients: it logs 0, the step
    # warns, and training departs from the clipped reference.
    with pytest.warns(UnclippedGradientsWarning):
        loss, norm = _trainer_run(
            tmp_path / "unclipped",
            seed,
            unclipped,
            CPUOffloadAdamW(trainable(unclipped), **hp),
            None,
        )
    assert norm == [0.0] * STEPS
    assert loss[0] == ref_loss[0]
    lora_a = [
        (a, b) for (n, a), b in zip(unclipped.named_parameters(), ref.parameters()) if "lora_A" in n
    ]
    assert not all(torch.equal(a, b) for a, b in lora_a)


# ---- CUDA (skipped without a GPU) -------------------------------------------------------


class _SyncOracle:
    """The intended result of the CUDA path, computed the slow obvious way: blocking
    copies of every gradient to fp32 CPU tensors, the same torch AdamW kernel, blocking
    copies back. Clips where the optimizer under test does: on the host fp32 gradients
    when they are offloaded, else on ``p.grad``."""

    def __init__(self, params: list[torch.Tensor], clip_on_device: bool, **hparams):
        self.params = params
        self.clip_on_device = clip_on_device
        self.host = [p.detach().cpu().float().requires_grad_() for p in params]
        self.opt = reference_adamw(self.host, **hparams)

    def step(self, max_norm: float) -> torch.Tensor:
        if self.clip_on_device:
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        for h, p in zip(self.host, self.params):
            h.grad = None if p.grad is None else p.grad.detach().cpu().float()
        if not self.clip_on_device:
            norm = torch.nn.utils.clip_grad_norm_(self.host, max_norm)
        self.opt.step()
        with torch.no_grad():
            for h, p in zip(self.host, self.params):
                p.copy_(h)
                p.grad = None
        return norm


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_path_matches_a_synchronous_oracle(seed, offload, dtype):
    ours, ref = _pair(seed, dtype)
    ours.cuda(), ref.cuda()
    opt = CPUOffloadAdamW(ours.parameters(), **HPARAMS, offload_gradients=offload)
    oracle = _SyncOracle(list(ref.parameters()), clip_on_device=not offload, **HPARAMS)
    assert opt.pinned_bytes > 0
    for step in range(6):
        for net in (ours, ref):
            # Three micro-batches: the second offloaded copy of a gradient must wait for
            # the first to be folded before its staging buffer is reused.
            for micro in range(3):
                x = _batch(net, seed, 10 * step + micro).cuda()
                (_loss(net, x, micro) / 3).backward()
        if offload:
            assert all(p.grad is None for p in ours.parameters())
        norm = opt.clip_grad_norm(0.5)
        ref_norm = oracle.step(0.5)
        opt.step()
        # No synchronize: the copy-back runs on the current stream, so the comparison
        # below (also on it) must already see the new values.
        if dtype == torch.float32:
            # Same gradients, same accumulation order, same clipping, same kernel.
            assert torch.equal(norm.cpu(), ref_norm.cpu())
            _assert_params_equal(ours, ref, f"step {step}")
        else:
            # bf16: the oracle accumulates micro-batches in bf16 on p.grad, the offloaded
            # path in fp32 on the host; parameters may then round to a neighbouring bf16
            # value (~1e-3 here) while one lost or doubled update would move them ~1e-2.
            for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
                torch.testing.assert_close(
                    a, b, rtol=1e-2, atol=2e-3, msg=lambda m, n=name, s=step: f"step {s} {n}: {m}"
                )
        opt.zero_grad()


@ignore_unclipped
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_version_counter(seed, dtype, monkeypatch):
    """A torch without ``Tensor._version`` (the compatibility point returns None): outside
    writes are found by value, and the fp32 masters of bf16 parameters are kept, so every
    step is bit-identical to the version-counter path."""
    from trilora.optim import tensors

    assert tensors.version_counter(torch.zeros(1)) is not None
    nets = _pair(seed, dtype)
    opts = [CPUOffloadAdamW(net.parameters(), **HPARAMS) for net in nets]
    new_weight = torch.randn_like(nets[0].lin2.weight)
    for step in range(5):
        if step == 2:
            with torch.no_grad():
                for net in nets:
                    net.lin2.weight.copy_(new_weight)
                    net.lin1.bias.data = torch.full_like(net.lin1.bias, 0.25)  # rebinds storage
        for i, (net, o) in enumerate(zip(nets, opts)):
            if i == 1:
                monkeypatch.setattr(tensors, "version_counter", lambda t: None)
            o.zero_grad()
            _loss(net, _batch(net, seed, step), step).backward()
            o.step()
            monkeypatch.undo()
        _assert_params_equal(nets[1], nets[0], f"step {step}")
    assert torch.equal(nets[1].lin2.weight, nets[0].lin2.weight)
    # the masters really were kept: bf16 parameters moved by less than their rounding step
    # would have been lost if the masters had been re-read from them every step
    masters = [opt._slots[0].master for opt in opts]
    assert torch.equal(masters[0], masters[1])
