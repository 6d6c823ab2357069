"""Dispatch from `fluxc::routed_attention` to the GPU kernels of `fluxc.kernels`.

The kernels take structural masks: causal + per-sequence key ranges. That is `is_causal` alone, or `is_causal`
with the key mask (B, 1, 1, Tk) of a mask the pass read as structure (`fluxc::causal_positions` checked that its
real keys are contiguous). A site whose mask is a materialised (Tq, Tk) tensor is not handed to them: `auto`
runs the reference and logs why; an explicit `impl` raises.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from fluxc.errors import ImplementationError

log = logging.getLogger("fluxc")


def is_key_mask(attn_mask: Tensor | None, is_causal: bool) -> bool:
    """True for a structural mask: `is_causal` with a bool key mask (B, 1, 1, Tk)."""
    return (attn_mask is not None and is_causal and attn_mask.dtype == torch.bool and attn_mask.dim() == 4
            and attn_mask.shape[1] == 1 and attn_mask.shape[2] == 1)


def unsupported_reason(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool,
                       bottom_right: bool = False) -> str | None:
    """Why the kernels cannot run this call, or None when they can."""
    q_len, kv_len, head_dim = q.shape[2], k.shape[2], q.shape[3]
    if head_dim not in (64, 128):
        return f"head_dim={head_dim} (kernels take 64 or 128)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (kernels take float16 or bfloat16)"
    if is_key_mask(attn_mask, is_causal):
        return None
    if attn_mask is not None:
        return "the site passes a materialised mask (kernels take causal + lengths)"
    if q_len > 1 and not (is_causal and (bottom_right or q_len == kv_len)):
        return "prefill without is_causal over the whole key range"
    if q_len == 1 and is_causal and not bottom_right and kv_len > 1:
        return "SDPA's top-left is_causal with one query sees only the first key"
    return None


def _decline(impl: str, why: str, explicit: bool, what: str, op: str) -> None:
    """An explicit `impl` that cannot run raises; `auto` logs why the reference runs instead."""
    if explicit:
        raise ImplementationError(f"impl={impl!r} cannot run {what}: {why}; use impl='auto' "
                                  f"(falls back to the reference, logged) or impl='reference'")
    log.info("fluxc: %s runs the reference implementation: %s", op, why)
    return None


def run_kernel(impl: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, route: Tensor, qpos: Tensor,
               key_start: Tensor, *, is_causal: bool, scale: float, softcap: float, pattern: str, sink: int,
               window: int, block: int, block_exact: bool, n_last: int, bottom_right: bool = False,
               native_window: int = 0, explicit: bool) -> Tensor | None:
    """Run `impl` ("triton" | "flex") or return None after logging why the reference must run instead."""
    why = unsupported_reason(q, k, attn_mask, is_causal, bottom_right)
    if why is not None:
        return _decline(impl, why, explicit, "this attention site", "routed attention")
    batch, _, q_len, _ = q.shape
    kv_len = k.shape[2]
    common = dict(scale=scale, sink=sink, window=window, block=block, block_exact=block_exact, softcap=softcap,
                  native_window=native_window)
    if is_key_mask(attn_mask, is_causal):
        if impl == "flex":
            return _decline(impl, "the FlexAttention lowering takes no key ranges (left padding)", explicit,
                            "this attention site", "routed attention")
        # consecutive query positions (the pass proved both index vectors are aranges): the last query sits at
        # key qpos[:, -1], so the keys are [key_start, qpos[:, -1]] and the queries the last q_len of them
        kv_lens = (qpos[:, -1] + 1).clamp(min=q_len).to(torch.int32)  # (B,)
        common["kv_start"] = key_start
    else:
        kv_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=q.device)
    if impl == "triton":
        from fluxc.kernels.attention import routed_decode, routed_prefill
    else:
        from fluxc.kernels.flex import routed_decode_flex as routed_decode
        from fluxc.kernels.flex import routed_prefill_flex as routed_prefill
    if q_len == 1:
        return routed_decode(q, k, v, route, kv_lens, **common)
    q_lens = torch.full((batch,), q_len, dtype=torch.int32, device=q.device)
    return routed_prefill(q, k, v, route, kv_lens, q_lens, pattern=pattern, n_last=n_last, **common)


def run_cache_kernel(impl: str, q: Tensor, k_store: Tensor, v_store: Tensor, lengths: Tensor, route: Tensor, *,
                     layout: int, scale: float, softcap: float, sink: int, window: int, block: int,
                     block_exact: bool, explicit: bool) -> Tensor | None:
    """Decode over the engine's compacted cache with the Triton kernels, or None after logging why not."""
    from fluxc.ops.cache import RING

    why = unsupported_reason(q[:, :, :1], k_store, None, False)
    if why is None and impl == "flex":
        why = "the FlexAttention lowering has no compacted-cache decode"
    if why is not None:
        return _decline(impl, why, explicit, "this decode step", "cache attention")
    kv_lens = lengths.to(torch.int32)
    common = dict(scale=scale, sink=sink, window=window, block=block, block_exact=block_exact, softcap=softcap)
    if layout == RING:
        from fluxc.kernels.attention import routed_decode_ring

        return routed_decode_ring(q, k_store, v_store, kv_lens, **common)
    from fluxc.kernels.attention import routed_decode

    return routed_decode(q, k_store, v_store, route, kv_lens, **common)
