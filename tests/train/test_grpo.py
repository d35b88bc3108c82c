"""GRPO: the loss and its gradient against float64 formulas and TRL's GRPOTrainer, the
group advantages, reward functions (built-in, the user's, bad ones), and a run that
resumes bit for bit inside a --num-iterations group (sampling RNG and generation batch)."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from train_helpers import save_tiny_lm, write_jsonl

from trilora.io import UsageError, UserError
from trilora.train import data as D
from trilora.train.config import TrainConfig
from trilora.train.losses import token_losses
from trilora.train.methods.grpo import group_advantages, grpo_loss
from trilora.train.methods.rewards import RewardError, parse_rewards, score_rewards
from trilora.train.model import load_model

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def _float64_loss(logp, old, ref, adv, mask, kind, beta, lo, hi, lmax):
    """TRL 1.16's _compute_loss, element by element, in float64 (one micro-batch)."""
    n, t = logp.shape
    per = [[0.0] * t for _ in range(n)]
    for i in range(n):
        for j in range(t):
            ratio = torch.exp(logp[i, j] - old[i, j])
            clipped = torch.clamp(ratio, 1 - lo, 1 + hi)
            value = -torch.min(ratio * adv[i], clipped * adv[i])
            if beta:
                d = ref[i, j] - logp[i, j]
                value = value + beta * ratio * (torch.exp(d) - d - 1)
            per[i][j] = value * mask[i, j]
    rows = [sum(per[i]) for i in range(n)]
    if kind == "grpo":
        return sum(rows[i] / max(float(mask[i].sum()), 1.0) for i in range(n)) / n
    if kind == "dr_grpo":
        return sum(rows) / (n * lmax)
    return sum(rows) / mask.sum()


