"""`fluxc::full_attention` (the FA branch of an exported per-layer choice) and `fluxc::dense_copy`: values against
a per-row loop in fp64, gradients by finite differences."""

from __future__ import annotations

import math

import pytest
import torch

import fluxc  # noqa: F401  (registers the ops)
from fluxc.spec import SiteSpec


def _loop_reference(q, k, v, allowed, scale, softcap):
    """Row by row: softmax over the allowed keys of each query. q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D)."""
    batch, heads, q_len, _ = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(batch, heads, q_len, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                keys = [j for j in range(k.shape[2]) if allowed[b, 0, i, j]]
                s = torch.stack([(q[b, h, i] * k[b, h // group, j]).sum() * scale for j in keys])
                if softcap:
                    s = torch.tanh(s / softcap) * softcap
                p = torch.softmax(s, 0)
                out[b, h, i] = sum(p[n] * v[b, h // group, j] for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("math_kind,softcap", [("sdpa", 0.0), ("eager", 0.0), ("eager", 5.0)])
def test_full_attention_matches_loop_reference_and_has_gradients(math_kind, softcap):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64)  # (B, Hq, Tq, D), GQA over 2 kv heads
    k, v = (torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64) for _ in range(2))  # (B, Hkv, Tk, D)
    rows, keys = torch.arange(5)[:, None] + 2, torch.arange(7)[None, :]
    allowed = (keys <= rows).expand(2, 1, 5, 7).clone()  # (B, 1, Tq, Tk) bottom-right causal
    allowed[1, :, :, 0] = False  # sequence 1: left padding of one key
    scale = 1 / math.sqrt(8)
    args = (allowed, SiteSpec(is_causal=False, scale=scale, softcap=softcap, math=math_kind, softmax_fp32=False).encode())
    out = torch.ops.fluxc.full_attention(q, k, v, *args)
    torch.testing.assert_close(out, _loop_reference(q, k, v, allowed, scale, softcap), atol=1e-12, rtol=0)
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda *qkv: torch.ops.fluxc.full_attention(*qkv, *args), inputs)


def test_dense_copy_is_a_contiguous_identity_with_gradient():
    x = torch.randn(3, 4, dtype=torch.float64).t().requires_grad_()  # a transposed view
    y = torch.ops.fluxc.dense_copy(x)
    assert y.is_contiguous() and torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    assert torch.autograd.gradcheck(torch.ops.fluxc.dense_copy, (x,))
