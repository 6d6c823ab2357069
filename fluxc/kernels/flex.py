"""Routed attention lowered through FlexAttention (``torch.nn.attention.flex_attention``): the
``"flex"`` implementation.  Inductor generates the Triton kernels when compiled.

The routing lives in the ``mask_mod``: it reads ``route``, ``kv_lens`` and ``q_lens`` from device
tensors, so one compiled kernel serves every route assignment.  The BlockMask, however, is data: it
must be rebuilt (``build_block_mask``) when routes or lengths change -- a small device computation,
compiled with ``compile_mask=True`` (needed at 128K, where the eager build runs out of memory).

Differences from the Triton kernels (``attention.py``): keys at positions >= kv_lens[b] must be finite
(FlexAttention multiplies masked probabilities, zero, by them; a NaN there would leak), and padding
query rows are zeroed by an extra elementwise op.
"""

from __future__ import annotations

import functools

import torch

from fluxc.patterns import dense_from, sa_allowed, window_start

from ._common import check_padded_prefill, resolve_pattern
from .errors import KernelError

__all__ = ["make_mask_mod", "build_block_mask", "routed_prefill_flex", "routed_decode_flex"]


def make_mask_mod(route, kv_lens, q_lens, *, sink: int, window: int, block: int, block_exact: bool,
                  pattern: str = "streaming", n_last: int = 0, native_window: int = 0, routed: bool = True):
    """mask_mod(b, h, q_idx, kv_idx) for the routed rule.  ``routed=False`` gives the plain SA mask
    (route ignored): the "FlexAttention with the same mask" baseline."""
    pat = resolve_pattern(sink=sink, window=window, block=block, block_exact=block_exact, pattern=pattern,
                          n_last=n_last, native_window=native_window)

    def mask_mod(b, h, q_idx, kv_idx):
        kl = kv_lens[b]
        ql = q_lens[b]
        p = kl - ql + q_idx
        ok = (q_idx < ql) & (kv_idx <= p) & (kv_idx < kl)
        if pat.native_window:
            ok = ok & (p - kv_idx < pat.native_window)
        sa = sa_allowed(p, kv_idx, sink=pat.sink_end, window=pat.window, block=pat.block,
                        block_exact=pat.block_exact, last=kl - 1 if pat.triangle else None, n_last=n_last)
        if routed:
            sa = sa | (route[b] != 0)
        return ok & sa

    return mask_mod


