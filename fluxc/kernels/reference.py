"""Plain-PyTorch reference for routed attention: the semantics the kernels implement.

Dense (materialises the (B, Tq, Tk) mask), any device, any float dtype; ``compute_dtype=torch.float64``
gives the reference tests compare against, the input's own low-precision dtype gives "PyTorch's own
error" used to set tolerances.  The kernels never import this module.

Allowed (query position p, key k) for sequence b, where query row i < q_lens[b] has
p = kv_lens[b] - q_lens[b] + i, and s = kv_start[b] (0 without kv_start) is the first real key:

* s <= k <= p, k < kv_lens[b], and (native_window == 0 or p - k < native_window);
* if route[b] == 0 (sparse attention) also the SA rule of ``fluxc.patterns`` in positions counted from s,
  with the triangle's dense rows for queries p >= kv_lens[b] - n_last.

Rows i >= q_lens[b] are padding and come out as zeros; so does any row with no allowed key.

``routed_decode_ring_reference``: SA decode over an evicted (ring-buffer) cache; for every slot it
recovers the real key index the slot holds, then applies the same rule (``fluxc.patterns.ring_valid``).
"""

from __future__ import annotations

import torch

from fluxc.patterns import ring_capacity, ring_key, ring_valid, sa_allowed

from ._common import LEN_DTYPES, ROUTE_DTYPES, check_qkv, check_vec, resolve_pattern
from .errors import KernelError


def allowed_mask(route, kv_lens, q_lens, Tq: int, Tk: int, *, sink: int, window: int, block: int,
                 block_exact: bool, pattern: str = "streaming", n_last: int = 0, native_window: int = 0,
                 kv_start=None) -> torch.Tensor:
    """Bool (B, Tq, Tk): True where query row i of sequence b may attend to key k."""
    pat = resolve_pattern(sink=sink, window=window, block=block, block_exact=block_exact, pattern=pattern,
                          n_last=n_last, native_window=native_window)
    dev = kv_lens.device
    kv = kv_lens.to(torch.int64)[:, None, None]
    ql = q_lens.to(torch.int64)[:, None, None]
    i = torch.arange(Tq, device=dev, dtype=torch.int64)[None, :, None]
    k = torch.arange(Tk, device=dev, dtype=torch.int64)[None, None, :]
    p = kv - ql + i
    ok = (i < ql) & (k <= p) & (k < kv)
    if pat.native_window:
        ok &= (p - k) < pat.native_window
    if kv_start is not None:  # the SA rule sees positions relative to the first real key
        s0 = kv_start.to(device=dev, dtype=torch.int64)[:, None, None]
        ok &= k >= s0
        k, p, kv = k - s0, p - s0, kv - s0
    sa = sa_allowed(p, k, sink=pat.sink_end, window=pat.window, block=pat.block, block_exact=pat.block_exact,
                    last=kv - 1 if pat.triangle else None, n_last=n_last)
    fa = (route.to(dev) != 0)[:, None, None]
    return ok & (fa | sa)


def _expand_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def routed_attention_reference(q, k, v, route, kv_lens, q_lens, *, scale: float, sink: int, window: int,
                               block: int, block_exact: bool, pattern: str = "streaming", n_last: int = 0,
                               softcap: float = 0.0, native_window: int = 0, compute_dtype=None,
                               kv_start=None) -> torch.Tensor:
    """Routed attention, dense.  q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D); returns q's dtype.

    ``compute_dtype`` (default: q.dtype) is the dtype of the matmuls; the softmax runs in float32 or
    wider, like the HF eager path."""
    check_qkv(q, k, v, kernel=False)
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    check_vec(route, "route", B, q.device, ROUTE_DTYPES)
    check_vec(kv_lens, "kv_lens", B, q.device, LEN_DTYPES)
    check_vec(q_lens, "q_lens", B, q.device, LEN_DTYPES)
    if kv_start is not None:
        check_vec(kv_start, "kv_start", B, q.device, LEN_DTYPES)
    cd = compute_dtype or q.dtype
    group = Hq // k.shape[1]
    qc, kc, vc = q.to(cd), _expand_kv(k.to(cd), group), _expand_kv(v.to(cd), group)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    mask = allowed_mask(route, kv_lens, q_lens, Tq, Tk, sink=sink, window=window, block=block,
                        block_exact=block_exact, pattern=pattern, n_last=n_last, native_window=native_window,
                        kv_start=kv_start)
    sdt = torch.float64 if cd == torch.float64 else torch.float32
    s = s.to(sdt).masked_fill(~mask[:, None], float("-inf"))
    row_any = mask.any(-1)[:, None, :, None]
    pr = torch.softmax(s, dim=-1)
    pr = torch.where(row_any, pr, torch.zeros((), dtype=sdt, device=pr.device)).to(cd)
    out = torch.matmul(pr, vc)
    out = torch.where(row_any, out, torch.zeros((), dtype=cd, device=out.device))
    return out.to(q.dtype)


