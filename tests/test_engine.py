"""The decode engine: a paged cache (sparse layers keep their sink + window ring) gives exactly the tokens and
logits of SA without eviction (HF DynamicCache + the routed op); one compile of the prefill serves every prompt
length and one of the decode step every routing mask and batch bucket; prompts of different lengths share
decode steps (continuous batching) and give each its own answer; pages follow routes and come back; sampling,
EOS and clear errors. transformers' generate() with a FluxCache (compacted per routing mask) at the end."""

from __future__ import annotations

import logging

import pytest
import torch
from test_hf_models import _routers_with_mixed_decisions
from transformers import DynamicCache

import fluxc
from fluxc.serve.cache import FluxCache
from fluxc.serve.engine import DecodeEngine

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
PAGE = 4  # small pages: the tiny prompts span several, the rings (6 and 8 slots) two


def _engine(fm, **kw) -> DecodeEngine:
    return DecodeEngine(fm, max_batch=kw.pop("max_batch", 4), max_len=kw.pop("max_len", 96), page_size=PAGE, **kw)


@pytest.mark.parametrize("arch,impl,cfg,route", [
    ("llama", "sdpa", SMALL, "full"), ("llama", "sdpa", SMALL, MIXED), ("qwen3", "sdpa", TOKEN_EXACT, "sparse"),
    ("gemma", "eager", SMALL, MIXED),
], ids=["llama-full", "llama-mixed", "qwen3-token-exact", "gemma-eager"])
def test_eviction_matches_sa_without_eviction(arch, impl, cfg, route):
    model = tiny_model(arch, impl)
    ids, mask = batch(seq=12, left_pad=3)
    fm = fluxc.compile(model, config=cfg, route=route)
    engine = _engine(fm)
    new = 12  # past the ring's size several times over
    state = engine.prefill(ids, attention_mask=mask, max_new_tokens=new)
    step_logits: list[torch.Tensor] = []
    tokens = torch.cat([state.next_tokens, engine.decode(state, new - 1, logits=step_logits)], dim=1)  # (B, new)
    expected = _no_eviction_logits(fluxc.compile(model, config=cfg, route=route), ids, mask, tokens)
    torch.testing.assert_close(torch.stack(step_logits, 1), expected[:, 1:].float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, expected.argmax(-1))  # greedy: every token is the argmax of exact logits
    full = [route == "full"] * 3 if isinstance(route, str) else [r == "full" for r in route]
    assert [list(engine.routes_of(r)) for r in state.requests] == [full, full]
    assert engine.stats["eager_steps"] == new - 1 and engine.pages_in_use() == 0  # every page back at the end


def test_generate_uses_the_engine_and_matches_the_dynamic_cache_loop():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch(seq=10, left_pad=2)
    fm = fluxc.compile(model, config=SMALL, route=("full", "sparse", "sparse"))
    got = fluxc.generate(fm, ids, 9, attention_mask=mask)
    assert fm._fluxc_engine is not None and fm._fluxc_engine.stats["prefills"] == 2
    expected = fluxc.generate(fm, ids, 9, attention_mask=mask, engine=False)
    assert torch.equal(got, expected)


