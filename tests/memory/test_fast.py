"""trilora mem's fast model (depth + length extrapolation) against full-depth traces.

The claim under test: on its lattice of lengths the fast model's report *equals* the
full-depth trace's, byte for byte in every category, and the budget search's answer is the
one full-depth traces give. Checked on small models deep enough for the depth extrapolation
(6 layers; 7 for Gemma's alternating layers) at lengths past the five short traces the model is
built from, for the option sets whose memory scales differently with depth and length.

Cost: every trace costs about a millisecond per traced op (FakeTensor dispatch), so a
fast model (five traces) plus one full-depth trace takes ~15-25 s of CPU. Full-depth traces
are shared through ``full_trace`` (one per option set and length), each check is made at
the first lattice length past the samples, and only the cheapest lattice check (no
checkpointing) runs in the lanes without slow tests: it follows transformers' model code
op for op, which is what a new release could change; the other option sets run the same
extrapolation code over our own loops.
"""

import contextlib
import io
import warnings
from dataclasses import replace

import numpy as np
import pytest

from trilora.memory.depth import depth_samples, layer_period, trace
from trilora.memory.fast import FastProfiler, Lattice
from trilora.memory.optimizer_model import OPTIMIZER_NAMES, offloads_gradients, optimizer_bytes
from trilora.memory.progress import BarProgress, Progress
from trilora.memory.report import MemOptions, format_bytes
from trilora.memory.search import find_max, profile
from trilora.memory.timeline import LengthModel, Timeline, TimelineMismatch, TimelineRecorder
from trilora.memory.trace import load_config

# A 65,536-token vocabulary makes the fused loss run in 1,024-token chunks, so the loss loop
# grows with the length too (as for Llama-3.1-8B's 512-token chunks).
LLAMA = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=65536,
    max_position_embeddings=1 << 20,
)
# Gemma-3's sliding-window and global layers, alternating here (one in six in the real
# models): with grouped attention they trace differently (sliding windows fall back to
# transformers' SDPA), so the depth extrapolation must move in whole patterns. Seven layers
# (S F S F S F S): the samples are 3 and 5 layers, two layers (one pattern) apart.
GEMMA3 = dict(
    model_type="gemma3_text",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=7,
    head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
    max_position_embeddings=1 << 20,
    sliding_window=256,
    layer_types=["sliding_attention", "full_attention"] * 3 + ["sliding_attention"],
)
# The options of the README's 24 GB figure.
FIGURE = MemOptions(r=8, grouped_attention=True, offload_embeddings=True)


def _same(fast, full) -> None:
    assert fast.method == "lattice" and full.method == "full"
    assert fast.categories == full.categories
    assert fast.overheads == full.overheads
    assert (fast.host_pinned, fast.host_embedding, fast.host_optimizer) == (
        full.host_pinned,
        full.host_embedding,
        full.host_optimizer,
    )
    assert fast.total == full.total


@pytest.fixture(scope="module")
def llama():
    return load_config(LLAMA)


@pytest.fixture(scope="module")
def figure_model(llama):
    return FastProfiler(llama, FIGURE)


@pytest.fixture(scope="module")
def full_trace(llama):
    """``full_trace(opts, provider="trilora")``: the full-depth trace of the 6-layer Llama,
    traced once per option set in this module (several tests check against the same one)."""
    cache = {}

    def get(opts: MemOptions, provider: str = "trilora"):
        key = (repr(opts), provider)  # MemOptions is a mutable dataclass: not hashable
        if key not in cache:
            cache[key] = trace(llama, opts, provider)
        return cache[key]

    return get


# (Until this file's slow tests were cut down it also checked 20,480 tokens here: the
# budget test below compares 16,384 tokens category by category, further along the same
# lattice.)
@pytest.mark.slow  # our extrapolation over our own loops; no-checkpointing below covers the upstream model code
def test_fast_equals_full_depth_on_the_lattice(figure_model, full_trace):
    # Samples at 8,192 / 10,240 / 12,288 tokens (3 and 4 layers); 14,336 is the next one.
    assert figure_model.period() == 2048 and figure_model.first_regular() == 8192
    _same(figure_model.report(14336), full_trace(replace(FIGURE, seq_len=14336)).report())


# slow: the same extrapolation code over our own loops (see the module doc)
_SLOW_OPTIONS = pytest.mark.slow


