"""flash-attn sites: the pass matches flash-attn's registered op `flash_attn::_flash_attn_forward` (the op
Dynamo reaches through `flash_attn_func`). flash-attn builds only with CUDA, so where it is absent the test
registers a plain-PyTorch stand-in with the same name and schema (bottom-right causal, window, softcap)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

import fluxc
from fluxc.passes import counters

from hf_models import dense_sa_mask

if importlib.util.find_spec("flash_attn") is None:

    @torch.library.custom_op("flash_attn::_flash_attn_forward", mutates_args=())
    def _flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float,
                            causal: bool, window_size_left: int, window_size_right: int, softcap: float,
                            alibi_slopes: torch.Tensor | None, return_softmax: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        b, tq, h, d = q.shape
        tk = k.shape[1]
        rep = h // k.shape[2]
        qt = q.transpose(1, 2)  # (B, H, Tq, D)
        kt = k.transpose(1, 2).repeat_interleave(rep, 1)
        vt = v.transpose(1, 2).repeat_interleave(rep, 1)
        s = qt @ kt.transpose(-1, -2) * softmax_scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        pos = torch.arange(tq)[:, None] + (tk - tq)
        keys = torch.arange(tk)[None, :]
        allowed = (keys <= pos) if causal else torch.ones(tq, tk, dtype=torch.bool)
        if window_size_left >= 0:
            allowed = allowed & (pos - keys <= window_size_left)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
        out = (p @ vt).transpose(1, 2).contiguous()
        return out, torch.zeros(b, h, tq), torch.zeros(0), torch.zeros(2, dtype=torch.int64)

    @_flash_attn_forward.register_fake
    def _(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
          return_softmax):
        b, tq, h, _ = q.shape
        return (torch.empty_like(q), q.new_empty(b, h, tq, dtype=torch.float32), q.new_empty(0),
                q.new_empty(2, dtype=torch.int64))


class FlashModel(nn.Module):
    """Two layers calling flash-attn's op in (B, T, H, D) layout, GQA 4/2, with window and softcap."""

    def __init__(self, window_left=-1, softcap=0.0):
        super().__init__()
        self.q, self.kv = nn.Linear(64, 64), nn.Linear(64, 64)
        self.o = nn.Linear(64, 64)
        self.window_left, self.softcap = window_left, softcap

    def forward(self, x, past=None):  # past: (k, v) of earlier tokens, (B, Tp, Hkv, D)
        b, t, _ = x.shape
        for _ in range(2):
            q = self.q(x).view(b, t, 4, 16)
            k, v = self.kv(x).view(b, t, 2, 2, 16).unbind(2)
            if past is not None:
                k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
            out = torch.ops.flash_attn._flash_attn_forward(q, k, v, 0.0, 0.25, True, self.window_left, 0,
                                                           self.softcap, None, False)[0]
            x = x + self.o(out.reshape(b, t, 64))
        return x


CFG = fluxc.FluxConfig(sink=2, window=4, block=2, compiler="eager")


@pytest.mark.parametrize("window_left,softcap", [(-1, 0.0), (5, 0.0), (-1, 20.0)])
def test_flash_attn_sites_full_and_sparse(window_left, softcap):
    torch.manual_seed(0)
    model = FlashModel(window_left, softcap).eval()
    x = torch.randn(2, 11, 64)
    with torch.no_grad():
        ref = model(x)
        counters.clear()
        fm = fluxc.compile(model, route="full", config=CFG)
        torch.testing.assert_close(fm(x), ref, atol=1e-5, rtol=0)
        assert counters["rewrite_flash_attn"] == 2
        sites = fluxc.sites(fm)
        assert [s.kind for s in sites] == ["flash_attn"] * 2 and sites[0].kv_heads == 2
        sparse = fluxc.compile(model, route="sparse", config=CFG)(x)
    # independent reference: dense attention with causal (+ native window) AND the loop-built SA pattern
    t = x.shape[1]
    causal = torch.ones(2, t, t, dtype=torch.bool).tril()
    if window_left >= 0:
        causal &= (torch.arange(t)[:, None] - torch.arange(t)[None, :] <= window_left)
    keep = dense_sa_mask(causal, [0, 0], sink=CFG.sink, window=CFG.window, block=CFG.block, block_exact=True)
    with torch.no_grad():
        h = x
        for _ in range(2):
            q = model.q(h).view(2, t, 4, 16).transpose(1, 2)
            k, v = (z.transpose(1, 2).repeat_interleave(2, 1) for z in model.kv(h).view(2, t, 2, 2, 16).unbind(2))
            s = q @ k.transpose(-1, -2) * 0.25
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            p = torch.softmax(s.masked_fill(~keep[:, None], -math.inf), -1)
            h = h + model.o((p @ v).transpose(1, 2).reshape(2, t, 64))
    torch.testing.assert_close(sparse, h, atol=1e-5, rtol=0)


def test_flash_attn_bottom_right_causal_with_cached_keys():
    torch.manual_seed(0)
    model = FlashModel().eval()
    x = torch.randn(1, 3, 64)  # 3 new queries after 5 cached keys: queries are the last 3 positions
    past = (torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16))
    with torch.no_grad():
        ref = model(x, past)
        out = fluxc.compile(model, route="full", config=CFG)(x, past)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
