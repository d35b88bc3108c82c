"""Train level: DPO step memory, trilora (reference = adapters disabled) vs TRL + bitsandbytes +
PEFT with a reference model.

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
    args = p.parse_args(argv)
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
