"""Triton kernels for routed attention.  Imported lazily by ``attention.py`` (this module imports
Triton at import time; nothing else in the package does).

Three kernels:

* ``_prefill_kernel``: one program per (query block, batch * query head).  The route of the
  sequence is read from device memory (ROUTE_MODE=0) or fixed at compile time (1 = FA, 2 = SA, used
  to measure what reading it costs).  The key blocks a query block visits are two segments (the sink
  segment, then the window segment; for FA the first segment is the whole causal range and the second
  is empty), and each segment is split into masked edge blocks and unmasked interior blocks, so that
  SA touches only sink + window + diagonal blocks and interior blocks skip the mask arithmetic.
* ``_decode_kernel``: flash-decoding.  One program per (key split, batch * kv head) handles all
  query heads of its GQA group as the rows of one tile; the splits partition the list of key blocks
  the sequence's branch visits (all causal blocks for FA, sink + window blocks for SA).  RING mode:
  the cache is an SA layer's ring buffer (sink + window slots) and the splits partition its slots.
* ``_paged_decode_kernel``: the same over a paged cache (vLLM's layout: shared pages, a block table per
  sequence), FA or SA (ring) per sequence by its route, read on the device.
* ``_combine_kernel``: merges the splits' partial outputs with their log-sum-exps (not launched
  with a single split: the decode kernel then writes the output itself).

Scores are kept in the log2 domain (scale pre-multiplied by log2(e), exp2).
"""

from __future__ import annotations

import types

import triton
import triton.language as tl

from fluxc import patterns

NEG_INF = tl.constexpr(float("-inf"))


def _jit_rule(fn):
    # the interpreter (TRITON_INTERPRET=1) patches triton.language through the function's globals
    return triton.jit(types.FunctionType(fn.__code__, {**fn.__globals__, "tl": tl}, fn.__name__))


# The SA rule, compiled from its one definition (fluxc.patterns): BLOCK_EXACT arrives as a constexpr.
_window_start = _jit_rule(patterns.window_start)
_keeps = _jit_rule(patterns.keeps)
_dense_from = _jit_rule(patterns.dense_from)
_ring_key = _jit_rule(patterns.ring_key)


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1); exact limits at +-inf, no NaN.
    e = tl.exp2(x * 2.8853900817779268)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _allowed(pos, k_idx, kv_len, sink_end, window, nw, is_fa, dense_row,
             BLOCK_EXACT: tl.constexpr, SA_BLOCK: tl.constexpr, HAS_NW: tl.constexpr,
             SA_POSSIBLE: tl.constexpr):
    """(rows, keys) bool: the full routed mask for query positions ``pos`` and keys ``k_idx``."""
    ok = (k_idx[None, :] <= pos[:, None]) & (k_idx[None, :] < kv_len)
    if HAS_NW:
        ok = ok & ((pos[:, None] - k_idx[None, :]) < nw)
    if SA_POSSIBLE:
        start = _window_start(pos, window, SA_BLOCK, BLOCK_EXACT)
        sa = _keeps(k_idx[None, :], sink_end, start[:, None]) | dense_row[:, None]
        ok = ok & (sa | is_fa)
    return ok