def build_block_mask(route, kv_lens, q_lens, B: int, Tq: int, Tk: int, *, sink: int, window: int, block: int,
                     block_exact: bool, pattern: str = "streaming", n_last: int = 0, native_window: int = 0,
                     routed: bool = True, block_size: int = 128, compile_mask: bool = False,
                     closed_form: bool = True):
    """The BlockMask of `make_mask_mod`'s rule. `closed_form`: its block lists from the pattern's window bounds
    per (query block, key block), O(B * (Tq / block_size) * (Tk / block_size)) work and about twenty small device
    ops, no host sync (`sa_block_lists`); False: `create_block_mask`, which evaluates the mask_mod on every token
    pair (1.7-3.3 ms at 32K on an H100, more than the sparse kernel itself). `compile_mask` applies to the latter."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    mm = make_mask_mod(route, kv_lens, q_lens, sink=sink, window=window, block=block, block_exact=block_exact,
                       pattern=pattern, n_last=n_last, native_window=native_window, routed=routed)
    if not closed_form:
        return create_block_mask(mm, B, None, Tq, Tk, device=kv_lens.device, BLOCK_SIZE=block_size,
                                 _compile=compile_mask)
    partial, full = sa_block_lists(route, kv_lens, q_lens, Tq, Tk, sink=sink, window=window, block=block,
                                   block_exact=block_exact, pattern=pattern, n_last=n_last,
                                   native_window=native_window, routed=routed, block_size=block_size)
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=block_size, mask_mod=mm,
                                    seq_lengths=(Tq, Tk))


def sa_block_lists(route, kv_lens, q_lens, Tq: int, Tk: int, *, sink: int, window: int, block: int,
                   block_exact: bool, pattern: str = "streaming", n_last: int = 0, native_window: int = 0,
                   routed: bool = True, block_size: int = 128):
    """(partial, full) bool (B, 1, Tq / block_size, Tk / block_size), rounded up: key blocks that hold some pair
    `make_mask_mod` allows (the mask_mod runs there), and those where it allows every pair (it is skipped there).

    Conservative both ways: every block with an allowed pair is listed, and `full` lists only blocks where every
    pair is allowed (a covered block it misses, e.g. one straddling the sink's end and the window's start, runs
    the mask_mod). Per query block the keys are bounded by its first and last real positions pmin / pmax:
    `window_start` never decreases, so the window of the smallest position >= a key block's start decides
    whether that block is touched, and the window of pmax whether it is covered."""
    pat = resolve_pattern(sink=sink, window=window, block=block, block_exact=block_exact, pattern=pattern,
                          n_last=n_last, native_window=native_window)
    device = kv_lens.device
    kl = kv_lens.to(torch.int64)[:, None, None]  # (B, 1, 1)
    ql = q_lens.to(torch.int64)[:, None, None]  # (B, 1, 1)
    bs = block_size
    q0 = torch.arange(-(-Tq // bs), device=device)[None, :, None] * bs  # (1, Qb, 1) first query of each block
    k0 = torch.arange(-(-Tk // bs), device=device)[None, None, :] * bs  # (1, 1, Kb) first key of each block
    k_hi = k0 + bs - 1
    q_real = q0 < ql  # (B, Qb, 1) the block has a real query
    q_whole = q0 + bs <= ql  # (B, Qb, 1) every query of the block is real
    pmin = kl - ql + q0  # (B, Qb, 1) positions of the block's first and last real queries
    pmax = kl - ql + torch.minimum(q0 + bs, ql) - 1
    touched = q_real & (k0 <= pmax) & (k0 < kl)  # (B, Qb, Kb) the causal rule allows some pair
    covered = q_whole & (k_hi <= pmin) & (k_hi < kl)  # (B, Qb, Kb) ... every pair
    if pat.native_window:
        touched = touched & (k_hi > pmin - pat.native_window)
        covered = covered & (pmax - k0 < pat.native_window)
    first = torch.maximum(pmin, k0)  # smallest query position that can reach the key block
    sa_touched = (k0 < pat.sink_end) | ((first <= pmax) & (window_start(first, pat.window, pat.block,
                                                                        pat.block_exact) <= k_hi))
    sa_covered = (k_hi < pat.sink_end) | (window_start(pmax, pat.window, pat.block, pat.block_exact) <= k0)
    if pat.triangle:  # the last n_last prompt queries keep every key
        dense_at = dense_from(kl - 1, pat.n_last)
        sa_touched = sa_touched | (pmax >= dense_at)
        sa_covered = sa_covered | (pmin >= dense_at)
    if routed:
        dense = (route != 0)[:, None, None]  # (B, 1, 1) full-attention rows keep every causal key
        sa_touched, sa_covered = sa_touched | dense, sa_covered | dense
    full = covered & sa_covered
    partial = touched & sa_touched & ~full
    return partial[:, None], full[:, None]


def _ordered(blocks):
    """bool (B, H, Qb, Kb) -> (num_blocks (B, H, Qb) int32, indices (B, H, Qb, Kb) int32): the listed key blocks
    first, in increasing order (FlexAttention's block-list layout)."""
    count = blocks.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count, order


@functools.cache
def _compiled_flex(dynamic: bool = False):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=dynamic)


def _recompile_budget():
    """Each (shape, mask_mod) is one Dynamo recompile of flex_attention; past Dynamo's default limit
    (8) it silently falls back to the slow eager path.  Raise the limit for our calls only."""
    import torch._dynamo.config as dc

    name = "recompile_limit" if hasattr(dc, "recompile_limit") else "cache_size_limit"
    return dc.patch(**{name: max(getattr(dc, name), 64)})


