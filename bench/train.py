"""Train level: DPO step memory, trilora (reference = adapters disabled) vs TRL + bitsandbytes +
PEFT with a reference model; one GRPO step's time and memory, trilora vs TRL's
``GRPOTrainer`` + bitsandbytes + PEFT (same model, prompts, group size, lengths, LoRA).

``trilora bench --level train`` (rows ``train/dpo_step/peak_memory``), or standalone
``python -m trilora.bench.train [--hidden 512 --layers 4 --seq 256 --pairs 2]``. It builds a tiny
Llama (no downloads), then runs one DPO training step in a fresh process per provider and
reports the peak of each:

* CUDA: ``torch.cuda.max_memory_allocated``;
* CPU: the process's peak resident set (``wait4``), which also counts the Python runtime and
  the libraries each stack imports, so it is an upper bound of what the step itself holds.

trilora: ``trilora train``'s own DPO step (NF4 base, LoRA r=16, the reference scored with
the adapters disabled, log-probabilities from the chunked linear cross-entropy). TRL:
``DPOTrainer.compute_loss`` + backward on a bitsandbytes 4-bit model with PEFT LoRA and a
second bitsandbytes 4-bit copy as ``ref_model``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from trilora.bench.harness import Stats, make_row
from trilora.train.tiny_model import save_tiny_lm

_STEP = r"""
import json, sys, torch
from pathlib import Path
root, provider, pairs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
recs = [json.loads(x) for x in (root / "pairs.jsonl").read_text().splitlines()][:pairs]
cuda = torch.cuda.is_available()
if provider == "trilora":
    from trilora.train.config import TrainConfig
    from trilora.train.model import load_model, base_model_mode
    from trilora.train import data as D
    from trilora.train.losses import sequence_logps
    from trilora.train.methods.dpo import dpo_losses
    lm = load_model(TrainConfig(model=str(root / "m"), data="-", method="dpo"), log=lambda *_: None)
    ex = [D.encode_pair(r, lm.tokenizer, 4096, "x") for r in recs]
    batch = D.collate_pairs(ex, lm.tokenizer.pad_token_id)
    with torch.no_grad(), base_model_mode(lm.model, True):
        ref = sequence_logps(lm.model, batch)
    loss = dpo_losses(sequence_logps(lm.model, batch), ref, 0.1)[0].mean()
    loss.backward()
else:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
    kw = dict(quantization_config=bnb, device_map="cuda" if cuda else "cpu")
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "m", **kw),
                            LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    ref = AutoModelForCausalLM.from_pretrained(root / "m", **kw)
    tok = AutoTokenizer.from_pretrained(root / "m")
    tr = DPOTrainer(model=policy, ref_model=ref, processing_class=tok, train_dataset=Dataset.from_list(recs),
                    args=DPOConfig(output_dir=str(root / "trl"), report_to=[], use_cpu=not cuda,
                                   per_device_train_batch_size=pairs, max_length=None))
    inputs = tr.data_collator([tr.train_dataset[i] for i in range(pairs)])
    inputs = {k: v.to(policy.device) for k, v in inputs.items()}
    tr.compute_loss(policy, inputs).backward()
print(json.dumps({"cuda_peak": torch.cuda.max_memory_allocated() if cuda else None}))
"""


_GRPO_STEP = r"""
import json, sys, time, torch
from pathlib import Path
root, provider = Path(sys.argv[1]), sys.argv[2]
prompts, gens, length, repeats = map(int, sys.argv[3:7])
recs = [json.loads(x) for x in (root / "prompts.jsonl").read_text().splitlines()][:prompts]
cuda = torch.cuda.is_available()
torch.manual_seed(0)


def short(completions, **kw):  # the same reward for both: completions under 40 characters
    return [float(len(c if isinstance(c, str) else c[0]["content"]) < 40) for c in completions]


