"""Data shapes, response-only labels, bad input and batching of trilora.train.data."""

from __future__ import annotations

import json
import random

import pytest
from train_helpers import save_tokenizer, sft_records, write_jsonl

from trilora.io import UserError
from trilora.train import data as D


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tok_plain"), chat=False)


def _decode_labels(tok, ex):
    return tok.decode([t for t in ex.labels if t != D.IGNORE])


@pytest.mark.parametrize("shape", ["instruction", "prompt_completion", "messages", "text"])
def test_loss_falls_on_the_response_only(tok, plain_tok, shape):
    answer = "the answer is forty two"
    rec = {
        "instruction": {"instruction": "what is it", "input": "context", "output": answer},
        "prompt_completion": {"prompt": "Q: what is it\nA: ", "completion": answer},
        "messages": {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "what is it"},
                {"role": "assistant", "content": answer},
            ]
        },
        "text": {"text": answer},
    }[shape]
    assert D.record_shape(rec, "f:1") == shape
    for t in (tok, plain_tok) if shape in ("instruction",) else (tok,):
        ex = D.encode_sft(rec, shape, t, 512, "f:1")
        assert len(ex.input_ids) == len(ex.labels)
        assert ex.labels[0] == D.IGNORE
        learned = _decode_labels(t, ex)
        if shape == "text":
            assert learned == answer[1:] + t.eos_token  # all but the first token
        else:
            assert learned.startswith(answer)
            assert "what is it" not in learned
        # labels equal the ids wherever they are not ignored
        assert all(lab in (D.IGNORE, i) for lab, i in zip(ex.labels, ex.input_ids))


@pytest.mark.parametrize("seed_", range(3))
def test_question_is_what_the_user_asked_and_inside_the_prompt(tok, plain_tok, seed_):
    """The comparison's label is the user's question as written, and the model's prompt
    holds it (its template around it)."""
    rng = random.Random(seed_)
    words = ["refund", "order", "café", "naïve", "42", "line\nbreak", "<b>", "ünïcode"]
    q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 7)))
    extra = " ".join(rng.choice(words) for _ in range(rng.randint(0, 3)))
    cases = [
        ({"instruction": q, "input": extra, "output": "x"}, f"{q}\n\n{extra}" if extra else q),
        ({"prompt": q, "completion": "x"}, q),
        (
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": "x"},
                ]
            },
            q,
        ),
    ]
    for rec, want in cases:
        shape = D.record_shape(rec, "f:1")
        assert D.question_text(rec, shape) == want
        for t in (tok, plain_tok) if shape == "instruction" else (tok,):
            assert q in D.prompt_text(t, rec, shape)
    assert D.question_text({"prompt": q, "chosen": "x", "rejected": "y"}, "pair") == q
    assert D.question_text({"text": q}, "text") == ""


def test_every_assistant_turn_is_learned(tok):
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "first reply"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "second reply"},
    ]
    ex = D.encode_sft({"messages": msgs}, "messages", tok, 512, "f:1")
    learned = _decode_labels(tok, ex)
    assert "first reply" in learned and "second reply" in learned
    assert "user" not in learned
    # the whole sequence equals the chat template's own rendering
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)


def test_truncation_is_counted(tmp_path, tok):
    recs = [{"prompt": "p: ", "completion": "x" * n} for n in (5, 70, 200)]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    examples, _, stats = D.load_dataset(path, tok, 64)
    assert stats.truncated == 2
    assert [e.truncated for e in examples] == [False, True, True]
    assert max(len(e) for e in examples) == 64


def test_malformed_line_names_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [sft_records(1)[0], "{not json", sft_records(2)[1]])
    with pytest.raises(UserError, match=r"d\.jsonl:2: not valid JSON.*--skip-bad-lines"):
        D.load_dataset(path, tok, 128)
    examples, _, stats = D.load_dataset(path, tok, 128, skip_bad_lines=True)
    assert len(examples) == 2 and stats.bad_lines == 1


