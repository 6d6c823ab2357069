"""The decode engine: compacted caches (SA layers evicted to sink + window) give exactly the tokens and
logits of SA without eviction (HF DynamicCache + the routed op), per-sequence routes in one batch, the
graph cache keyed by the routing mask, sampling, memory following the routes, and clear errors."""

from __future__ import annotations

import pytest
import torch
from test_hf_models import _routers_with_mixed_decisions
from transformers import DynamicCache

import fluxc
from fluxc.serve.engine import DecodeEngine, FluxCache

from hf_models import batch, tiny_model

SMALL = fluxc.FluxConfig(sink=2, window=4, block=2, compiler="eager")  # ring wraps within a few steps
TOKEN_EXACT = SMALL.replace(block_exact=False, sink=3, window=5)


@torch.no_grad()
def _no_eviction_logits(fm, ids, mask, tokens):
    """Logits of each step with every key kept (DynamicCache), teacher-forced on `tokens` (B, N)."""
    cache = DynamicCache()
    out = fm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
             past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for i in range(tokens.shape[1] - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step = tokens[:, i : i + 1]
        out = fm(input_ids=step, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                 past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)  # (B, N, V)


MIXED = ("sparse", "full", "sparse")


@pytest.mark.parametrize("arch,impl,cfg,route", [
    ("llama", "sdpa", SMALL, "full"), ("llama", "sdpa", SMALL, MIXED), ("qwen3", "sdpa", TOKEN_EXACT, "sparse"),
    ("gemma", "eager", SMALL, MIXED),
], ids=["llama-full", "llama-mixed", "qwen3-token-exact", "gemma-eager"])
def test_eviction_matches_sa_without_eviction(arch, impl, cfg, route):
    model = tiny_model(arch, impl)
    ids, mask = batch(seq=12, left_pad=3)
    fm = fluxc.compile(model, config=cfg, route=route)
    engine = DecodeEngine(fm)
    new = 12  # past the ring's size several times over
    state = engine.prefill(ids, attention_mask=mask, max_new_tokens=new)
    step_logits: list[torch.Tensor] = []
    tokens = torch.cat([state.next_tokens, engine.decode(state, new - 1, logits=step_logits)], dim=1)  # (B, new)
    expected = _no_eviction_logits(fluxc.compile(model, config=cfg, route=route), ids, mask, tokens)
    torch.testing.assert_close(torch.stack(step_logits, 1), expected[:, 1:].float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, expected.argmax(-1))  # greedy: every token is the argmax of exact logits
    layouts = state.cache.layouts()
    names = {"full": "full", "sparse": "sparse-ring"}
    assert layouts == ([names[route]] * 3 if isinstance(route, str) else [names[r] for r in route])
    assert engine.stats["graphs_built"] == 1 and engine.stats["eager_steps"] == new - 1


def test_generate_uses_the_engine_and_matches_the_dynamic_cache_loop():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch(seq=10, left_pad=2)
    fm = fluxc.compile(model, config=SMALL, route=("full", "sparse", "sparse"))
    got = fluxc.generate(fm, ids, 9, attention_mask=mask)
    assert fm._fluxc_engine is not None and fm._fluxc_engine.stats["graphs_built"] == 1
    expected = fluxc.generate(fm, ids, 9, attention_mask=mask, engine=False)
    assert torch.equal(got, expected)


def test_memory_follows_the_routes():
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    sizes = {}
    for route in ("full", "sparse", ("full", "sparse", "sparse")):
        engine = DecodeEngine(fluxc.compile(model, config=SMALL, route=route))
        sizes[route] = engine.prefill(ids, max_new_tokens=8).cache.nbytes()
    per_layer_full = sizes["full"] / 3
    ring = 2 * 2 * 2 * (SMALL.sink + SMALL.window) * 16 * 4  # K and V, (B, Hkv, C, D) fp32
    assert sizes["sparse"] == 3 * ring
    assert sizes[("full", "sparse", "sparse")] == per_layer_full + 2 * ring
    assert per_layer_full == 2 * 2 * 2 * 256 * 16 * 4  # capacity 40 + 8 rounded up to 256


@torch.no_grad()
def test_prompt_cache_is_freed_layer_by_layer_and_evicted_buffers_go():
    """Compaction frees each prompt layer once copied (peak: prompt cache + one layer, not + the decode cache);
    an evicted or cleared graph's buffers are freed (nothing else, the backend included, keeps them)."""
    import weakref

    model = tiny_model("llama", "sdpa")
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    fm = fluxc.compile(model, config=SMALL, route=("full", "sparse", "sparse"))
    prompt = FluxCache(SMALL)
    fm(input_ids=ids, past_key_values=prompt, use_cache=True)
    layers = list(prompt.flux_layers)
    seen: list[int] = []

    def copy_and_watch(dst, src):
        seen.append(sum(layer.keys is not None for layer in layers))  # prompt layers still held at this copy
        return src

    routes = torch.tensor([[True, False, False]] * 2)
    prompt_keys = [weakref.ref(layer.keys) for layer in layers]
    original = torch.Tensor.copy_
    torch.Tensor.copy_ = lambda self, src, *a, **k: original(self, copy_and_watch(self, src), *a, **k)
    try:
        prompt.compact(routes, torch.full((2,), 40), 256)
    finally:
        torch.Tensor.copy_ = original
    assert seen[:6:2] == [3, 2, 1]  # keys of layer i are copied while layers i.. are still held
    assert all(ref() is None for ref in prompt_keys) and prompt.layouts() == ["full", "sparse-ring", "sparse-ring"]

    engine = DecodeEngine(fluxc.compile(model, config=SMALL, route="sparse"), max_graphs=1)
    a = engine.prefill(ids, max_new_tokens=4)
    engine.decode(a, 2)
    buffers = [weakref.ref(t) for layer in a.cache.flux_layers for t in (layer.keys, layer.values)]
    del a
    engine.prefill(ids[:1], max_new_tokens=4)  # another key: evicts the first graph and its cache
    assert all(ref() is None for ref in buffers)
    b = engine.prefill(ids[:1], max_new_tokens=4)
    buffers = [weakref.ref(t) for layer in b.cache.flux_layers for t in (layer.keys, layer.values)]
    del b
    engine.clear()
    assert not engine.entries and all(ref() is None for ref in buffers)


def test_mixed_routes_in_one_batch_give_each_sequence_its_own_tokens(tmp_path):
    model = tiny_model("llama", "sdpa")
    ids, mask = batch(left_pad=3)
    cfg = SMALL.replace(router_hidden=(32, 16, 16, 8), pool_size=4)
    routers = _routers_with_mixed_decisions(model, ids, mask, cfg, 16)
    path = tmp_path / "routers.safetensors"
    fluxc.save_routers(path, routers, cfg, fluxc.Fingerprint(type(model).__name__, 3, 4, 2, 16), {"test": "mixed"})
    engine = DecodeEngine(fluxc.compile(model, str(path), config=cfg))
    both = engine.generate(ids, 8, attention_mask=mask)
    route = engine.entries[next(iter(engine.entries))].key.routes
    assert route[0] != route[1], "the two sequences should take different routes"
    assert "mixed" in engine.entries[next(iter(engine.entries))].cache.layouts()
    pads = int((mask == 0).sum(1)[1])
    alone = [engine.generate(ids[:1], 8), engine.generate(ids[1:, pads:], 8)]
    assert torch.equal(both[0, 12:], alone[0][0, 12:])
    assert torch.equal(both[1, 12:], alone[1][0, 12 - pads:])
    keys = list(engine.entries)
    assert len(keys) == 3 and keys[1].routes == (route[0],) and keys[2].routes == (route[1],)


def test_graph_cache_is_keyed_by_mask_and_bounded():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch(seq=10, left_pad=0)
    engine = DecodeEngine(fluxc.compile(model, config=SMALL, route="sparse"), max_graphs=1)
    a = engine.prefill(ids, max_new_tokens=4)
    first = engine.decode(a, 3)
    b = engine.prefill(ids[:1], max_new_tokens=4)  # another key (batch 1): evicts a's graph and cache
    assert engine.stats["graphs_evicted"] == 1 and list(engine.entries) == [b.key]
    with pytest.raises(fluxc.ConfigError, match="reused by a later prefill or evicted"):
        engine.decode(a, 1)
    assert torch.equal(engine.decode(b, 3)[0], first[0])
    c = engine.prefill(ids[:1], max_new_tokens=4)  # same key: the entry (and its graph) is reused
    assert c.key == b.key and engine.stats["graph_hits"] == 1
    with pytest.raises(fluxc.ConfigError, match="reused by a later prefill"):
        engine.decode(b, 1)


def test_sampling_top_k_one_is_greedy_and_seeded_sampling_matches_the_dynamic_loop():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch(seq=10, left_pad=2)
    fm = fluxc.compile(model, config=SMALL, route=("full", "sparse", "full"))
    greedy = fluxc.generate(fm, ids, 6, attention_mask=mask)
    assert torch.equal(fluxc.generate(fm, ids, 6, attention_mask=mask, do_sample=True, top_k=1), greedy)
    torch.manual_seed(7)
    sampled = fluxc.generate(fm, ids, 6, attention_mask=mask, do_sample=True, temperature=1.5, top_p=0.9)
    torch.manual_seed(7)
    loop = fluxc.generate(fm, ids, 6, attention_mask=mask, do_sample=True, temperature=1.5, top_p=0.9, engine=False)
    assert torch.equal(sampled, loop)
    assert not torch.equal(sampled, greedy)


def test_eos_stops_and_pads():
    model = tiny_model("llama", "sdpa")
    ids, _ = batch(seq=10, left_pad=0)
    fm = fluxc.compile(model, config=SMALL, route="full")
    free = fluxc.generate(fm, ids, 8)
    eos = int(free[0, 12])  # the third generated token of sequence 0
    out = fluxc.generate(fm, ids, 8, eos_token_id=eos)
    for row in range(2):
        hits = (free[row, 10:] == eos).nonzero()
        stop = 10 + int(hits[0]) + 1 if len(hits) else out.shape[1]  # up to and including the first EOS
        assert torch.equal(out[row, :stop], free[row, :stop])
        assert (out[row, stop:] == eos).all()


def test_engine_errors():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch(seq=8, left_pad=2)
    engine = DecodeEngine(fluxc.compile(model, config=SMALL, route="full"))
    right = mask.flip(1)
    with pytest.raises(fluxc.ConfigError, match="left-padded"):
        engine.prefill(ids, attention_mask=right, max_new_tokens=2)
    with pytest.raises(fluxc.ConfigError, match="cuda_graphs=True needs a CUDA model"):
        DecodeEngine(engine.model, cuda_graphs=True).generate(ids, 2)
    with pytest.raises(fluxc.ConfigError, match="temperature"):
        engine.generate(ids, 2, do_sample=True, temperature=0.0)
    with pytest.raises(fluxc.ConfigError, match="FluxModule"):
        DecodeEngine(model)
    state = engine.prefill(ids, max_new_tokens=2)
    with pytest.raises(fluxc.ConfigError, match="max_new_tokens"):
        engine.decode(state, 5)
    sliding = fluxc.compile(tiny_model("mistral", "sdpa"), config=SMALL, route="full")
    with pytest.raises(fluxc.ConfigError, match="sliding-window"):
        DecodeEngine(sliding)
    with pytest.raises(fluxc.ConfigError, match="sliding-window"):
        fluxc.generate(sliding, ids, 2, engine=True)
    assert fluxc.generate(sliding, ids, 2).shape == (2, 10)  # auto: the DynamicCache loop, logged


def test_flux_cache_is_an_hf_cache():
    cache = FluxCache(SMALL)
    assert isinstance(cache, DynamicCache.__mro__[1])  # transformers' Cache base
    assert cache.get_seq_length() == 0 and not cache.is_compileable


def test_hf_generate_with_flux_cache():
    """transformers' own generate() on the routed graph: route full equals the untouched model's HF generate
    (left padding included); a mixed route equals the engine."""
    model = tiny_model("llama", "sdpa")
    ids, mask = batch(seq=12, left_pad=3)
    full = fluxc.compile(model, config=SMALL, route="full")
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(full.generate(ids, attention_mask=mask, **kwargs), model.generate(ids, attention_mask=mask, **kwargs))
    mixed = fluxc.compile(model, config=SMALL, route=MIXED)
    want = fluxc.generate(mixed, ids[:, 3:], 8)
    for keyword in ("cache", "past_key_values"):  # transformers' name from 5.24 on, and the older one
        cache = FluxCache(SMALL)
        assert torch.equal(mixed.generate(ids[:, 3:], **{keyword: cache}, **kwargs), want)
        assert cache.layouts() == ["sparse-ring", "full", "sparse-ring"]
    with pytest.raises(fluxc.ConfigError, match="max_new_tokens"):
        mixed.generate(ids)
    with pytest.raises(fluxc.ConfigError, match="both cache= and past_key_values="):
        mixed.generate(ids, cache=FluxCache(SMALL), past_key_values=FluxCache(SMALL), **kwargs)
