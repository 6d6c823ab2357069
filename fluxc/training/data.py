"""Task-labelled training and evaluation examples, generated offline over real text.

Two kinds of task families (`TASKS`):

- **retrieval**: the answer sits far back in a long context, so a layer needs full attention to reach it.
  ``passkey`` (a 5-digit number hidden at a random depth), ``kv_lookup`` (identifier -> number records
  scattered through the text, one is asked for), ``var_tracking`` (a chain "The value of alpha is
  12345." ... "The value of bravo is the same as the value of alpha." ... spread over the text; the
  value of the last variable is asked for).
- **holistic** (local / whole-passage): the recent text suffices, so sinks + a local window do.
  ``continue_recent`` (the next sentence of the passage), ``last_paragraph_qa`` (a number stated in the
  final paragraph; with `LAST_PARAGRAPH_DECOYS` > 0 earlier paragraphs state other numbers the same
  way, so reaching far back only distracts), ``lm`` (plain language modelling, loss on the last `LM_TARGET` tokens).

The context ("filler") is a contiguous run of real paragraphs from `text_corpus` (documentation that
ships with Python and its packages). Answers are short digit strings checked by exact match, except
``continue_recent`` and ``lm`` which are scored by perplexity.

Train and eval splits never share an example: they draw their text from disjoint parts of the corpus
(the last `EVAL_FRACTION` of its paragraphs is eval-only, and half the eval examples come from a text domain
training never reads, `text_sources.HELD_OUT_SOURCE`), their numbers from disjoint sets (a CRC check), their
phrasings from disjoint `TEMPLATES` (the last `EVAL_ONLY_TEMPLATES` of each family are eval-only), and their
random streams from different seeds.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from .text_sources import HELD_OUT_SOURCE, _split_sentences, heldout_domain_corpus, text_corpus

TASKS: dict[str, str] = {
    "passkey": "retrieval",
    "kv_lookup": "retrieval",
    "var_tracking": "retrieval",
    "continue_recent": "holistic",
    "last_paragraph_qa": "holistic",
    "lm": "holistic",
}
RETRIEVAL_TASKS = tuple(t for t, k in TASKS.items() if k == "retrieval")
HOLISTIC_TASKS = tuple(t for t, k in TASKS.items() if k == "holistic")
PERPLEXITY_TASKS = ("continue_recent", "lm")  # scored by perplexity; the others by exact match

EVAL_FRACTION = 0.1  # the last tenth of the corpus paragraphs is text for the eval split only
LM_TARGET = 64  # tokens of plain text that carry the loss in the "lm" family
DEPTH = (0.05, 0.75)  # where needles go, as a fraction of the context (0 = start)
KV_PAIRS = 3  # SmolLM2-135M at 1K tokens: 6/10 right with 3 records, 3/10 with 6
VAR_HOPS = 1  # a = n, then b = a (one indirection); SmolLM2-135M at 1K: 6/10 with 1, 3/10 with 2
LAST_PARAGRAPH_DECOYS = 0  # at most this many earlier paragraphs also state "The number of this paragraph"
LENGTH_TOLERANCE = 0.05
IGNORE = -100

_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
_KEY_CHARS = "abcdefghijkmnpqrstuvwxyz"  # letters only: digits in keys get mistaken for the answer
_VAR_NAMES = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo",
              "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform",
              "victor", "whiskey", "xray", "yankee", "zulu")


@dataclass(frozen=True)
class Example:
    """One example: `input_ids` = prompt + answer tokens; `labels` is -100 except on the answer tokens
    (unshifted, as Hugging Face causal LMs expect). `filler_start` is the index of the first paragraph of its
    text in `corpus()`."""

    task: str
    kind: str
    input_ids: list[int]
    labels: list[int]
    answer: str
    prompt_len: int
    filler_start: int = -1
    template: str = ""  # "<task>/<index>" of `TEMPLATES`; empty for lm
    domain: str = "docstrings"  # where its text comes from: "docstrings", or the held-out `HELD_OUT_SOURCE`

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.prompt_len]

    @property
    def answer_ids(self) -> list[int]:
        return self.input_ids[self.prompt_len:]


# ---------------------------------------------------------------------------------------------- text


_ENCODINGS: dict[int, tuple[Any, dict[str, list[int]]]] = {}


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_cached(tokenizer: Any, text: str) -> list[int]:
    holder = _ENCODINGS.get(id(tokenizer))
    if holder is None or holder[0] is not tokenizer:
        holder = _ENCODINGS[id(tokenizer)] = (tokenizer, {})
    cache = holder[1]
    if text not in cache:
        cache[text] = _encode(tokenizer, text)
    return cache[text]


_CORPUS: list[list[str]] = []


def corpus() -> list[str]:
    """The text examples draw from: the docstring corpus (`text_corpus`) then the held-out domain
    (`heldout_domain_corpus`), one list so that `Example.filler_start` orders the regions."""
    if not _CORPUS:
        _CORPUS.append(text_corpus() + heldout_domain_corpus())
    return _CORPUS[0]


def _region(split: str, domain: str = "docstrings") -> tuple[list[str], int, int]:
    """(corpus, lo, hi): training reads the docstrings' first 1 - `EVAL_FRACTION`; evaluation their last
    `EVAL_FRACTION`, or (domain=`HELD_OUT_SOURCE`) the domain training never reads."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    text, main = corpus(), len(text_corpus())
    cut = int(main * (1 - EVAL_FRACTION))
    if split == "train":
        return text, 0, cut
    return (text, main, len(text)) if domain == HELD_OUT_SOURCE else (text, cut, main)


