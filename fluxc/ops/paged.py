"""Ops of the paged KV cache: `fluxc::paged_write`, `fluxc::paged_view`, `fluxc::paged_attention`.

The pages (num_pages, page_size, Hkv, D) are shared by every layer and sequence (vLLM's layout); page 0 is
scratch, never handed out, where rows with no sequence write. A block table (B, W) int32 lists one layer's
pages of each sequence in order. A sequence routed to full attention in that layer keeps every key (key r at
slot r); one routed sparse keeps the ring of sink + window slots (`fluxc.patterns.ring_slot`), so memory
follows routes. `seq_lens` (B,) counts each sequence's keys, the ones being written included; 0 marks a row
with no sequence.

A decode step's cache hands the attention site `paged_view`s of the pages; the Flux pass replaces each such
site by one `paged_attention`, which reads routes, tables and lengths on the device: one graph serves every
routing mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fluxc import patterns
from fluxc.kernels import attention as triton_kernels
from fluxc.kernels.reference import paged_gather, paged_valid
from fluxc.ops.attention import routed_attention_reference
from fluxc.ops.dispatch import resolve_impl, run_paged_kernel
from fluxc.spec import SiteSpec


def write_rows(block_table: Tensor, seq_lens: Tensor, route: Tensor, count: int, page_size: int,
               spec: SiteSpec) -> Tensor:
    """(B, count) int64 rows of the pages viewed as (num_pages * page_size, Hkv, D) where the last `count` keys of
    each sequence go (positions seq_lens - count .. seq_lens - 1); rows with no sequence write to page 0."""
    positions = seq_lens.to(torch.int64)[:, None] - count + torch.arange(count, device=seq_lens.device)  # (B, T)
    live = positions >= 0
    positions = positions.clamp_min(0)
    ring = torch.where(positions < spec.sink, positions, patterns.ring_slot(positions, spec.sink, spec.window))
    slots = torch.where(route.to(torch.bool)[:, None], positions, ring)  # (B, T)
    pages = block_table.to(torch.int64).gather(1, slots // page_size)  # (B, T)
    return torch.where(live, pages * page_size + slots % page_size, 0)


@torch.library.custom_op("fluxc::paged_write", mutates_args=("k_pages", "v_pages"))
def paged_write(k_pages: Tensor, v_pages: Tensor, k_new: Tensor, v_new: Tensor, block_table: Tensor,
                seq_lens: Tensor, route: Tensor, spec: str) -> None:
    """Write k_new/v_new (B, Hkv, T, D), each sequence's last T keys, into their slots. T > 1 (a prompt) takes
    full-attention slots whatever the route: the route is decided by that same forward (`compact_ring` moves
    a sparse layer's keys to its ring afterwards)."""
    batch, heads, count, dim = k_new.shape
    if count > 1 and resolve_impl(SiteSpec.decode(spec).impl, k_new.device) != "reference" \
            and k_pages.dtype == k_new.dtype:  # one launch, not some twenty ops (a served prefill is host-bound)
        triton_kernels.paged_write_prompt(k_pages, v_pages, k_new, v_new, block_table, seq_lens)
        return
    route = torch.ones_like(route, dtype=torch.bool) if count > 1 else route
    rows = write_rows(block_table, seq_lens, route, count, k_pages.shape[1], SiteSpec.decode(spec)).flatten()
    k_pages.flatten(0, 1).index_copy_(0, rows, k_new.transpose(1, 2).reshape(-1, heads, dim).to(k_pages.dtype))
    v_pages.flatten(0, 1).index_copy_(0, rows, v_new.transpose(1, 2).reshape(-1, heads, v_new.shape[-1])
                                      .to(v_pages.dtype))


@paged_write.register_fake
def _(k_pages, v_pages, k_new, v_new, block_table, seq_lens, route, spec):
    return None


@torch.library.custom_op("fluxc::paged_view", mutates_args=())
def paged_view(pages: Tensor, block_table: Tensor, seq_lens: Tensor, route: Tensor, spec: str) -> Tensor:
    """(B, Hkv, W * page_size, D): each sequence's slots in order (a ring's slots are not positions: only
    `paged_attention` reads them right). What the cache gives the model's attention code, so that the traced
    site has the shapes it expects until the pass replaces it."""
    return paged_gather(pages, block_table).contiguous()


@paged_view.register_fake
def _(pages, block_table, seq_lens, route, spec):
    return pages.new_empty((block_table.shape[0], pages.shape[2], block_table.shape[1] * pages.shape[1],
                            pages.shape[3]))


def paged_attention_reference(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seq_lens: Tensor,
                              route: Tensor, spec: SiteSpec) -> Tensor:
    """Decode attention over the pages, as `routed_attention_reference` computes it with every key: the slots a
    sequence's query attends become the mask (a ring's slots already are the SA keys)."""
    k, v = paged_gather(k_pages, block_table), paged_gather(v_pages, block_table)  # (B, Hkv, S, D)
    valid = paged_valid(seq_lens, route, k.shape[2], **spec.rule)  # (B, S)
    # a reused page's stale slots may hold another request's NaN: a zero weight times NaN is still NaN
    k = torch.where(valid[:, None, :, None], k, torch.zeros((), dtype=k.dtype, device=k.device))
    v = torch.where(valid[:, None, :, None], v, torch.zeros((), dtype=v.dtype, device=v.device))
    batch = q.shape[0]
    qpos = (seq_lens.to(torch.int64) - 1).clamp_min(0).view(batch, 1)  # (B, 1)
    everything = torch.ones(batch, dtype=torch.bool, device=q.device)
    out = routed_attention_reference(q, k, v, valid[:, None, None, :], everything, qpos, torch.zeros_like(qpos[:, 0]),
                                     spec.replace(is_causal=False, pattern="streaming"))
    return torch.where(valid.any(-1)[:, None, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


@torch.library.custom_op("fluxc::paged_attention", mutates_args=())
def paged_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seq_lens: Tensor,
                    route: Tensor, spec: str) -> Tensor:
    """One decode token per sequence, q (B, Hq, 1, D), over its pages: full attention or its ring, by its route
    (B,) bool on the device. Rows with seq_lens 0 give zeros."""
    site = SiteSpec.decode(spec)
    chosen = resolve_impl(site.impl, q.device)
    if chosen != "reference":
        out = run_paged_kernel(chosen, q, k_pages, v_pages, block_table, seq_lens, route, site,
                               explicit=site.impl != "auto")
        if out is not None:
            return out
    return paged_attention_reference(q, k_pages, v_pages, block_table, seq_lens, route, site).contiguous()


@paged_attention.register_fake
def _(q, k_pages, v_pages, block_table, seq_lens, route, spec):
    return q.new_empty((*q.shape[:-1], v_pages.shape[-1]))


@torch.no_grad()
def compact_ring(k_pages: Tensor, v_pages: Tensor, block_table: Tensor, length: int, spec: SiteSpec) -> None:
    """After a prompt of `length` keys was written with full-attention slots into the pages of `block_table`
    (W,), move the keys a sparse layer keeps to their ring slots (the first ring pages of the same table)."""
    capacity = patterns.ring_capacity(spec.sink, spec.window)
    if length <= capacity:  # every key sits at its ring slot already (ring_slot(r) == r below the capacity)
        return
    page = k_pages.shape[1]
    slots = torch.arange(capacity, device=block_table.device)
    keys = torch.where(slots < spec.sink, slots, patterns.ring_key(slots, length - 1, spec.window))  # (C,)
    table = block_table.to(torch.int64)
    src = table[keys // page] * page + keys % page
    dst = table[slots // page] * page + slots % page
    for pages in (k_pages, v_pages):
        flat = pages.flatten(0, 1)
        flat.index_copy_(0, dst, flat.index_select(0, src))  # gathered first: sources and slots may overlap