def test_non_object_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ["[1, 2]"])
    with pytest.raises(UserError, match=r":1: expected a JSON object"):
        D.load_dataset(path, tok, 128)


def test_non_utf8_bytes(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        D.load_dataset(path, tok, 128)


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"instruction": "x"}, "output"),
        ({"prompt": "x"}, "completion"),
        ({"completion": "x"}, "prompt"),
        ({"foo": 1}, None),
    ],
)
def test_missing_field_names_field_and_shapes(tmp_path, tok, record, field):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(UserError) as info:
        D.load_dataset(path, tok, 128)
    msg = str(info.value)
    assert "d.jsonl:1" in msg and "accepted shapes" in msg and '"messages"' in msg
    if field:
        assert f"missing field {field!r}" in msg


def test_dpo_missing_field(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "chosen": "y"}])
    with pytest.raises(UserError, match=r"missing field 'rejected'.*prompt.*chosen.*rejected"):
        D.load_dataset(path, tok, 128, records=D.PAIR_RECORDS)


def test_empty_after_filtering(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ["{bad", "", "also bad"])
    with pytest.raises(UserError, match=r"no usable examples \(2 lines, 2 skipped"):
        D.load_dataset(path, tok, 128, skip_bad_lines=True)


def test_prompt_longer_than_max_seq_len(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p" * 100, "completion": "c"}])
    with pytest.raises(
        UserError,
        match=r"d\.jsonl:1: the prompt is 100 tokens, longer than "
        r"--max-seq-len 32",
    ):
        D.load_dataset(path, tok, 32)
    pair = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "p" * 100, "chosen": "a", "rejected": "b"}]
    )
    with pytest.raises(UserError, match="longer than --max-seq-len 32"):
        D.load_dataset(pair, tok, 32, records=D.PAIR_RECORDS)


def test_pairs_share_the_prompt(tmp_path, tok):
    recs = [
        {
            "prompt": [{"role": "user", "content": "pick"}],
            "chosen": "good one",
            "rejected": [{"role": "assistant", "content": "bad"}],
        }
    ]
    (pair,), _, _ = D.load_dataset(
        write_jsonl(tmp_path / "p.jsonl", recs), tok, 128, D.PAIR_RECORDS
    )
    c, r = pair.chosen, pair.rejected
    n = next(i for i, lab in enumerate(c.labels) if lab != D.IGNORE)
    assert c.input_ids[:n] == r.input_ids[:n]
    assert _decode_labels(tok, c).startswith("good one")
    assert _decode_labels(tok, r).startswith("bad")


def test_packing_keeps_every_example_once(seed):
    rng = random.Random(seed)
    examples = [
        D.Example(list(range(n)), list(range(n)), f"x:{i}")
        for i, n in enumerate(rng.randint(1, 40) for _ in range(60))
    ]
    rows = D.pack(examples, 64)
    assert sorted(id(e) for r in rows for e in r) == sorted(id(e) for e in examples)
    assert all(sum(len(e) for e in r) <= 64 for r in rows)
    assert len(rows) <= len(examples)
    batch = D.collate(rows[:3], pad_id=0)
    assert "attention_mask" not in batch
    for b, row in enumerate(rows[:3]):
        t = 0
        for e in row:  # positions restart at 0 for every example
            assert batch["position_ids"][b, t : t + len(e)].tolist() == list(range(len(e)))
            t += len(e)


