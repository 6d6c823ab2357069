"""GPU tests of the flash-attn-4 implementation (`impl="fa4"`): its full branch against the float64 reference
(GQA, right padding, soft-cap, the model's own window), routed batches against the Triton kernel, and the choice
`auto` makes. Skipped without a CUDA GPU of SM90/SM100 with flash-attn-4 installed."""

from __future__ import annotations

import pytest
import torch

from fluxc.kernels import fa4
from fluxc.kernels import reference as ref

_WHY = fa4.unavailable_reason(torch.device("cuda")) if torch.cuda.is_available() else "needs a CUDA GPU"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_WHY is not None, reason=str(_WHY))]

RULE = dict(sink=128, window=256, block=128, block_exact=True, pattern="streaming", n_last=0)


def _inputs(batch: int, q_heads: int, kv_heads: int, length: int, head_dim: int, seed: int):
    g = torch.Generator("cuda").manual_seed(seed)
    q = torch.randn(batch, q_heads, length, head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
    return q, k, v


def _check(out, q, k, v, route, kv_lens, q_lens, **kw):
    exact = ref.routed_attention_reference(q.double(), k.double(), v.double(), route, kv_lens, q_lens, **kw)
    low = ref.routed_attention_reference(q, k, v, route, kv_lens, q_lens, **kw)
    rows = (torch.arange(q.shape[2], device="cuda")[None, :] < q_lens[:, None])[:, None, :, None]
    err = ((out.double() - exact) * rows).abs().max().item()
    torch_err = ((low.double() - exact) * rows).abs().max().item()
    assert err <= 2 * torch_err + 1e-4, (err, torch_err)
    assert (out * ~rows == 0).all()  # padding query rows are zero


@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(8, 2, 128), (9, 3, 64), (32, 4, 128)])
@pytest.mark.parametrize("padded", [False, True])
def test_full_branch_matches_reference(q_heads, kv_heads, head_dim, padded):
    q, k, v = _inputs(2, q_heads, kv_heads, 1000, head_dim, seed=head_dim + q_heads)
    lens = torch.tensor([1000, 700] if padded else [1000, 1000], dtype=torch.int32, device="cuda")
    route = torch.ones(2, dtype=torch.bool, device="cuda")
    scale = head_dim ** -0.5
    out = fa4.routed_prefill_fa4(q, k, v, route, lens, lens, scale=scale, **RULE)
    _check(out, q, k, v, route, lens, lens, scale=scale, **RULE)


@pytest.mark.parametrize("softcap,native_window", [(30.0, 0), (0.0, 300)])
def test_full_branch_softcap_and_own_window(softcap, native_window):
    q, k, v = _inputs(1, 8, 2, 1500, 128, seed=11)
    lens = torch.full((1,), 1500, dtype=torch.int32, device="cuda")
    route = torch.ones(1, dtype=torch.bool, device="cuda")
    kw = dict(scale=128 ** -0.5, softcap=softcap, native_window=native_window, **RULE)
    _check(fa4.routed_prefill_fa4(q, k, v, route, lens, lens, **kw), q, k, v, route, lens, lens, **kw)


def test_mixed_and_sparse_batches_run_the_triton_kernel_in_one_launch(monkeypatch):
    from fluxc.kernels import attention

    q, k, v = _inputs(2, 8, 2, 1200, 128, seed=3)
    lens = torch.full((2,), 1200, dtype=torch.int32, device="cuda")
    calls = {"dense": 0, "triton": 0}
    dense, routed = fa4.full_prefill_fa4, attention.routed_prefill
    monkeypatch.setattr(fa4, "full_prefill_fa4", lambda *a, **kw: calls.__setitem__("dense", calls["dense"] + 1)
                        or dense(*a, **kw))
    monkeypatch.setattr(attention, "routed_prefill", lambda *a, **kw: calls.__setitem__("triton", calls["triton"] + 1)
                        or routed(*a, **kw))
    for routes in ([True, False], [False, False], [True, True]):
        route = torch.tensor(routes, device="cuda")
        out = fa4.routed_prefill_fa4(q, k, v, route, lens, lens, scale=128 ** -0.5, **RULE)
        _check(out, q, k, v, route, lens, lens, scale=128 ** -0.5, **RULE)
    assert calls == {"dense": 1, "triton": 2}


def test_sparse_branch_on_flash_attn_4_matches_reference_and_compiles_once():
    """sparse="flash": sparse and mixed batches (right padding, GQA) through FlexAttention on flash-attn-4's kernel
    against float64; new prompt lengths after the first two reuse the compiled kernel (dynamic shapes)."""
    import torch._dynamo.utils as dynamo_utils

    scale = 128 ** -0.5
    graphs = []
    for length, routes, lens in ((1100, [False, False], [1100, 900]), (1500, [True, False], [1500, 1500]),
                                 (2300, [False, True], [2000, 2300]), (3000, [False, False], [3000, 2500])):
        q, k, v = _inputs(2, 8, 2, length, 128, seed=length)
        route = torch.tensor(routes, device="cuda")
        kv = torch.tensor(lens, dtype=torch.int32, device="cuda")
        out = fa4.routed_prefill_fa4(q, k, v, route, kv, kv, scale=scale, sparse="flash", **RULE)
        _check(out, q, k, v, route, kv, kv, scale=scale, **RULE)
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    assert graphs[3] == graphs[1], graphs  # lengths 2300 and 3000 compiled nothing new


def test_auto_picks_fa4_and_explicit_fa4_runs_it(monkeypatch):
    from fluxc.ops.dispatch import resolve_impl, run_kernel
    from fluxc.spec import SiteSpec

    assert resolve_impl("auto", torch.device("cuda")) == "fa4"
    assert resolve_impl("fa4", torch.device("cuda")) == "fa4"
    q, k, v = _inputs(1, 8, 2, 512, 128, seed=4)
    calls = []
    dense = fa4.full_prefill_fa4
    monkeypatch.setattr(fa4, "full_prefill_fa4", lambda *a, **kw: calls.append(1) or dense(*a, **kw))
    spec = SiteSpec(is_causal=True, scale=128 ** -0.5, sink=128, window=256, block=128, block_exact=True, n_last=0)
    qpos = torch.arange(512, device="cuda")[None]
    start = torch.zeros(1, dtype=torch.long, device="cuda")
    route = torch.ones(1, dtype=torch.bool, device="cuda")
    run_kernel("fa4", q, k, v, None, route, qpos, start, spec, explicit=True)
    assert calls == [1]
    run_kernel("fa4", q, k, v, None, route, qpos, start, spec, explicit=False)  # auto below 8K: no host read
    assert calls == [1]