def test_memory_follows_the_routes():
    """Pages per request: a full layer one per PAGE keys, a sparse one its ring's (sink + window), and no more."""
    model = tiny_model("llama", "sdpa")
    prompt = torch.randint(1, 128, (40,), generator=torch.Generator().manual_seed(3))
    pages = {}
    for route in ("full", "sparse", ("full", "sparse", "sparse")):
        engine = _engine(fluxc.compile(model, config=SMALL, route=route))
        request = engine.add_request(prompt, max_new_tokens=8)
        pages[route] = engine.pages_in_use()
        assert engine.kv_bytes(request) == pages[route] * engine.pool.page_bytes
        engine.finish(request)
        assert engine.pages_in_use() == 0
    ring = -(-(SMALL.sink + SMALL.window) // PAGE)  # 6 slots: 2 pages
    assert pages["full"] == 3 * (40 // PAGE) and pages["sparse"] == 3 * ring
    assert pages[("full", "sparse", "sparse")] == 40 // PAGE + 2 * ring


def _mixed_router_setup(tmp_path):
    """A tiny Llama, a left-padded batch, and a router file whose routers route that batch's sequences apart."""
    model = tiny_model("llama", "sdpa")
    ids, mask = batch(left_pad=3)
    cfg = SMALL.replace(router_hidden=(32, 16, 16, 8), pool_size=4)
    routers = _routers_with_mixed_decisions(model, ids, mask, cfg, 16)
    path = tmp_path / "routers.safetensors"
    fluxc.save_routers(path, routers, cfg, fluxc.Fingerprint(type(model).__name__, 3, 4, 2, 16), {"test": "mixed"})
    return model, ids, mask, cfg, str(path)


def test_batch_invariant_runs_every_decode_step_at_the_largest_bucket(tmp_path, monkeypatch):
    """`batch_invariant=True`: one bucket, so a request decodes at the same batch size alone or among others (its
    tokens cannot depend on its neighbours' count); its answers are the default engine's."""
    model, _, _, cfg, path = _mixed_router_setup(tmp_path)
    fm = fluxc.compile(model, path, config=cfg)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (n,), generator=g) for n in (9, 17, 13)]
    default, invariant = _engine(fm), _engine(fm, batch_invariant=True)
    assert default.buckets == (2, 4) and invariant.buckets == (4,)
    steps = []
    step = DecodeEngine._step
    monkeypatch.setattr(DecodeEngine, "_step", lambda self, bucket, sampling: (steps.append(bucket),
                                                                                step(self, bucket, sampling)))
    alone = invariant.generate(prompts[:1], 6)
    assert set(steps) == {4}, steps  # one request still decodes at 4 rows
    together = invariant.generate(prompts, 6)
    assert torch.equal(alone[0], together[0])
    assert all(torch.equal(a, b) for a, b in zip(together, default.generate(prompts, 6)))
    steps.clear()
    default.generate(prompts[:1], 6)
    assert set(steps) == {2}  # the default engine decodes one request at its smallest bucket
    with pytest.raises(fluxc.ConfigError, match="batch_invariant='yes'"):
        _engine(fm, batch_invariant="yes")


def test_one_compile_serves_every_length_and_routing_mask(tmp_path):
    """Prompts of many lengths whose routers pick different masks: after one prompt alone and two together (a
    prefill compile each, one decode compile), nothing traces or compiles again; the masks seen differ."""
    model, ids, mask, cfg, path = _mixed_router_setup(tmp_path)
    fm = fluxc.compile(model, path, config=cfg)
    engine = _engine(fm)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 128, (n,), generator=g) for n in (7, 12, 19, 26, 33, 9, 41, 15)]
    outs = engine.generate(prompts[:1], 5)
    assert fm._backend.graphs == 2  # one prompt's prefill (dynamic length) and the decode step (dynamic batch)
    outs += engine.generate(prompts[1:3], 5)
    assert fm._backend.graphs == 3  # the prefill of several prompts (dynamic batch and length)
    outs += engine.generate(prompts[3:], 5) + engine.generate(prompts[7:], 5)
    assert fm._backend.graphs == 3, "a new length, batch bucket or routing mask traced or compiled again"
    assert engine.stats["prefills"] == len(prompts) + 1 and set(engine.buckets) >= {2, 4}
    masks = set()
    for prompt, out in zip(prompts + prompts[7:], outs):  # each answer is the prompt's alone (SA without eviction, batch 1)
        assert torch.equal(out, fluxc.generate(fm, prompt[None], 5, engine=False)[0])
        masks.add(tuple(bool(x) for x in fluxc.last_route(fm)[0].tolist()))
    assert len(masks) > 1, "the routers should pick more than one routing mask over these prompts"