@pytest.mark.parametrize(
    ("opts", "provider", "seq_len"),
    [
        # every layer input stays on the device: memory grows with depth x length
        pytest.param(MemOptions(r=8, offload=False), "trilora", 14336, marks=_SLOW_OPTIONS),
        # fixed chunk count (pieces grow with the length), optimizer state in host memory;
        # samples at 3,072-5,120 tokens
        pytest.param(
            MemOptions(r=8, mlp_chunks=4, optimizer="adamw_cpu_offload"),
            "trilora",
            6144,
            marks=_SLOW_OPTIONS,
        ),
        # no checkpointing at all: every activation of every layer (the cheapest lattice)
        (MemOptions(r=8, checkpointing=False, mlp_chunks=None), "trilora", 6144),
        # transformers + bitsandbytes + PEFT: no loops, stock loss with full logits
        pytest.param(MemOptions(r=8), "bnb_peft", 4096, marks=_SLOW_OPTIONS),
    ],
    ids=["no-offload", "4-chunks-cpu-offload-adamw", "no-checkpointing", "bnb-peft"],
)
def test_fast_equals_full_depth_across_options(llama, full_trace, opts, provider, seq_len):
    fast = FastProfiler(llama, opts, provider)
    lattice = fast.lattice(seq_len)
    # the first length past the five short traces
    assert lattice is not None and lattice.index(seq_len) == lattice.first + 3
    _same(fast.report(seq_len), full_trace(replace(opts, seq_len=seq_len), provider).report())


@pytest.mark.slow  # optimizer bytes are our own model (tests/optim/test_optimizer_model.py)
def test_every_optimizer_through_the_fast_model(figure_model, full_trace):
    """Every report, fast or traced, takes its optimizer bytes from
    trilora.memory.optimizer_model; the lattice model extrapolates them in depth and length
    exactly (host paging's two page buffers do not grow with depth, its state does). The
    traced step is the same for every optimizer that keeps gradients on the device, so one
    full-depth trace serves them all; the CPU-offloaded ones are traced above."""
    seq_len = 14336
    full = full_trace(replace(FIGURE, seq_len=seq_len))
    lattice = figure_model.lattice(seq_len)
    lengths = figure_model._model(lattice)
    names = [n for n in OPTIMIZER_NAMES if not offloads_gradients(n)]
    assert {"adamw", "adamw_8bit", "adamw_host", "adamw_8bit_uvm", "paged_adamw_8bit"} <= set(names)
    devices = {}
    for name in names:
        opts = replace(FIGURE, seq_len=seq_len, optimizer=name)
        ref = full.report(opts=opts)
        _same(lengths.report(lattice.index(seq_len), opts), ref)
        held = optimizer_bytes(name, full.trainable_numels, full.trainable_itemsize)
        assert (ref.categories["optimizer_state"], ref.host_optimizer) == (held.device, held.host)
        devices[name] = held.device
    # (this model's LoRA tensors are under trilora.optim's 4,096-element 8-bit minimum:
    # 8-bit is 32-bit here; tests/optim/test_optimizer_model.py checks the 8-bit layout)
    assert devices["adamw_host"] < devices["adamw"] == devices["adamw_8bit"]


@pytest.mark.slow  # our depth extrapolation; the preset traces below run Gemma's model code
def test_layer_patterns_extrapolate_in_whole_patterns():
    gemma = load_config(GEMMA3)
    assert layer_period(gemma) == 2 and depth_samples(gemma) == (3, 5)
    # Four MLP chunks of any length: the lattice starts at 1,024 tokens (samples at
    # 1,024-3,072), far cheaper than auto chunks' 8,192; the depth is what is under test.
    opts = MemOptions(r=8, grouped_attention=True, mlp_chunks=4)
    fast = FastProfiler(gemma, opts)
    assert fast.lattice(4096).index(4096) == fast.lattice(4096).first + 3
    _same(fast.report(4096), profile(gemma, replace(opts, seq_len=4096)))
    # periods of real configs
    assert depth_samples(load_config("gemma-3-27b")) == (8, 14)  # 62 layers, one global in six
    assert depth_samples(load_config("gemma-2-9b")) == (4, 6)  # 42 layers in pairs
    assert depth_samples(load_config("llama-3.1-8b")) == (3, 4)
    # Gemma-2's soft-capped attention cannot take the grouped path: said, not traced
    with pytest.raises(ValueError, match="soft-capped"):
        profile(load_config("gemma-2-2b"), replace(opts, seq_len=64), depth="extrapolate")


@pytest.mark.slow  # our search logic over the lattice model
def test_budget_answer_is_the_full_depth_answer(llama, figure_model, full_trace):
    lo, hi = figure_model.report(14336).total, figure_model.report(16384).total
    budget = (lo + hi) // 2
    value, rep = find_max(llama, FIGURE, budget, profiler=figure_model)
    info = rep.options["search"]
    assert value == 14336 and info["precision"] == 2048 and rep.method == "lattice"
    # the answer's full-depth trace fits, and the next lattice length's does not: both equal
    # the lattice's reports in every category
    answer = full_trace(replace(FIGURE, seq_len=value)).report()
    following = full_trace(replace(FIGURE, seq_len=value + info["precision"])).report()
    _same(rep, answer)
    _same(figure_model.report(value + info["precision"]), following)
    assert answer.total <= budget < following.total
    assert info["next_value"] == 16384 and info["next_total"] == hi