@pytest.mark.parametrize("kind", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.07])
def test_loss_and_gradient_match_float64_formulas(kind, beta):
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    n, t, lmax = 6, 7, 9
    logp = (torch.rand(n, t, generator=g) * -3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(n, t, generator=g)  # a policy that moved
    ref = logp.detach() + 0.5 * torch.randn(n, t, generator=g)
    adv = torch.randn(n, generator=g)
    mask = (torch.rand(n, t, generator=g) > 0.3).float()
    mask[0] = 0  # a fully masked completion (truncated and masked) still counts in N
    lo, hi = 0.2, 0.28
    loss, stats = grpo_loss(
        logp,
        old,
        ref if beta else None,
        adv,
        mask,
        loss_type=kind,
        beta=beta,
        epsilon_low=lo,
        epsilon_high=hi,
        max_completion_length=lmax,
        num_sequences=n,
        num_tokens=int(mask.sum()),
    )
    p64 = logp.detach().double().requires_grad_()
    ref64 = _float64_loss(
        p64, old.double(), ref.double(), adv.double(), mask.double(), kind, beta, lo, hi, lmax
    )
    assert float(loss.detach()) == pytest.approx(float(ref64.detach()), rel=1e-5, abs=1e-7)
    loss.backward()
    ref64.backward()
    torch.testing.assert_close(logp.grad.double(), p64.grad, rtol=1e-4, atol=1e-7)
    ratio = torch.exp(logp.detach() - old)
    expected_clip = ((ratio < 1 - lo) & (adv[:, None] < 0)) | (
        (ratio > 1 + hi) & (adv[:, None] > 0)
    )
    assert stats["clip_fraction"] == pytest.approx(float((expected_clip * mask).sum() / mask.sum()))
    assert 0 < stats["clip_fraction"] < 1


def test_group_advantages_match_trl():
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    rewards = torch.randn(12, generator=g)
    rewards[5] = float("nan")  # no function applied to this one
    adv = group_advantages(rewards, 4, scale=True)
    r = rewards.double().view(3, 4)
    for k in range(3):
        vals = [float(v) for v in r[k] if not torch.isnan(v)]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
        for j in range(4):
            want = 0.0 if torch.isnan(r[k, j]) else (float(r[k, j]) - mean) / (std + 1e-4)
            assert float(adv[4 * k + j]) == pytest.approx(want, rel=1e-5, abs=1e-6)
    plain = group_advantages(rewards, 4, scale=False)
    assert float(plain[0]) == pytest.approx(
        float(rewards[0] - torch.nanmean(rewards[:4])), rel=1e-5
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    save_tiny_lm(root / "m", layers=2, hidden=64)
    rng = random.Random(1)
    recs = []
    for i in range(12):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        prompt = f"add {a} and {b}:"
        recs.append(
            {
                "prompt": [{"role": "user", "content": prompt}] if i % 3 == 0 else prompt,
                "answer": str(a + b),
            }
        )
    write_jsonl(root / "p.jsonl", recs)
    (root / "my_rewards.py").write_text(
        "def lowercase(prompts, completions, completion_ids, answer, **kw):\n"
        "    texts = [c if isinstance(c, str) else c[0]['content'] for c in completions]\n"
        "    assert len(answer) == len(texts) and all(isinstance(a, str) for a in answer)\n"
        "    return [sum(ch.islower() for ch in t) / max(len(t), 1) for t in texts]\n"
        "def wrong_count(completions, **kw):\n"
        "    return [1.0]\n"
        "def not_a_number(completions, **kw):\n"
        "    return ['yes'] * len(completions)\n"
        "def raises(completions, **kw):\n"
        "    raise ValueError('no answer field')\n"
    )
    return root


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed")
@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_loss_matches_trl_grpo_trainer(tiny, tmp_path, kind):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    cfg = TrainConfig(
        model=str(tiny / "m"), data="d", method="grpo", reward="json", lora_r=4, lora_dropout=0.0
    )
    torch.manual_seed(0)
    lm = load_model(cfg, "cpu", log=lambda *_: None)
    model = lm.model
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    n, p_len, c_len, temperature, beta = 4, 5, 6, 0.7, 0.05
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=n,
        num_generations=n,
        max_completion_length=c_len,
        temperature=temperature,
        beta=beta,
        loss_type=kind,
        epsilon=0.2,
        epsilon_high=0.25,
        bf16=False,  # TRL's default casts the logits to bf16 on CPU; the comparison is in fp32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=args,
            train_dataset=Dataset.from_list([{"prompt": "x"}] * n),
            processing_class=lm.tokenizer,
        )
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.1, generator=g)
    prompt_ids = torch.randint(0, 256, (n, p_len), generator=g)
    completion_ids = torch.randint(0, 256, (n, c_len), generator=g)
    lengths = [c_len, 3, 1, 5]
    completion_mask = torch.tensor([[int(j < k) for j in range(c_len)] for k in lengths])
    advantages = torch.randn(n, generator=g)
    model.train()
    # the log-probabilities from our fused path, at the completion positions
    rows = [
        [
            D.Example(
                prompt_ids[i].tolist() + completion_ids[i, : lengths[i]].tolist(),
                [D.IGNORE] * p_len + completion_ids[i, : lengths[i]].tolist(),
                "",
            )
        ]
        for i in range(n)
    ]
    batch = D.collate(rows, lm.tokenizer.pad_token_id)
    with torch.no_grad():
        ours_lp = -token_losses(model, batch, "none", temperature=temperature)
        at = ours_lp[:, p_len - 1 : p_len - 1 + c_len]
        with model.disable_adapter():
            ref_lp = -token_losses(model, batch, "none", temperature=temperature)
    old = at + 0.2 * torch.randn(n, c_len, generator=g) * completion_mask
    ref_c = ref_lp[:, p_len - 1 : p_len - 1 + c_len]
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref_c,
        "num_items_in_batch": completion_mask.sum(),
    }
    model.zero_grad()
    trl_loss = trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    lp = -token_losses(model, batch, "none", temperature=temperature)
    width = lp.shape[1]

    def full(x):  # [N, C] at the completion positions -> [N, T]
        out = torch.zeros(n, width)
        out[:, p_len - 1 : p_len - 1 + c_len] = x
        return out

    mask = torch.zeros(n, width)
    mask[:, :-1] = (batch["labels"][:, 1:] != D.IGNORE).float()
    loss, _ = grpo_loss(
        lp,
        full(old),
        full(ref_c),
        advantages,
        mask,
        loss_type=kind,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.25,
        max_completion_length=c_len,
        num_sequences=n,
        num_tokens=int(completion_mask.sum()),
    )
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            err = (p.grad - trl_grads[name]).abs().max() / trl_grads[name].abs().max()
            assert err < 1e-4, (name, float(err))


def test_builtin_rewards():
    rewards = parse_rewards(
        "json:a|b; regex:^\\d+$; equals:answer; contains:answer; length:2-4", "1,2,1,1,0.5"
    )
    assert [r.name for r in rewards] == [
        "json",
        "regex",
        "equals_answer",
        "contains_answer",
        "length",
    ]
    completions = ['{"a": 1, "b": 2}', "12", " 12 ", "x12y", '{"a": 1}']
    scores = score_rewards(
        rewards, ["p"] * 5, completions, [[1]] * 5, {"answer": ["3", "12", "12", "12", "1"]}
    )
    assert scores == [
        [1.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 1.0, 1.0, 1.0],
        [0.0, 0.0, 1.0, 1.0, 1.0],
        [0.0, 0.0, 0.0, 1.0, 1.0],
        [0.0, 0.0, 0.0, 1.0, 0.0],
    ]
    chat = score_rewards(
        parse_rewards("json", None),
        [[{"role": "user", "content": "q"}]],
        [[{"role": "assistant", "content": "[1]"}]],
        [[1]],
        {},
    )
    assert chat == [[1.0]]


