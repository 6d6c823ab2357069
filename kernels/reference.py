"""Plain-PyTorch reference for routed attention: the semantics the kernels implement.

Dense (materialises the (B, Tq, Tk) mask), any device, any float dtype; ``compute_dtype=torch.float64``
gives the reference tests compare against, the input's own low-precision dtype gives "PyTorch's own
error" used to set tolerances.  The kernels never import this module.

Allowed (query position p, key k) for sequence b, where query row i < q_lens[b] has
p = kv_lens[b] - q_lens[b] + i:

* k <= p, k < kv_lens[b], and (native_window == 0 or p - k < native_window);
* if route[b] == 0 (sparse attention) also the streaming rule
    - token-exact: k < sink or p - k < window,
    - block-exact: k // block < ceil(sink / block) or k // block > p // block - window // block,
  and with pattern="triangle" the rule is lifted (all k <= p) for queries p >= kv_lens[b] - n_last.

Rows i >= q_lens[b] are padding and come out as zeros; so does any row with no allowed key.
"""

from __future__ import annotations

import math

import torch

from ._common import LEN_DTYPES, ROUTE_DTYPES, check_qkv, check_vec, resolve_pattern


def allowed_mask(route, kv_lens, q_lens, Tq: int, Tk: int, *, sink: int, window: int, block: int,
                 block_exact: bool, pattern: str = "streaming", n_last: int = 0, native_window: int = 0,
                 ) -> torch.Tensor:
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
    if pat.block_exact:
        bs = pat.block
        sink_blocks = math.ceil(sink / bs)
        sa = (torch.div(k, bs, rounding_mode="floor") < sink_blocks) | (
            torch.div(k, bs, rounding_mode="floor") > torch.div(p, bs, rounding_mode="floor") - pat.window_blocks)
    else:
        sa = (k < pat.sink_end) | ((p - k) < pat.window)
    if pat.triangle:
        sa = sa | (p >= kv - n_last)
    fa = (route.to(dev) != 0)[:, None, None]
    return ok & (fa | sa)


def _expand_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def routed_attention_reference(q, k, v, route, kv_lens, q_lens, *, scale: float, sink: int, window: int,
                               block: int, block_exact: bool, pattern: str = "streaming", n_last: int = 0,
                               softcap: float = 0.0, native_window: int = 0, compute_dtype=None,
                               ) -> torch.Tensor:
    """Routed attention, dense.  q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D); returns q's dtype.

    ``compute_dtype`` (default: q.dtype) is the dtype of the matmuls; the softmax runs in float32 or
    wider, like the HF eager path."""
    check_qkv(q, k, v, kernel=False)
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    check_vec(route, "route", B, q.device, ROUTE_DTYPES)
    check_vec(kv_lens, "kv_lens", B, q.device, LEN_DTYPES)
    check_vec(q_lens, "q_lens", B, q.device, LEN_DTYPES)
    cd = compute_dtype or q.dtype
    group = Hq // k.shape[1]
    qc, kc, vc = q.to(cd), _expand_kv(k.to(cd), group), _expand_kv(v.to(cd), group)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    mask = allowed_mask(route, kv_lens, q_lens, Tq, Tk, sink=sink, window=window, block=block,
                        block_exact=block_exact, pattern=pattern, n_last=n_last, native_window=native_window)
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
                            compute_dtype=None) -> torch.Tensor:
    """One query per sequence at position kv_lens[b] - 1; SA sequences use the streaming rule."""
    B = q.shape[0]
    if q.dim() != 4 or q.shape[2] != 1:
        from .errors import KernelError
        raise KernelError(f"q.shape={tuple(q.shape)}: decode expects (batch, heads, 1, head_dim)")
    q_lens = torch.ones(B, dtype=torch.int32, device=q.device)
    return routed_attention_reference(q, k_cache, v_cache, route, kv_lens, q_lens, scale=scale, sink=sink,
                                      window=window, block=block, block_exact=block_exact, pattern="streaming",
                                      n_last=0, softcap=softcap, native_window=native_window,
                                      compute_dtype=compute_dtype)


def executed_pairs(route, kv_lens, q_lens, Tq: int, Tk: int, **pattern) -> int:
    """Number of allowed (query, key) pairs summed over the batch (per head): the work a
    mask-aware kernel must do.  Dense; for large sizes use ``executed_pairs_streaming``."""
    return int(allowed_mask(route, kv_lens, q_lens, Tq, Tk, **pattern).sum())