def _fill(tokenizer: Any, region: tuple[list[str], int, int], end: int, budget: int) -> tuple[int, list[str]]:
    """Contiguous paragraphs of `region` ending just before index `end`, about `budget` tokens in all
    (paragraph separators counted as one token); the first one is cut to a suffix to fit.
    Returns (index of the first paragraph, paragraphs)."""
    corpus, lo, hi = region
    paras: list[str] = []
    left = budget
    idx = end
    for _ in range(hi - lo):
        if left <= 8:
            break
        idx = idx - 1 if idx - 1 >= lo else hi - 1
        ids = _encode_cached(tokenizer, corpus[idx])
        if len(ids) + 1 <= left:
            paras.append(corpus[idx])
            left -= len(ids) + 1
            continue
        tail = tokenizer.decode(ids[len(ids) - left + 1:])
        tail = tail.split(" ", 1)[1] if " " in tail else tail  # start on a whole word
        paras.append(tail[:1].upper() + tail[1:])
        left = 0
    else:
        raise ValueError(f"the text region [{lo}, {hi}) is too small for {budget} tokens")
    paras.reverse()
    return idx, paras


def _number(rng: random.Random, split: str, digits: int = 5) -> int:
    """A random number whose CRC puts it in `split` (one in ten numbers is eval-only)."""
    while True:
        n = rng.randrange(10 ** (digits - 1), 10**digits)
        if (zlib.crc32(str(n).encode()) % 10 == 0) == (split == "eval"):
            return n


def _insert(paras: list[str], needles: list[tuple[float, str]]) -> list[str]:
    """Insert needle sentences as their own paragraphs at the given depths (fractions of the text)."""
    sizes = [len(p) for p in paras]
    total = sum(sizes) or 1
    bounds, acc = [], 0
    for s in sizes:  # character offset of each paragraph boundary
        bounds.append(acc)
        acc += s
    bounds.append(acc)
    slots: dict[int, list[str]] = {}
    for depth, text in needles:
        slot = min(range(len(bounds)), key=lambda i: abs(bounds[i] - depth * total))
        slots.setdefault(slot, []).append(text)
    out: list[str] = []
    for i in range(len(paras) + 1):
        out.extend(slots.get(i, []))
        if i < len(paras):
            out.append(paras[i])
    return out


# ------------------------------------------------------------------------------------------ prompts


def _render(tokenizer: Any, user: str, chat: bool, plain_suffix: str = "\nAnswer:") -> str:
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return user + plain_suffix