if provider == "trilora":
    from trilora.distributed import DistEnv
    from trilora.train import data as D
    from trilora.train.config import TrainConfig
    from trilora.train.methods.base import MicroBatch, RunContext
    from trilora.train.methods.grpo import Grpo
    from trilora.train.methods.rewards import Reward
    from trilora.train.model import base_model_mode, load_model
    cfg = TrainConfig(model=str(root / "m"), data="-", method="grpo", reward="json",
                      num_generations=gens, max_completion_length=length, batch_size=prompts,
                      generation_batch_size=prompts * gens).validate()
    lm = load_model(cfg, "cuda" if cuda else "cpu", log=lambda *_: None)
    method = Grpo(cfg)
    method.rewards = [Reward("short", short)]
    ex = [D.encode_prompt(r, lm.tokenizer, 4096, "x") for r in recs]
    run = RunContext(lm.model, cfg, lm.tokenizer,
                     torch.bfloat16 if cuda else None, lambda: base_model_mode(lm.model, True),
                     DistEnv(), lm.tokenizer.pad_token_id, root, rows=ex, records=recs)
    lm.model.train()

    def step(i):
        mb = MicroBatch(method.collate(ex, run.pad_id), list(range(len(ex))))
        method.prepare_step(run, i, [mb])
        loss, _ = method.micro_loss(run, mb, method.loss_items(mb))
        loss.backward()
        lm.model.zero_grad(set_to_none=True)
else:
    import warnings
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import GRPOConfig, GRPOTrainer
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
    kw = dict(quantization_config=bnb, device_map="cuda" if cuda else "cpu")
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "m", **kw),
                            LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    tok = AutoTokenizer.from_pretrained(root / "m")
    args = GRPOConfig(output_dir=str(root / "trl"), report_to=[], use_cpu=not cuda, bf16=cuda,
                      per_device_train_batch_size=prompts * gens, num_generations=gens,
                      max_completion_length=length, beta=0.0, top_k=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = GRPOTrainer(model=policy, reward_funcs=short, args=args,
                         train_dataset=Dataset.from_list(recs), processing_class=tok)
    tr.current_gradient_accumulation_steps = 1
    policy.train()

    def step(i):
        batch = [tr.train_dataset[i] for i in range(len(recs)) for _ in range(gens)]
        inputs = tr._generate_and_score_completions(batch)
        tr.compute_loss(policy, inputs).backward()
        policy.zero_grad(set_to_none=True)
times = []
for i in range(1 + repeats):  # the first step warms up (lazy imports, allocator, caches)
    t0 = time.perf_counter()
    step(i)
    if cuda:
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
print(json.dumps({"cuda_peak": torch.cuda.max_memory_allocated() if cuda else None,
                  "step_s": times[1:]}))
"""


GRPO_REPEATS = 3  # timed steps after one warm-up step (--quick: one, a smoke test)


def _measure_grpo(
    root: Path, provider: str, prompts: int, gens: int, length: int, repeats: int
) -> dict:
    args = [str(v) for v in (prompts, gens, length, repeats)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _GRPO_STEP, str(root), provider, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        return {
            "provider": provider,
            "error": err.strip().splitlines()[-1] if err.strip() else "failed",
        }
    got = json.loads(out.strip().splitlines()[-1])
    cuda = got["cuda_peak"]
    return {
        "provider": provider,
        "peak_bytes": cuda if cuda is not None else usage.ru_maxrss * 1024,
        "kind": "CUDA allocated" if cuda is not None else "peak RSS (whole process)",
        "step_s": statistics.median(got["step_s"]),
        "steps_s": got["step_s"],
    }


def measure_grpo(
    hidden: int,
    layers: int,
    prompts: int,
    gens: int,
    length: int,
    repeats: int = GRPO_REPEATS,
) -> list[dict]:
    """One GRPO step (sampling ``gens`` completions of ``length`` tokens for each of
    ``prompts`` prompts, rewards, loss, backward) per provider: ``{"provider",
    "peak_bytes", "kind", "step_s"}`` or ``{"provider", "error"}``."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_tiny_lm(
            root / "m",
            hidden=hidden,
            layers=layers,
            vocab=320,
            intermediate=hidden * 3,
            max_position_embeddings=4 * length + 128,
        )
        words = ["red", "green", "blue", "cyan", "magenta", "yellow", "black", "white"]
        with open(root / "prompts.jsonl", "w") as f:
            for i in range(prompts):
                text = " ".join(words[(i + j) % 8] for j in range(12))
                f.write(json.dumps({"prompt": f"continue: {text}"}) + "\n")
        return [_measure_grpo(root, name, prompts, gens, length, repeats) for name in PROVIDERS]