def test_batches_are_a_pure_function_of_seed_and_epoch(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 100) for _ in range(rng.randint(10, 200))]
    a = D.batches_for_epoch(lengths, 4, seed, 3, True)
    assert a == D.batches_for_epoch(lengths, 4, seed, 3, True)
    assert a != D.batches_for_epoch(lengths, 4, seed, 4, True) or len(lengths) <= 4
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    assert max(lengths[i] for i in a[0]) == max(lengths)  # the longest batch comes first

    # grouping reduces padding against plain shuffling
    def pad(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    assert pad(a) <= pad(D.batches_for_epoch(lengths, 4, seed, 3, False))


def test_validation_split_is_seeded():
    a = D.split_validation(100, 0.1, 1)
    assert a == D.split_validation(100, 0.1, 1)
    assert len(a[1]) == 10 and not set(a[0]) & set(a[1])
    with pytest.raises(UserError, match="leaves nothing to train"):
        D.split_validation(1, 0.5, 0)


def test_demo_data_generator_reproduces_the_bundled_files():
    from trilora.train import demo_data

    train, held = demo_data.generate()
    for name, recs in (("train.jsonl", train), ("heldout.jsonl", held)):
        lines = (demo_data.DATA_DIR / name).read_text("utf-8").splitlines()
        assert [json.loads(x) for x in lines] == recs
    assert demo_data.main(["--check"]) == 0
    # held-out questions use product/task pairs never seen in training
    ask = lambda r: r["messages"][1]["content"].splitlines()[2]  # noqa: E731
    assert not {ask(r) for r in held} & {ask(r) for r in train}
    assert all(demo_data.style_score(r["messages"][1]["content"]) == 1.0 for r in train + held)
    assert demo_data.style_score("Sure! Just open the app.") == 0.0


@pytest.mark.parametrize("seed_", range(3))
def test_compare_takes_the_first_records_that_have_a_prompt(tok, seed_):
    """``--compare N`` answers N held-out prompts whenever N records have one, wherever the
    prompt-less ``text`` records fall in the held-out split."""
    from types import SimpleNamespace

    from trilora.train.loop import _compare_prompts

    rng = random.Random(seed_)
    records = []
    for i in range(rng.randint(3, 9)):
        rec = rng.choice([{"text": f"plain {i}"}, {"prompt": f"question {i}", "completion": "a"}])
        rec["_shape"] = D.record_shape(rec, f"f:{i}")
        records.append(rec)
    with_prompt = [r for r in records if r["_shape"] != "text"]
    for n in range(len(records) + 2):
        got, prompts = _compare_prompts(
            tok, SimpleNamespace(val_records=records), SimpleNamespace(compare=n)
        )
        assert got == with_prompt[:n]
        assert prompts == [r["prompt"] for r in with_prompt[:n]]


@pytest.mark.parametrize("seed_", range(2))
def test_docs_say_how_instruction_and_input_become_the_prompt(tok, plain_tok, seed_):
    """docs/train.md spells out how an instruction record becomes the prompt (instruction
    and input joined with a blank line; the Alpaca layout without a chat template); the
    code is held to those words."""
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "train.md").read_text()
    flat = " ".join(docs.split())  # line breaks in the docs are free
    for phrase in (
        '`instruction + "\\n\\n" + input` (joined with one blank line)',
        '`"### Instruction:\\n" + instruction + "\\n\\n"`',
        '`"### Input:\\n" + input + "\\n\\n"`',
        '`"### Response:\\n"`',
        "an empty or `null` `input` is the same as none",
    ):
        assert phrase in flat, phrase
    rng = random.Random(seed_)
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "\n", "x:"]
    ins, inp, out = (
        " ".join(rng.choice(words) for _ in range(rng.randint(1, 7))).strip() or "q"
        for _ in range(3)
    )
    rec = {"instruction": ins, "input": inp, "output": out}
    user = [{"role": "user", "content": f"{ins}\n\n{inp}"}]
    assert D.prompt_text(tok, rec, "instruction") == tok.apply_chat_template(
        user, tokenize=False, add_generation_prompt=True
    )
    assert D.prompt_text(plain_tok, rec, "instruction") == (
        "### Instruction:\n" + ins + "\n\n" + "### Input:\n" + inp + "\n\n" + "### Response:\n"
    )
    for none in ("", None):
        bare = {"instruction": ins, "input": none, "output": out}
        assert D.prompt_text(plain_tok, bare, "instruction") == (
            "### Instruction:\n" + ins + "\n\n" + "### Response:\n"
        )
        assert D.prompt_text(tok, bare, "instruction") == tok.apply_chat_template(
            [{"role": "user", "content": ins}], tokenize=False, add_generation_prompt=True
        )