@pytest.mark.slow  # our search logic along the batch
def test_batch_search_answer_is_the_full_depth_answer(llama):
    # Along the batch: the MLP loops keep their count, the loss loop grows (1,024-token
    # chunks of 2,048-token sequences); samples at batch 2, 3 and 4, answer at 5.
    opts = replace(FIGURE, seq_len=2048)
    fast = FastProfiler(llama, opts, dimension="batch")
    assert fast.first_regular() == 2
    lo, hi = fast.report(5).total, fast.report(6).total
    value, rep = find_max(llama, opts, (lo + hi) // 2, search="batch", profiler=fast)
    assert value == 5 and rep.method == "lattice" and rep.options["search"]["precision"] == 1
    assert profile(llama, replace(opts, batch=5)).total == lo
    assert profile(llama, replace(opts, batch=6)).total == hi
    with pytest.raises(ValueError, match="another model"):
        find_max(llama, opts, lo, profiler=fast)  # a batch model asked for lengths


@pytest.mark.slow  # our fallback logic
def test_wrong_lattice_falls_back_to_tracing(llama):
    # A lattice whose chunks are not all equal (1,000-token steps from 7,000: 4 MLP pieces
    # of 1,750 and of 2,000 tokens, then 5 of 1,800; ragged loss chunks): the first two
    # samples fit, the check trace disagrees with the extrapolation, which the model
    # detects; each length is then traced itself.
    class Ragged(FastProfiler):
        def lattice(self, value):
            return Lattice(1000, 7, "chunked") if value % 1000 == 0 else None

    fast = Ragged(llama, FIGURE)
    with pytest.warns(RuntimeWarning, match="length extrapolation does not apply"):
        rep = fast.report(10000)
    assert rep.method == "extrapolated" and rep.options["seq_len"] == 10000


# --- the timeline algebra on synthetic traces ------------------------------------------


def _synthetic(n: int, rng, slopes, bumps, middle_kink: int = 0) -> Timeline:
    """A step of ``n`` loop repetitions: a prologue, the loop, an epilogue; each op's bytes
    affine in ``n`` (and in the repetition inside the loop)."""
    rec = TimelineRecorder()
    columns = slopes[0].shape[1]
    for row in slopes[0] * n + bumps[0]:
        rec.rows.append(tuple(int(v) for v in row))
    for i in range(n):
        rec.mark(("loop",), "start")
        for row in slopes[1] * n + bumps[1] + (i + (middle_kink if i == n // 2 else 0)) * 7:
            rec.rows.append(tuple(int(v) for v in row))
    rec.mark(("loop",), "end")
    for row in slopes[2] * n + bumps[2]:
        rec.rows.append(tuple(int(v) for v in row))
    assert all(len(r) == columns for r in rec.rows)
    return rec.timeline()


def _parts(rng):
    sizes = rng.integers(1, 6, size=3)
    slopes = [rng.integers(0, 50, size=(s, 7)) for s in sizes]
    bumps = [rng.integers(0, 10_000, size=(s, 7)) for s in sizes]
    return slopes, bumps


def test_length_model_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    slopes, bumps = _parts(rng)
    a, b, c = (_synthetic(n, rng, slopes, bumps) for n in (4, 5, 6))
    model = LengthModel.fit(a, b, 4)
    model.check(c, 6)
    for n in (7, 13, 40):
        truth = _synthetic(n, rng, slopes, bumps).rows
        first = int(np.argmax(truth.sum(axis=1)))
        assert list(model.peak(n).values()) == truth[first].tolist()


def test_length_model_rejects_what_is_not_affine(seed):
    rng = np.random.default_rng(seed)
    slopes, bumps = _parts(rng)
    a, b = (_synthetic(n, rng, slopes, bumps) for n in (4, 5))
    model = LengthModel.fit(a, b, 4)
    with pytest.raises(TimelineMismatch, match="differs from the extrapolation"):
        model.check(_synthetic(6, rng, [2 * s for s in slopes], bumps), 6)
    with pytest.raises(TimelineMismatch, match="not affine"):
        model.check(_synthetic(6, rng, slopes, bumps, middle_kink=3), 6)
    extra = _synthetic(5, rng, slopes, bumps)
    extra.rows = np.concatenate([extra.rows, extra.rows[-1:] + 1])
    with pytest.raises(TimelineMismatch):
        LengthModel.fit(a, extra, 4)


# --- presets ---------------------------------------------------------------------------

# Parameter counts of the published checkpoints (the text model for Gemma-3 4b/12b/27b,
# whose published totals add a 417M-parameter SigLIP vision tower): a typo in a preset's
# sizes changes its count.
PUBLISHED_PARAMETERS = {
    "gemma-2-2b": 2_614_341_888,
    "gemma-2-9b": 9_241_705_984,
    "gemma-2-27b": 27_227_128_320,
    "gemma-3-1b": 999_885_952,
    "gemma-3-4b": 3_880_263_168,
    "gemma-3-12b": 11_766_034_176,
    "gemma-3-27b": 27_009_346_304,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_248_023_552,
    "mistral-nemo": 12_247_782_400,
    "phi-3-mini": 3_821_079_552,
    "phi-4": 14_659_507_200,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352,
}


def test_every_preset_is_listed_and_counted():
    from trilora.memory.moe import is_moe
    from trilora.presets import names

    # mixture-of-experts presets: tests/memory/test_moe.py (total and active counts)
    dense = {n for n in names() if not is_moe(load_config(n))}
    assert dense == set(PUBLISHED_PARAMETERS)
    assert set(TRACED_PRESETS) <= set(names())


# One preset of each distinct code path through the trace: model type, tied or separate
# embeddings, rope scaling, sliding windows. The others differ from their representative
# only in sizes, which a fake-tensor trace does not see (their parameter counts are checked
# above); tracing them too cost ~30 s of CPU and no new case.
TRACED_PRESETS = {
    "llama-3.1-8b": "Llama, llama3 rope, separate head",
    "llama-3.2-1b": "Llama, tied embeddings",
    "mistral-7b": "Mistral",
    "phi-3-mini": "Phi-3, sliding window",
    "phi-4": "Phi-3 code without a sliding window",
    "qwen2.5-0.5b": "Qwen2, tied embeddings",
    "qwen2.5-7b": "Qwen2, separate head",
    "gemma-2-2b": "Gemma-2: soft-capping, sliding/global pairs",
    "gemma-3-4b": "Gemma-3: five sliding layers to one global, linear rope scaling",
}


def test_every_preset_builds_with_its_published_size():
    import torch
    from transformers import AutoModelForCausalLM

    for name, published in PUBLISHED_PARAMETERS.items():
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(load_config(name))
        assert sum(p.numel() for p in model.parameters()) == published, name


@pytest.mark.parametrize("name", sorted(TRACED_PRESETS))
def test_preset_traces(name):
    config = load_config(name)
    # a short step of the first layers (a whole layer pattern) through trilora's code path,
    # fake tensors
    layers = max(2, layer_period(config))
    step = trace(config, MemOptions(seq_len=64, r=8), "trilora", layers, name)
    rep = step.report()
    assert rep.layers == layers and rep.categories["activations"] > 0
    assert rep.categories["lora_params"] > 0 and rep.categories["base_weights"] > 0


# --- report formatting and progress ----------------------------------------------------


def test_units_follow_the_size(llama):
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 1024 + 512) == "3.50 KiB"
    assert format_bytes(5 * 1024**2) == "5.00 MiB"
    assert format_bytes(int(2.25 * 1024**3)) == "2.25 GiB"
    from trilora.commands.mem import format_reports

    rep = trace(llama, MemOptions(seq_len=64, r=8), "trilora", 2).report()  # any report
    table = format_reports([rep])
    for name, value in rep.categories.items():
        line = next(row for row in table.splitlines() if row.startswith(name))
        assert value == 0 or "0.00" not in line


@pytest.mark.slow  # our own progress bar over a trace (~4 s); the traces: test_preset_traces
def test_progress_ticks_twice_per_layer_and_draws_a_bar(llama):
    class Counting(Progress):
        ticks = 0

        @contextlib.contextmanager
        def trace(self, desc, ticks):
            def tick():
                self.ticks += 1

            yield tick

    opts = MemOptions(seq_len=64, r=8)
    for provider in ("trilora", "bnb_peft"):
        counting = Counting()
        trace(llama, opts, provider, 2, progress=counting)
        assert counting.ticks == 2 * 2  # each layer's forward, then its backward
    stream = io.StringIO()
    bar = BarProgress(stream=stream, bar=True)
    trace(llama, opts, "trilora", 2, progress=bar)
    bar.line("a result line")
    bar.close()
    out = stream.getvalue()
    assert "layer passes" in out and "4/4" in out and "a result line" in out
    plain = io.StringIO()
    BarProgress(stream=plain).line("no terminal: lines only")  # StringIO is not a TTY
    assert plain.getvalue() == "  no terminal: lines only\n"
