"""The training loop: ``trilora train`` as a library call, :func:`train`.

One run lives in one folder (``cfg.out``)::

    config.yaml         the resolved configuration
    run.json            model / data fingerprints, trilora version (resume checks them)
    metrics.jsonl       one line per logged step and evaluation
    base.json           the base model's held-out loss and answers (before training)
    checkpoints/        step-XXXXXXXX/ (resumable; last --keep-last kept)
    adapter/            the final adapter, PEFT format (full fine-tuning: model/)
    summary.json        final numbers; loss_curve.png; samples.md; merged/ with --merge

Determinism: every random draw comes from generators seeded by ``cfg.seed`` and saved in
each checkpoint; batches are a pure function of ``(seed, epoch)``; nothing depends on the
wall clock. So a run resumed from a checkpoint replays the uninterrupted run's losses bit
for bit on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import trilora.distributed as td
from trilora import __version__
from trilora.distributed import DistEnv, destroy_distributed, parallel_info, unwrap
from trilora.io import (
    RunStopped,
    UsageError,
    UserError,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    check_output,
)
from trilora.loading import from_pretrained
from trilora.merging import merge, save_tokenizer
from trilora.train import checkpoints as S
from trilora.train import data as D
from trilora.train.checkpoints import latest_checkpoint
from trilora.train.collectives import (
    all_reduce,
    gather_objects,
    gradient_sync,
    inference_model,
    on_main,
    rank_rows,
    setup,
    strategy,
    wrap,
)
from trilora.train.config import (
    TrainConfig,
    config_differences,
    config_fingerprint,
    dump_yaml,
)
from trilora.train.dpo import dpo_losses, sequence_logps
from trilora.train.losses import compute_device, sft_loss, token_losses
from trilora.train.model import (
    apply_memory_options,
    base_model_mode,
    load_model,
    load_tokenizer,
    model_fingerprint,
)
from trilora.train.optim import build_optimizer, build_scheduler, clip_gradients
from trilora.train.reporting import (
    MetricsLog,
    Progress,
    human_bytes,
    peak_memory_bytes,
    perplexity,
    plot_loss_curve,
    side_by_side,
)
from trilora.train.stop import StopNow, StopSignals, TestHook, signal_name

__all__ = ["train"]

FORMAT = 2  # 2: checkpoints hold state/ (torch.distributed.checkpoint)
SHOWN_SAMPLES = 3  # answers printed side by side (all are in samples.md)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# the run folder
# ---------------------------------------------------------------------------------------


def _abs(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _fingerprints(cfg: TrainConfig) -> dict[str, str | None]:

    return {
        "model": model_fingerprint(cfg.model),
        "data": D.fingerprint_file(cfg.data) if Path(cfg.data).is_file() else None,
        "val_data": D.fingerprint_file(cfg.val_data)
        if cfg.val_data and Path(cfg.val_data).is_file()
        else None,
    }


def _check_run_dir(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path:
    """Refuse an output folder that cannot take this run, before any heavy work. Writes
    nothing: a new run's folder is written by :func:`_create_run_dir` once the data are
    known to be good."""

    run_dir = Path(cfg.out).expanduser()
    inputs = [cfg.model, cfg.data, cfg.val_data, cfg.peft_config]
    holds_run = (run_dir / "run.json").is_file()
    if resume:
        if not holds_run:
            raise UsageError(
                f"--resume: {run_dir} holds no trilora run (no run.json); start a "
                "new run without --resume"
            )

        saved = json.loads((run_dir / "run.json").read_text())
        diffs = config_differences(saved.get("config", {}), cfg)
        fingerprints = _fingerprints(cfg)
        for key in ("model", "data", "val_data"):
            if saved.get("fingerprints", {}).get(key) != fingerprints[key]:
                diffs.append(f"{key} files changed since the run started")
        if diffs:
            raise UsageError(
                f"--resume: {run_dir} was started with another model or config ("
                + "; ".join(diffs[:6])
                + "); resume with the same settings or "
                "start a new run in another folder"
            )
        if latest_checkpoint(run_dir) is None:
            _log(f"{run_dir} has no complete checkpoint yet; starting it again from step 0")
        return run_dir
    if holds_run and not overwrite:
        raise UsageError(
            f"--out {run_dir} holds another run; pass --resume to continue it or "
            "--overwrite to replace it"
        )
    check_output(run_dir, overwrite=overwrite, inputs=[i for i in inputs if i], flag="--out")
    return run_dir


class _NewRunFolder:
    """What a new run put in its output folder, taken away again if the run fails or is
    stopped before its first step ends, so that the same command simply runs again.

    Only this run's entries go (the files a run writes, and hidden temporaries); whatever
    the folder held before stays. A folder replaced with ``--overwrite`` was moved aside,
    not deleted: it comes back in that case, and is deleted once the first step has ended.
    """

    RUN_FILES = frozenset(
        {
            "config.yaml",
            "run.json",
            "base.json",
            "metrics.jsonl",
            "tensorboard",
            "checkpoints",
            "ref_logps.pt",
            "loss_curve.png",
            "samples.md",
            "summary.json",
            "adapter",
            "model",
            "merged",
        }
    )

    def __init__(self, run_dir: Path, overwrite: bool) -> None:
        self.run_dir = Path(os.path.abspath(run_dir))
        self.replaced: Path | None = None
        if overwrite and self.run_dir.exists() and any(self.run_dir.iterdir()):
            aside = self.run_dir.parent / f".{self.run_dir.name}.replaced-{os.getpid()}"
            os.replace(self.run_dir, aside)
            self.replaced = aside
        # the folder and any parents this run creates, deepest first
        self.created: list[Path] = []
        p = self.run_dir
        while not p.exists():
            self.created.append(p)
            p = p.parent
        self.before = set(os.listdir(self.run_dir)) if self.run_dir.is_dir() else set()
        self.kept = False

    def keep(self) -> None:
        """The first step has ended: from here on the folder is a run to resume."""
        if self.kept:
            return
        self.kept = True
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)

    def discard(self) -> None:
        """Remove what this run added (nothing once :meth:`keep` was called)."""
        if self.kept:
            return
        self.kept = True
        if self.run_dir.is_dir():
            for name in os.listdir(self.run_dir):
                if name in self.before or not (name in self.RUN_FILES or name.startswith(".")):
                    continue
                path = self.run_dir / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: it holds something that is not ours
        if self.replaced is not None and not self.run_dir.exists():
            os.replace(self.replaced, self.run_dir)


def _create_run_dir(cfg: TrainConfig, run_dir: Path, overwrite: bool) -> _NewRunFolder:
    """Write a new run's config.yaml and run.json (a folder replaced with ``--overwrite``
    is moved aside first, see :class:`_NewRunFolder`)."""

    folder = None
    try:
        folder = _NewRunFolder(run_dir, overwrite)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        atomic_write_json(
            run_dir / "run.json",
            {
                "format": FORMAT,
                "trilora": __version__,
                "config": config_fingerprint(cfg),
                "fingerprints": _fingerprints(cfg),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
    except OSError as exc:
        if folder is not None:
            folder.discard()
        raise UserError(f"--out {run_dir}: cannot write there ({exc.strerror or exc})") from None
    return folder


def _check_free_space(run_dir: Path, trainable_bytes: int, keep_last: int) -> None:
    # A checkpoint holds the trainable tensors, two AdamW moments and small state; the
    # final adapter one more copy. Refuse to start a run that cannot save.
    need = trainable_bytes * 3 * (keep_last + 1) + trainable_bytes + (1 << 20)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise UserError(
            f"--out {run_dir}: {human_bytes(free)} free, but checkpoints need about "
            f"{human_bytes(need)}; free some space or lower --keep-last"
        )


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------


@dataclass
class Data:
    train: list
    val: list
    val_records: list[dict]
    rows: list[list]  # SFT: rows of examples (packed or one each); DPO: pairs
    lengths: list[int]
    stats: D.DataStats
    val_stats: D.DataStats | None


def _load_data(cfg: TrainConfig, tokenizer) -> Data:
    examples, records, stats = D.load_dataset(
        cfg.data, tokenizer, cfg.max_seq_len, cfg.method, cfg.skip_bad_lines
    )
    val_stats = None
    if cfg.val_data:
        val, val_records, val_stats = D.load_dataset(
            cfg.val_data, tokenizer, cfg.max_seq_len, cfg.method, cfg.skip_bad_lines
        )
        train = examples
    else:
        train_idx, val_idx = D.split_validation(len(examples), cfg.val_fraction, cfg.seed)
        train = [examples[i] for i in train_idx]
        val = [examples[i] for i in val_idx]
        val_records = [records[i] for i in val_idx]
    if cfg.method == "dpo":
        rows = train
    elif cfg.packing:
        rows = D.pack(train, cfg.max_seq_len)
    else:
        rows = [[e] for e in train]
    lengths = [len(r) if cfg.method == "dpo" else sum(len(e) for e in r) for r in rows]
    return Data(train, val, val_records, rows, lengths, stats, val_stats)


@dataclass
class MicroBatch:
    """This rank's rows of one global micro-batch: collated ``batch``, their row indices
    ``idx``, and ``real`` (False: a stand-in row at weight 0, see
    :func:`trilora.train.collectives.rank_rows`)."""

    batch: dict[str, Any]
    idx: list[int]
    real: bool = True


class BatchStream:
    """Micro-batch ``g`` of the run, for any ``g``: epoch ``g // per_epoch``, batch ``g % per_epoch``.

    Every rank draws the same global batches (a pure function of the seed and the epoch)
    and keeps its own rows of each.
    """

    def __init__(self, data: Data, cfg: TrainConfig, pad_id: int, env=None):

        self.data, self.cfg, self.pad_id = data, cfg, pad_id
        self.env = env or DistEnv()
        self.per_epoch = math.ceil(len(data.rows) / cfg.batch_size)
        self._epoch, self._batches = -1, []

    def get(self, g: int) -> MicroBatch:

        epoch, index = divmod(g, self.per_epoch)
        if epoch != self._epoch:
            self._batches = D.batches_for_epoch(
                self.data.lengths,
                self.cfg.batch_size,
                self.cfg.seed,
                epoch,
                self.cfg.group_by_length,
            )
            self._epoch = epoch
        idx, real = rank_rows(self._batches[index], self.env)
        if self.cfg.method == "dpo":
            return MicroBatch(
                D.collate_pairs([self.data.rows[i] for i in idx], self.pad_id), idx, real
            )
        return MicroBatch(D.collate([self.data.rows[i] for i in idx], self.pad_id), idx, real)


# ---------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model,
    data: Data,
    cfg: TrainConfig,
    pad_id: int,
    autocast_dtype,
    ref_logps: torch.Tensor | None = None,
    base_mode=None,
    env=None,
) -> dict[str, float]:
    """Held-out loss and perplexity (SFT) or DPO loss and preference accuracy.

    In a distributed run every rank must call it: each scores its rows of every evaluation
    batch and the sums are all-reduced, so every rank returns the same numbers.
    """

    env = env or DistEnv()
    n_val = len(data.val)

    def chunks():
        for s in range(0, n_val, cfg.eval_batch_size):
            yield rank_rows(list(range(s, min(s + cfg.eval_batch_size, n_val))), env)

    with inference_model(model) as m:
        was_training = m.training
        m.eval()
        try:
            if cfg.method == "sft":
                total, count = 0.0, 0
                for rows, real in chunks():
                    batch = D.collate([[data.val[i]] for i in rows], pad_id)
                    loss = float(token_losses(m, batch, "sum", autocast_dtype))
                    if real:
                        total += loss
                        count += int((batch["labels"][:, 1:] != D.IGNORE).sum())
                total, count = all_reduce(env, [total, count])
                count = int(count)
                loss = total / max(count, 1)
                return {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_tokens": count}
            from trilora.train.dpo import dpo_losses, sequence_logps

            losses, wins, margins = 0.0, 0, 0.0
            for rows, real in chunks():
                pairs = [data.val[i] for i in rows]
                batch = D.collate_pairs(pairs, pad_id)
                pol = sequence_logps(m, batch, autocast_dtype)
                if base_mode is not None:
                    with base_mode():
                        ref = sequence_logps(m, batch, autocast_dtype)
                else:
                    ref = pol
                if not real:
                    continue
                loss, _, _ = dpo_losses(pol, ref, cfg.beta)
                losses += sum(loss.tolist())
                b = len(pairs)
                wins += int((pol[:b] > pol[b:]).sum())
                margins += float((pol[:b] - pol[b:]).sum())
            losses, wins, margins = all_reduce(env, [losses, wins, margins])
            n = max(n_val, 1)
            return {
                "eval_loss": losses / n,
                "eval_chosen_preferred": wins / n,
                "eval_logp_margin": margins / n,
            }
        finally:
            m.train(was_training)


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16, env=None
) -> list[str]:
    """Greedy answers to ``prompts`` (left-padded batches).

    Distributed: under DDP rank 0 answers alone (it holds the whole model) and the other
    ranks return ``[]``; under FSDP2 every rank must call it and runs the same generation
    (``synced_gpus``: a rank that finishes early keeps joining the all-gathers).
    """

    if not prompts:
        return []
    env = env or td.DistEnv()
    info = td.parallel_info(model)
    sharded = info is not None and info.strategy == "fsdp"
    if not sharded and not env.is_main:
        return []
    extra = {"synced_gpus": True} if sharded and env.distributed else {}
    device = compute_device(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    with inference_model(model) as m:
        was_training = m.training
        m.eval()
        try:
            for s in range(0, len(prompts), batch_size):
                chunk = prompts[s : s + batch_size]
                # Chat-rendered prompts spell out their special tokens.
                enc = tokenizer(
                    chunk,
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=not getattr(tokenizer, "chat_template", None),
                )
                enc = {k: v.to(device) for k, v in enc.items()}
                out = m.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                    **extra,
                )
                new = out[:, enc["input_ids"].shape[1] :]
                answers += [
                    t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)
                ]
        finally:
            tokenizer.padding_side = side
            m.train(was_training)
    return answers


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _precompute_ref(model, data: Data, cfg, pad_id, autocast_dtype, base_mode, run_dir, env):

    path = run_dir / "ref_logps.pt"
    cached = on_main(env, lambda: torch.load(path, weights_only=True) if path.is_file() else None)
    if cached is not None:
        return cached
    n = len(data.rows)
    values: dict[int, tuple[float, float]] = {}
    with inference_model(model) as m:
        was_training = m.training
        m.eval()
        with torch.no_grad(), base_mode():
            for s in range(0, n, cfg.eval_batch_size):
                rows, real = rank_rows(list(range(s, min(s + cfg.eval_batch_size, n))), env)
                pairs = [data.rows[i] for i in rows]
                lp = sequence_logps(m, D.collate_pairs(pairs, pad_id), autocast_dtype)
                lp = lp.float().cpu()
                b = len(pairs)
                if real:
                    values.update((i, (lp[j].item(), lp[b + j].item())) for j, i in enumerate(rows))
        m.train(was_training)
    out = torch.empty(n, 2)
    for part in gather_objects(env, values):
        for i, (chosen, rejected) in part.items():
            out[i, 0], out[i, 1] = chosen, rejected

    def save() -> None:
        tmp = run_dir / ".ref_logps.pt.tmp"
        torch.save(out, tmp)
        tmp.replace(path)

    on_main(env, save)
    return out


def _latest_checkpoint(run_dir: Path) -> Path | None:

    S.remove_partial(run_dir)
    return S.latest_checkpoint(run_dir)


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    quiet: bool = False,
    resume_command: str | None = None,
    loss_table: bool = True,
) -> dict[str, Any] | None:
    """Run ``cfg`` to the end; return the summary (also written to ``OUT/summary.json``).

    Started by a launcher (``torchrun``, ``accelerate launch``, ``trilora train --nproc``),
    every process calls it: it joins the process group, trains its share, and rank 0 writes
    the run folder and returns the summary (the other ranks return None).

    The data are read and tokenized before the model loads, so a bad file fails in seconds;
    a run that fails or is stopped before its first step ends leaves nothing in ``cfg.out``
    (:class:`_NewRunFolder`). SIGTERM and SIGINT stop the run at the next step boundary with
    a checkpoint (:mod:`trilora.train.stop`): :class:`trilora.io.RunStopped` is raised, its
    message naming the checkpoint and ``resume_command`` (default: ``trilora train --config
    OUT/config.yaml --out OUT --resume``). ``loss_table=False`` leaves the held-out table
    out of the printed summary (the demo prints its own, with the style scores).
    """

    cfg.validate()
    for name in ("model", "data", "val_data", "peft_config"):
        setattr(cfg, name, _abs(getattr(cfg, name)))
    env, dev, initialized_here = setup(device)
    summary = _train(
        cfg,
        env,
        dev,
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
        resume_command=resume_command,
        loss_table=loss_table,
    )
    if initialized_here:
        destroy_distributed()
    return summary


@dataclass
class _Stopping:
    """Where a run is, for the one line a stop prints (:mod:`trilora.train.stop`)."""

    run_dir: Path
    command: str
    main: bool
    resume: bool
    grace: float
    folder: _NewRunFolder | None = None  # a new run's folder (rank 0)
    step: int = 0  # optimizer steps ended
    total: int = 0
    finishing: bool = False  # past the last step: final evaluation, answers, saving

    def _latest(self) -> str:

        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return "no checkpoint exists yet (--resume starts again from step 0)"
        return f"the latest checkpoint is {ckpt}"

    def _doing(self) -> str:
        if self.finishing:
            return "the final evaluation and answers"
        return f"step {self.step + 1} of {self.total}"

    def saved(self, signum: int, ckpt: Path) -> str:

        return (
            f"stopped by {signal_name(signum)} after step {self.step} of {self.total}: "
            f"checkpoint saved in {ckpt}; resume with: {self.command}"
        )

    def timed_out(self, signum: int) -> str | None:

        if not self.main:
            return None
        return (
            f"trilora train: stopped by {signal_name(signum)}: {self._doing()} did not end "
            f"within --stop-grace {self.grace:g} s, so no checkpoint was written; "
            f"{self._latest()}; resume with: {self.command}"
        )

    def at_once(self, exc, left_nothing: bool) -> str:

        name = signal_name(exc.signum)
        if left_nothing:
            return (
                f"stopped by {name} before the first step ended: nothing to save, and the "
                f"run left nothing in {self.run_dir}; run the same command to start "
                "again"
            )
        if exc.again:
            return (
                f"stopped at once by a second {name}: no checkpoint written for "
                f"{self._doing()}; {self._latest()}; resume with: {self.command}"
            )
        return (
            f"stopped by {name} before training resumed; {self._latest()}; resume with: "
            f"{self.command}"
        )


def _train(
    cfg: TrainConfig,
    env,
    device: torch.device,
    *,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    resume_command: str | None,
    loss_table: bool = True,
) -> dict[str, Any] | None:

    if env.distributed and cfg.batch_size < env.world_size:
        raise UsageError(
            f"--batch-size {cfg.batch_size} is the global micro-batch, split "
            f"across the {env.world_size} processes: give at least "
            f"{env.world_size} rows (one per process) or start fewer "
            "processes"
        )
    run_dir = on_main(env, lambda: _check_run_dir(cfg, resume, overwrite))
    if resume_command is None:
        where = os.path.abspath(run_dir)
        resume_command = shlex.join(
            ["trilora", "train", "--config", f"{where}/config.yaml", "--out", where, "--resume"]
        )
    stopping = _Stopping(run_dir, resume_command, env.is_main, resume, cfg.stop_grace)
    stopper = StopSignals(cfg.stop_grace, stopping.timed_out)
    with stopper:
        try:
            return _run(
                cfg,
                env,
                device,
                run_dir,
                stopping,
                stopper,
                resume=resume,
                overwrite=overwrite,
                quiet=quiet,
                loss_table=loss_table,
            )
        except StopNow as exc:
            folder = stopping.folder
            left_nothing = folder is not None and not folder.kept
            if folder is not None:
                folder.discard()
            raise RunStopped(stopping.at_once(exc, left_nothing), exc.signum) from None
        except BaseException:
            if stopping.folder is not None:
                stopping.folder.discard()  # nothing once the first step has ended
            raise


def _run(
    cfg: TrainConfig,
    env,
    device: torch.device,
    run_dir: Path,
    stopping: _Stopping,
    stopper,
    *,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    loss_table: bool,
) -> dict[str, Any] | None:

    main = env.is_main
    say = (lambda *_: None) if quiet or not main else _log
    hook = TestHook()
    kind = strategy(env, cfg.fsdp)
    if kind is None and cfg.fsdp:
        say(
            "note: --fsdp shards the model across processes; this run is one process, which "
            "holds the whole model (start several with --nproc N or torchrun)"
        )
    t_start = time.perf_counter()
    # The tokenizer loads in a second and the data in a few; the model takes much longer.
    # Data mistakes (a malformed line, a prompt longer than --max-seq-len) fail here, before
    # anything is written to the run folder.
    folder_path, tokenizer = load_tokenizer(cfg, log=say)
    data = _load_data(cfg, tokenizer)
    if len(data.rows) < env.world_size:
        raise UserError(
            f"{cfg.data}: {len(data.rows)} training rows for {env.world_size} "
            "processes; every process needs at least one row (more data, or "
            "fewer processes)"
        )
    if not resume:
        created = on_main(env, lambda: _create_run_dir(cfg, run_dir, overwrite))
        stopping.folder = created if main else None
    hook("in_setup", 0, run_dir, env.rank, stopper)
    _seed_everything(cfg.seed)
    lm = load_model(cfg, device, log=say, env=env, tokenizer=tokenizer, folder=folder_path)
    model = wrap(lm.model, env, cfg)
    apply_memory_options(model, cfg)
    if env.rank > 0:
        # Rank 0 keeps the single-process stream; the others draw their own dropout masks.
        torch.manual_seed((cfg.seed + 1_000_003 * env.rank) % 2**63)
    autocast_dtype = (
        torch.bfloat16 if lm.device.type == "cuda" and lm.compute_dtype == torch.bfloat16 else None
    )
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainable_bytes = sum(p.numel() * 4 for p in lm.model.parameters() if p.requires_grad)
    on_main(env, lambda: _check_free_space(run_dir, trainable_bytes, cfg.keep_last))
    pad_id = tokenizer.pad_token_id
    stream = BatchStream(data, cfg, pad_id, env)
    if cfg.max_steps is not None:
        total_micro = cfg.max_steps * cfg.grad_accum
    else:
        total_micro = max(1, math.floor(cfg.epochs * stream.per_epoch))
    total_steps = math.ceil(total_micro / cfg.grad_accum)
    stopping.total = total_steps
    warmup = (
        cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total_steps)
    )
    optimizer = build_optimizer(cfg.optim, model, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps, warmup, cfg.scheduler)

    def base_mode():
        return base_model_mode(model, lm.has_adapter)

    placement = f"{lm.device.type}"
    if kind is not None:
        placement = f"{env.world_size} processes, {kind.upper()}, {lm.device.type}"
    say(
        f"model {cfg.model}: {lm.total_params / 1e6:.1f}M parameters, "
        f"{lm.trainable_params / 1e6:.2f}M trainable ({cfg.finetune}, base {cfg.quant}, "
        f"{placement}); data: {len(data.train)} train / {len(data.val)} held-out examples, "
        f"{data.stats.truncated} truncated at {cfg.max_seq_len} tokens"
        + (f", {data.stats.bad_lines} bad lines skipped" if data.stats.bad_lines else "")
        + (f", packed into {len(data.rows)} rows" if cfg.packing else "")
        + f"; {total_steps} steps"
    )

    start_step, micro_done, tokens_seen, elapsed_before = 0, 0, 0, 0.0
    ckpt = on_main(env, lambda: _latest_checkpoint(run_dir)) if resume else None
    if ckpt is not None:
        st = S.load_checkpoint(ckpt, model, optimizer, scheduler, env)
        start_step, micro_done = st["step"], st["micro_batches"]
        tokens_seen, elapsed_before = st["tokens_seen"], st["elapsed"]
        if st["rng"] is not None:
            S.set_rng_state(st["rng"])
        saved_on = st.get("world_size", 1)
        say(
            f"resumed from {ckpt} (step {start_step} of {total_steps}"
            + (f"; saved on {saved_on} processes" if saved_on != env.world_size else "")
            + ")"
        )
    stopping.step = start_step
    saved_step = start_step if ckpt is not None else None  # the newest checkpoint's step

    base_path = run_dir / "base.json"
    base = on_main(env, lambda: json.loads(base_path.read_text()) if base_path.is_file() else None)
    if base is None:
        base = {}
        # Before any step: for full fine-tuning this is the only moment the base exists.
        with base_mode():
            if data.val:
                base.update(evaluate(model, data, cfg, pad_id, autocast_dtype, env=env))
            _, prompts = _compare_prompts(tokenizer, data, cfg)
            if prompts:
                base["answers"] = generate_answers(
                    model, tokenizer, prompts, cfg.max_new_tokens, env=env
                )
        on_main(env, lambda: atomic_write_json(base_path, base))
    ref_logps = None
    if cfg.method == "dpo" and cfg.precompute_ref:
        ref_logps = _precompute_ref(
            model, data, cfg, pad_id, autocast_dtype, base_mode, run_dir, env
        )

    metrics = None
    if main:
        metrics = MetricsLog(
            run_dir / "metrics.jsonl",
            start_step if ckpt is not None else 0,
            run_dir / "tensorboard" if cfg.tensorboard else None,
        )
    progress = Progress(total_steps, start_step, cfg.progress and not quiet and main)
    model.train()
    t_loop = time.perf_counter()
    last_eval: dict[str, Any] = {}
    # DDP and FSDP2 average the gradients over the ranks; each rank's loss is its share of
    # the step's token-mean loss, so it is scaled back up by the rank count.
    scale = float(env.world_size)
    stat_keys = ("reward_accuracy", "reward_margin") if cfg.method == "dpo" else ()

    def save(step: int) -> Path:
        elapsed = elapsed_before + time.perf_counter() - t_loop
        stopper.checkpoint_starting()
        return S.save_checkpoint(
            run_dir,
            step,
            model,
            optimizer,
            scheduler,
            {
                "format": FORMAT,
                "step": step,
                "micro_batches": micro_done,
                "tokens_seen": tokens_seen,
                "elapsed": elapsed,
                "world_size": env.world_size,
                "strategy": kind or "single",
            },
            cfg.keep_last,
            env,
        )

    def stop_if_asked() -> None:
        """Where a stop may happen: every rank learns whether any rank was signalled, and
        all of them save the step that just ended, then stop."""
        nonlocal saved_step
        signum = stopper.agreed(env)
        if not signum:
            return
        done = stopping.step
        path = S.latest_checkpoint(run_dir) if main else None
        if saved_step != done:
            path = save(done)
            saved_step = done
        if metrics is not None:
            metrics.close()
        raise RunStopped(stopping.saved(signum, Path(path or run_dir)), signum)

    try:
        stopper.training = True
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            micro = [
                stream.get(g)
                for g in range(micro_done, min(micro_done + cfg.grad_accum, total_micro))
            ]
            if cfg.method == "sft":
                local_items = sum(
                    int((mb.batch["labels"][:, 1:] != D.IGNORE).sum()) for mb in micro if mb.real
                )
            else:
                local_items = sum(len(mb.idx) for mb in micro if mb.real)
            local_tokens = sum(int(mb.batch["input_ids"].numel()) for mb in micro if mb.real)
            num_items = int(all_reduce(env, [local_items])[0])
            lr = optimizer.param_groups[0]["lr"]
            loss_total = 0.0
            extra = dict.fromkeys(stat_keys, 0.0)
            for k, mb in enumerate(micro):
                with gradient_sync(model, k == len(micro) - 1):
                    if cfg.method == "sft":
                        loss = sft_loss(model, mb.batch, num_items, autocast_dtype)
                    else:
                        loss, stats = _dpo_micro_step(
                            model,
                            mb.batch,
                            mb.idx,
                            num_items,
                            cfg,
                            autocast_dtype,
                            ref_logps,
                            base_mode,
                        )
                        if mb.real:
                            for key, v in stats.items():
                                extra[key] += v
                    if mb.real:
                        loss_total += float(loss.detach())
                    if env.distributed:
                        loss = loss * (scale if mb.real else 0.0)
                    loss.backward()
            hook("in_step", step + 1, run_dir, env.rank, stopper)
            grad_norm = clip_gradients(optimizer, model, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            micro_done += len(micro)
            sums = all_reduce(env, [loss_total, local_tokens, *extra.values()])
            loss_total, step_tokens = sums[0], int(sums[1])
            extra = dict(zip(stat_keys, sums[2:]))
            tokens_seen += step_tokens
            peak = int(all_reduce(env, [peak_memory_bytes(lm.device.type)], "max")[0])
            dt = time.perf_counter() - t0
            record = {
                "kind": "train",
                "step": step + 1,
                "loss": loss_total,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens_seen,
                "tokens_per_s": step_tokens / max(dt, 1e-9),
                "peak_memory": peak,
                "epoch": micro_done / stream.per_epoch,
                **extra,
            }
            if metrics is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == total_steps):
                metrics.write(record)
            progress.update(record)
            if not math.isfinite(loss_total):
                raise UserError(
                    f"the loss became {loss_total} at step {step + 1}; lower --lr or check the data"
                )
            if stopping.folder is not None:
                stopping.folder.keep()  # a step has ended: the folder is now a run to resume
            if (
                cfg.eval_every
                and (step + 1) % cfg.eval_every == 0
                and data.val
                and step + 1 < total_steps
            ):
                last_eval = evaluate(
                    model,
                    data,
                    cfg,
                    pad_id,
                    autocast_dtype,
                    base_mode=base_mode if cfg.method == "dpo" else None,
                    env=env,
                )
                if main:
                    metrics.write({"kind": "eval", "step": step + 1, **last_eval})
                    progress.write(f"step {step + 1}: held-out loss {last_eval['eval_loss']:.4f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                save(step + 1)
                saved_step = step + 1
            stopping.step = step + 1
            stop_if_asked()
    finally:
        progress.close()
    train_time = elapsed_before + time.perf_counter() - t_loop

    stopping.finishing = True
    tuned: dict[str, Any] = {}
    if data.val:
        tuned = evaluate(
            model,
            data,
            cfg,
            pad_id,
            autocast_dtype,
            base_mode=base_mode if cfg.method == "dpo" else None,
            env=env,
        )
    stop_if_asked()
    samples = _compare_answers(
        model, tokenizer, data, cfg, base_mode, base, run_dir, lm.has_adapter, env
    )
    # The final evaluation is logged only now: a run stopped before this point resumes at
    # its last step and logs it then, once.
    stop_if_asked()
    if main and tuned:
        metrics.write({"kind": "eval", "step": total_steps, **tuned})
    saved_to = _save_result(model, tokenizer, lm, cfg, run_dir, env)
    peak = int(all_reduce(env, [peak_memory_bytes(lm.device.type)], "max")[0])
    if not main:
        if cfg.merge:
            _merge(model, lm, cfg, run_dir, env)
        return None
    curve = plot_loss_curve(metrics.records, run_dir / "loss_curve.png", base)
    metrics.close()
    summary = {
        "steps": total_steps,
        "train_time_s": train_time,
        "total_time_s": time.perf_counter() - t_start,
        "tokens": tokens_seen,
        "tokens_per_s": tokens_seen / max(train_time, 1e-9),
        "peak_memory": peak,
        "final_train_loss": next(
            (r["loss"] for r in reversed(metrics.records) if r.get("kind") == "train"), None
        ),
        "base": base,
        "tuned": tuned,
        "trainable_params": lm.trainable_params,
        "total_params": lm.total_params,
        "truncated": data.stats.truncated,
        "bad_lines": data.stats.bad_lines,
        "train_examples": len(data.train),
        "val_examples": len(data.val),
        "output": str(saved_to),
        "run_dir": str(run_dir),
        "device": lm.device.type,
        "processes": env.world_size,
        "strategy": kind or "single",
        "samples": samples,
        "base_folder": str(lm.folder),
        "loss_curve": str(run_dir / "loss_curve.png") if curve else None,
    }
    if cfg.merge:
        summary["merged"] = str(_merge(model, lm, cfg, run_dir, env))
    atomic_write_json(run_dir / "summary.json", summary)
    if not quiet:
        _print_summary(summary, cfg, loss_table)
    return summary


def _dpo_micro_step(model, batch, idx, num_pairs, cfg, autocast_dtype, ref_logps, base_mode):

    if ref_logps is not None:
        ref = torch.cat([ref_logps[idx, 0], ref_logps[idx, 1]])
    else:
        was_training = model.training
        model.eval()
        with torch.no_grad(), base_mode():
            ref = sequence_logps(model, batch, autocast_dtype)
        model.train(was_training)
    policy = sequence_logps(model, batch, autocast_dtype)
    losses, chosen_r, rejected_r = dpo_losses(policy, ref.to(policy.device), cfg.beta)
    stats = {
        "reward_accuracy": float((chosen_r > rejected_r).float().sum()) / num_pairs,
        "reward_margin": float((chosen_r - rejected_r).sum()) / num_pairs,
    }
    return losses.sum() / num_pairs, stats


def _compare_prompts(tokenizer, data: Data, cfg) -> tuple[list[dict], list[str]]:
    """The first ``cfg.compare`` held-out records that have a prompt (a ``text`` record has
    none), compared at the end, and their prompts."""
    if not cfg.compare or not data.val_records:
        return [], []
    pairs = []
    for r in data.val_records:  # the first --compare records that have a prompt ("text" has none)
        p = D.prompt_text(tokenizer, r, r["_shape"])
        if p:
            pairs.append((r, p))
            if len(pairs) == cfg.compare:
                break
    return [r for r, _ in pairs], [p for _, p in pairs]


def _compare_answers(
    model, tokenizer, data: Data, cfg, base_mode, base: dict, run_dir: Path, has_adapter: bool, env
):

    records, prompts = _compare_prompts(tokenizer, data, cfg)
    if not prompts:
        return []
    # --compare changed on resume: rank 0's base.json decides, for every rank
    stale = on_main(env, lambda: len(base.get("answers", [])) != len(prompts))
    if stale:
        if has_adapter:
            with base_mode():
                answers = generate_answers(model, tokenizer, prompts, cfg.max_new_tokens, env=env)
            if env.is_main:
                base["answers"] = answers
                atomic_write_json(run_dir / "base.json", base)
        else:
            base["answers"] = ["(not recorded before training)"] * len(prompts)
    tuned = generate_answers(model, tokenizer, prompts, cfg.max_new_tokens, env=env)
    if not env.is_main:
        return []
    rows = []
    md = ["# Held-out prompts: base vs tuned\n"]
    for i, (p, a, b) in enumerate(zip(prompts, base["answers"], tuned), 1):
        ref = D.reference_answer(records[i - 1], records[i - 1]["_shape"])
        question = D.question_text(records[i - 1], records[i - 1]["_shape"]) or p
        rows.append({"prompt": p, "question": question, "base": a, "tuned": b, "reference": ref})
        md += [
            f"## {i}\n",
            "**prompt**\n",
            f"```\n{p}\n```\n",
            "**base**\n",
            f"{a}\n",
            "**tuned**\n",
            f"{b}\n",
            "**reference**\n",
            f"{ref}\n",
        ]

    atomic_write_text(run_dir / "samples.md", "\n".join(md))
    return rows


def _sharded(model) -> bool:

    info = parallel_info(model)
    return info is not None and info.strategy == "fsdp"


def _save_result(model, tokenizer, lm, cfg, run_dir: Path, env) -> Path:
    """The adapter (PEFT format) or, with full fine-tuning, the model, plus the tokenizer.

    A single process or DDP's rank 0 holds the whole model and saves it as it is; under
    FSDP2 the shards are gathered to rank 0 one tensor at a time first.
    """

    target = run_dir / ("model" if cfg.finetune == "full" else "adapter")
    full = cfg.finetune == "full"
    gathered = td.gather_state_dict(model) if full and _sharded(model) else None

    def save() -> None:
        try:
            with atomic_directory(target, overwrite=True) as tmp:
                inner = td.unwrap(model)
                if full:
                    from trilora.patches.fused_loss import disable_fused_cross_entropy

                    disable_fused_cross_entropy(inner)
                    inner.save_pretrained(tmp, state_dict=gathered)
                else:
                    inner.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        except OSError as exc:
            raise UserError(f"could not save {target}: {exc.strerror or exc}") from exc

    if full or not _sharded(model):
        on_main(env, save)
        return target
    try:
        td.save_adapter(model, target, overwrite=True, add_files=tokenizer.save_pretrained)
    except OSError as exc:
        raise UserError(f"could not save {target}: {exc.strerror or exc}") from exc
    return target


def _merge(model, lm, cfg, run_dir: Path, env) -> Path:
    """``OUT/merged``: the 16-bit merged model, written by rank 0 (the other ranks return at
    once). Under FSDP2 rank 0 merges a fresh single-process copy: the base it read and the
    adapter just saved."""

    target = run_dir / "merged"
    if not env.is_main:
        return target
    dtype = torch.bfloat16
    if not lm.has_adapter:
        source = run_dir / "model"
        with atomic_directory(target, overwrite=True) as tmp:
            for f in source.iterdir():
                shutil.copy2(f, tmp / f.name)
        return target
    peft_model = _reload_adapter(cfg, lm, run_dir / "adapter") if _sharded(model) else unwrap(model)
    merged = merge(peft_model, dtype=dtype)
    with atomic_directory(target, overwrite=True) as tmp:
        merged.save_pretrained(tmp)
        save_tokenizer([lm.folder, run_dir / "adapter"], tmp)  # as `trilora merge` does
    return target


def _reload_adapter(cfg, lm, adapter: Path):
    """The base model read again in one process, with the saved adapter on it."""

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*checkpoint tensors not used.*")
        if cfg.quant == "none":
            base = AutoModelForCausalLM.from_pretrained(lm.folder, dtype=lm.compute_dtype)
        else:
            base = from_pretrained(
                lm.folder,
                quant_type=cfg.quant,
                compute_dtype=lm.compute_dtype,
                dtype=lm.compute_dtype,
                device="cpu",
            )
    return PeftModel.from_pretrained(base, str(adapter))


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _print_summary(s: dict[str, Any], cfg: TrainConfig, loss_table: bool = True) -> None:
    p = print
    if s["samples"]:
        shown = s["samples"][:SHOWN_SAMPLES]
        p(side_by_side([(r.get("question") or r["prompt"], r["base"], r["tuned"]) for r in shown]))
        p("")
    p(
        f"done: {s['steps']} steps in {s['train_time_s']:.1f} s ({s['tokens_per_s']:.0f} tokens/s), "
        f"peak memory {human_bytes(s['peak_memory'])} ({'CUDA' if s['device'] == 'cuda' else 'RSS'})"
    )
    if s["tuned"] and loss_table:
        b, t = s["base"], s["tuned"]
        p(f"{'held-out':<22}{'base':>12}{'tuned':>12}")
        p(f"{'loss':<22}{_fmt(b.get('eval_loss')):>12}{_fmt(t.get('eval_loss')):>12}")
        if "eval_ppl" in t:
            p(
                f"{'perplexity':<22}{_fmt(b.get('eval_ppl'), '.2f'):>12}{_fmt(t.get('eval_ppl'), '.2f'):>12}"
            )
        if "eval_chosen_preferred" in t:
            p(
                f"{'chosen preferred':<22}{_fmt(b.get('eval_chosen_preferred'), '.1%'):>12}"
                f"{_fmt(t.get('eval_chosen_preferred'), '.1%'):>12}"
            )
    if s["truncated"]:
        p(f"{s['truncated']} training examples were truncated at --max-seq-len {cfg.max_seq_len}")
    p(
        f"saved {s['output']} (metrics: {s['run_dir']}/metrics.jsonl"
        + (f", curve: {s['loss_curve']}" if s["loss_curve"] else "")
        + ")"
    )
    if cfg.finetune != "full":
        nxt = s.get("merged") or f"{s['run_dir']}/merged"
        p(f"next: trilora merge {s['output']} --base {s['base_folder']} --out {nxt}")