def _measure(root: Path, provider: str, pairs: int) -> dict:
    proc = subprocess.Popen(
        [sys.executable, "-c", _STEP, str(root), provider, str(pairs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        return {
            "provider": provider,
            "error": err.strip().splitlines()[-1] if err.strip() else "failed",
        }
    cuda = json.loads(out.strip().splitlines()[-1])["cuda_peak"]
    return {
        "provider": provider,
        "peak_bytes": cuda if cuda is not None else usage.ru_maxrss * 1024,
        "kind": "CUDA allocated" if cuda is not None else "peak RSS (whole process)",
    }


LEVEL = "train"
QUICK = {"hidden": 128, "layers": 2, "seq": 64, "pairs": 2}
FULL = {"hidden": 512, "layers": 4, "seq": 256, "pairs": 2}
GRPO_QUICK = {"hidden": 128, "layers": 2, "prompts": 2, "gens": 4, "length": 16}
GRPO_FULL = {"hidden": 512, "layers": 4, "prompts": 2, "gens": 4, "length": 64}
PROVIDERS = ("trilora", "trl_bnb_peft")


def measure(hidden: int, layers: int, seq: int, pairs: int) -> list[dict]:
    """One entry per provider: ``{"provider", "peak_bytes", "kind"}`` or ``{"provider", "error"}``."""

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_tiny_lm(
            root / "m",
            hidden=hidden,
            layers=layers,
            vocab=320,
            intermediate=hidden * 3,
            max_position_embeddings=2 * seq + 64,
        )
        words = ["red", "green", "blue", "cyan", "magenta", "yellow", "black", "white"]
        with open(root / "pairs.jsonl", "w") as f:
            for i in range(pairs):
                pick = lambda n, k=i: " ".join(words[(k + j) % 8] for j in range(n))  # noqa: E731
                f.write(
                    json.dumps(
                        {"prompt": pick(16), "chosen": pick(seq // 5), "rejected": pick(seq // 6)}
                    )
                    + "\n"
                )
        return [_measure(root, name, pairs) for name in PROVIDERS]


def run(quick: bool, log=print) -> tuple[list[dict], list[str]]:
    """Rows of the DPO step's peak memory, for ``trilora bench --level train``."""

    size = QUICK if quick else FULL
    missing = [
        m for m in ("trl", "bitsandbytes", "datasets") if importlib.util.find_spec(m) is None
    ]
    results = measure(**size)
    case = f"dpo_step_h{size['hidden']}_l{size['layers']}_s{size['seq']}_p{size['pairs']}"
    rows, notes = [], []
    for r in results:
        if "error" in r:
            skipped = r["provider"] == "trl_bnb_peft" and bool(missing)
            note = (
                f"needs {', '.join(missing)}: pip install {' '.join(missing)}"
                if skipped
                else r["error"]
            )
            rows.append(
                make_row(
                    LEVEL,
                    case,
                    "peak_memory",
                    r["provider"],
                    "bytes",
                    status="skipped" if skipped else "error",
                    note=note,
                )
            )
        else:
            rows.append(
                make_row(
                    LEVEL,
                    case,
                    "peak_memory",
                    r["provider"],
                    "bytes",
                    Stats.of([float(r["peak_bytes"])]),
                    note=r["kind"],
                )
            )
        log(f"  {r['provider']}: {r.get('peak_bytes', r.get('error'))}")
    ok = {r["provider"]: r["peak_bytes"] for r in results if "peak_bytes" in r}
    if len(ok) == len(PROVIDERS):
        notes.append(
            f"train level: DPO step peak, trilora {ok['trilora'] / ok['trl_bnb_peft']:.0%} "
            f"of TRL + bitsandbytes + PEFT with a reference model ({results[0]['kind']})"
        )
    g = GRPO_QUICK if quick else GRPO_FULL
    grpo = measure_grpo(**g, repeats=1 if quick else GRPO_REPEATS)
    case = f"grpo_step_h{g['hidden']}_l{g['layers']}_p{g['prompts']}_g{g['gens']}_c{g['length']}"
    for r in grpo:
        for metric, unit, key in (
            ("peak_memory", "bytes", "peak_bytes"),
            ("step_time", "s", "step_s"),
        ):
            if "error" in r:
                skipped = r["provider"] == "trl_bnb_peft" and bool(missing)
                rows.append(
                    make_row(
                        LEVEL,
                        case,
                        metric,
                        r["provider"],
                        unit,
                        status="skipped" if skipped else "error",
                        note=f"needs {', '.join(missing)}" if skipped else r["error"],
                    )
                )
            else:
                rows.append(
                    make_row(
                        LEVEL,
                        case,
                        metric,
                        r["provider"],
                        unit,
                        Stats.of([float(v) for v in r["steps_s"]])
                        if key == "step_s"
                        else Stats.of([float(r[key])]),
                        note=r["kind"]
                        if key == "peak_bytes"
                        else "one step: sampling, rewards, loss, backward (median of 3 after a warm-up)",
                    )
                )
        log(
            f"  grpo {r['provider']}: {r.get('step_s', r.get('error'))} s, {r.get('peak_bytes')} bytes"
        )
    done = {r["provider"]: r for r in grpo if "step_s" in r}
    if len(done) == len(PROVIDERS):
        t, b = done["trilora"], done["trl_bnb_peft"]
        notes.append(
            f"train level: GRPO step, trilora {t['step_s']:.2f} s vs {b['step_s']:.2f} s and "
            f"peak {t['peak_bytes'] / b['peak_bytes']:.0%} of TRL GRPOTrainer + bitsandbytes + PEFT "
            f"({t['kind']})"
        )
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=FULL["hidden"], help="model width (default: 512)")
    p.add_argument("--layers", type=int, default=FULL["layers"], help="decoder layers (default: 4)")
    p.add_argument(
        "--seq", type=int, default=FULL["seq"], help="tokens per sequence (default: 256)"
    )
    p.add_argument("--pairs", type=int, default=FULL["pairs"], help="pairs per step (default: 2)")
    p.add_argument(
        "--grpo", action="store_true", help="the GRPO step instead (time and peak memory)"
    )
    args = p.parse_args(argv)
    if args.grpo:
        for r in measure_grpo(
            args.hidden, args.layers, **{k: GRPO_FULL[k] for k in ("prompts", "gens", "length")}
        ):
            if "error" in r:
                print(f"{r['provider']:<14} error: {r['error']}")
            else:
                print(
                    f"{r['provider']:<14} {r['step_s']:7.2f} s {r['peak_bytes'] / 2**20:9.1f} MiB {r['kind']}"
                )
        return 0
    rows = measure(args.hidden, args.layers, args.seq, args.pairs)
    base = next((r for r in rows if r["provider"] == "trl_bnb_peft" and "peak_bytes" in r), None)
    for r in rows:
        if "error" in r:
            print(f"{r['provider']:<14} error: {r['error']}")
            continue
        ratio = (
            f"  ({r['peak_bytes'] / base['peak_bytes']:.0%} of TRL + bnb + PEFT)" if base else ""
        )
        print(f"{r['provider']:<14} {r['peak_bytes'] / 2**20:9.1f} MiB {r['kind']}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