def _softcap_mod(softcap: float):
    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return score_mod


def routed_prefill_flex(q, k, v, route, kv_lens, q_lens, *, scale: float, sink: int, window: int, block: int,
                        block_exact: bool, pattern: str, n_last: int, softcap: float = 0.0, native_window: int = 0,
                        out=None, block_mask=None, compile: bool = True, compile_mask: bool | None = None,
                        backend: str = "TRITON", dynamic: bool = False) -> torch.Tensor:
    """Same contract as ``attention.routed_prefill`` (see flex.py's docstring for the two
    differences).  ``block_mask``: a prebuilt ``build_block_mask(...)`` for these route/length
    values; ``compile``: run ``torch.compile(flex_attention)`` (False: eager, for CPU tests).
    ``backend``: FlexAttention's kernel, "TRITON" (Inductor's) or "FLASH" (flash-attn-4's CuTe kernel, Hopper and
    Blackwell); ``dynamic``: compile once for every length (the mask_mod reads lengths from device tensors, so
    no Python scalar in it becomes a guard)."""
    if backend not in ("TRITON", "FLASH"):
        raise KernelError(f"backend={backend!r}: use 'TRITON' or 'FLASH'")
    pat = check_padded_prefill(q, k, v, route, kv_lens, q_lens, sink=sink, window=window, block=block,
                               block_exact=block_exact, pattern=pattern, n_last=n_last, softcap=softcap,
                               native_window=native_window)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if block_mask is None:
        block_mask = build_block_mask(route, kv_lens, q_lens, B, Tq, Tk, sink=sink, window=window, block=block,
                                      block_exact=block_exact, pattern=pattern, n_last=n_last,
                                      native_window=native_window,
                                      compile_mask=(compile and Tk >= 32768) if compile_mask is None
                                      else compile_mask)
    if compile:
        fn = _compiled_flex(dynamic)
    else:
        from torch.nn.attention.flex_attention import flex_attention as fn
    score_mod = _softcap_mod(pat.softcap) if pat.softcap > 0 else None
    if compile:
        options = {"BACKEND": backend} if backend != "TRITON" else None
        with _recompile_budget():
            res = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=float(scale), enable_gqa=Hq != Hkv,
                     kernel_options=options)
    else:
        res = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=float(scale), enable_gqa=Hq != Hkv)
    valid = (torch.arange(Tq, device=q.device)[None, :] < q_lens[:, None])[:, None, :, None]
    res = torch.where(valid, res, torch.zeros((), dtype=res.dtype, device=res.device))
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype:
            raise KernelError(f"out: expected shape {tuple(q.shape)} and dtype {q.dtype}")
        out.copy_(res)
        return out
    return res


def routed_decode_flex(q, k_cache, v_cache, route, kv_lens, *, scale: float, sink: int, window: int, block: int,
                       block_exact: bool, softcap: float = 0.0, native_window: int = 0, num_splits=None,
                       block_mask=None, compile: bool = True) -> torch.Tensor:
    """Same contract as ``attention.routed_decode`` through FlexAttention.  Its decoding kernel
    chooses its own key split: ``num_splits`` must be None."""
    if num_splits is not None:
        raise KernelError(f"num_splits={num_splits!r}: the flex lowering chooses its own key split; pass None")
    if q.dim() != 4 or q.shape[2] != 1:
        raise KernelError(f"q.shape={tuple(q.shape)}: decode takes one query token per sequence")
    B = q.shape[0]
    q_lens = torch.ones(B, dtype=torch.int32, device=q.device)
    return routed_prefill_flex(q, k_cache, v_cache, route, kv_lens, q_lens, scale=scale, sink=sink,
                               window=window, block=block, block_exact=block_exact, pattern="streaming",
                               n_last=0, softcap=softcap, native_window=native_window, block_mask=block_mask,
                               compile=compile)