def test_user_rewards_and_bad_ones(tiny, monkeypatch):
    f = tiny / "my_rewards.py"
    (rw,) = parse_rewards(f"{f}:lowercase", None)
    assert rw.name == "lowercase"
    got = score_rewards([rw], ["p", "p"], ["abC", "12"], [[1], [2]], {"answer": ["1", "2"]})
    assert got == [[pytest.approx(2 / 3)], [0.0]]
    monkeypatch.syspath_prepend(str(tiny))
    (mod,) = parse_rewards("my_rewards:lowercase", None)
    assert score_rewards([mod], ["p"], ["ab"], [[1]], {"answer": ["x"]}) == [[1.0]]
    for name, message in [
        ("wrong_count", "reward function wrong_count returned 1 values for 2 completions: [1.0]"),
        (
            "not_a_number",
            "reward function not_a_number returned 'yes' among its values, not a finite number",
        ),
        ("raises", "reward function raises raised ValueError: no answer field"),
    ]:
        (bad,) = parse_rewards(f"{f}:{name}", None)
        with pytest.raises(RewardError) as exc:
            score_rewards([bad], ["p", "p"], ["a", "b"], [[1], [2]], {})
        assert str(exc.value) == message
    with pytest.raises(UsageError, match="has no function 'nope'"):
        parse_rewards(f"{f}:nope", None)
    with pytest.raises(UsageError, match="expected json"):
        parse_rewards("jsn", None)
    with pytest.raises(UsageError, match="2 weights for 1 reward"):
        parse_rewards("json", "1,2")


def _cfg(tiny, out, **kw):
    base = dict(
        model=str(tiny / "m"),
        data=str(tiny / "p.jsonl"),
        method="grpo",
        reward=f"{tiny / 'my_rewards.py'}:lowercase; length:0-12",
        reward_weights="1,0.5",
        num_generations=3,
        max_completion_length=6,
        max_seq_len=64,
        batch_size=2,
        lora_r=4,
        lora_dropout=0.1,
        lr=2e-2,
        max_steps=4,
        num_iterations=2,
        beta=0.04,
        val_fraction=0.2,
        compare=1,
        max_new_tokens=4,
        save_every=1,
        keep_last=4,
        progress=False,
        out=str(out),
    )
    return TrainConfig(**{**base, **kw})


