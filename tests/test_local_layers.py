"""Models with their own local layers (Gemma 3: sliding-window layers between global ones): a layer whose window is
no wider than the sparse branch's is kept as the model runs it and gets no router; the global layers are routed.
Checked against the untouched model and the independent loop-built reference of `hf_models`."""

from __future__ import annotations

import pytest
import torch

import fluxc
from fluxc.passes import counters
from fluxc.passes.masks import native_window

from hf_models import Reference, batch, reference_router, run_reference, tiny_model

LOCAL, GLOBAL = "sliding_attention", "full_attention"
TYPES = [LOCAL, LOCAL, GLOBAL, LOCAL, GLOBAL]  # Gemma 3's pattern, shortened
NATIVE = 6
CFG = fluxc.FluxConfig(sink=2, window=8, block=2, block_exact=False, compiler="eager",
                       router_hidden=(32, 16, 16, 8), pool_size=4)  # SA reaches 8 keys back: a window of 6 is local
PADS = [0, 3]


def _gemma3(impl: str, window: int = NATIVE):
    return tiny_model("gemma3", impl, layers=len(TYPES), sliding_window=window, layer_types=TYPES)


def _real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.bool()]


def _reference_routes(route: str) -> list[str]:
    return ["full" if t == LOCAL else route for t in TYPES]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_local_layers_are_kept_and_global_layers_routed(impl):
    model = _gemma3(impl)
    ids, mask = batch(seq=20, left_pad=3)
    with torch.no_grad():
        untouched = model(input_ids=ids, attention_mask=mask).logits
        counters.clear()
        full = fluxc.compile(model, route="full", config=CFG)
        out_full = full(input_ids=ids, attention_mask=mask).logits
        sparse = fluxc.compile(model, route="sparse", config=CFG)
        out_sparse = sparse(input_ids=ids, attention_mask=mask).logits
    sites = fluxc.sites(sparse)
    assert [s.local_window for s in sites] == [NATIVE if t == LOCAL else 0 for t in TYPES]
    assert [s.routed for s in sites] == [t == GLOBAL for t in TYPES]
    assert "local (own window of 6 keys), not routed" in str(sites[0]) and str(sites[2]).endswith("routed")
    assert counters["sites_rewritten"] == 2 * len(TYPES)  # local layers still run through fluxc's op
    torch.testing.assert_close(_real(out_full, mask), _real(untouched, mask), atol=1e-5, rtol=0)
    ref = run_reference(model, ids, mask, Reference(_reference_routes("sparse"), PADS, CFG.sink, CFG.window, CFG.block,
                                                    CFG.block_exact))
    torch.testing.assert_close(_real(out_sparse, mask), _real(ref, mask), atol=1e-5, rtol=0)
    assert (_real(out_sparse, mask) - _real(untouched, mask)).abs().max() > 1e-3  # the global layers went sparse
    # the stored decisions: local layers run their own attention (the full branch under their window)
    assert fluxc.last_route(sparse).tolist() == [[t == LOCAL for t in TYPES]] * 2


def test_a_native_window_wider_than_the_sparse_window_stays_routed():
    """SA inside a 6-key native window still drops keys when SA reaches only 4 back: those layers are routed."""
    model = _gemma3("sdpa")
    narrow = CFG.replace(window=4)
    ids, mask = batch(seq=20, left_pad=3)
    with torch.no_grad():
        fm = fluxc.compile(model, route="sparse", config=narrow)
        out = fm(input_ids=ids, attention_mask=mask).logits
    assert all(s.routed and not s.local_window for s in fluxc.sites(fm))
    ref = run_reference(model, ids, mask, Reference(["sparse"] * len(TYPES), PADS, narrow.sink, narrow.window,
                                                    narrow.block, narrow.block_exact))
    torch.testing.assert_close(_real(out, mask), _real(ref, mask), atol=1e-5, rtol=0)


