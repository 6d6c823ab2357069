"""The pass on decoders written in plain PyTorch (gpt-fast and nanoGPT styles): no transformers involved."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fluxc
from fluxc.passes import counters

from hf_models import dense_sa_mask
from plain_decoders import PlainDecoder

CFG = fluxc.FluxConfig(sink=2, window=4, block=2, block_exact=True, pool_size=3, router_hidden=(16, 8, 8, 4),
                       compiler="eager")


def _model(style):
    torch.manual_seed(0)
    model = PlainDecoder(style).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model


def _reference(model, idx, routes, cfg):
    t = idx.shape[1]
    causal = torch.ones(idx.shape[0], t, t, dtype=torch.bool).tril()
    sa = dense_sa_mask(causal, [0] * idx.shape[0], sink=cfg.sink, window=cfg.window, block=cfg.block,
                       block_exact=cfg.block_exact)
    for block, route in zip(model.blocks, routes):
        block.attention.reference_keep = None if route == "full" else sa
    try:
        with torch.no_grad():
            return model(idx)
    finally:
        for block in model.blocks:
            block.attention.reference_keep = None


@pytest.mark.parametrize("style,kind", [("fast", "sdpa"), ("nano", "eager")])
def test_plain_decoder_sites_and_routes(style, kind):
    model = _model(style)
    idx = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = model(idx)
        counters.clear()
        fm = fluxc.compile(model, route="full", config=CFG)
        out = fm(idx)
    sites = fluxc.sites(fm)
    assert [s.kind for s in sites] == [kind] * 3
    assert [s.module for s in sites] == [f"blocks.{i}.attention" for i in range(3)]
    assert counters["sites_rewritten"] == 3
    assert sites[0].mask == ("causal" if style == "fast" else "fill")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for routes in (["sparse"] * 3, ["sparse", "full", "sparse"]):
        with torch.no_grad():
            out = fluxc.compile(model, route=routes, config=CFG)(idx)
        torch.testing.assert_close(out, _reference(model, idx, routes, CFG), atol=1e-5, rtol=0)


@pytest.mark.parametrize("style", ["fast", "nano"])
def test_plain_decoder_router_input_is_pre_rope_query(style, tmp_path):
    model = _model(style)
    idx = torch.randint(0, 97, (2, 11))
    torch.manual_seed(1)
    routers = torch.nn.ModuleList(fluxc.ops.LayerRouter(16, CFG.router_hidden) for _ in range(3))
    path = tmp_path / "r.safetensors"
    fluxc.save_routers(path, routers, CFG, fluxc.Fingerprint("PlainDecoder", 3, 4, 2 if style == "fast" else 4, 16))
    with torch.no_grad():
        fm = fluxc.compile(model, str(path), config=CFG)
        out = fm(idx)
    got = fluxc.last_route(fm)
    # Replay with the decisions fluxc took; the untouched model records each layer's pre-RoPE query.
    routes_per_seq = []
    for b in range(2):
        routes = ["full" if r else "sparse" for r in got[b].tolist()]
        ref = _reference(model, idx[b:b + 1], routes, CFG)
        torch.testing.assert_close(out[b:b + 1], ref, atol=1e-5, rtol=0)
        expected = []
        for block, router in zip(model.blocks, routers):
            q = block.attention.last_pre_rope.float()  # (1, T, H, D), recorded by the reference run
            pooled = torch.cat([q[0, :CFG.pool_size], q[0, -CFG.pool_size:]]).mean(0).mean(0)
            w = dict(router.named_parameters())
            x = F.linear(F.silu(F.linear(pooled, w["feature.0.weight"], w["feature.0.bias"])), w["feature.2.weight"],
                         w["feature.2.bias"])
            x = F.silu(F.linear(x, w["head.0.weight"], w["head.0.bias"]))
            x = F.silu(F.linear(x, w["head.2.weight"], w["head.2.bias"]))
            expected.append(bool(F.linear(x, w["head.4.weight"], w["head.4.bias"]).argmax() == 1))
        routes_per_seq.append(expected)
    assert got.tolist() == routes_per_seq


class FlexDecoderLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        t = x.shape[1]
        q, k, v = self.qkv(x).view(x.shape[0], t, 3, 4, 8).permute(2, 0, 3, 1, 4)
        block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, t, t, device="cpu")
        return flex_attention(q, k, v, block_mask=block_mask)


def test_flex_attention_site_is_found_and_kept():
    model = FlexDecoderLayer()
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        ref = model(x)
        fm = fluxc.compile(model, route="full", config=CFG)
        torch.testing.assert_close(fm(x), ref)
    (site,) = fluxc.sites(fm)
    assert site.kind == "flex" and site.mask == "block_mask" and not site.routable
    assert "not routed yet" in site.reason
    with pytest.raises(fluxc.RouteError, match="kept as-is"), torch.no_grad():
        fluxc.compile(model, route="sparse", config=CFG)(x)
