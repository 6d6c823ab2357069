"""Implementation choice: explicit requests never fall back; automatic fallbacks are logged."""

import logging

import pytest
import torch

import fluxc
from fluxc.ops.dispatch import resolve_impl, run_kernel, unsupported_reason
from fluxc.spec import SiteSpec


def _args():
    q, k, v = torch.randn(1, 2, 4, 64, dtype=torch.float16), torch.randn(1, 2, 4, 64, dtype=torch.float16), torch.randn(1, 2, 4, 64, dtype=torch.float16)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    return q, k, v, mask


def test_resolve_impl_on_cpu():
    assert resolve_impl("auto", torch.device("cpu")) == "reference"
    assert resolve_impl("reference", torch.device("cpu")) == "reference"
    with pytest.raises(fluxc.ImplementationError, match="needs CUDA"):
        resolve_impl("triton", torch.device("cpu"))
    with pytest.raises(fluxc.ImplementationError, match="needs CUDA"):
        resolve_impl("flex", torch.device("cpu"))


def test_materialised_masks_fall_back_only_when_automatic(caplog):
    q, k, v, mask = _args()
    route, qpos, start = torch.tensor([True]), torch.arange(4)[None], torch.zeros(1, dtype=torch.long)
    spec = SiteSpec(is_causal=False, scale=0.125, softcap=0.0, pattern="streaming", sink=1, window=2, block=1,
                    block_exact=False, n_last=0)
    assert "materialised mask" in unsupported_reason(q, k, mask, False)
    with caplog.at_level(logging.INFO, logger="fluxc"):
        assert run_kernel("triton", q, k, v, mask, route, qpos, start, spec, explicit=False) is None
    assert "runs the reference implementation: the site passes a materialised mask" in caplog.text
    with pytest.raises(fluxc.ImplementationError, match="impl='triton' cannot run this attention site"):
        run_kernel("triton", q, k, v, mask, route, qpos, start, spec, explicit=True)
    assert unsupported_reason(q, k, None, True) is None
    assert "head_dim=32" in unsupported_reason(q[..., :32], k[..., :32], None, True)


def _long_prefill(device: str, routes: list[bool], tokens: int = 8192):
    gen = torch.Generator(device).manual_seed(5)
    shape = (len(routes), 2, tokens, 64)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(3))
    qpos = torch.arange(tokens, device=device).expand(len(routes), -1)
    start = torch.zeros(len(routes), dtype=torch.long, device=device)
    spec = SiteSpec(is_causal=True, scale=0.125, softcap=0.0, pattern="streaming", sink=64, window=512, block=64,
                    block_exact=True, n_last=0)
    return q, k, v, torch.tensor(routes, device=device), qpos, start, spec


def test_host_dispatch_only_for_long_automatic_cuda_prefill():
    from fluxc.ops.dispatch import HOST_DISPATCH_MIN_TOKENS, host_dispatch

    long_cpu = torch.empty(1, 2, HOST_DISPATCH_MIN_TOKENS, 64)
    assert not host_dispatch(long_cpu, explicit=False)  # CPU: nothing to hand to cuDNN
    if torch.cuda.is_available():
        long_gpu = long_cpu.cuda()
        assert host_dispatch(long_gpu, explicit=False)
        assert not host_dispatch(long_gpu, explicit=True)  # impl='triton' asked for the Triton kernel
        assert not host_dispatch(long_gpu[:, :, : HOST_DISPATCH_MIN_TOKENS - 1], explicit=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("routes", [[True, True], [True, False]])
def test_long_all_full_prefill_runs_sdpa(monkeypatch, routes):
    """`auto` at 8K tokens: an all-full batch never reaches the Triton kernel, a mixed one does; both match
    the float64 reference within twice PyTorch's own bf16 error."""
    from fluxc.kernels import attention as triton_kernels
    from fluxc.ops.attention import routed_attention_reference

    q, k, v, route, qpos, start, spec = _long_prefill("cuda", routes)
    calls = []
    triton_prefill = triton_kernels.routed_prefill
    monkeypatch.setattr(triton_kernels, "routed_prefill", lambda *a, **kw: calls.append(1) or triton_prefill(*a, **kw))
    out = run_kernel("triton", q, k, v, None, route, qpos, start, spec, explicit=False)
    assert len(calls) == (0 if all(routes) else 1)
    exact = routed_attention_reference(q.double(), k.double(), v.double(), None, route, qpos, start, spec)
    low = routed_attention_reference(q, k, v, None, route, qpos, start, spec)
    assert (out.double() - exact).abs().max() <= 2 * (low.double() - exact).abs().max() + 1e-4


def test_fa4_requested_where_it_cannot_run_names_what_is_missing(monkeypatch):
    from fluxc.kernels import fa4

    with pytest.raises(fluxc.ImplementationError, match=r"impl='fa4' cannot run: device cpu is not a CUDA GPU"):
        resolve_impl("fa4", torch.device("cpu"))
    fa4._importable.cache_clear()
    monkeypatch.setattr(fa4.importlib.util, "find_spec", lambda name: None)
    try:
        assert "flash_attn.cute is not importable: install flash-attn-4 (pip install 'fluxc[fa4]')" in fa4._importable()
    finally:
        fa4._importable.cache_clear()
    assert fluxc.FluxConfig(impl="fa4").impl == "fa4"
    with pytest.raises(fluxc.ConfigError, match="'fa4'"):
        fluxc.FluxConfig(impl="fa5")


def test_kernel_output_layout_matches_the_ops_fake_under_inductor(monkeypatch):
    """A library kernel may hand back another memory layout (cuDNN SDPA writes (B, T, H, D)); the op returns
    the contiguous layout its fake promises, or Inductor's stride assertion fails at run time."""
    from fluxc.ops import attention as attention_op

    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))  # (B, H, T, D)
    route, qpos, start = torch.tensor([True, False]), torch.arange(16)[None].expand(2, -1), torch.zeros(2, dtype=torch.long)
    spec = SiteSpec(is_causal=True, scale=8 ** -0.5, sink=2, window=4, block=2, block_exact=True, n_last=0)
    reference = attention_op.routed_attention_reference(q, k, v, None, route, qpos, start, spec)

    def transposed_layout(*args, **kwargs):
        return reference.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, T, D) over (B, T, H, D) memory

    monkeypatch.setattr(attention_op, "resolve_impl", lambda impl, device: "triton")
    monkeypatch.setattr(attention_op, "run_kernel", transposed_layout)

    def site(q, k, v):
        return torch.ops.fluxc.routed_attention(q, k, v, None, route, qpos, start, spec.encode()) * 2

    torch._dynamo.reset()
    out = torch.compile(site, backend="inductor", fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, reference * 2)
