"""The pass on tiny random HF decoders: sites, full-route exactness, sparse vs an independent reference,
mixed routes, router decisions, and the `flux` torch.compile backend."""

from __future__ import annotations

import pytest
import torch

import fluxc
from fluxc.passes import counters

from hf_models import CASES, Reference, batch, reference_router, run_reference, tiny_model

CFG = fluxc.FluxConfig(sink=2, window=4, block=2, block_exact=True, compiler="eager")
TOKEN_CFG = CFG.replace(block_exact=False, sink=1, window=3)
PADS = [0, 3]


def _real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.bool()]


@pytest.mark.parametrize("arch,impl", CASES)
def test_full_route_matches_untouched_model(arch, impl):
    model = tiny_model(arch, impl)
    ids, mask = batch(left_pad=3)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        counters.clear()
        fm = fluxc.compile(model, route="full", config=CFG)
        out = fm(input_ids=ids, attention_mask=mask).logits
    sites = fluxc.sites(fm)
    assert len(sites) == model.config.num_hidden_layers
    assert counters["sites_rewritten"] == len(sites) and counters["sites_kept"] == 0
    assert all(s.routable for s in sites)
    assert [s.layer for s in sites] == list(range(len(sites)))
    assert all(s.module == f"model.layers.{s.layer}.self_attn" for s in sites)
    assert {s.kind for s in sites} == {"sdpa" if impl == "sdpa" else "eager"}
    assert sites[0].q_heads == 4 and sites[0].kv_heads == 2
    torch.testing.assert_close(_real(out, mask), _real(ref, mask), atol=1e-5, rtol=0)
    assert fluxc.last_route(fm).tolist() == [[True] * len(sites)] * 2
    with torch.no_grad():
        fm(input_ids=ids[:1], attention_mask=mask[:1])  # a smaller batch replaces the stored decisions
    assert fluxc.last_route(fm).tolist() == [[True] * len(sites)]


@pytest.mark.parametrize("arch,impl", CASES)
@pytest.mark.parametrize("cfg", [CFG, TOKEN_CFG], ids=["block", "token"])
def test_sparse_and_mixed_routes_match_dense_mask_reference(arch, impl, cfg):
    model = tiny_model(arch, impl)
    ids, mask = batch(left_pad=3)
    n = model.config.num_hidden_layers
    for routes in (["sparse"] * n, ["full", "sparse", "full"][:n]):
        with torch.no_grad():
            fm = fluxc.compile(model, route=routes, config=cfg)
            out = fm(input_ids=ids, attention_mask=mask).logits
        ref = run_reference(model, ids, mask, Reference(routes, PADS, cfg.sink, cfg.window, cfg.block, cfg.block_exact))
        torch.testing.assert_close(_real(out, mask), _real(ref, mask), atol=1e-5, rtol=0)
        assert fluxc.last_route(fm).tolist() == [[r == "full" for r in routes]] * 2
    full = model(input_ids=ids, attention_mask=mask).logits
    assert (_real(out, mask) - _real(full, mask)).abs().max() > 1e-3  # the sparse branch really changes outputs


def _routers_with_mixed_decisions(model, ids, mask, cfg, head_dim):
    """Random small routers whose last bias is set, layer by layer with the independent reference, so that
    the two sequences of the batch take different branches (router tests then see mixed decisions)."""
    torch.manual_seed(0)
    n = model.config.num_hidden_layers
    routers = torch.nn.ModuleList(fluxc.ops.LayerRouter(head_dim, (32, 16, 16, 8)) for _ in range(n))
    with torch.no_grad():
        for p in routers.parameters():
            p.normal_(0.0, 0.5)
    for layer in range(n):
        weights = [{k: v.detach().clone() for k, v in r.named_parameters()} for r in routers]
        route_fn, hooks, margins = reference_router(model, weights, cfg.pool_size, PADS)
        run_reference(model, ids, mask, Reference(None, PADS, cfg.sink, cfg.window, cfg.block, cfg.block_exact,
                                                  router=route_fn))
        for h in hooks:
            h.remove()
        with torch.no_grad():
            routers[layer].head[4].bias[1] -= margins[layer].mean()
    return routers


@pytest.mark.parametrize("arch,impl", CASES)
def test_router_decisions_match_eager_reimplementation(arch, impl, tmp_path):
    model = tiny_model(arch, impl)
    ids, mask = batch(left_pad=3)
    heads = model.config.num_attention_heads
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // heads
    cfg = CFG.replace(router_hidden=(32, 16, 16, 8), pool_size=4)
    routers = _routers_with_mixed_decisions(model, ids, mask, cfg, head_dim)
    path = tmp_path / "routers.safetensors"
    fp = fluxc.Fingerprint(type(model).__name__, len(routers), heads, model.config.num_key_value_heads, head_dim)
    fluxc.save_routers(path, routers, cfg, fp, {"test": "random"})
    with torch.no_grad():
        counters.clear()
        fm = fluxc.compile(model, str(path), config=cfg)
        out = fm(input_ids=ids, attention_mask=mask).logits
    assert counters["routers_inserted"] == len(routers)
    weights = [{k: v.detach() for k, v in r.named_parameters()} for r in routers]
    route_fn, hooks, _ = reference_router(model, weights, cfg.pool_size, PADS)
    ref = Reference(None, PADS, cfg.sink, cfg.window, cfg.block, cfg.block_exact, router=route_fn)
    ref_logits = run_reference(model, ids, mask, ref)
    for h in hooks:
        h.remove()
    expected = torch.stack([ref.decisions[i] for i in range(len(routers))], dim=1)  # (B, L)
    got = fluxc.last_route(fm)
    assert got.tolist() == expected.tolist()
    assert got.any() and not got.all()  # mixed decisions: both branches exercised
    assert (got[0] != got[1]).any()  # per-sequence decisions
    torch.testing.assert_close(_real(out, mask), _real(ref_logits, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,impl", CASES)
def test_flux_backend_matches_fluxc_compile(arch, impl):
    torch._dynamo.reset()  # backend tests compile the raw model class: start from an empty Dynamo cache
    model = tiny_model(arch, impl)
    ids, mask = batch(left_pad=3)
    routes = ["sparse", "full", "sparse"]
    with torch.no_grad():
        expected = fluxc.compile(model, route=routes, config=CFG)(input_ids=ids, attention_mask=mask).logits
        state = fluxc.RouteState()
        compiled = torch.compile(model, backend="flux", fullgraph=True,
                                 options={"route": routes, "config": CFG.to_dict(), "state": state})
        out = compiled(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert fluxc.last_route(state).tolist() == [[False, True, False]] * 2
    assert fluxc.last_route(compiled).tolist() == [[False, True, False]] * 2
    assert len(fluxc.sites(compiled)) == 3
    torch._dynamo.reset()
