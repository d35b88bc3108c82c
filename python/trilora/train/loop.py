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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
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
from trilora.moe import experts_summary
from trilora.peft import load_adapter
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
from trilora.train.losses import compute_device
from trilora.train.methods import build_method
from trilora.train.methods.base import Method, MicroBatch, RunContext
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
    PhasePeaks,
    Progress,
    human_bytes,
    peak_memory_bytes,
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
    rows: list  # the method's training rows (SFT: rows of examples; DPO: pairs)
    lengths: list[int]
    stats: D.DataStats
    val_stats: D.DataStats | None
    train_records: list[dict] = field(default_factory=list)


def _load_data(cfg: TrainConfig, tokenizer, method: Method) -> Data:
    examples, records, stats = D.load_dataset(
        cfg.data, tokenizer, cfg.max_seq_len, method.records, cfg.skip_bad_lines
    )
    val_stats = None
    if cfg.val_data:
        val, val_records, val_stats = D.load_dataset(
            cfg.val_data, tokenizer, cfg.max_seq_len, method.records, cfg.skip_bad_lines
        )
        train, train_records = examples, records
    else:
        train_idx, val_idx = D.split_validation(len(examples), cfg.val_fraction, cfg.seed)
        train = [examples[i] for i in train_idx]
        train_records = [records[i] for i in train_idx]
        val = [examples[i] for i in val_idx]
        val_records = [records[i] for i in val_idx]
    rows = method.rows(train)
    lengths = [method.row_length(r) for r in rows]
    return Data(train, val, val_records, rows, lengths, stats, val_stats, train_records)


class BatchStream:
    """Micro-batch ``g`` of the run, for any ``g``: epoch ``g // per_epoch``, batch ``g % per_epoch``.

    Every rank draws the same global batches (a pure function of the seed and the epoch)
    and keeps its own rows of each.
    """

    def __init__(self, data: Data, cfg: TrainConfig, pad_id: int, method: Method, env=None):

        self.data, self.cfg, self.pad_id, self.method = data, cfg, pad_id, method
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
        batch = self.method.collate([self.data.rows[i] for i in idx], self.pad_id)
        return MicroBatch(batch, idx, real, g)


# ---------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    method: Method, run: RunContext, data: Data, as_base: bool = False
) -> dict[str, float]:
    """The method's held-out figures (SFT: loss and perplexity; DPO: loss and preference
    accuracy). ``as_base``: the caller runs the model as the base already.

    In a distributed run every rank must call it: each scores its rows of every evaluation
    batch and the sums are all-reduced, so every rank returns the same numbers.
    """

    env, cfg = run.env, run.cfg
    n_val = len(data.val)

    def chunks():
        for s in range(0, n_val, cfg.eval_batch_size):
            yield rank_rows(list(range(s, min(s + cfg.eval_batch_size, n_val))), env)

    with inference_model(run.model) as m:
        was_training = m.training
        m.eval()
        try:
            return method.evaluate(
                run, m, data.val, chunks(), lambda values: all_reduce(env, values), as_base
            )
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
    """The phases of a run: data, model, resume, base figures, steps, final results."""

    session = _Session(cfg, env, run_dir, stopping, stopper, quiet)
    session.mem = PhasePeaks(device.type)
    try:
        with session.mem.phase("load"):
            session.load_data()
            if not resume:
                created = on_main(env, lambda: _create_run_dir(cfg, run_dir, overwrite))
                stopping.folder = created if session.main else None
            session.hook("in_setup", 0, run_dir, env.rank, stopper)
            session.build_model(device)
            if resume:
                session.resume()
        session.base_figures()
        with session.mem.phase("load"):
            session.method.prepare(session.run)
        with session.mem.phase("steps"):
            session.train_steps()
        return session.finish(loss_table)
    finally:
        session.mem.close()


