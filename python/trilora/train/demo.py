"""``trilora train --demo``: SmolLM2-135M-Instruct learns a customer-service house style.

The run is an ordinary ``trilora train`` run (NF4 base, LoRA r=16 on every linear layer,
packed examples) over the bundled dataset of :mod:`trilora.train.demo_data`; afterwards
the base model (adapters disabled) and the tuned one answer held-out questions, and the
house-style score of those answers (:func:`trilora.train.demo_data.style_score`) is printed
next to the held-out loss of both.
"""

from __future__ import annotations

from trilora.train.config import TrainConfig
from trilora.train.demo_data import style_checks, style_score
from trilora.train.loop import train

STYLE_PROMPTS = 12


def run_demo(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    resume_command: str | None = None,
) -> int:

    if cfg.compare < STYLE_PROMPTS:
        cfg.compare = STYLE_PROMPTS
    # The table below holds the held-out loss and perplexity next to the style scores, so
    # the trainer's own loss table is left out (it would print the same numbers twice).
    summary = train(
        cfg,
        resume=resume,
        overwrite=overwrite,
        device=device,
        resume_command=resume_command,
        loss_table=False,
    )
    samples = summary["samples"]
    b, t = summary["base"], summary["tuned"]
    n = len(samples)
    print()
    if samples:
        print(
            f"house style on {n} held-out questions (greeting, task line, numbered steps, "
            "sign-off):"
        )
    print(f"{'':<26}{'base':>10}{'tuned':>10}")
    if t:
        print(f"{'held-out loss':<26}{b['eval_loss']:>10.3f}{t['eval_loss']:>10.3f}")
        print(f"{'held-out perplexity':<26}{b['eval_ppl']:>10.2f}{t['eval_ppl']:>10.2f}")
    if samples:
        base_scores = [style_score(s["base"]) for s in samples]
        tuned_scores = [style_score(s["tuned"]) for s in samples]
        full_base = sum(all(style_checks(s["base"]).values()) for s in samples)
        full_tuned = sum(all(style_checks(s["tuned"]).values()) for s in samples)
        print(f"{'style score':<26}{sum(base_scores) / n:>10.0%}{sum(tuned_scores) / n:>10.0%}")
        print(f"{'answers fully in style':<26}{f'{full_base}/{n}':>10}{f'{full_tuned}/{n}':>10}")
        wins = t and t["eval_loss"] < b["eval_loss"] and sum(tuned_scores) > sum(base_scores)
        print(
            "the tuned model wins on both"
            if wins
            else "the tuned model does not win on both yet (more steps: --max-steps)"
        )
    print(f"total time {summary['total_time_s']:.0f} s (training {summary['train_time_s']:.0f} s)")
    return 0


def run_grpo_demo(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    resume_command: str | None = None,
) -> int:
    """``trilora train --demo grpo``: the run, then the held-out mean reward of the base
    and the tuned model (:mod:`trilora.train.demo_grpo`)."""
    summary = train(
        cfg,
        resume=resume,
        overwrite=overwrite,
        device=device,
        resume_command=resume_command,
        loss_table=False,
    )
    b, t = summary["base"], summary["tuned"]
    print()
    print(f"{'held-out (12 prompts)':<30}{'base':>10}{'tuned':>10}")
    for key, label in (
        ("eval_reward", "mean reward (of 2)"),
        ("eval_reward_one_word", "one word (1 / words)"),
        ("eval_reward_contains_answer", "holds the answer"),
    ):
        if key in t:
            print(f"{label:<30}{b.get(key, float('nan')):>10.3f}{t[key]:>10.3f}")
    print(f"total time {summary['total_time_s']:.0f} s (training {summary['train_time_s']:.0f} s)")
    return 0