def test_routers_only_for_global_layers(tmp_path):
    model = _gemma3("sdpa")
    ids, mask = batch(seq=20, left_pad=3)
    heads, head_dim = model.config.num_attention_heads, model.config.head_dim
    torch.manual_seed(0)
    global_layers = [i for i, t in enumerate(TYPES) if t == GLOBAL]
    routers = torch.nn.ModuleList(fluxc.ops.LayerRouter(head_dim, CFG.router_hidden) for _ in global_layers)
    with torch.no_grad():
        for p in routers.parameters():
            p.normal_(0.0, 0.5)
    fp = fluxc.Fingerprint(type(model).__name__, len(TYPES), heads, model.config.num_key_value_heads, head_dim)
    path = tmp_path / "routers.safetensors"
    fluxc.save_routers(path, routers, CFG, fp)
    with torch.no_grad():
        counters.clear()
        fm = fluxc.compile(model, str(path), config=CFG)
        out = fm(input_ids=ids, attention_mask=mask).logits
    assert counters["routers_inserted"] == len(global_layers)
    weights = {layer: {k: v.detach() for k, v in r.named_parameters()} for layer, r in zip(global_layers, routers)}
    route_fn, hooks, _ = reference_router(model, weights, CFG.pool_size, PADS)

    def route(module, layer):  # local layers keep their own attention; global ones ask the router
        return route_fn(module, layer) if layer in weights else torch.ones(ids.shape[0], dtype=torch.bool)

    ref = Reference(None, PADS, CFG.sink, CFG.window, CFG.block, CFG.block_exact, router=route)
    expected_logits = run_reference(model, ids, mask, ref)
    for h in hooks:
        h.remove()
    expected = torch.stack([ref.decisions[i] for i in range(len(TYPES))], dim=1)  # (B, L)
    assert fluxc.last_route(fm).tolist() == expected.tolist()
    torch.testing.assert_close(_real(out, mask), _real(expected_logits, mask), atol=1e-5, rtol=0)

    every_layer = tmp_path / "every_layer.safetensors"  # one router per layer: the local ones have none
    fluxc.save_routers(every_layer, torch.nn.ModuleList(fluxc.ops.LayerRouter(head_dim, CFG.router_hidden)
                                                        for _ in TYPES), CFG, fp)
    with pytest.raises(fluxc.ConfigError, match=r"5 layer routers but the model has 2 routed .*3 more are the "
                                                r"model's own local layers"):
        fluxc.compile(model, str(every_layer), config=CFG)(input_ids=ids, attention_mask=mask)


