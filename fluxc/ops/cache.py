"""KV-cache ops of the decode engine: `fluxc::cache_write` and `fluxc::cache_attention`.

After prefill the engine compacts each layer's cache (padding dropped, keys stored by *real* index r):
- DENSE: slot r holds key r; the layer keeps every key (FA, or a batch mixing FA and SA sequences).
- RING: only the sink and the window are kept (the layer is SA for every sequence), laid out as
  `fluxc.patterns.ring_slot` says: sinks keep their index, later keys cycle through the window slots.

`lengths` (B,) counts each sequence's real keys, the current query's own key included, so the query's
real position is lengths - 1. The decode graph's attention reads only `lengths` and the layout: no mask,
no router, no branch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fluxc import patterns
from fluxc.ops.attention import routed_attention_reference
from fluxc.ops.dispatch import resolve_impl, run_cache_kernel
from fluxc.spec import SiteSpec

DENSE, RING, MIXED = 0, 1, 2  # layouts: all sequences FA | all SA (evicted) | per-sequence route, dense
LAYOUT_NAMES = {DENSE: "full", RING: "sparse-ring", MIXED: "mixed"}


def ring_capacity(sink: int, window: int, block: int, block_exact: bool) -> int:
    """Slots of a ring layer: the sink plus the window (whole blocks when block-exact)."""
    return patterns.ring_capacity(sink, window)


def ring_supported(sink: int, window: int, block: int, block_exact: bool) -> str | None:
    """Why a ring cannot hold exactly the SA keys, or None when it can."""
    if block_exact and (sink % block or window % block):
        return f"block-exact ring needs sink ({sink}) and window ({window}) to be multiples of block ({block})"
    return None


def ring_slot(r: Tensor, sink: int, window: int, block: int, block_exact: bool) -> Tensor:
    """Slot of real key index r (any shape, int64) in a ring layer (`fluxc.patterns.ring_slot`)."""
    return torch.where(r < sink, r, patterns.ring_slot(r, sink, window))


def ring_keys(n: Tensor, sink: int, window: int, block: int, block_exact: bool) -> tuple[Tensor, Tensor]:
    """(r (B, C) int64, valid (B, C) bool): the real key index each slot holds when n[b] keys were written,
    and whether the query at position n - 1 may attend it (`fluxc.patterns.ring_valid`)."""
    j = torch.arange(ring_capacity(sink, window, block, block_exact), device=n.device)[None, :]  # (1, C)
    p = (n.to(torch.int64) - 1)[:, None]  # (B, 1) query position
    r = torch.where(j < sink, j, patterns.ring_key(j, p, window))
    return r, patterns.ring_valid(j, p, sink=sink, window=window, block=block, block_exact=block_exact)


def write_slots(lengths: Tensor, layout: int, spec: SiteSpec) -> Tensor:
    """(B,) int64 slot of each sequence's current token (real index lengths - 1; its ring slot in a ring layer)."""
    r = lengths.to(torch.int64) - 1  # (B,)
    return ring_slot(r, **spec.rule) if layout == RING else r


@torch.library.custom_op("fluxc::cache_write", mutates_args=("k_store", "v_store"))
def cache_write(k_store: Tensor, v_store: Tensor, k_new: Tensor, v_new: Tensor, lengths: Tensor, layout: int,
                spec: str, route: Tensor) -> None:
    """Write the current token's key/value (B, Hkv, 1, D) at real index lengths - 1 of each sequence.

    `spec` (a `SiteSpec`'s `encode()`) gives the ring's sink and window. `route` (B,) bool, the layer's stored
    route, is not used here: it travels with the write so that the pass finds it next to the store when it
    rewrites the layer's attention site."""
    batch, heads, _, dim = k_new.shape
    index = write_slots(lengths, layout, SiteSpec.decode(spec)).view(batch, 1, 1, 1).expand(batch, heads, 1, dim)
    k_store.scatter_(2, index, k_new.to(k_store.dtype))
    v_store.scatter_(2, index.expand(batch, heads, 1, v_new.shape[-1]), v_new.to(v_store.dtype))


@cache_write.register_fake
def _(k_store, v_store, k_new, v_new, lengths, layout, spec, route):
    return None


def cache_attention_reference(q: Tensor, k_store: Tensor, v_store: Tensor, lengths: Tensor, route: Tensor,
                              layout: int, spec: SiteSpec) -> Tensor:
    """Decode attention over a compacted cache, as `routed_attention_reference` computes it on the full cache."""
    batch, cap = q.shape[0], k_store.shape[2]
    n = lengths.to(torch.int64)  # (B,)
    if layout == RING:
        _, valid = ring_keys(n, **spec.rule)  # (B, C): the SA keys, already
        route = torch.ones_like(route, dtype=torch.bool)
    else:
        valid = torch.arange(cap, device=q.device)[None, :] < n[:, None]  # (B, C)
        if layout == DENSE:
            route = torch.ones_like(route, dtype=torch.bool)
    mask = valid[:, None, None, :]  # (B, 1, 1, C)
    qpos = (n - 1).view(batch, 1)  # (B, 1)
    key_start = torch.zeros_like(n)
    return routed_attention_reference(q, k_store, v_store, mask, route.to(torch.bool), qpos, key_start,
                                      spec.replace(is_causal=False, pattern="streaming"))


@torch.library.custom_op("fluxc::cache_attention", mutates_args=())
def cache_attention(q: Tensor, k_store: Tensor, v_store: Tensor, lengths: Tensor, route: Tensor, layout: int,
                    spec: str) -> Tensor:
    """One decode token per sequence, q (B, Hq, 1, D), against a compacted cache (B, Hkv, C, D)."""
    site = SiteSpec.decode(spec)
    chosen = resolve_impl(site.impl, q.device)
    if chosen != "reference":
        out = run_cache_kernel(chosen, q, k_store, v_store, lengths, route, ring=layout == RING, spec=site,
                               explicit=site.impl != "auto")
        if out is not None:
            return out
    return cache_attention_reference(q, k_store, v_store, lengths, route, layout, site).contiguous()


@cache_attention.register_fake
def _(q, k_store, v_store, lengths, route, layout, spec):
    return q.new_empty((*q.shape[:-1], v_store.shape[-1]))
