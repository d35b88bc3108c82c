"""Nothing in the repository shadows an installed package when its root is on ``sys.path``.

``python -m pytest``, ``python script.py`` and ``python -c`` run from a clone put the root
(and pytest puts ``tests/`` and each test folder) first on ``sys.path``. A regular package
or a module there named like an installed distribution's top-level name replaces it: a
top-level ``kernels/__init__.py`` once hid Hugging Face's ``kernels``, which transformers
imports when it builds a model. These tests run in a subprocess whose working folder is the
root, as a user's script would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_no_top_level_name_collides_with_an_installed_distribution():
    # The folders Python and pytest put on sys.path: the root, tests/ and every test folder.
    folders = [ROOT, ROOT / "tests", *sorted(p for p in (ROOT / "tests").iterdir() if p.is_dir())]
    code = f"""
        import importlib.metadata, importlib.util, sys
        from pathlib import Path

        root = Path({str(ROOT)!r})
        folders = [Path(p) for p in {[str(f) for f in folders]!r}]
        provided = importlib.metadata.packages_distributions()
        problems = []
        for folder in folders:
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith((".", "_")):
                    continue
                if entry.is_file() and entry.suffix == ".py":
                    kind, name = "module", entry.stem
                elif entry.is_dir() and any(entry.glob("*.py")):
                    regular = (entry / "__init__.py").is_file()
                    kind, name = ("regular package" if regular else "namespace folder"), entry.name
                    if regular and folder == root:
                        # a future release may claim any name: the root holds no packages
                        problems.append(f"{{entry}} is a regular package at the repository root")
                else:
                    continue
                if name not in provided:
                    continue
                spec = importlib.util.find_spec(name)
                places = [spec.origin] if spec and spec.origin else []
                places += list(spec.submodule_search_locations or []) if spec else []
                inside = [p for p in places if p and Path(p).resolve().is_relative_to(root)]
                if inside:
                    problems.append(
                        f"{{entry}} ({{kind}}) shadows {{name!r}} of {{provided[name]}}: {{inside}}"
                    )
        print("\\n".join(problems))
        sys.exit(1 if problems else 0)
    """
    result = _run_from_root(code)
    assert result.returncode == 0, result.stdout + result.stderr


def test_transformers_builds_a_llama_from_the_repository_root():
    result = _run_from_root(
        """
        import importlib.util
        from pathlib import Path

        import torch
        import transformers
        from transformers.integrations import hub_kernels  # imports HF's kernels when present

        spec = importlib.util.find_spec("kernels")
        if spec is not None and spec.origin:
            assert not Path(spec.origin).resolve().is_relative_to(Path.cwd()), spec.origin
        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2,
        )
        model = transformers.LlamaForCausalLM(config)
        out = model(torch.tensor([[1, 2, 3]]))
        assert out.logits.shape == (1, 3, 64)

        import trilora.kernels.quantize  # trilora's own kernels still import from the root
        print("ok")
        """
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
