"""GPU tests of the decode engine: CUDA-graph replay gives the eager engine's tokens, one captured graph serves
every routing mask (and a batch mixing them) with each prompt's own routes, eviction matches SA without
eviction in bf16 on the Triton kernels, and SmolLM2-135M-Instruct in bf16 follows transformers. Skipped
without CUDA."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import fluxc
from fluxc.ops.router import LayerRouter, router_logits_reference
from fluxc.serve.engine import DecodeEngine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CFG = fluxc.FluxConfig(sink=64, window=128, block=64, compiler="eager", pool_size=16,
                       router_hidden=(64, 32, 32, 16))


def _llama(layers: int = 2):
    import transformers

    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512,
                                      max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model.to("cuda", torch.bfloat16)


def _prompts(length: int = 400):
    g = torch.Generator().manual_seed(5)
    a = torch.randint(1, 512, (1, length), generator=g)
    b = torch.full((1, length), 7)
    b[0, ::3] = 11
    return a.cuda(), b.cuda()


def _split_routers(model, a, b, tmp_path) -> str:
    """Routers whose decisions for prompt a and prompt b differ at every layer (bias set between them)."""
    n = model.config.num_hidden_layers
    torch.manual_seed(1)
    routers = torch.nn.ModuleList(LayerRouter(64, CFG.router_hidden) for _ in range(n)).cuda()
    queries = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda mod, inp, out, i=i: queries.__setitem__(i, out.float().unflatten(-1, (4, 64))))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        margins = []
        for ids in (a, b):
            model(input_ids=ids)
            valid = torch.ones(ids.shape, dtype=torch.bool, device="cuda")
            margins.append([float((lambda x: x[0, 1] - x[0, 0])(
                router_logits_reference(queries[i], valid, [w.float() for w in routers[i].weights()], CFG.pool_size)))
                for i in range(n)])
        for i in range(n):
            assert margins[0][i] != margins[1][i]
            routers[i].head[4].bias[1] -= (margins[0][i] + margins[1][i]) / 2
    for h in hooks:
        h.remove()
    path = tmp_path / "routers.safetensors"
    fluxc.save_routers(path, routers.cpu(), CFG, fluxc.Fingerprint(type(model).__name__, n, 4, 2, 64), {"test": "gpu"})
    return str(path)


def test_cuda_graph_replay_matches_eager_engine():
    model = _llama()
    a, _ = _prompts()
    for route in ("full", "sparse", ("full", "sparse")):
        fm = fluxc.compile(model, config=CFG, route=route)
        graphs = DecodeEngine(fm, cuda_graphs=True)
        got = graphs.generate(a, 300)  # the ring wraps twice
        eager = DecodeEngine(fm, cuda_graphs=False).generate(a, 300)
        assert graphs.stats["graphs_captured"] == 1 and graphs.stats["replays"] == 299
        assert torch.equal(got, eager), route
        assert graphs.pages_in_use() == 0


def test_one_graph_serves_every_routing_mask(tmp_path):
    """Prompts a and b take different routes in every layer; one captured graph (per batch bucket) serves a, b and
    a batch of both, each with its own routes: the same tokens as the eager engine, and routes that matter."""
    model = _llama()
    a, b = _prompts()
    path = _split_routers(model, a, b, tmp_path)
    fm = fluxc.compile(model, path, config=CFG)
    engine = DecodeEngine(fm, cuda_graphs=True, max_batch=2)
    out_a = engine.generate(a, 64)
    routes_a = fluxc.last_route(fm)[0].tolist()
    out_b = engine.generate(b, 64)
    routes_b = fluxc.last_route(fm)[0].tolist()
    both = engine.generate([a[0], b[0]], 64)
    assert routes_a != routes_b and engine.stats["graphs_captured"] == 1 and engine.compiles == 3  # prefill of 1, of 2
    eager = DecodeEngine(fm, cuda_graphs=False)
    assert torch.equal(out_a, eager.generate(a, 64)) and torch.equal(out_b, eager.generate(b, 64))
    assert torch.equal(both[0], out_a[0]) and torch.equal(both[1], out_b[0])
    # b under a's routes gives other logits: serving b with a's routes would have been visible
    right: list[torch.Tensor] = []
    wrong: list[torch.Tensor] = []
    state = engine.prefill(b, max_new_tokens=16)
    engine.decode(state, 15, logits=right)
    forced_a = tuple("full" if r else "sparse" for r in routes_a)
    other = DecodeEngine(fluxc.compile(model, config=CFG, route=forced_a), cuda_graphs=False)
    other.decode(other.prefill(b, max_new_tokens=16), 15, logits=wrong)
    assert not all(torch.equal(x, y) for x, y in zip(right, wrong))


def test_eviction_matches_sa_without_eviction_bf16_kernels():
    model = _llama()
    a, _ = _prompts(700)
    fm = fluxc.compile(model, config=CFG, route=("sparse", "full"))
    engine = DecodeEngine(fm, cuda_graphs=True)
    state = engine.prefill(a, max_new_tokens=200)
    logits: list[torch.Tensor] = []
    tokens = torch.cat([state.next_tokens, engine.decode(state, 199, logits=logits)], dim=1)  # (1, 200)
    assert engine.routes_of(state.requests[0]) == (False, True)
    from transformers import DynamicCache

    ref = fluxc.compile(model, config=CFG, route=("sparse", "full"))
    with torch.no_grad():
        out = ref(input_ids=a, past_key_values=DynamicCache(), use_cache=True)
        worst = 0.0
        for i in range(199):
            out = ref(input_ids=tokens[:, i : i + 1], past_key_values=out.past_key_values, use_cache=True,
                      position_ids=torch.tensor([[a.shape[1] + i]], device="cuda"))
            worst = max(worst, float((out.logits[:, -1].float() - logits[i]).abs().max()))
    scale = float(logits[0].abs().max())
    assert worst <= 0.05 * scale, (worst, scale)  # bf16 model: same keys, different kernels and layouts


def _smollm2():
    spec = importlib.util.spec_from_file_location(
        "fluxc_examples_smollm2", Path(__file__).resolve().parent.parent / "examples" / "smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.load_smollm2(torch.bfloat16, os.environ.get("FLUXC_SMOLLM2_GGUF"))
    except (FileNotFoundError, ModuleNotFoundError, fluxc.ConfigError) as exc:  # no GGUF, or no gguf package
        pytest.skip(f"SmolLM2 GGUF not available: {exc}")


def test_smollm2_bf16_full_route_follows_transformers():
    model, tokenizer = _smollm2()
    model = model.cuda()
    ids = tokenizer("The three primary colours of light are", return_tensors="pt").input_ids.cuda()
    fm = fluxc.compile(model, config=fluxc.FluxConfig(compiler="eager"), route="full")
    new = 32
    got = DecodeEngine(fm, cuda_graphs=True).generate(ids, new)
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, output_scores=True, return_dict_in_generate=True)
    diverge = (got[0] != hf.sequences[0]).nonzero()
    if len(diverge):  # a bf16 near-tie may flip a token: only where HF's own top-2 logits agree within bf16
        i = int(diverge[0]) - ids.shape[1]
        top2 = hf.scores[i][0].float().topk(2).values
        assert float(top2[0] - top2[1]) <= 4 * 2**-8 * max(1.0, float(top2[0].abs())), (i, top2)  # 4 bf16 ulps


def test_local_layers_on_the_gpu_engine():
    """A Gemma 3-style model (local layers of a 48-key window, within the 65 keys CFG's SA window keeps; the global
    layer routed) in bf16 on the Triton kernels: CUDA-graph replay gives the eager engine's tokens, and a local
    layer holds the pages of its window."""
    import transformers

    config = transformers.Gemma3TextConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512,
                                           max_position_embeddings=4096, sliding_window=48,
                                           layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                        "sliding_attention"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().to("cuda", torch.bfloat16)
    a, b = _prompts()
    for route in ("full", "sparse"):
        fm = fluxc.compile(model, config=CFG, route=route)
        engine = DecodeEngine(fm, cuda_graphs=True, page_size=16)
        got = engine.generate([a[0], b[0, :250]], 200)  # the local rings (48) and the SA ring (192) wrap
        eager = DecodeEngine(fm, cuda_graphs=False, page_size=16).generate([a[0], b[0, :250]], 200)
        assert [s.layer for s in fluxc.sites(fm) if s.local_window] == [0, 1, 3]
        assert all(torch.equal(x, y) for x, y in zip(got, eager)), route
        assert engine.stats["graphs_captured"] == 1 and engine.pages_in_use() == 0
        state = engine.prefill(a, max_new_tokens=2)
        pages = [len(p) for p in engine._requests[state.requests[0]].pages]
        assert pages[0] == pages[1] == pages[3] == 3  # 48 keys in pages of 16
        engine.end(state)