def test_a_compile_after_warm_up_is_logged_and_counted(tmp_path, caplog):
    """After warm_up, prompts of new lengths (one token too) and masks compile nothing; a prefill or step whose
    graph Dynamo dropped compiles again, which the engine logs and counts."""
    model, ids, mask, cfg, path = _mixed_router_setup(tmp_path)
    engine = _engine(fluxc.compile(model, path, config=cfg))
    engine.warm_up()
    fm = engine.model
    with caplog.at_level(logging.WARNING, logger="fluxc"):
        engine.generate([torch.arange(1, 30), torch.arange(3, 14)], 3)
        graphs = fm._backend.graphs
        fm(input_ids=torch.arange(1, 9)[None])  # the model's own forward compiles a graph: not the engine's
        assert fm._backend.graphs > graphs
        engine.generate([torch.arange(2, 20)], 3)
        assert engine.stats["compiles_after_warm_up"] == 0 and "after warm_up" not in caplog.text
        engine.generate([torch.tensor([5])], 3)  # one token: padded to two, no compile either
        assert engine.stats["compiles_after_warm_up"] == 0 and "after warm_up" not in caplog.text
        torch._dynamo.reset()  # Dynamo forgets the warm graphs: the next prefill and step compile again
        engine.generate([torch.arange(1, 12)], 3)
    assert engine.stats["compiles_after_warm_up"] == 2
    assert "a prefill of 1 prompt(s) of up to 11 tokens compiled 1 new graph(s) after warm_up" in caplog.text
    assert "a decode step of batch bucket 2 compiled 1 new graph(s) after warm_up" in caplog.text


def test_prompts_of_different_lengths_share_decode_steps_and_free_their_pages(tmp_path):
    """More prompts than slots: each joins when a slot frees (continuous batching); every answer equals the
    prompt's alone; the pool ends empty."""
    model, ids, mask, cfg, path = _mixed_router_setup(tmp_path)
    fm = fluxc.compile(model, path, config=cfg)
    engine = _engine(fm, max_batch=2)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 128, (n,), generator=g) for n in (9, 23, 14, 30, 6)]
    outs = engine.generate(prompts, 7)
    routes = set()
    for prompt, out in zip(prompts, outs):
        alone = fluxc.generate(fm, prompt[None], 7, engine=False)[0]
        routes.add(tuple(bool(x) for x in fluxc.last_route(fm)[0].tolist()))
        assert torch.equal(out, alone)
    assert len(routes) > 1, "the routers should pick more than one mask over these prompts"
    assert engine.pages_in_use() == 0 and engine.stats["prefills"] == len(prompts)
    assert engine.stats["prefill_forwards"] < len(prompts), "prompts waiting together should share a prefill"
    bounded = _engine(fm, max_batch=4, max_prefill_tokens=50)  # 9 + 23 pad to 46; a third (3 x 23) waits
    assert [torch.equal(a, b) for a, b in zip(bounded.generate(prompts, 7), outs)] == [True] * len(prompts)
    assert bounded.stats["prefill_forwards"] == 4  # (9, 23), (14), (30), (6): no group over 50 padded tokens
    assert max(engine.buckets) == 2


def test_prompts_admitted_together_equal_each_alone(tmp_path):
    """One prefill forward of left-padded prompts of different lengths (and a one-token prompt): each request's
    tokens, routes and pages are those of its prompt admitted alone."""
    model, ids, mask, cfg, path = _mixed_router_setup(tmp_path)
    engine = _engine(fluxc.compile(model, path, config=cfg))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (n,), generator=g) for n in (31, 8, 1, 19)]
    together = engine.add_requests(prompts, 6)
    kv_together = [engine.kv_bytes(r) for r in together]
    margins = [torch.tensor(engine.route_margins_of(r)) for r in together]  # (L,) each
    assert engine.stats["prefill_forwards"] == 1
    while not all(engine.finished(r) for r in together):
        engine.step()
    alone = []
    for prompt in prompts:
        request = engine.add_request(prompt, 6)
        alone.append((engine.routes_of(request), engine.kv_bytes(request)))
        torch.testing.assert_close(torch.tensor(engine.route_margins_of(request)), margins[len(alone) - 1],
                                   rtol=1e-4, atol=1e-4)
        while not engine.finished(request):
            engine.step()
        alone[-1] += (engine.tokens_of(request),)
    assert engine.stats["prefill_forwards"] == 1 + len(prompts)
    routes = set()
    for request, kv_held, (route, kv, tokens), margin in zip(together, kv_together, alone, margins):
        assert engine.routes_of(request) == route and torch.equal(engine.tokens_of(request), tokens)
        routed = ~margin.isnan()  # layers a router decided: the margin's sign is the route
        assert routed.any() and torch.equal(margin[routed] > 0, torch.tensor(route)[routed])
        assert kv_held == kv  # the same pages: sparse layers compacted to their rings
        routes.add(route)
    assert len(routes) > 1, "the routers should route these prompts apart"
    assert engine.pages_in_use() == 0


