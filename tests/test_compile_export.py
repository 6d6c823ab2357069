"""The rewritten graph under Inductor (fullgraph), torch.export, and `opcheck` of the custom ops; routes
decided at prefill are kept for decode steps."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import fluxc
from fluxc.ops.attention import routed_attention
from fluxc.ops.router import router_logits
from fluxc.spec import SiteSpec

from hf_models import batch, random_router_file, tiny_model

CFG = fluxc.FluxConfig(sink=2, window=4, block=2, block_exact=True)


def test_inductor_fullgraph_matches_eager_pass():
    model = tiny_model("qwen3", "sdpa", layers=2)
    ids, mask = batch(left_pad=2)
    routes = ["sparse", "full"]
    with torch.no_grad():
        eager = fluxc.compile(model, route=routes, config=CFG.replace(compiler="eager"))(input_ids=ids, attention_mask=mask)
        fm = fluxc.compile(model, route=routes, config=CFG)  # default compiler: Inductor
        out = fm(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.logits, eager.logits, atol=1e-5, rtol=1e-5)
    assert fluxc.last_route(fm).tolist() == [[False, True]] * 2


def test_rewritten_graph_exports_with_torch_export():
    model = tiny_model("llama", "eager", layers=2)
    ids, mask = batch(left_pad=2)
    with torch.no_grad():
        fm = fluxc.compile(model, route=["sparse", "full"], config=CFG.replace(compiler="eager"))
        fm._backend.keep_inputs = True
        expected = fm(input_ids=ids, attention_mask=mask, use_cache=False).logits
    gm, inputs = fm._backend.last_graph, fm._backend.last_inputs
    names = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert names.count(torch.ops.fluxc.routed_attention.default) == 2
    program = torch.export.export(gm, inputs, strict=False)
    out = program.module()(*inputs)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, expected, atol=1e-5, rtol=0)
    assert any(n.target == torch.ops.fluxc.routed_attention.default for n in program.graph.nodes)


def _decode(module, ids, steps):
    """Greedy prefill + `steps` decode steps with a DynamicCache; returns (tokens, per-step logits)."""
    mask = torch.ones_like(ids)
    out = module(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True)
    logits = [out.logits[:, -1]]
    tokens = [out.logits[:, -1:].argmax(-1)]
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
        out = module(input_ids=tokens[-1], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[:, -1])
        tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(tokens, 1), torch.stack(logits, 1)


def test_prefill_routes_are_kept_for_decode_steps(tmp_path):
    model = tiny_model("llama", "sdpa", layers=3)
    path, cfg = _router_module(tmp_path, model)
    fm = fluxc.compile(model, path, config=cfg)
    ids, _ = batch(left_pad=0)
    with torch.no_grad():
        tokens, logits = _decode(fm, ids, steps=4)
    decided = fluxc.last_route(fm)  # after the decode steps: still the prefill's decisions
    for b in range(ids.shape[0]):
        routes = ["full" if r else "sparse" for r in decided[b].tolist()]
        with torch.no_grad():
            forced_tokens, forced_logits = _decode(fluxc.compile(model, route=routes, config=cfg), ids[b:b + 1], steps=4)
        torch.testing.assert_close(logits[b:b + 1], forced_logits, atol=1e-5, rtol=0)
        assert torch.equal(tokens[b:b + 1], forced_tokens)


def test_custom_ops_pass_opcheck():
    q = torch.randn(2, 4, 6, 8)
    k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6).clone()
    route = torch.tensor([True, False])
    qpos, valid, start = torch.ops.fluxc.positions(q, k, mask, False, False, 0)
    spec = SiteSpec(is_causal=False, scale=0.3, softcap=0.0, math="eager", softmax_fp32=True, pattern="streaming",
                    sink=1, window=2, block=1, block_exact=False, n_last=0, impl="reference")
    args = (q, k, v, mask, route, qpos, start, spec.encode())
    torch.library.opcheck(routed_attention, args)
    q.requires_grad_(True)
    torch.library.opcheck(routed_attention, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    weights = [p.detach() for p in fluxc.ops.LayerRouter(8, (8, 8, 8, 4)).weights()]
    torch.library.opcheck(router_logits, (torch.randn(2, 6, 4, 8), valid, weights, 3))


def _router_module(tmp_path, model, seed=3):
    cfg = CFG.replace(router_hidden=(8, 8, 8, 8), compiler="eager", sink=2, window=2, block=1)
    path, _ = random_router_file(tmp_path / f"r{seed}.safetensors", cfg, seed=seed)
    return path, cfg


def test_fresh_one_token_prompt_is_routed_not_given_a_stale_route(tmp_path):
    model = tiny_model("llama", "sdpa", layers=3)
    path, cfg = _router_module(tmp_path, model)
    ids, _ = batch(left_pad=0)
    fm = fluxc.compile(model, path, config=cfg)
    with torch.no_grad():
        _decode(fm, ids, steps=2)  # stores routes for two sequences
        fresh = fluxc.compile(model, path, config=cfg)
        for token in range(1, 40):
            stored = fluxc.last_route(fm).clone()  # what a stale reuse would give
            one = torch.tensor([[token], [token + 40]])
            fm(input_ids=one, attention_mask=torch.ones_like(one), past_key_values=DynamicCache(), use_cache=True)
            fresh.route_state.route.fill_(-1)  # `fresh` never carries state from an earlier prompt
            fresh(input_ids=one, attention_mask=torch.ones_like(one), past_key_values=DynamicCache(), use_cache=True)
            assert torch.equal(fluxc.last_route(fm), fluxc.last_route(fresh))
            if not torch.equal(stored, fluxc.last_route(fresh)):
                break
        else:
            pytest.fail("no 1-token prompt pair routed differently: the test would not catch stale routes")


def test_chunked_prefill_keeps_the_first_chunks_decision(tmp_path):
    model = tiny_model("llama", "sdpa", layers=3)
    path, cfg = _router_module(tmp_path, model, seed=4)
    ids, _ = batch(left_pad=0)
    fm = fluxc.compile(model, path, config=cfg)
    with torch.no_grad():
        first = fm(input_ids=ids[:, :7], past_key_values=DynamicCache(), use_cache=True)
        decided = fluxc.last_route(fm).clone()
        second = fm(input_ids=ids[:, 7:], past_key_values=first.past_key_values, use_cache=True)
    assert torch.equal(fluxc.last_route(fm), decided)
    for b in range(2):
        routes = ["full" if r else "sparse" for r in decided[b].tolist()]
        forced = fluxc.compile(model, route=routes, config=cfg)
        with torch.no_grad():
            f1 = forced(input_ids=ids[b:b + 1, :7], past_key_values=DynamicCache(), use_cache=True)
            f2 = forced(input_ids=ids[b:b + 1, 7:], past_key_values=f1.past_key_values, use_cache=True)
        torch.testing.assert_close(second.logits[b:b + 1], f2.logits, atol=1e-5, rtol=0)


def test_custom_op_gradients_match_plain_autograd():
    from fluxc.ops.attention import routed_attention_reference
    from fluxc.ops.router import router_logits_reference

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 8, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    mask = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 1, 7, 7).clone()
    mask[1, :, 2:, :2] = False  # left padding of sequence 1 (its padding rows still see themselves: no NaN)
    route = torch.tensor([True, False])
    qpos, _, start = torch.ops.fluxc.positions(q, k, mask, False, False, 0)
    spec = SiteSpec(is_causal=False, scale=0.3, softcap=5.0, math="eager", softmax_fp32=True, pattern="streaming",
                    sink=1, window=2, block=1, block_exact=False, n_last=0, impl="reference")
    grad = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    got = torch.autograd.grad(torch.ops.fluxc.routed_attention(q, k, v, mask, route, qpos, start, spec.encode()),
                              (q, k, v), grad)
    want = torch.autograd.grad(routed_attention_reference(q, k, v, mask, route, qpos, start, spec), (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
        assert a.abs().sum() > 0
    router = fluxc.ops.LayerRouter(8, (8, 8, 8, 4)).double()
    x = torch.randn(2, 7, 4, 8, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(2, 7, dtype=torch.bool)
    g2 = torch.randn(2, 2, dtype=torch.float64)
    got = torch.autograd.grad(router(x, valid, 3), [x, *router.weights()], g2)
    want = torch.autograd.grad(router_logits_reference(x, valid, router.weights(), 3), [x, *router.weights()], g2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
