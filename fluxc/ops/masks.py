"""Plain-PyTorch semantics of the model's own mask and of the SA pattern (reference, any device).

Positions are read off the model's mask, so the same code serves HF masks (left/right padding,
native sliding windows, static caches) and plain ``is_causal`` attention:
- a query's position is the largest key index its row may see (causal attention sees itself);
- a query row is real when it sees something and its position is new (right-padding rows repeat
  the last real position, left-padding rows see nothing);
- a sequence starts at its first key that any query may see (left padding shifts it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fluxc.patterns import sa_allowed


def allowed_mask(attn_mask: Tensor | None, is_causal: bool, batch: int, q_len: int, kv_len: int,
                 device: torch.device, *, bottom_right: bool = False, native_window: int = 0) -> Tensor:
    """The model's own mask as bool 'may attend', broadcast to (B, H', Tq, Tk) with H' in {1, H}.

    Without a mask tensor: SDPA's `is_causal` is top-left aligned (query i sees keys 0..i); flash-attn's
    causal is bottom-right aligned (the queries are the last Tq keys) and may carry a native window.
    """
    if attn_mask is None:
        if not is_causal:
            return torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool, device=device)
        offset = kv_len - q_len if bottom_right else 0
        rows = torch.arange(q_len, device=device)[:, None] + offset  # (Tq, 1) query positions
        keys = torch.arange(kv_len, device=device)[None, :]  # (1, Tk)
        causal = keys <= rows  # (Tq, Tk)
        if native_window > 0:
            causal = causal & (rows - keys < native_window)
        return causal.expand(batch, 1, q_len, kv_len)
    if attn_mask.dtype == torch.bool:
        allowed = attn_mask
    else:
        allowed = attn_mask > torch.finfo(attn_mask.dtype).min / 2
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    return allowed.expand(batch, allowed.shape[1], q_len, kv_len)


def _new_positions(qpos: Tensor) -> Tensor:
    """valid (B, Tq): a query sees something and its position is past every earlier query's."""
    prev = torch.cummax(qpos, dim=1).values  # running max up to and including row i
    prev = torch.cat([torch.full_like(prev[:, :1], -1), prev[:, :-1]], dim=1)  # max over rows < i
    return (qpos >= 0) & (qpos > prev)


def mask_positions(allowed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(qpos (B, Tq) int64, valid (B, Tq) bool, key_start (B,) int64) from an allowed mask (B, H', Tq, Tk)."""
    seen = allowed.any(dim=1)  # (B, Tq, Tk)
    kv_len = seen.shape[-1]
    key_idx = torch.arange(kv_len, device=seen.device)  # (Tk,)
    qpos = torch.where(seen, key_idx, -1).amax(dim=-1)  # (B, Tq)
    key_seen = seen.any(dim=1)  # (B, Tk)
    key_start = torch.where(key_seen, key_idx, kv_len).amin(dim=-1).clamp_max(kv_len - 1)  # (B,)
    return qpos, _new_positions(qpos), key_start


def maskless_positions(is_causal: bool, batch: int, q_len: int, kv_len: int, device: torch.device, *,
                       bottom_right: bool = False, native_window: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """`mask_positions(allowed_mask(None, ...))` in O(Tq): each query row sees one run of keys [lo, hi], so the
    (Tq, Tk) mask is never built (a prompt of 8K tokens would build 64M flags per layer)."""
    rows = torch.arange(q_len, device=device)  # (Tq,)
    if is_causal:
        rows = rows + (kv_len - q_len if bottom_right else 0)  # each query's own key index
        hi = rows.clamp_max(kv_len - 1)
        lo = (rows - native_window + 1).clamp_min(0) if native_window > 0 else torch.zeros_like(rows)
    else:
        hi, lo = torch.full_like(rows, kv_len - 1), torch.zeros_like(rows)
    sees = hi >= lo  # (Tq,) a causal row before key 0 (hi < 0) or past its window sees nothing
    qpos = torch.where(sees, hi, -1).expand(batch, q_len).contiguous()  # (B, Tq)
    key_start = torch.where(sees, lo, kv_len).amin(dim=0, keepdim=True).clamp_max(kv_len - 1)  # (1,)
    return qpos, _new_positions(qpos), key_start.expand(batch).contiguous()


def sparse_allowed(qpos: Tensor, key_start: Tensor, kv_len: int, *, pattern: str, sink: int, window: int,
                   block: int, block_exact: bool, n_last: int, prefill: bool) -> Tensor:
    """SA pattern (B, Tq, Tk) bool (`fluxc.patterns`), in positions counted from each sequence's first key."""
    start = key_start[:, None, None]  # (B, 1, 1)
    keys = torch.arange(kv_len, device=qpos.device)[None, None, :] - start  # (B, 1, Tk)
    q = qpos[:, :, None] - start  # (B, Tq, 1)
    # the triangle's dense rows are the last prompt queries: prefill only
    last = qpos.amax(dim=1)[:, None, None] - start if pattern == "triangle" and prefill else None  # (B, 1, 1)
    return sa_allowed(q, keys, sink=sink, window=window, block=block, block_exact=block_exact, last=last,
                      n_last=n_last)