class _Session:
    """One run's state, advanced phase by phase by :func:`_run`."""

    def __init__(self, cfg: TrainConfig, env, run_dir: Path, stopping: _Stopping, stopper, quiet):
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        self.stopping, self.stopper, self.quiet = stopping, stopper, quiet
        self.main = env.is_main
        self.say = (lambda *_: None) if quiet or not self.main else _log
        self.hook = TestHook()
        self.kind = strategy(env, cfg.fsdp)
        if self.kind is None and cfg.fsdp:
            self.say(
                "note: --fsdp shards the model across processes; this run is one process, "
                "which holds the whole model (start several with --nproc N or torchrun)"
            )
        self.t_start = time.perf_counter()
        self.method = build_method(cfg)
        # where the run is: optimizer steps and micro-batches done, tokens seen, train time
        # before this process started
        self.start_step, self.micro_done, self.tokens_seen, self.elapsed_before = 0, 0, 0, 0.0
        self.resumed_from: Path | None = None
        self.saved_step: int | None = None  # the newest checkpoint's step
        self.metrics: MetricsLog | None = None
        self.base: dict[str, Any] = {}
        self.mem: PhasePeaks  # set by _run, which knows the device

    # --- phases -------------------------------------------------------------------------

    def load_data(self) -> None:
        """The tokenizer loads in a second and the data in a few; the model takes much
        longer. Data mistakes (a malformed line, a prompt longer than --max-seq-len) fail
        here, before anything is written to the run folder."""
        cfg, env = self.cfg, self.env
        self.folder_path, self.tokenizer = load_tokenizer(cfg, log=self.say)
        self.data = _load_data(cfg, self.tokenizer, self.method)
        if len(self.data.rows) < env.world_size:
            raise UserError(
                f"{cfg.data}: {len(self.data.rows)} training rows for {env.world_size} "
                "processes; every process needs at least one row (more data, or "
                "fewer processes)"
            )

    def build_model(self, device: torch.device) -> None:
        """The model, the optimizer and scheduler, the batch stream, the step count."""
        cfg, env, data = self.cfg, self.env, self.data
        _seed_everything(cfg.seed)
        lm = load_model(
            cfg, device, log=self.say, env=env, tokenizer=self.tokenizer, folder=self.folder_path
        )
        self.lm = lm
        model = self.model = wrap(lm.model, env, cfg)
        apply_memory_options(model, cfg)
        if env.rank > 0:
            # Rank 0 keeps the single-process stream; the others draw their own dropout masks.
            torch.manual_seed((cfg.seed + 1_000_003 * env.rank) % 2**63)
        self.autocast_dtype = (
            torch.bfloat16
            if lm.device.type == "cuda" and lm.compute_dtype == torch.bfloat16
            else None
        )
        if lm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainable_bytes = sum(p.numel() * 4 for p in lm.model.parameters() if p.requires_grad)
        on_main(env, lambda: _check_free_space(self.run_dir, trainable_bytes, cfg.keep_last))
        self.pad_id = self.tokenizer.pad_token_id
        self.stream = BatchStream(data, cfg, self.pad_id, self.method, env)
        # total_micro: the micro-batches of data the run consumes; each optimizer step
        # takes grad_accum of them, and a method may use them for several steps (repeats)
        repeats = self.method.repeats
        if cfg.max_steps is not None:
            self.total_micro = math.ceil(cfg.max_steps / repeats) * cfg.grad_accum
            self.total_steps = cfg.max_steps
        else:
            self.total_micro = max(1, math.floor(cfg.epochs * self.stream.per_epoch))
            self.total_steps = math.ceil(self.total_micro / cfg.grad_accum) * repeats
        self.stopping.total = self.total_steps
        warmup = (
            cfg.warmup_steps
            if cfg.warmup_steps is not None
            else round(cfg.warmup_ratio * self.total_steps)
        )
        self.optimizer = build_optimizer(cfg.optim, model, cfg.lr, cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, warmup, cfg.scheduler)

        def base_mode():
            return base_model_mode(model, lm.has_adapter)

        self.run = RunContext(
            model=model,
            cfg=cfg,
            tokenizer=self.tokenizer,
            autocast_dtype=self.autocast_dtype,
            base_mode=base_mode,
            env=env,
            pad_id=self.pad_id,
            run_dir=self.run_dir,
            rows=data.rows,
            records=data.train_records,
            val_records=data.val_records,
        )
        placement = f"{lm.device.type}"
        if self.kind is not None:
            placement = f"{env.world_size} processes, {self.kind.upper()}, {lm.device.type}"
        self.say(
            f"model {cfg.model}: {lm.total_params / 1e6:.1f}M parameters, "
            f"{lm.trainable_params / 1e6:.2f}M trainable ({cfg.finetune}, base {cfg.quant}, "
            f"{placement}); data: {len(data.train)} train / {len(data.val)} held-out "
            f"examples, {data.stats.truncated} truncated at {cfg.max_seq_len} tokens"
            + (f", {data.stats.bad_lines} bad lines skipped" if data.stats.bad_lines else "")
            + (f", packed into {len(data.rows)} rows" if cfg.packing else "")
            + f"; {self.total_steps} steps"
        )
        experts = experts_summary(unwrap(lm.model))
        if experts is not None:
            self.say(experts)

    def resume(self) -> None:
        """Load the latest complete checkpoint, if there is one."""
        env = self.env
        ckpt = on_main(env, lambda: _latest_checkpoint(self.run_dir))
        if ckpt is None:
            return
        st = S.load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, env)
        self.start_step, self.micro_done = st["step"], st["micro_batches"]
        self.tokens_seen, self.elapsed_before = st["tokens_seen"], st["elapsed"]
        if st["rng"] is not None:
            S.set_rng_state(st["rng"])
        saved_on = st.get("world_size", 1)
        # the method's state of this rank (a GRPO generation batch holds each rank's own
        # rows; the method checks they are the rows it is given); before method_by_rank a
        # checkpoint held rank 0's only
        by_rank = st.get("method_by_rank") or [st.get("method")]
        self.method.load_state(by_rank[env.rank] if env.rank < len(by_rank) else None)
        self.say(
            f"resumed from {ckpt} (step {self.start_step} of {self.total_steps}"
            + (f"; saved on {saved_on} processes" if saved_on != env.world_size else "")
            + ")"
        )
        self.resumed_from = ckpt
        self.saved_step = self.start_step
        self.stopping.step = self.start_step

    def base_figures(self) -> None:
        """The base model's held-out figures and answers (``OUT/base.json``), before any
        step: for full fine-tuning this is the only moment the base exists."""
        env, data, run = self.env, self.data, self.run
        base_path = self.run_dir / "base.json"
        base = on_main(
            env, lambda: json.loads(base_path.read_text()) if base_path.is_file() else None
        )
        if base is None:
            base = {}
            with run.base_mode():
                if data.val:
                    with self.mem.phase("evaluation"):
                        base.update(evaluate(self.method, run, data, as_base=True))
                _, prompts = _compare_prompts(self.tokenizer, data, self.cfg)
                if prompts:
                    with self.mem.phase("generation"):
                        base["answers"] = generate_answers(
                            self.model, self.tokenizer, prompts, self.cfg.max_new_tokens, env=env
                        )
            on_main(env, lambda: atomic_write_json(base_path, base))
        self.base = base

    def save(self, step: int) -> Path:
        elapsed = self.elapsed_before + time.perf_counter() - self.t_loop
        self.stopper.checkpoint_starting()
        with self.mem.phase("save"):
            return self._save(step, elapsed)

    def _save(self, step: int, elapsed: float) -> Path:
        method_states = gather_objects(self.env, self.method.state())
        return S.save_checkpoint(
            self.run_dir,
            step,
            self.model,
            self.optimizer,
            self.scheduler,
            {
                "format": FORMAT,
                "step": step,
                "micro_batches": self.micro_done,
                "tokens_seen": self.tokens_seen,
                "elapsed": elapsed,
                "world_size": self.env.world_size,
                "strategy": self.kind or "single",
                "method_by_rank": (
                    method_states if any(m is not None for m in method_states) else None
                ),
            },
            self.cfg.keep_last,
            self.env,
        )

    def stop_if_asked(self) -> None:
        """Where a stop may happen: every rank learns whether any rank was signalled, and
        all of them save the step that just ended, then stop."""
        signum = self.stopper.agreed(self.env)
        if not signum:
            return
        done = self.stopping.step
        path = S.latest_checkpoint(self.run_dir) if self.main else None
        if self.saved_step != done:
            path = self.save(done)
            self.saved_step = done
        if self.metrics is not None:
            self.metrics.close()
        raise RunStopped(self.stopping.saved(signum, Path(path or self.run_dir)), signum)

    def train_steps(self) -> None:
        """The optimizer steps from the resumed one to the last, with the periodic
        evaluations and checkpoints."""
        cfg = self.cfg
        if self.main:
            self.metrics = MetricsLog(
                self.run_dir / "metrics.jsonl",
                self.start_step if self.resumed_from is not None else 0,
                self.run_dir / "tensorboard" if cfg.tensorboard else None,
            )
        self.progress = Progress(
            self.total_steps, self.start_step, cfg.progress and not self.quiet and self.main
        )
        self.model.train()
        self.t_loop = time.perf_counter()
        try:
            self.stopper.training = True
            for step in range(self.start_step, self.total_steps):
                record = self.one_step(step)
                if self.metrics is not None and (
                    (step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps
                ):
                    self.metrics.write(record)
                self.progress.update(record, self.method.bar_text(record))
                self.method.after_step(self.run, record, self.progress.write)
                if not math.isfinite(record["loss"]):
                    raise UserError(
                        f"the loss became {record['loss']} at step {step + 1}; lower --lr or "
                        "check the data"
                    )
                if self.stopping.folder is not None:
                    self.stopping.folder.keep()  # a step has ended: the folder is a run now
                self.periodic(step + 1)
                self.stopping.step = step + 1
                self.stop_if_asked()
        finally:
            self.progress.close()
        self.train_time = self.elapsed_before + time.perf_counter() - self.t_loop

    def one_step(self, step: int) -> dict[str, Any]:
        """Optimizer step ``step`` (0-based): its micro-batches' losses and gradients, the
        update, and the record logged for it."""
        cfg, env, method = self.cfg, self.env, self.method
        t0 = time.perf_counter()
        first = (step // method.repeats) * cfg.grad_accum
        last = min(first + cfg.grad_accum, self.total_micro)
        micro = [self.stream.get(g) for g in range(first, last)]
        method.prepare_step(self.run, step, micro)
        counts = [method.loss_items(mb) for mb in micro if mb.real]
        local_items = [sum(c) for c in zip(*counts)] if counts else [0] * method.item_kinds
        local_tokens = sum(int(mb.batch["input_ids"].numel()) for mb in micro if mb.real)
        num_items = [int(n) for n in all_reduce(env, local_items)]
        lr = self.optimizer.param_groups[0]["lr"]
        loss_total = 0.0
        extra = dict.fromkeys(method.stat_keys, 0.0)
        # DDP and FSDP2 average the gradients over the ranks; each rank's loss is its share
        # of the step's mean loss, so it is scaled back up by the rank count.
        scale = float(env.world_size)
        for k, mb in enumerate(micro):
            with gradient_sync(self.model, k == len(micro) - 1):
                loss, stats = method.micro_loss(self.run, mb, num_items)
                if mb.real:
                    for key, v in stats.items():
                        extra[key] += v
                    loss_total += float(loss.detach())
                if env.distributed:
                    loss = loss * (scale if mb.real else 0.0)
                loss.backward()
        self.hook("in_step", step + 1, self.run_dir, env.rank, self.stopper)
        grad_norm = clip_gradients(self.optimizer, self.model, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.micro_done = last
        sums = all_reduce(env, [loss_total, local_tokens, *extra.values()])
        loss_total, step_tokens = sums[0], int(sums[1])
        extra = dict(zip(method.stat_keys, sums[2:]))
        self.tokens_seen += step_tokens
        peak = int(all_reduce(env, [peak_memory_bytes(self.lm.device.type)], "max")[0])
        dt = time.perf_counter() - t0
        return {
            "kind": "train",
            "step": step + 1,
            "loss": loss_total,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens_seen,
            "tokens_per_s": step_tokens / max(dt, 1e-9),
            "peak_memory": peak,
            "epoch": self.micro_done / self.stream.per_epoch,
            **extra,
        }

    def periodic(self, done: int) -> None:
        """The evaluation and checkpoint due after ``done`` steps (not after the last)."""
        cfg = self.cfg
        if (
            cfg.eval_every
            and done % cfg.eval_every == 0
            and self.data.val
            and done < self.total_steps
        ):
            with self.mem.phase("evaluation"):
                figures = evaluate(self.method, self.run, self.data)
            if self.main:
                self.metrics.write({"kind": "eval", "step": done, **figures})
                self.progress.write(f"step {done}: {self.method.eval_line(figures)}")
        if cfg.save_every and done % cfg.save_every == 0 and done < self.total_steps:
            self.save(done)
            self.saved_step = done

    def finish(self, loss_table: bool) -> dict[str, Any] | None:
        """The final evaluation and answers, the saved result, the summary (rank 0)."""
        cfg, env, lm, data, model = self.cfg, self.env, self.lm, self.data, self.model
        self.stopping.finishing = True
        tuned: dict[str, Any] = {}
        if data.val:
            with self.mem.phase("evaluation"):
                tuned = evaluate(self.method, self.run, data)
        self.stop_if_asked()
        with self.mem.phase("generation"):
            samples = _compare_answers(
                model,
                self.tokenizer,
                data,
                cfg,
                self.run.base_mode,
                self.base,
                self.run_dir,
                lm.has_adapter,
                env,
            )
        # The final evaluation is logged only now: a run stopped before this point resumes
        # at its last step and logs it then, once.
        self.stop_if_asked()
        metrics = self.metrics
        if self.main and tuned:
            metrics.write({"kind": "eval", "step": self.total_steps, **tuned})
        with self.mem.phase("save"):
            saved_to = _save_result(model, self.tokenizer, lm, cfg, self.run_dir, env)
        peak = int(all_reduce(env, [peak_memory_bytes(lm.device.type)], "max")[0])
        if not self.main:
            if cfg.merge:
                with self.mem.phase("merge"):
                    _merge(model, lm, cfg, self.run_dir, env)
            return None
        curve = plot_loss_curve(metrics.records, self.run_dir / "loss_curve.png", self.base)
        metrics.close()
        run_dir = self.run_dir
        summary = {
            "steps": self.total_steps,
            "train_time_s": self.train_time,
            "total_time_s": time.perf_counter() - self.t_start,
            "tokens": self.tokens_seen,
            "tokens_per_s": self.tokens_seen / max(self.train_time, 1e-9),
            "peak_memory": peak,
            "final_train_loss": next(
                (r["loss"] for r in reversed(metrics.records) if r.get("kind") == "train"), None
            ),
            "base": self.base,
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
            "strategy": self.kind or "single",
            "samples": samples,
            "base_folder": str(lm.folder),
            "loss_curve": str(run_dir / "loss_curve.png") if curve else None,
        }
        if cfg.merge:
            with self.mem.phase("merge"):
                summary["merged"] = str(_merge(model, lm, cfg, run_dir, env))
        # This process's phases (rank 0's under several processes).
        summary["peak_memory_by_phase"] = self.mem.close()
        atomic_write_json(run_dir / "summary.json", summary)
        if not self.quiet:
            _print_summary(summary, cfg, loss_table)
        return summary


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
    return load_adapter(base, adapter)


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
    phases = s.get("peak_memory_by_phase") or {}
    if phases:
        p(
            "peak memory by phase: "
            + ", ".join(
                f"{name} {human_bytes(v['peak'])}"
                + (f" (+{human_bytes(v['raised'])})" if v["raised"] else "")
                for name, v in phases.items()
            )
        )
    if s["tuned"] and loss_table:
        b, t = s["base"], s["tuned"]
        p(f"{'held-out':<22}{'base':>12}{'tuned':>12}")
        p(f"{'loss':<22}{_fmt(b.get('eval_loss')):>12}{_fmt(t.get('eval_loss')):>12}")
        if "eval_ppl" in t:
            p(
                f"{'perplexity':<22}{_fmt(b.get('eval_ppl'), '.2f'):>12}{_fmt(t.get('eval_ppl'), '.2f'):>12}"
            )
        if "eval_reward" in t:
            p(
                f"{'mean reward':<22}{_fmt(b.get('eval_reward')):>12}"
                f"{_fmt(t.get('eval_reward')):>12}"
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