def test_mixed_routes_in_one_batch_give_each_sequence_its_own_tokens(tmp_path):
    model, ids, mask, cfg, path = _mixed_router_setup(tmp_path)
    engine = _engine(fluxc.compile(model, path, config=cfg))
    state = engine.prefill(ids, attention_mask=mask, max_new_tokens=8)
    assert engine.routes_of(state.requests[0]) != engine.routes_of(state.requests[1]), \
        "the two sequences should take different routes"
    both = torch.cat([state.next_tokens, engine.decode(state, 7)], dim=1)
    pads = int((mask == 0).sum(1)[1])
    alone = [engine.generate(ids[:1], 8), engine.generate(ids[1:, pads:], 8)]
    assert torch.equal(both[0], alone[0][0, 12:])
    assert torch.equal(both[1], alone[1][0, 12 - pads:])


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
    engine = _engine(fluxc.compile(model, config=SMALL, route="full"), max_batch=2)
    right = mask.flip(1)
    with pytest.raises(fluxc.ConfigError, match="left-padded"):
        engine.prefill(ids, attention_mask=right, max_new_tokens=2)
    with pytest.raises(fluxc.ConfigError, match="cuda_graphs=True needs a CUDA model"):
        DecodeEngine(engine.model, cuda_graphs=True).generate(ids, 2)
    with pytest.raises(fluxc.ConfigError, match="temperature"):
        engine.generate(ids, 2, do_sample=True, temperature=0.0)
    with pytest.raises(fluxc.ConfigError, match="FluxModule"):
        DecodeEngine(model)
    with pytest.raises(fluxc.ConfigError, match="max_batch=0"):
        DecodeEngine(engine.model, max_batch=0)
    with pytest.raises(fluxc.ConfigError, match="max_prefill_tokens=1 must be an int >= 2"):
        DecodeEngine(engine.model, max_prefill_tokens=1)
    with pytest.raises(fluxc.CapacityError, match="exceeds max_len=96"):
        engine.generate([torch.ones(90, dtype=torch.long)], 10)
    with pytest.raises(fluxc.ConfigError, match="token ids are integers"):
        engine.generate([torch.ones(2, 3)], 2)
    state = engine.prefill(ids, max_new_tokens=2)
    with pytest.raises(fluxc.ConfigError, match="max_new_tokens"):
        engine.decode(state, 5)
    with pytest.raises(fluxc.CapacityError, match="decode slots are taken"):
        engine.add_request(ids[0], 2)
    engine.decode(state, 1)
    assert engine.pages_in_use() == 0
    small = DecodeEngine(engine.model, max_batch=2, max_len=96, page_size=PAGE, num_pages=4)
    with pytest.raises(fluxc.CapacityError, match="pages"):
        small.generate([torch.ones(40, dtype=torch.long)], 2)
    sliding = fluxc.compile(tiny_model("mistral", "sdpa"), config=SMALL, route="full")  # its window: 5 keys
    with pytest.raises(fluxc.ConfigError, match="sliding window of 5 keys, wider than the 3 the SA window keeps"):
        DecodeEngine(sliding)
    with pytest.raises(fluxc.ConfigError, match="sliding window of 5 keys"):
        fluxc.generate(sliding, ids, 2, engine=True)
    assert fluxc.generate(sliding, ids, 2).shape == (2, 10)  # auto: the DynamicCache loop, logged


@torch.no_grad()
def test_flux_cache_compaction_frees_the_prompt_layer_by_layer():
    """transformers' generate() path: compaction frees each prompt layer once copied (peak: prompt cache + one
    layer, not + the decode cache)."""
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


