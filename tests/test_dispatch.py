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