def test_training_trains_routers_for_global_layers_only():
    from fluxc.api import compile_for_training
    from fluxc.ops.router import RouteRecorder

    model = _gemma3("sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    ids, mask = batch(seq=20, left_pad=3)
    recorder = RouteRecorder(1.0)
    module = compile_for_training(model, CFG, recorder)
    logits = module(input_ids=ids, attention_mask=mask).logits
    assert len(module.routers) == TYPES.count(GLOBAL)
    assert recorder.samples().shape == (2, TYPES.count(GLOBAL))
    (logits.float().square().mean() + recorder.logits().sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.routers.parameters())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_native_window_is_read_off_the_traced_mask(impl):
    """The sliding term HF traces (`kv_idx > q_idx - W`, ANDed with causal and padding) gives W; a global
    layer's mask gives 0."""
    model = _gemma3(impl, window=5)
    found = []

    def backend(gm, example_inputs):
        from fluxc.passes.sites import find_sites

        for site in find_sites(gm.graph):
            found.append(native_window(site.mask, 20, 20) if site.mask is not None else 0)
        return gm.forward

    ids, mask = batch(seq=20, left_pad=3)
    torch._dynamo.reset()
    torch.compile(model, backend=backend, dynamic=False)(input_ids=ids, attention_mask=mask)
    assert sorted(found) == sorted(5 if t == LOCAL else 0 for t in TYPES)


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
def test_sliding_window_masks_are_read_as_structure(arch):
    """A sliding-window mask (local or routed layer) becomes positions + the window: no (T, T) mask is built and
    the results equal the materialised path's and the reference's."""
    from test_structural_masks import _square_masks

    model = _gemma3("sdpa") if arch == "gemma3" else tiny_model("mistral", "sdpa", layers=3, sliding_window=6)
    n = model.config.num_hidden_layers
    ids, mask = batch(seq=20, left_pad=3)
    real = mask.bool()
    outs = {}
    for structural in (True, False):
        counters.clear()
        fm = fluxc.compile(model, route="sparse", config=CFG.replace(window=4))  # every layer routed, SA inside
        fm._backend.structural_masks = structural
        with torch.no_grad():
            outs[structural] = fm(input_ids=ids, attention_mask=mask).logits
        distinct = 2 if arch == "gemma3" else 1  # gemma3: the local layers' mask and the global layers'
        assert counters["structural_masks"] == (distinct if structural else 0)
        assert bool(_square_masks(fm._backend.last_graph, ids.shape[1])) != structural
    torch.testing.assert_close(outs[True][real], outs[False][real], atol=1e-6, rtol=0)
    ref = run_reference(model, ids, mask, Reference(["sparse"] * n, PADS, CFG.sink, 4, CFG.block, CFG.block_exact))
    torch.testing.assert_close(outs[True][real], ref[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("route", ["full", "sparse"])
def test_decode_engine_keeps_a_ring_of_the_local_window(route):
    """The engine serves a model with local layers: each keeps the ring of its own window (pages follow), and the
    tokens and logits equal the DynamicCache loop's (every key kept, HF's own sliding mask)."""
    from fluxc.serve.engine import DecodeEngine

    model = _gemma3("sdpa")
    ids, mask = batch(seq=20, left_pad=3)
    prompts = [ids[0], ids[1, 3:]]  # different lengths, no padding
    fm = fluxc.compile(model, route=route, config=CFG)
    engine = DecodeEngine(fm, max_batch=2, max_len=64, page_size=4)
    new = 14  # the decode steps pass the local windows (6 keys) and the SA pattern (2 + 8) several times over
    got = engine.generate(prompts, new)
    want = [fluxc.generate(fm, p[None], new, engine=False)[0] for p in prompts]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    if route == "full":
        with torch.no_grad():
            hf = [model.generate(p[None], max_new_tokens=new, min_new_tokens=new, do_sample=False)[0] for p in prompts]
        assert all(torch.equal(a, b) for a, b in zip(got, hf))
    state = engine.prefill(prompts[0][None], max_new_tokens=4)
    request = state.requests[0]
    pages = [len(p) for p in engine._requests[request].pages]
    ring = -(-NATIVE // 4)  # a local layer: its 6-key window in pages of 4
    sa = -(-(CFG.sink + CFG.window) // 4)
    dense = -(-20 // 4)
    assert pages == [ring if t == LOCAL else (dense if route == "full" else sa) for t in TYPES]
    assert engine.routes_of(request) == tuple(t == LOCAL or route == "full" for t in TYPES)
    engine.decode(state, 3)
    engine.end(state)
    assert engine.pages_in_use() == 0


def test_decode_engine_refuses_sliding_windows_wider_than_the_sparse_window():
    from fluxc.serve.engine import DecodeEngine

    fm = fluxc.compile(_gemma3("sdpa"), route="sparse", config=CFG.replace(window=4))
    with pytest.raises(fluxc.ConfigError, match=r"layers \[0, 1, 3\] have a sliding window of 6 keys, wider than "
                                                r"the 4 the SA window keeps"):
        DecodeEngine(fm, max_batch=2, max_len=64, page_size=4)


def test_attention_work_counts_local_layers_at_their_window():
    """Work saved is relative to the model as it runs: local layers cost their window in both counts."""
    from fluxc.stats import attention_work

    n = 20

    def pairs(keep) -> int:  # explicit loops over (query, key)
        return sum(1 for i in range(n) for k in range(i + 1) if keep(i, k))

    full = pairs(lambda i, k: True)
    window = pairs(lambda i, k: i - k < NATIVE)
    sparse = pairs(lambda i, k: k < CFG.sink or i - k < CFG.window)
    route = torch.tensor([[True, True, True, True, False]])  # local layers read True: their own attention
    local = {i: NATIVE for i, t in enumerate(TYPES) if t == LOCAL}
    work = attention_work(route, [n], CFG, local)
    assert int(work["dense_pairs"][0]) == 2 * full + 3 * window
    assert int(work["executed_pairs"][0]) == full + sparse + 3 * window
    plain = attention_work(route, [n], CFG)  # no local layers named: every layer counted as routed
    assert int(plain["dense_pairs"][0]) == 5 * full