_END_OF_TURN: dict[int, tuple[Any, int | None]] = {}


def end_of_turn_id(tokenizer: Any) -> int | None:
    """Id of the token that ends an assistant turn: ``<|im_end|>`` when the vocabulary has it (SmolLM2's
    chat format), else the eos token. Cached per tokenizer (`get_vocab` builds a large dict)."""
    held = _END_OF_TURN.get(id(tokenizer))
    if held is None or held[0] is not tokenizer:
        end = getattr(tokenizer, "eos_token_id", None)
        if "<|im_end|>" in tokenizer.get_vocab():
            end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        held = _END_OF_TURN[id(tokenizer)] = (tokenizer, end)
    return held[1]


def _answer_ids(tokenizer: Any, answer: str, chat: bool) -> list[int]:
    templated = chat and getattr(tokenizer, "chat_template", None)
    ids = _encode(tokenizer, answer if templated else " " + answer)
    end = end_of_turn_id(tokenizer) if templated else getattr(tokenizer, "eos_token_id", None)
    return ids + ([end] if end is not None else [])


@dataclass(frozen=True)
class Template:
    """One phrasing of a family: the instruction before the text, the needle sentence (and var_tracking's
    link sentence), the question. Fields are `str.format` patterns over the example's names and numbers."""

    intro: str
    needle: str
    question: str
    link: str = ""