def routed_decode_reference(q, k_cache, v_cache, route, kv_lens, *, scale: float, sink: int, window: int,
                            block: int, block_exact: bool, softcap: float = 0.0, native_window: int = 0,
                            compute_dtype=None, kv_start=None) -> torch.Tensor:
    """One query per sequence at position kv_lens[b] - 1; SA sequences use the streaming rule."""
    B = q.shape[0]
    if q.dim() != 4 or q.shape[2] != 1:
        raise KernelError(f"q.shape={tuple(q.shape)}: decode expects (batch, heads, 1, head_dim)")
    q_lens = torch.ones(B, dtype=torch.int32, device=q.device)
    return routed_attention_reference(q, k_cache, v_cache, route, kv_lens, q_lens, scale=scale, sink=sink,
                                      window=window, block=block, block_exact=block_exact, pattern="streaming",
                                      n_last=0, softcap=softcap, native_window=native_window,
                                      compute_dtype=compute_dtype, kv_start=kv_start)


def ring_keys(n, C: int, *, sink: int, window: int, block: int, block_exact: bool):
    """For a ring-buffer cache of C slots holding real keys 0..n[b]-1 (see ``_common.ring_slot``):
    (r, valid), both (B, C).  r[b, j] is the real index of the key in slot j (the latest index <= p
    written there, p = n[b] - 1); valid[b, j] says the slot was written and the SA rule lets query p
    attend key r."""
    pat = resolve_pattern(sink=sink, window=window, block=block, block_exact=block_exact)
    p = n.to(torch.int64)[:, None] - 1  # (B, 1)
    j = torch.arange(C, device=n.device, dtype=torch.int64)[None, :]  # (1, C)
    r = torch.where(j < pat.sink_end, j, ring_key(j, p, pat.window))  # (B, C)
    valid = ring_valid(j, p, sink=pat.sink_end, window=pat.window, block=pat.block, block_exact=pat.block_exact)
    return r, valid


def routed_decode_ring_reference(q, k_ring, v_ring, n, *, scale: float, sink: int, window: int, block: int,
                                 block_exact: bool, softcap: float = 0.0, compute_dtype=None) -> torch.Tensor:
    """SA decode (streaming rule) over a ring-buffer cache.  q (B, Hq, 1, D); k_ring/v_ring
    (B, Hkv, sink + window, D) filled by ``_common.ring_slot``; n (B,) real keys written, the query's
    own included (query at real position n[b] - 1).  Returns (B, Hq, 1, D); zeros where n[b] == 0."""
    check_qkv(q, k_ring, v_ring, names=("q", "k_ring", "v_ring"), kernel=False)
    B, Hq, Tq, D = q.shape
    if Tq != 1:
        raise KernelError(f"q.shape={tuple(q.shape)}: decode expects (batch, heads, 1, head_dim)")
    check_vec(n, "n", B, q.device, LEN_DTYPES)
    C = k_ring.shape[2]
    pat = resolve_pattern(sink=sink, window=window, block=block, block_exact=block_exact, softcap=softcap)
    if C != pat.sink_end + pat.window:
        raise KernelError(f"k_ring.shape[2]={C}: a ring of sink={sink} + window={window} has "
                          f"{pat.sink_end + pat.window} slots")
    _, valid = ring_keys(n, C, sink=sink, window=window, block=block, block_exact=block_exact)
    cd = compute_dtype or q.dtype
    group = Hq // k_ring.shape[1]
    qc, kc, vc = q.to(cd), _expand_kv(k_ring.to(cd), group), _expand_kv(v_ring.to(cd), group)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # (B, Hq, 1, C)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    sdt = torch.float64 if cd == torch.float64 else torch.float32
    mask = valid[:, None, None, :]  # (B, 1, 1, C)
    s = s.to(sdt).masked_fill(~mask, float("-inf"))
    row_any = valid.any(-1)[:, None, None, None]
    pr = torch.where(row_any, torch.softmax(s, dim=-1), torch.zeros((), dtype=sdt, device=s.device)).to(cd)
    # invalid slots may hold anything (NaN included): zero them so that 0 * NaN never reaches the output
    out = torch.matmul(pr, torch.where(mask[:, :, 0, :, None], vc, torch.zeros((), dtype=cd, device=vc.device)))
    return out.to(q.dtype)


