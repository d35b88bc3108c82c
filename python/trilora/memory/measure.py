"""``trilora mem --measure``: run the traced step for real on a CUDA device.

Untested here (the development machines have no GPU): it builds the same model as the
trace (random 4-bit state: memory does not depend on the values), runs one warm-up step to
create the optimizer state, resets the peak counter, runs one step and returns
``torch.cuda.max_memory_allocated()``, which is directly comparable with the report's
``traced_peak`` (overheads excluded on both sides).
"""

from __future__ import annotations

import torch

from trilora.memory.report import MemOptions
from trilora.memory.trace import apply_memory_options, build_meta_model, make_optimizer


def measure_cuda(config, opts: MemOptions) -> int:
    """Peak bytes allocated by one real training step on the current CUDA device."""
    if not torch.cuda.is_available():
        raise RuntimeError("--measure needs a CUDA device; none is available")
    model = build_meta_model(config, opts)
    model.to_empty(device="cuda")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.is_floating_point():
                p.normal_(0, 0.02) if "lora_A" in n else p.zero_() if "lora_B" in n else None
    model.train()
    apply_memory_options(model, opts)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, opts.optimizer)
    ids = torch.randint(0, config.vocab_size, (opts.batch, opts.seq_len), device="cuda")
    for i in range(2):
        if i == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()