# Several phrasings per family; the last `EVAL_ONLY_TEMPLATES` of each are evaluation's alone, so held-out
# accuracy measures phrasings training never saw. Each was checked to be one SmolLM2-135M-Instruct answers
# with full attention at 1K tokens (3-6 of 4-6 examples on CPU): a phrasing the model cannot do tests nothing.
# (continue_recent's are scored by perplexity: nothing to check.)
TEMPLATES: dict[str, tuple[Template, ...]] = {
    "passkey": (
        Template("There is a pass key hidden inside a lot of irrelevant text. Find it and remember it; you will be "
                 "asked for it.", "The pass key is {key}. Remember it. {key} is the pass key.",
                 "What is the pass key? Answer with the number only."),
        Template("Somewhere in the document below is a secret code. Memorize it.",
                 "The secret code is {key}. Keep it in mind: {key}.",
                 "What was the secret code? Reply with just the number."),
        Template("A long passage follows. One line in it gives an access number.",
                 "Access number: {key}. Write it down, the access number is {key}.",
                 "Which access number was given in the passage? Give only the digits."),
        Template("The following document hides a single magic number among many unrelated paragraphs. Look for it.",
                 "The magic number is {key}. Remember: the magic number is {key}.",
                 "What is the magic number? Answer with the number only."),
        Template("Buried somewhere in this long text is a password made of digits.",
                 "The password is {key}. Do not forget the password {key}.", "What is the password? Reply with the digits only."),
        Template("Please read the long material below and locate the lucky number hidden in it.",
                 "The lucky number is {key}. The lucky number is {key}.", "What is the lucky number? Answer with the number only."),
        Template("Below is a lengthy excerpt with a secret number tucked away inside. You will need it at the end.",
                 "The secret number is {key}. Remember the secret number: {key}.",
                 "What is the secret number? Answer with the digits only."),
        Template("Read carefully; a verification PIN appears once in the following material.",
                 "Your verification PIN is {key}.", "What is the verification PIN? Respond with the number alone."),
    ),
    "kv_lookup": (
        Template("The text below contains records that map an identifier to a number, scattered among irrelevant "
                 "paragraphs. Remember them; you will be asked for one.",
                 "Record: the identifier {key} has the number {value}.",
                 "What is the number recorded for the identifier {key}? Answer with the number only."),
        Template("Scores are listed here and there in the text below.", "The score of {key} is {value}.",
                 "What is the score of {key}? Answer with the number only."),
        Template("Some notes in the following text give a number for a name. Keep track of them.",
                 "The number for {key} is {value}.", "What is the number for {key}? Reply with the number only."),
        Template("The passage below records measurements taken for a few samples.", "Sample {key} measured {value}.",
                 "What did sample {key} measure? Answer with the number only."),
        Template("Account balances are mentioned here and there in the material below.",
                 "The account labelled {key} holds a balance of {value}.",
                 "What balance does the account labelled {key} hold? Digits only."),
        Template("Keys and their values have been hidden in this document.", "Key {key} has value {value}.",
                 "What is the value of key {key}? Give just the number."),
    ),
    "var_tracking": (
        Template("The text below contains variable assignments hidden among irrelevant paragraphs. Follow the "
                 "assignments; you will be asked for the value of a variable.", "The value of {a} is {value}.",
                 "What is the value of {b}? Answer with the number only.",
                 "The value of {b} is the same as the value of {a}."),
        Template("Numbers are given to names in the following text, some by reference to others.",
                 "The number of {a} is {value}.", "What is the number of {b}? Answer with the number only.",
                 "The number of {b} equals the number of {a}."),
        Template("Named storage slots are described in the document below.", "{a} stores the number {value}.",
                 "What number does {b} store? Reply with the number only.", "{b} stores whatever {a} stores."),
        Template("Values are given to names in this text, some copied from others.", "{a} has the value {value}.",
                 "What value does {b} have? Digits only.", "{b} has the same value as {a}."),
        Template("Some code words stand for numbers in the material below.", "The number {a} stands for is {value}.",
                 "Which number does {b} stand for? Give only the number.", "{b} stands for the same number as {a}."),
    ),
    "last_paragraph_qa": (
        Template("Read the text below.", "The number of this paragraph is {value}.",
                 "What is the number of the last paragraph? Answer with the number only."),
        Template("Read the following document.", "This closing section is tagged {value}.",
                 "What tag does the closing section carry? Answer with the number only."),
        Template("Here is a passage.", "(Reference code for this paragraph: {value}.)",
                 "What reference code does the final paragraph give? Reply with the number only."),
        Template("Read this document to the end.", "The last paragraph is numbered {value}.",
                 "What number does the last paragraph have? Answer with the number only."),
        Template("Here is some text.", "This ending paragraph has the label {value}.",
                 "What label does the ending paragraph have? Reply with the number only."),
        Template("Study the passage below.", "(Footnote number for this paragraph: {value}.)",
                 "What footnote number is given in the closing paragraph? Give just the number."),
        Template("Go through the material below.", "The final figure quoted here is {value}.",
                 "What figure is quoted in the very last paragraph? Digits only."),
        Template("Look over this text.", "Paragraph ID: {value}.",
                 "What is the ID of the final paragraph? Give just the number."),
    ),
    "continue_recent": (
        Template("Continue the following text with its next sentence.", "", ""),
        Template("Write the sentence that comes next in this text.", "", ""),
        Template("What is the next sentence? Continue the passage.", "", ""),
        Template("Keep going: write the next sentence of this text.", "", ""),
        Template("Extend the passage below by one more sentence.", "", ""),
        Template("Add the sentence that would naturally come next.", "", ""),
        Template("Predict the following sentence of the text.", "", ""),
        Template("Finish this excerpt's thought with its next sentence.", "", ""),
        Template("Carry on writing from where the text stops, with one sentence.", "", ""),
        Template("Complete the passage with the sentence that follows.", "", ""),
    ),
}
EVAL_ONLY_TEMPLATES = 2
HELD_OUT_DOMAIN_SHARE = 0.5  # of evaluation examples, drawn from the domain training never reads


def _template(task: str, rng: random.Random, split: str) -> tuple[str, Template]:
    """A phrasing of `task`: the training ones for "train", the evaluation-only ones for "eval"."""
    options = TEMPLATES[task]
    cut = len(options) - EVAL_ONLY_TEMPLATES
    index = rng.randrange(cut) if split == "train" else rng.randrange(cut, len(options))
    return f"{task}/{index}", options[index]


