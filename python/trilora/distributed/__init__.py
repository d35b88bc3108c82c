"""trilora past one GPU: DDP and FSDP2 over torchrun / accelerate launch.

A distributed run, in the order a trainer makes the calls (see ``docs/distributed.md``)::

    env = trilora.distributed.init_distributed()          # process group from torchrun's env
    model = trilora.distributed.load_pretrained(path, env=env)   # rank 0 reads, others: meta
    model = trilora.get_peft_model(model, lora_config)     # same LoRA settings on every rank
    model = trilora.distributed.wrap_fsdp(model, env=env)  # or wrap_ddp(model, env=env)
    trilora.enable_checkpointing(model)                    # optional, offload included
    opt = trilora.distributed.build_optimizer(model, torch.optim.AdamW, lr=2e-4)
    ...                                                    # forward, backward, clip_grad_norm, step
    trilora.distributed.save_state(dir, model, opt, extra={"step": step})   # resumable, any N
    trilora.distributed.save_adapter(model, out)           # PEFT format, written by rank 0

Everything here also runs in a single process without a process group, as the identity
(``wrap_*`` return the model unchanged), so a trainer needs one code path.
"""

from trilora.distributed.env import DistEnv, current_env, destroy_distributed, init_distributed
from trilora.distributed.loading import load_pretrained
from trilora.distributed.optim import ShardedOptimizer, build_optimizer, clip_grad_norm
from trilora.distributed.sharding import (
    ParallelInfo,
    check_same_model,
    fsdp_holds_integer_params,
    fsdp_storage_dtypes,
    match_storage,
    parallel_info,
    resident_bytes,
    unwrap,
    wrap_ddp,
    wrap_fsdp,
)
from trilora.distributed.state import (
    gather_state_dict,
    load_state,
    model_fingerprint,
    read_state_meta,
    save_adapter,
    save_state,
)

__all__ = [
    "DistEnv",
    "ParallelInfo",
    "ShardedOptimizer",
    "build_optimizer",
    "check_same_model",
    "clip_grad_norm",
    "current_env",
    "destroy_distributed",
    "fsdp_holds_integer_params",
    "fsdp_storage_dtypes",
    "gather_state_dict",
    "init_distributed",
    "load_pretrained",
    "load_state",
    "match_storage",
    "model_fingerprint",
    "parallel_info",
    "read_state_meta",
    "resident_bytes",
    "save_adapter",
    "save_state",
    "unwrap",
    "wrap_ddp",
    "wrap_fsdp",
]