def executed_pairs(route, kv_lens, q_lens, Tq: int, Tk: int, **pattern) -> int:
    """Number of allowed (query, key) pairs summed over the batch (per head): the work a
    mask-aware kernel must do.  Dense; for large sizes use ``executed_pairs_streaming``."""
    return int(allowed_mask(route, kv_lens, q_lens, Tq, Tk, **pattern).sum())


def paged_gather(pages, block_table) -> torch.Tensor:
    """(B, Hkv, W * page_size, D): each sequence's slots in order, read through its block table. pages
    (num_pages, page_size, Hkv, D), block_table (B, W) int32."""
    page = pages.shape[1]
    rows = (block_table.to(torch.int64)[:, :, None] * page + torch.arange(page, device=pages.device)).flatten(1)
    return pages.flatten(0, 1)[rows].transpose(1, 2)  # (B, S, Hkv, D) -> (B, Hkv, S, D)


def paged_valid(seq_lens, route, slots: int, *, sink: int, window: int, block: int, block_exact: bool) -> torch.Tensor:
    """(B, slots) bool: slot j of a sequence holds a key its decode query attends. Full attention (route): keys
    0..n-1 at slots 0..n-1; sparse: the ring's slots, as ``fluxc.patterns.ring_valid`` says."""
    n = seq_lens.to(torch.int64)[:, None]  # (B, 1)
    j = torch.arange(slots, device=seq_lens.device)[None, :]  # (1, S)
    ring = (j < ring_capacity(sink, window)) & ring_valid(j, n - 1, sink=sink, window=window, block=block,
                                                           block_exact=block_exact)
    return torch.where(route.to(torch.bool)[:, None], j < n, ring)


def routed_decode_paged_reference(q, k_pages, v_pages, block_table, seq_lens, route, *, scale: float, sink: int,
                                  window: int, block: int, block_exact: bool, softcap: float = 0.0,
                                  compute_dtype=None) -> torch.Tensor:
    """``routed_decode_paged``'s semantics, dense: q (B, Hq, 1, D); zeros where seq_lens[b] == 0."""
    resolve_pattern(sink=sink, window=window, block=block, block_exact=block_exact, softcap=softcap)
    k, v = paged_gather(k_pages, block_table), paged_gather(v_pages, block_table)  # (B, Hkv, S, D)
    valid = paged_valid(seq_lens, route, k.shape[2], sink=sink, window=window, block=block,
                        block_exact=block_exact)  # (B, S)
    cd = compute_dtype or q.dtype
    group = q.shape[1] // k.shape[1]
    qc, kc, vc = q.to(cd), _expand_kv(k.to(cd), group), _expand_kv(v.to(cd), group)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # (B, Hq, 1, S)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    sdt = torch.float64 if cd == torch.float64 else torch.float32
    mask = valid[:, None, None, :]
    s = s.to(sdt).masked_fill(~mask, float("-inf"))
    row_any = valid.any(-1)[:, None, None, None]
    pr = torch.where(row_any, torch.softmax(s, dim=-1), torch.zeros((), dtype=sdt, device=s.device)).to(cd)
    # slots no one wrote may hold anything (NaN included): zero them so that 0 * NaN never reaches the output
    out = torch.matmul(pr, torch.where(mask[:, :, 0, :, None], vc, torch.zeros((), dtype=cd, device=vc.device)))
    return out.to(q.dtype)