def test_run_logs_rewards_and_resumes_bitwise_inside_a_group(tiny, tmp_path):
    from trilora.train.loop import train

    ref = tmp_path / "ref"
    s = train(_cfg(tiny, ref), quiet=True)
    recs = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        for key in (
            "reward",
            "reward_lowercase",
            "reward_length",
            "kl",
            "clip_fraction",
            "completion_length",
        ):
            assert key in r, key
        assert r["reward"] == pytest.approx(
            r["reward_lowercase"] + 0.5 * r["reward_length"], abs=1e-5
        )
        assert 1 <= r["completion_length"] <= 6
    assert steps[0]["kl"] == 0.0 and steps[0]["clip_fraction"] == 0.0  # the policy is the reference
    assert steps[1]["clip_fraction"] > 0 or steps[1]["kl"] > 0  # step 2 reuses step 1's samples
    assert "eval_reward" in s["base"] and "eval_reward_lowercase" in s["tuned"]

    # resume from the checkpoint after step 3: inside the second generation group (steps 3, 4)
    out = tmp_path / "resumed"
    shutil.copytree(ref, out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-00000003"
    shutil.rmtree(out / "adapter")
    (out / "summary.json").unlink()
    train(_cfg(tiny, out), resume=True, quiet=True)
    again = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert again == recs or [
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_memory")} for r in again
    ] == [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_memory")} for r in recs]
    a = (ref / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == a

    # from step 2's checkpoint: the next group samples again, from the restored RNG
    out2 = tmp_path / "resumed2"
    shutil.copytree(ref, out2)
    shutil.rmtree(out2 / "checkpoints" / "step-00000003")
    shutil.rmtree(out2 / "adapter")
    train(_cfg(tiny, out2), resume=True, quiet=True)
    assert (out2 / "adapter" / "adapter_model.safetensors").read_bytes() == a


def test_bad_reward_stops_the_run_in_one_line_and_keeps_the_checkpoint(tiny, tmp_path, monkeypatch):
    from trilora.train.loop import train
    from trilora.train.methods import grpo

    calls = {"n": 0}
    real = grpo.score_rewards

    def failing_after_two(rewards, *a, **kw):  # a reward that breaks at the third step
        calls["n"] += 1
        if calls["n"] == 3:
            return real(parse_rewards(f"{tiny / 'my_rewards.py'}:not_a_number", None), *a, **kw)
        return real(rewards, *a, **kw)

    monkeypatch.setattr(grpo, "score_rewards", failing_after_two)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"^reward function not_a_number returned 'yes' among"):
        train(_cfg(tiny, out, num_iterations=1, val_fraction=0.0, compare=0), quiet=True)
    assert (out / "checkpoints" / "step-00000002").is_dir()


def test_grpo_settings_are_checked(tiny):
    def cfg(**kw):
        return TrainConfig(model="m", data="d", **kw).validate()

    assert cfg(method="grpo", reward="json").beta == 0.0
    assert cfg(method="dpo").beta == 0.1
    with pytest.raises(UsageError, match="--reward: GRPO needs"):
        cfg(method="grpo")
    with pytest.raises(
        UsageError, match="--loss-type: --method grpo takes one of dapo, grpo, dr_grpo"
    ):
        cfg(method="grpo", reward="json", loss_type="ipo")
    with pytest.raises(UsageError, match="--num-iterations: is a GRPO setting"):
        cfg(method="sft", num_iterations=2)
    with pytest.raises(UsageError, match="--reward: is a GRPO setting"):
        cfg(method="dpo", reward="json")
    with pytest.raises(UsageError, match="--num-generations: a group needs at least 2"):
        cfg(method="grpo", reward="json", num_generations=1)


def test_grpo_demo_task_is_fixed_and_its_rewards_score_one_word_answers(tmp_path):
    from trilora.train import demo_grpo

    train_path, held_out = demo_grpo.write_prompts(tmp_path / "a")
    again = demo_grpo.write_prompts(tmp_path / "b")
    assert train_path.read_bytes() == again[0].read_bytes()
    held = [json.loads(x) for x in held_out.read_text().splitlines()]
    assert len(held) == demo_grpo.HELD_OUT
    words = {r["answer"] for r in held}
    assert not words & {json.loads(x)["answer"] for x in train_path.read_text().splitlines()} - {
        "old",
        "light",
    }
    rewards = parse_rewards(demo_grpo.REWARD, None)
    assert [r.name for r in rewards] == ["one_word", "contains_answer"]
    long_word = "x" * (demo_grpo.MAX_WORD_LETTERS + 1)
    completions = [
        "cold",
        "The opposite of hot is cold.",
        "",
        "Warm!",
        '"ice-cold"',
        "HETATM" * 8,  # a policy that dropped its spaces: not a word
        f"cold {long_word}",
        "cold 42",
    ]
    n = len(completions)
    got = score_rewards(rewards, ["p"] * n, completions, [[1]] * n, {"answer": ["cold"] * n})
    assert [g[0] for g in got] == [1.0, pytest.approx(1 / 6), 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert [g[1] for g in got] == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]


@pytest.mark.slow  # two 2-process launches (~40 s of CPU); the one-process resume is above
@pytest.mark.distributed
def test_two_processes_resume_bitwise_inside_a_group(tiny, tmp_path):
    """Each rank samples its own rows: a checkpoint inside a --num-iterations group holds
    every rank's generation batch, so a resume there continues bit for bit on every rank
    (rank 1 used to sample its rows again, from the restored RNG)."""
    import os
    import subprocess
    import sys

    def launch(out: Path, *extra: str) -> None:
        args = [
            *("--model", str(tiny / "m"), "--data", str(tiny / "p.jsonl"), "--out", str(out)),
            *("--reward", f"{tiny / 'my_rewards.py'}:lowercase; length:0-12"),
            *[
                "--method",
                "grpo",
                "--num-generations",
                "3",
                "--max-completion-length",
                "6",
                "--max-seq-len",
                "64",
                "--batch-size",
                "2",
                "--lora-r",
                "4",
                "--lora-dropout",
                "0.1",
                "--lr",
                "2e-2",
                "--max-steps",
                "2",
                "--num-iterations",
                "2",
                "--beta",
                "0.04",
                "--val-fraction",
                "0",
                "--compare",
                "0",
                "--save-every",
                "1",
                "--keep-last",
                "4",
                "--no-progress",
                "--nproc",
                "2",
            ],
            *extra,
        ]
        done = subprocess.run(
            [sys.executable, "-m", "trilora.cli", "train", *args],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-4000:]

    ref = tmp_path / "ref"
    launch(ref)
    out = tmp_path / "resumed"
    shutil.copytree(ref, out)
    # step 1 generated the group's completions, step 2 reuses them: resume between the two
    shutil.rmtree(out / "checkpoints" / "step-00000002", ignore_errors=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-00000001"
    state = json.loads((out / "checkpoints" / "step-00000001" / "trainer_state.json").read_text())
    assert [s["group"] for s in state["method_by_rank"]] == [0, 0]  # every rank holds group 0
    shutil.rmtree(out / "adapter")
    (out / "summary.json").unlink()
    launch(out, "--resume")
    a = (ref / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == a