@dataclass
class _Spec:
    """Everything random about one example, drawn before the text is fitted to the length."""

    intro: str
    question: str
    answer: str
    needles: list[tuple[float, str]]
    end: int  # corpus index after the last filler paragraph
    region: tuple[list[str], int, int]
    template: str
    domain: str
    tail: str = ""  # text after the filler (continue_recent's cut paragraph)


def _domain(rng: random.Random, split: str) -> str:
    return HELD_OUT_SOURCE if split == "eval" and rng.random() < HELD_OUT_DOMAIN_SHARE else "docstrings"


def _spec(task: str, rng: random.Random, split: str) -> _Spec:
    domain = _domain(rng, split)
    region = _region(split, domain)
    corpus, lo, hi = region
    end = rng.randrange(lo, hi)
    name, t = _template(task, rng, split)

    def spec(question: str, answer: str, needles: list[tuple[float, str]], tail: str = "") -> _Spec:
        return _Spec(t.intro, question, answer, needles, end, region, name, domain, tail)

    if task == "passkey":
        key = _number(rng, split)
        return spec(t.question, str(key), [(rng.uniform(*DEPTH), t.needle.format(key=key))])
    if task == "kv_lookup":
        keys: list[str] = []
        while len(keys) < KV_PAIRS:
            k = "".join(rng.choice(_KEY_CHARS) for _ in range(6))
            if k not in keys:
                keys.append(k)
        values = [_number(rng, split) for _ in keys]
        depths = sorted(rng.uniform(*DEPTH) for _ in keys)
        ask = rng.randrange(len(keys))
        return spec(t.question.format(key=keys[ask]), str(values[ask]),
                    [(d, t.needle.format(key=k, value=v)) for d, k, v in zip(depths, keys, values)])
    if task == "var_tracking":
        # Plain-English assignments: SmolLM2-135M answers "VAR B = VAR A" chains with "1" but follows these.
        names = rng.sample(_VAR_NAMES, VAR_HOPS + 1)
        value = _number(rng, split)
        depths = sorted(rng.uniform(*DEPTH) for _ in names)
        needles = [(depths[0], t.needle.format(a=names[0], value=value))]
        needles += [(d, t.link.format(a=a, b=b)) for d, a, b in zip(depths[1:], names, names[1:])]
        return spec(t.question.format(b=names[-1]), str(value), needles)
    if task == "last_paragraph_qa":
        # The final paragraph states a number; optionally earlier paragraphs state other numbers the same
        # way (off by default: decoys cut SmolLM2-135M's full-attention accuracy).
        value = _number(rng, split)
        decoys = [(rng.uniform(*DEPTH), t.needle.format(value=_number(rng, split)))
                  for _ in range(rng.randint(0, LAST_PARAGRAPH_DECOYS))]
        return spec(t.question, str(value), decoys + [(1.0, t.needle.format(value=value))])
    if task == "continue_recent":
        # The filler ends inside a paragraph of at least two sentences; the answer is its next sentence.
        for _ in range(hi - lo):
            sentences = _split_sentences(corpus[end])
            if len(sentences) >= 2:
                break
            end = end + 1 if end + 1 < hi else lo
        cut = rng.randrange(1, len(sentences))
        return spec("", sentences[cut], [], tail=" ".join(sentences[:cut]))
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")


def _build(tokenizer: Any, spec: _Spec, chat: bool, budget: int) -> tuple[list[int], list[int], int]:
    start, paras = _fill(tokenizer, spec.region, spec.end, budget)
    paras = _insert(paras, [n for n in spec.needles if n[0] < 1.0])
    if spec.tail:
        paras.append(spec.tail)
    last = [text for depth, text in spec.needles if depth >= 1.0]
    if last and not paras:
        paras = [""]
    if last:  # needles at depth 1.0 go inside the final paragraph, at a random sentence boundary
        sentences = _split_sentences(paras[-1])
        at = zlib.crc32(paras[-1].encode()) % (len(sentences) + 1)
        paras[-1] = " ".join(sentences[:at] + last + sentences[at:])
    context = "\n\n".join(paras)
    user = "\n\n".join(s for s in (spec.intro, context, spec.question) if s)
    prompt = _render(tokenizer, user, chat, plain_suffix="\nAnswer:" if spec.question else "")
    if spec.tail and not (chat and getattr(tokenizer, "chat_template", None)):
        prompt = user  # plain continuation: the answer follows the text directly
    return _encode(tokenizer, prompt), _answer_ids(tokenizer, spec.answer, chat), start