def test_a_batch_forward_after_the_engine_still_routes(tmp_path):
    """The engine's prefill compiles with a dynamic length; a later (B, T) forward recompiles with a dynamic batch
    too: the router input is still found (symbolic sizes are not hidden-state content) and the logits match a
    fresh compile's."""
    model, ids, mask, cfg, path = _mixed_router_setup(tmp_path)
    fm = fluxc.compile(model, path, config=cfg)
    _engine(fm).generate([ids[0], ids[1, 3:]], 3)
    got = fm(input_ids=ids, attention_mask=mask).logits
    route = fluxc.last_route(fm)
    fresh = fluxc.compile(model, path, config=cfg)
    torch.testing.assert_close(got, fresh(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(route, fluxc.last_route(fresh))


def test_the_served_graphs_are_cacheable(tmp_path, monkeypatch):
    """AOTAutograd caches every compiled region of the rewritten prefill and decode graphs (no bypass): a
    server's restart reuses them."""
    from torch._dynamo.utils import counters

    from fluxc.passes import counters as flux_counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model, ids, mask, cfg, path = _mixed_router_setup(tmp_path)
    counters.clear()
    compiled = flux_counters["regions_compiled"]
    engine = _engine(fluxc.compile(model, path, config=cfg.replace(compiler="inductor")))
    engine.warm_up()
    assert engine.compiles == 3
    compiled = flux_counters["regions_compiled"] - compiled
    assert compiled >= 4  # at least a head and a tail region per graph
    assert counters["aot_autograd"]["autograd_cache_bypass"] == 0
    assert counters["aot_autograd"]["autograd_cache_saved"] + counters["aot_autograd"]["autograd_cache_hit"] == compiled


def test_default_pool_leaves_room_for_prefill_activations():
    """The transient memory measured on the H100 (Llama-3.1-8B shape, bf16, 8 x 32K tokens in one prefill:
    peak 70.00 GiB - 14.99 GiB before - 32.25 GiB of KV = 22.76 GiB; benchmarks/results/e2e/e2e_h100.json) is
    covered by the estimate, with at most 30% to spare; the pool takes what is left of 90% of free memory."""
    from transformers import LlamaConfig

    from fluxc.serve.engine import default_pool_pages, prefill_activation_bytes

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128256)
    measured = (70.00 - 14.99 - 32.25) * 2**30
    estimate = prefill_activation_bytes(config, 8 * 32768, torch.bfloat16, None)
    assert measured <= estimate <= 1.3 * measured
    assert prefill_activation_bytes(config, 1000, torch.bfloat16, 128256) == \
        prefill_activation_bytes(config, 1000, torch.bfloat16, None) + 1000 * 4 * 128256  # float32 logits
    gib = 2**30
    assert default_pool_pages(wanted=100, page_bytes=gib // 100, free_bytes=10 * gib, reserve_bytes=gib)[0] == 100
    pages, why = default_pool_pages(wanted=10**6, page_bytes=gib // 100, free_bytes=10 * gib, reserve_bytes=gib)
    assert pages == (9 * gib - gib) // (gib // 100) and "1.00 GiB kept for prefill activations" in why
    with pytest.raises(fluxc.CapacityError, match="lower max_prefill_tokens or max_len, or pass num_pages="):
        default_pool_pages(wanted=10**6, page_bytes=gib // 100, free_bytes=10 * gib, reserve_bytes=9 * gib)


def test_allocate_makes_the_pool_before_the_first_request():
    model = tiny_model("llama", "sdpa")
    engine = _engine(fluxc.compile(model, config=SMALL, route="full"), max_batch=2)
    assert engine.pool is None
    engine.allocate()
    pool = engine.pool
    assert pool is not None and pool.num_pages == engine.max_batch * engine.num_layers * engine.width + 1
    assert pool.k.dtype == next(model.parameters()).dtype
    engine.allocate()  # a second call keeps the pool
    ids, _ = batch(seq=8, left_pad=0)
    state = engine.prefill(ids, max_new_tokens=2)
    assert engine.pool is pool and engine.pages_in_use() > 0
    engine.end(state)
