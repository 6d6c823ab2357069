"""`fluxc::positions`: query positions, real-token flags and sequence starts read off a site's mask."""

from __future__ import annotations

import torch
from torch import Tensor

from fluxc.errors import MaskError
from fluxc.ops.masks import allowed_mask, mask_positions, maskless_positions


@torch.library.custom_op("fluxc::positions", mutates_args=())
def flux_positions(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, bottom_right: bool,
                   native_window: int) -> tuple[Tensor, Tensor, Tensor]:
    """(qpos (B, Tq) int64, valid (B, Tq) bool, key_start (B,) int64) for q (B, H, Tq, D), k (B, Hkv, Tk, D)."""
    if attn_mask is None:
        qpos, valid, key_start = maskless_positions(is_causal, q.shape[0], q.shape[2], k.shape[2], q.device,
                                                    bottom_right=bottom_right, native_window=native_window)
    else:
        allowed = allowed_mask(attn_mask, is_causal, q.shape[0], q.shape[2], k.shape[2], q.device,
                               bottom_right=bottom_right, native_window=native_window)
        qpos, valid, key_start = mask_positions(allowed)
    return qpos.contiguous(), valid.contiguous(), key_start.contiguous()


@flux_positions.register_fake
def _(q, k, attn_mask, is_causal, bottom_right, native_window):
    batch, q_len = q.shape[0], q.shape[2]
    return (q.new_empty((batch, q_len), dtype=torch.int64), q.new_empty((batch, q_len), dtype=torch.bool),
            q.new_empty((batch,), dtype=torch.int64))


@torch.library.custom_op("fluxc::causal_positions", mutates_args=())
def causal_positions(q: Tensor, k: Tensor, q_index: Tensor, k_index: Tensor, keys_allowed: Tensor | None,
                     check_contiguous: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Positions of a mask read as structure (`fluxc.passes.masks`): key j visible to query i iff
    k_index[j] <= q_index[i] and `keys_allowed` (the AND of the mask's per-key factors, broadcastable to
    (B, 1, 1, Tk); None: every key) holds. O(B * (Tq + Tk)); the (Tq, Tk) mask is never built.

    Returns qpos (B, Tq) int64 (the key index at the query's own position, which every sequence shares),
    valid (B, Tq) bool (the query's own key is real), key_start (B,) int64 (first real key a query sees) and
    key_mask (B, 1, 1, Tk) bool. With `check_contiguous` (the kernels take one run of real keys per sequence),
    real keys must be contiguous up to the last one a query sees: one host check, raising `MaskError`."""
    batch, kv_len = q.shape[0], k.shape[2]
    key_mask = torch.ones((batch, 1, 1, kv_len), dtype=torch.bool, device=q.device)
    if keys_allowed is not None:
        key_mask = key_mask & keys_allowed.to(device=q.device, dtype=torch.bool)
    keys = key_mask.view(batch, kv_len)  # (B, Tk)
    raw = torch.searchsorted(k_index.to(torch.int64).contiguous(), q_index.to(torch.int64).contiguous(), right=True) - 1
    raw = raw.clamp(-1, kv_len - 1)  # (Tq,) the last key at or before each query's position
    qpos = raw.expand(batch, -1).contiguous()  # (B, Tq)
    valid = (raw >= 0) & keys.gather(1, raw.clamp_min(0).expand(batch, -1))  # (B, Tq)
    key_idx = torch.arange(kv_len, device=q.device)  # (Tk,)
    seen = keys & (key_idx <= raw.amax())  # (B, Tk) real keys some query sees
    key_start = torch.where(seen, key_idx, kv_len).amin(dim=1).clamp_max(kv_len - 1)  # (B,)
    if check_contiguous:
        last = torch.where(seen, key_idx, -1).amax(dim=1)  # (B,)
        inside = (key_idx >= key_start[:, None]) & (key_idx <= last[:, None])  # (B, Tk)
        gaps = (inside & ~keys).any(dim=1)  # (B,)
        if bool(gaps.any()):  # the one host check: the kernels' key range cannot express a hole
            rows = gaps.nonzero().flatten().tolist()
            raise MaskError(f"attention_mask has zeros between real tokens of sequence(s) {rows[:8]}: fluxc's kernels "
                            f"take left or right padding only; pad each sequence on one side, or compile with "
                            f"impl='reference' (plain PyTorch, any mask)")
    return qpos, valid, key_start, key_mask


@causal_positions.register_fake
def _(q, k, q_index, k_index, keys_allowed, check_contiguous):
    batch, q_len, kv_len = q.shape[0], q.shape[2], k.shape[2]
    return (q.new_empty((batch, q_len), dtype=torch.int64), q.new_empty((batch, q_len), dtype=torch.bool),
            q.new_empty((batch,), dtype=torch.int64), q.new_empty((batch, 1, 1, kv_len), dtype=torch.bool))


@torch.library.custom_op("fluxc::materialize", mutates_args=())
def materialize(x: Tensor) -> Tensor:
    """A copy of `x` that compilers keep as a named buffer (Inductor's CPU flex template needs its score_mod
    buffers realized; pointwise results computed in the same graph fail to lower)."""
    return x.clone()


@materialize.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("fluxc::dense_copy", mutates_args=())
def dense_copy(x: Tensor) -> Tensor:
    """A contiguous copy of `x` whose layout compilers cannot change: operands of the export's per-layer
    `torch.cond`, whose branches AOTInductor compiles for contiguous operands (a plain `.contiguous()` is a clone
    that Inductor may lay out in another dimension order)."""
    return x.clone(memory_format=torch.contiguous_format)


@dense_copy.register_fake
def _(x):
    return x.new_empty(x.shape)  # contiguous, whatever x's strides


dense_copy.register_autograd(lambda ctx, grad: grad)  # an identity: torch.compile of an exported program traces it