def _lm_example(tokenizer: Any, length: int, rng: random.Random, split: str) -> Example:
    domain = _domain(rng, split)
    region = _region(split, domain)
    start, paras = _fill(tokenizer, region, rng.randrange(region[1], region[2]), length + 16)
    ids = _encode(tokenizer, "\n\n".join(paras))[-length:]
    target = min(LM_TARGET, max(1, length // 4))
    prompt_len = len(ids) - target
    return Example("lm", "holistic", ids, [IGNORE] * prompt_len + ids[prompt_len:],
                   tokenizer.decode(ids[prompt_len:]), prompt_len, start, domain=domain)


def make_example(task: str, tokenizer: Any, length: int, rng: random.Random, chat: bool = True,
                 split: str = "train") -> Example:
    """One `task` example of about `length` tokens in all (prompt + answer, within `LENGTH_TOLERANCE`).

    Uses the tokenizer's chat template when `chat` and the tokenizer has one. Deterministic given the
    state of `rng`; `split` selects the corpus region and number set (train and eval never overlap).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    if task == "lm":
        return _lm_example(tokenizer, length, rng, split)
    spec = _spec(task, rng, split)
    empty_prompt, answer_ids, _ = _build(tokenizer, spec, chat, 0)
    budget = length - len(empty_prompt) - len(answer_ids) - 2 * len(spec.needles)
    if budget < 16:
        raise ValueError(f"length {length} is too short for a {task} example")
    for _ in range(4):  # fit: paragraph token counts are close to, not exactly, the joined count
        prompt_ids, answer_ids, start = _build(tokenizer, spec, chat, budget)
        total = len(prompt_ids) + len(answer_ids)
        if abs(total - length) <= max(2, length // 100):
            break
        budget += length - total
    ids = prompt_ids + answer_ids
    labels = [IGNORE] * len(prompt_ids) + answer_ids
    return Example(task, TASKS[task], ids, labels, spec.answer, len(prompt_ids), start, spec.template, spec.domain)


def make_dataset(tokenizer: Any, tasks: list[str] | tuple[str, ...] | None, n_per_task: int,
                 lengths: list[int] | tuple[int, ...] | int, seed: int = 0, split: str = "train",
                 chat: bool = True) -> list[Example]:
    """`n_per_task` examples of each task (all of `TASKS` when None), lengths taken from `lengths` in
    turn. Ordered by task, then index. Deterministic for (seed, split); each example has its own
    random stream seeded from (seed, split, task, index), so adding tasks does not change the others.
    """
    tasks = list(TASKS) if tasks is None else list(tasks)
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    out = []
    for task in tasks:
        for i in range(n_per_task):
            rng = random.Random(f"fluxc-data/{seed}/{split}/{task}/{i}")
            out.append(make_example(task, tokenizer, lengths[i % len(lengths)], rng, chat=chat, split=split))
    return out


_NUMBER = re.compile(r"(?<![0-9A-Za-z])\d+(?![0-9A-Za-z])")


def is_correct(generated: str, answer: str) -> bool:
    """Exact-match scoring of the number families: the first standalone number of the generated text
    is the answer (instruct models often answer "The pass key is 12345.")."""
    m = _NUMBER.search(generated)
    return m is not None and m.group(0) == answer.strip()


def collate(examples: list[Example], pad_id: int, left_pad: bool = True) -> dict[str, Any]:
    """Pad a batch: `input_ids`, `attention_mask`, `labels` as (B, T) int64 tensors, and `task` (list)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        cols = slice(width - n, width) if left_pad else slice(0, n)
        ids[row, cols] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[row, cols] = 1
        labels[row, cols] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task": [e.task for e in examples]}
