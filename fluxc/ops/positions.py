"""`fluxc::positions`: query positions, real-token flags and sequence starts read off a site's mask."""

from __future__ import annotations

import torch
from torch import Tensor

from fluxc.ops.masks import allowed_mask, mask_positions


@torch.library.custom_op("fluxc::positions", mutates_args=())
def flux_positions(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, bottom_right: bool,
                   native_window: int) -> tuple[Tensor, Tensor, Tensor]:
    """(qpos (B, Tq) int64, valid (B, Tq) bool, key_start (B,) int64) for q (B, H, Tq, D), k (B, Hkv, Tk, D)."""
    allowed = allowed_mask(attn_mask, is_causal, q.shape[0], q.shape[2], k.shape[2], q.device,
                           bottom_right=bottom_right, native_window=native_window)
    qpos, valid, key_start = mask_positions(allowed)
    return qpos.contiguous(), valid.contiguous(), key_start.contiguous()


@flux_positions.register_fake
def _(q, k, attn_mask, is_causal, bottom_right, native_window):
    batch, q_len = q.shape[0], q.shape[2]
    return (q.new_empty((batch, q_len), dtype=torch.int64), q.new_empty((batch, q_len), dtype=torch.bool),
            q.new_empty((batch,), dtype=torch.int64))


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
