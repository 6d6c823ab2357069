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


class FlexDecoder(torch.nn.Module):
    """Two flex-attention layers with a padding-aware causal mask_mod and a relative score_mod.
    `reference_keep` (B, T, T) is ANDed into the mask_mod by the untouched code (independent reference)."""

    def __init__(self, heads=4, head_dim=16, layers=2):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        dim = heads * head_dim
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.out = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))
        self.reference_keep: list | None = None

    def forward(self, x, pad):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        b, t, _ = x.shape
        for layer, (qkv, out) in enumerate(zip(self.qkv, self.out)):
            q, k, v = qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            keep = None if self.reference_keep is None else self.reference_keep[layer]

            def causal_padded(bi, h, qi, ki):
                return (qi >= ki) & (ki >= pad[bi])

            def with_reference(bi, h, qi, ki):
                return causal_padded(bi, h, qi, ki) & keep[bi, qi, ki]  # noqa: B023 (used within this iteration)

            mask_mod = causal_padded if keep is None else with_reference

            block_mask = create_block_mask(mask_mod, b, None, t, t, device="cpu")
            y = flex_attention(q, k, v, block_mask=block_mask, score_mod=lambda s, bi, h, qi, ki: s - 0.05 * (qi - ki))
            x = x + out(y.transpose(1, 2).reshape(b, t, -1))
        return x


def _flex_reference(model, x, pad, routes, cfg):
    b, t = x.shape[:2]
    causal = torch.ones(b, t, t, dtype=torch.bool).tril() & (torch.arange(t)[None, None, :] >= pad[:, None, None])
    sa = dense_sa_mask(causal, pad.tolist(), sink=cfg.sink, window=cfg.window, block=cfg.block,
                       block_exact=cfg.block_exact)
    model.reference_keep = [torch.where(torch.tensor(r)[:, None, None], torch.ones_like(sa), sa) for r in routes]
    try:
        with torch.no_grad():
            return model(x, pad)
    finally:
        model.reference_keep = None


def test_flex_attention_sites_are_routed():
    torch.manual_seed(0)
    model = FlexDecoder().eval()
    x, pad = torch.randn(2, 12, 64), torch.tensor([0, 3])
    real = torch.arange(12)[None, :] >= pad[:, None]  # compare real positions only
    with torch.no_grad():
        ref = model(x, pad)
        counters.clear()
        fm = fluxc.compile(model, route="full", config=CFG)
        torch.testing.assert_close(fm(x, pad)[real], ref[real], atol=1e-5, rtol=0)
    sites = fluxc.sites(fm)
    assert [s.kind for s in sites] == ["flex", "flex"] and all(s.routable for s in sites)
    assert counters["rewrite_flex"] == 2
    for cfg in (CFG, CFG.replace(block_exact=False, sink=1, window=3)):
        for routes in (["sparse", "sparse"], ["full", "sparse"]):
            with torch.no_grad():
                out = fluxc.compile(model, route=routes, config=cfg)(x, pad)
            expected = _flex_reference(model, x, pad, [[r == "full"] * 2 for r in routes], cfg)
            torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=0)
    assert (out[real] - ref[real]).abs().max() > 1e-3


def test_flex_attention_router_mixes_per_sequence(tmp_path):
    torch.manual_seed(0)
    model = FlexDecoder().eval()
    x, pad = torch.randn(2, 12, 64), torch.tensor([0, 3])
    real = torch.arange(12)[None, :] >= pad[:, None]
    torch.manual_seed(5)
    routers = torch.nn.ModuleList(fluxc.ops.LayerRouter(16, CFG.router_hidden) for _ in range(2))
    with torch.no_grad():
        for p in routers.parameters():
            p.normal_(0, 1.0)
    # Layer 0's decision computed independently: its query straight from qkv[0], pooled over real tokens.
    q0 = model.qkv[0](x).view(2, 12, 3, 4, 16)[:, :, 0].detach()  # (B, T, H, D)
    margins = []
    for b in range(2):
        real_q = q0[b, int(pad[b]):]
        pooled = torch.cat([real_q[:CFG.pool_size], real_q[-CFG.pool_size:]]).mean(0).mean(0)
        logits = routers[0].head(routers[0].feature(pooled)).detach()
        margins.append(logits[1] - logits[0])
    with torch.no_grad():
        routers[0].head[4].bias[1] -= (margins[0] + margins[1]) / 2
    expected_layer0 = [bool(m - (margins[0] + margins[1]) / 2 > 0) for m in margins]
    assert expected_layer0[0] != expected_layer0[1]
    path = tmp_path / "r.safetensors"
    fluxc.save_routers(path, routers, CFG, fluxc.Fingerprint("FlexDecoder", 2, 4, 4, 16))
    with torch.no_grad():
        fm = fluxc.compile(model, str(path), config=CFG)
        out = fm(x, pad)
    got = fluxc.last_route(fm)
    assert got[:, 0].tolist() == expected_layer0  # per-sequence decisions from the flex site's own query
    expected = _flex_reference(model, x, pad, [got[:, layer].tolist() for layer in range(2)], CFG)
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=0)


def test_flex_routed_under_inductor():
    # Inductor's CPU flex template needs the sequence to span whole blocks (128); short ones fail to
    # compile even without fluxc.
    torch.manual_seed(0)
    model = FlexDecoder().eval()
    x, pad = torch.randn(2, 128, 64), torch.tensor([0, 3])
    real = torch.arange(128)[None, :] >= pad[:, None]
    cfg = CFG.replace(sink=4, window=16, block=4)
    with torch.no_grad():
        eager = fluxc.compile(model, route=["full", "sparse"], config=cfg)(x, pad)
        inductor = fluxc.compile(model, route=["full", "sparse"], config=cfg.replace(compiler="inductor"))(x, pad)
    torch.testing.assert_close(inductor[real], eager[real], atol=1e-5, rtol=1e-5)
    expected = _flex_reference(model, x, pad, [[True, True], [False, False]], cfg)
    torch.testing.assert_close(eager[real], expected[real], atol=1e-5, rtol=0)