@triton.jit
def _attend_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_n, offs_d,
                   r0_lo, r0_hi, r1_lo, r1_hi, r2_lo, r2_hi, r3_lo, r3_hi,
                   pos, kv_len, sink_end, window, nw, is_fa, dense_row,
                   qk_scale, softcap_in, softcap_out,
                   MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_EXACT: tl.constexpr,
                   SA_BLOCK: tl.constexpr, HAS_NW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   SA_POSSIBLE: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr):
    """Online-softmax update over the key blocks of up to four block ranges [r_lo, r_hi), walked as
    ONE loop (one software pipeline, no refill between the sink and the window).  MASKED=False:
    every key of every block is allowed for every row (interior), so no mask and no bounds checks."""
    n0 = r0_hi - r0_lo
    n1 = n0 + (r1_hi - r1_lo)
    n2 = n1 + (r2_hi - r2_lo)
    n3 = n2 + (r3_hi - r3_lo)
    for j in range(0, n3):
        blk = tl.where(j < n0, r0_lo + j,
                       tl.where(j < n1, r1_lo + (j - n0), tl.where(j < n2, r2_lo + (j - n1), r3_lo + (j - n2))))
        k_idx = blk * BLOCK_N + offs_n
        if USE_TMA:
            # k_base / v_base are tensor descriptors over this (batch, kv head)'s first kv_len keys:
            # the copy engine zero-fills keys >= kv_len, so no load mask is needed.
            kt = tl.trans(k_base.load([blk * BLOCK_N, 0]))
        else:
            k_ptrs = k_base + k_idx[None, :] * stride_kn + offs_d[:, None]
            if MASKED:
                kt = tl.load(k_ptrs, mask=(k_idx < kv_len)[None, :], other=0.0)
            else:
                kt = tl.load(k_ptrs)
        qk = tl.dot(q, kt, input_precision=DOT_PREC)
        if HAS_SOFTCAP:
            s = _tanh(qk * softcap_in) * softcap_out
        else:
            s = qk * qk_scale
        if MASKED:
            ok = _allowed(pos, k_idx, kv_len, sink_end, window, nw, is_fa, dense_row,
                          BLOCK_EXACT, SA_BLOCK, HAS_NW, SA_POSSIBLE)
            s = tl.where(ok, s, NEG_INF)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = v_base.load([blk * BLOCK_N, 0])
        else:
            v_ptrs = v_base + k_idx[:, None] * stride_vn + offs_d[None, :]
            if MASKED:
                v = tl.load(v_ptrs, mask=(k_idx < kv_len)[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _block_ranges(lo, hi, all_lo, all_hi, min_blk, BLOCK_N: tl.constexpr):
    """Key blocks covering keys [lo, hi) (starting no lower than block min_blk), split into
    [b_lo, u_lo) masked, [u_lo, u_hi) unmasked (inside [all_lo, all_hi)), [u_hi, b_hi) masked."""
    b_lo = tl.maximum(lo // BLOCK_N, min_blk)
    b_hi = tl.where(hi > lo, tl.maximum(tl.cdiv(hi, BLOCK_N), b_lo), b_lo)
    u_lo = tl.minimum(tl.maximum(tl.cdiv(all_lo, BLOCK_N), b_lo), b_hi)
    u_hi = tl.maximum(tl.minimum(all_hi // BLOCK_N, b_hi), u_lo)
    return b_lo, u_lo, u_hi, b_hi


@triton.jit
def _route_flag(ROUTE, b, ROUTE_MODE: tl.constexpr):
    if ROUTE_MODE == 1:
        is_fa = tl.full((), 1, tl.int1)
    elif ROUTE_MODE == 2:
        is_fa = tl.full((), 0, tl.int1)
    else:
        is_fa = tl.load(ROUTE + b) != 0
    return is_fa


@triton.jit
def _prefill_kernel(Q, K, V, OUT, ROUTE, KV_LENS, Q_LENS, KV_START, CU_Q, CU_K,
                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                    H, GROUP, T_ROWS, num_m_blocks,
                    qk_scale, softcap_in, softcap_out, sink_end, window, nw, n_last,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    ROUTE_MODE: tl.constexpr, BLOCK_EXACT: tl.constexpr, SA_BLOCK: tl.constexpr,
                    TRIANGLE: tl.constexpr, HAS_NW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
                    HAS_START: tl.constexpr):
    """HAS_START: keys before KV_START[b] are padding.  The sequence is then re-based at its first
    real key (key and value bases advanced, kv_len reduced), so every position below (causal, sink,
    window, blocks, triangle) counts from it; query rows before it get no keys (zeros)."""
    # Heaviest (latest) query blocks first: better tail balance for the causal sweep.
    pid_m = num_m_blocks - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    if VARLEN:
        q0 = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q0
        k0 = tl.load(CU_K + b)
        kv_len = tl.load(CU_K + b + 1) - k0
        q_base = Q + q0.to(tl.int64) * stride_qt + h.to(tl.int64) * stride_qh
        k_base = K + k0.to(tl.int64) * stride_kt + kvh.to(tl.int64) * stride_kh
        v_base = V + k0.to(tl.int64) * stride_vt + kvh.to(tl.int64) * stride_vh
        o_base = OUT + q0.to(tl.int64) * stride_ot + h.to(tl.int64) * stride_oh
        row_lim = q_len
    else:
        q_len = tl.load(Q_LENS + b).to(tl.int32)
        kv_len = tl.load(KV_LENS + b).to(tl.int32)
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
        o_base = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        row_lim = T_ROWS
        if HAS_START:
            k_start = tl.load(KV_START + b).to(tl.int32)
            k_base = k_base + k_start.to(tl.int64) * stride_kt
            v_base = v_base + k_start.to(tl.int64) * stride_vt
            kv_len = kv_len - k_start

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if USE_TMA:
        k_base = tl.make_tensor_descriptor(k_base, shape=[kv_len, HEAD_DIM], strides=[stride_kt, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_base = tl.make_tensor_descriptor(v_base, shape=[kv_len, HEAD_DIM], strides=[stride_vt, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    row_ok = offs_m < q_len
    pos = kv_len - q_len + offs_m
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)

    n_real = tl.minimum(q_len - start_m, BLOCK_M)
    p_min = kv_len - q_len + start_m
    p_max = p_min + n_real - 1
    a_hi = tl.where(n_real > 0, tl.minimum(p_max + 1, kv_len), 0)  # keys any row may see: < a_hi
    c_hi = tl.minimum(p_min + 1, kv_len)  # keys every row may see (causally): < c_hi

    is_fa = _route_flag(ROUTE, b, ROUTE_MODE)
    SA_POSSIBLE: tl.constexpr = ROUTE_MODE != 1
    if TRIANGLE:
        dense_lo = _dense_from(kv_len - 1, n_last)
        dense_any = p_max >= dense_lo
        dense_all = p_min >= dense_lo
        dense_row = pos >= dense_lo
    else:
        dense_any = tl.full((), 0, tl.int1)
        dense_all = tl.full((), 0, tl.int1)
        dense_row = tl.full([BLOCK_M], 0, tl.int1)
    use_full = is_fa | dense_any
    all_full = is_fa | dense_all

    if HAS_NW:
        lo_any = tl.maximum(p_min - nw + 1, 0)
        lo_all = tl.maximum(p_max - nw + 1, 0)
    else:
        lo_any = tl.full((), 0, tl.int32)
        lo_all = tl.full((), 0, tl.int32)
    w_any = _window_start(p_min, window, SA_BLOCK, BLOCK_EXACT)
    w_all = _window_start(p_max, window, SA_BLOCK, BLOCK_EXACT)

    # Segment 1: FA -> the whole causal range; SA -> the sinks.
    hi1 = tl.where(use_full, a_hi, tl.minimum(sink_end, a_hi))
    ahi1 = tl.where(use_full, tl.where(all_full, c_hi, 0), tl.minimum(sink_end, c_hi))
    # Segment 2: SA -> the local window (empty for FA).
    lo2 = tl.where(use_full, a_hi, tl.maximum(w_any, lo_any))
    alo2 = tl.maximum(w_all, lo_all)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)

    b0, u0, u1, b1 = _block_ranges(lo_any, hi1, lo_all, ahi1, tl.full((), 0, tl.int32), BLOCK_N)
    if SA_POSSIBLE:
        c0, v0, v1, c1 = _block_ranges(lo2, a_hi, alo2, c_hi, b1, BLOCK_N)
    else:
        c0 = b1
        v0 = b1
        v1 = b1
        c1 = b1
    # interior blocks (sink interior, then window interior) without masks ...
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_n, offs_d,
                                   u0, u1, v0, v1, b1, b1, b1, b1,
                                   pos, kv_len, sink_end, window, nw, is_fa, dense_row,
                                   qk_scale, softcap_in, softcap_out, False, BLOCK_N, BLOCK_EXACT, SA_BLOCK,
                                   HAS_NW, HAS_SOFTCAP, SA_POSSIBLE, DOT_PREC, USE_TMA)
    # ... then the edge blocks (window start, diagonal, sequence end) with the full mask
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_n, offs_d,
                                   b0, u0, u1, b1, c0, v0, v1, c1,
                                   pos, kv_len, sink_end, window, nw, is_fa, dense_row,
                                   qk_scale, softcap_in, softcap_out, True, BLOCK_N, BLOCK_EXACT, SA_BLOCK,
                                   HAS_NW, HAS_SOFTCAP, SA_POSSIBLE, DOT_PREC, USE_TMA)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    out = tl.where(row_ok[:, None], out, 0.0)
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=(offs_m < row_lim)[:, None])


@triton.jit
def _ring_valid(j_idx, c_fill, p, sink_end, window, BLOCK_EXACT: tl.constexpr, SA_BLOCK: tl.constexpr):
    """(keys,) bool: ring slot j holds a key query p keeps (RING mode of the decode kernel), as
    fluxc.patterns.ring_valid composes it; slots fill in order, so the written ones are j < c_fill."""
    start = _window_start(tl.maximum(p, 0), window, SA_BLOCK, BLOCK_EXACT)
    return (j_idx < c_fill) & ((j_idx < sink_end) | (_ring_key(j_idx, p, window) >= start))


@triton.jit
def _decode_kernel(Q, K, V, OP, LSEP, OUT, ROUTE, KV_LENS, KV_START,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                   stride_ob, stride_oh, HQ, HKV, GROUP, num_splits,
                   qk_scale, softcap_in, softcap_out, sink_end, window, nw, ring_c,
                   HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                   ROUTE_MODE: tl.constexpr, BLOCK_EXACT: tl.constexpr, SA_BLOCK: tl.constexpr,
                   HAS_NW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
                   RING: tl.constexpr, DIRECT: tl.constexpr, HAS_START: tl.constexpr):
    """RING=False: K/V are (B, HKV, T, D) caches of real keys 0..kv_len-1, FA or SA per the route.
    RING=True: K/V are SA ring buffers of ring_c = sink + window slots (layout: _common.ring_slot),
    KV_LENS holds n (real keys written, the query's own included); the splits partition the slots.
    DIRECT (num_splits == 1): write the normalised output to OUT, no partials and no combine.
    HAS_START (not with RING): keys before KV_START[b] are padding; the sequence is re-based there."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None].to(tl.int64) * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh

    kv_len = tl.load(KV_LENS + b).to(tl.int32)
    if HAS_START:
        k_start = tl.load(KV_START + b).to(tl.int32)
        k_base = k_base + k_start.to(tl.int64) * stride_kt
        v_base = v_base + k_start.to(tl.int64) * stride_vt
        kv_len = kv_len - k_start
    p = kv_len - 1
    pos = tl.zeros([BLOCK_G], dtype=tl.int32) + p
    dense_row = tl.full([BLOCK_G], 0, tl.int1)
    is_fa = _route_flag(ROUTE, b, ROUTE_MODE)
    SA_POSSIBLE: tl.constexpr = ROUTE_MODE != 1
    if RING:
        # slots [0, min(n, C)) are the only ones ever written; the per-slot rule is _ring_valid
        c_fill = tl.minimum(tl.maximum(kv_len, 0), ring_c)
        n_blocks = tl.cdiv(c_fill, BLOCK_N)
        n1 = n_blocks
        bl1 = tl.full((), 0, tl.int32)
        bl2 = bl1
    else:
        c_fill = kv_len
        if HAS_NW:
            lo = tl.maximum(p - nw + 1, 0)
        else:
            lo = tl.full((), 0, tl.int32)
        wlo = _window_start(tl.maximum(p, 0), window, SA_BLOCK, BLOCK_EXACT)
        hi1 = tl.where(is_fa, kv_len, tl.minimum(sink_end, kv_len))
        lo2 = tl.where(is_fa, kv_len, tl.maximum(wlo, lo))
        bl1 = lo // BLOCK_N
        bh1 = tl.where(hi1 > lo, tl.cdiv(hi1, BLOCK_N), bl1)
        bl2 = tl.maximum(lo2 // BLOCK_N, bh1)
        bh2 = tl.where(kv_len > lo2, tl.maximum(tl.cdiv(kv_len, BLOCK_N), bl2), bl2)
        n1 = bh1 - bl1
        n_blocks = n1 + bh2 - bl2
    per = tl.cdiv(n_blocks, num_splits)
    j0 = pid_s * per
    j1 = tl.minimum(j0 + per, n_blocks)

    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], NEG_INF, dtype=tl.float32)
    for j in range(j0, j1):
        blk = tl.where(j < n1, bl1 + j, bl2 + (j - n1))
        k_idx = blk * BLOCK_N + offs_n
        if RING:
            kv_ok = _ring_valid(k_idx, c_fill, p, sink_end, window, BLOCK_EXACT, SA_BLOCK)
        else:
            kv_ok = k_idx < kv_len
        kt = tl.load(k_base + k_idx[None, :] * stride_kt + offs_d[:, None],
                     mask=kv_ok[None, :], other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PREC)
        if HAS_SOFTCAP:
            s = _tanh(qk * softcap_in) * softcap_out
        else:
            s = qk * qk_scale
        if RING:
            ok = (pos >= 0)[:, None] & kv_ok[None, :]
        else:
            ok = _allowed(pos, k_idx, kv_len, sink_end, window, nw, is_fa, dense_row,
                          BLOCK_EXACT, SA_BLOCK, HAS_NW, SA_POSSIBLE)
        s = tl.where(ok, s, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        pr = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(pr, 1)
        v = tl.load(v_base + k_idx[:, None] * stride_vt + offs_d[None, :],
                    mask=kv_ok[:, None], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(pr.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if DIRECT:
        o_ptrs = OUT + b.to(tl.int64) * stride_ob + heads[:, None].to(tl.int64) * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=g_ok[:, None])
    else:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), NEG_INF)
        # partial layout: (B, HQ, num_splits, HEAD_DIM) and (B, HQ, num_splits), contiguous
        row = (b * HQ + heads).to(tl.int64) * num_splits + pid_s
        tl.store(OP + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=g_ok[:, None])
        tl.store(LSEP + row, lse, mask=g_ok)


@triton.jit
def _paged_decode_kernel(Q, KP, VP, OP, LSEP, OUT, ROUTE, LENS, TABLE,
                         stride_qb, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_tb,
                         stride_ob, stride_oh, HQ, HKV, GROUP, num_splits,
                         qk_scale, softcap_in, softcap_out, sink_end, window, ring_c,
                         HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                         BLOCK_EXACT: tl.constexpr, SA_BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         DOT_PREC: tl.constexpr, DIRECT: tl.constexpr):
    """Decode over a paged KV cache: pages (num_pages, PAGE, HKV, D) shared by every sequence, TABLE (B, W) the
    pages of each sequence in order. ROUTE[b] != 0 (FA): the table covers keys 0..n-1, key r at slot r. SA: the
    table covers the ring's slots 0..ring_c-1 (fluxc.patterns' ring layout). The route is read here, so one
    launch (and one CUDA graph) serves every mix of routes. Splits and the (batch, kv head) grid as in
    _decode_kernel; a key block gathers its keys through the table."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None].to(tl.int64) * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)
    n = tl.load(LENS + b).to(tl.int32)
    p = n - 1
    is_fa = tl.load(ROUTE + b) != 0
    c_fill = tl.maximum(tl.where(is_fa, n, tl.minimum(n, ring_c)), 0)  # slots ever written
    n_blocks = tl.cdiv(c_fill, BLOCK_N)
    per = tl.cdiv(n_blocks, num_splits)
    j0 = pid_s * per
    j1 = tl.minimum(j0 + per, n_blocks)
    table = TABLE + b.to(tl.int64) * stride_tb

    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], NEG_INF, dtype=tl.float32)
    for j in range(j0, j1):
        slot = j * BLOCK_N + offs_n
        written = slot < c_fill
        kv_ok = tl.where(is_fa, written, _ring_valid(slot, c_fill, p, sink_end, window, BLOCK_EXACT, SA_BLOCK))
        page = tl.load(table + slot // PAGE, mask=written, other=0)
        row = page.to(tl.int64) * PAGE + slot % PAGE  # the key's row in the pages viewed as (pages * PAGE, HKV, D)
        kt = tl.load(KP + row[None, :] * stride_kr + kvh * stride_kh + offs_d[:, None], mask=kv_ok[None, :], other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PREC)
        if HAS_SOFTCAP:
            s = _tanh(qk * softcap_in) * softcap_out
        else:
            s = qk * qk_scale
        s = tl.where(kv_ok[None, :], s, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        pr = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(pr, 1)
        v = tl.load(VP + row[:, None] * stride_vr + kvh * stride_vh + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(pr.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if DIRECT:
        o_ptrs = OUT + b.to(tl.int64) * stride_ob + heads[:, None].to(tl.int64) * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=g_ok[:, None])
    else:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), NEG_INF)
        row_o = (b * HQ + heads).to(tl.int64) * num_splits + pid_s
        tl.store(OP + row_o[:, None] * HEAD_DIM + offs_d[None, :], o, mask=g_ok[:, None])
        tl.store(LSEP + row_o, lse, mask=g_ok)


@triton.jit
def _combine_kernel(OP, LSEP, OUT, HQ, num_splits, stride_ob, stride_oh,
                    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HQ
    h = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < num_splits
    base = pid.to(tl.int64) * num_splits
    lse = tl.load(LSEP + base + offs_s, mask=s_ok, other=NEG_INF)
    m = tl.max(lse, 0)
    m = tl.where(m == NEG_INF, 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(OP + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_d, out.to(OUT.dtype.element_ty))


@triton.jit
def _paged_write_kernel(K_new, V_new, K_pages, V_pages, Table, Seq_lens, T,
                        skb, skh, skt, svb, svh, svt, stb,
                        PAGE: tl.constexpr, HEADS: tl.constexpr, DIM: tl.constexpr, VDIM: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    # one program per (sequence, prompt row): the row's key and value go to its slot's page; a row before the
    # sequence's first key (left padding) writes nothing
    pid = tl.program_id(0)
    b = pid // T
    t = pid % T
    pos = tl.load(Seq_lens + b).to(tl.int64) - T + t
    if pos >= 0:
        page = tl.load(Table + b * stb + pos // PAGE).to(tl.int64)
        row = page * PAGE + pos % PAGE
        offs = tl.arange(0, BLOCK_K)
        keep = offs < HEADS * DIM
        k = tl.load(K_new + b * skb + (offs // DIM) * skh + t * skt + offs % DIM, mask=keep)
        tl.store(K_pages + row * (HEADS * DIM) + offs, k.to(K_pages.dtype.element_ty), mask=keep)
        offs = tl.arange(0, BLOCK_V)
        keep = offs < HEADS * VDIM
        v = tl.load(V_new + b * svb + (offs // VDIM) * svh + t * svt + offs % VDIM, mask=keep)
        tl.store(V_pages + row * (HEADS * VDIM) + offs, v.to(V_pages.dtype.element_ty), mask=keep)
