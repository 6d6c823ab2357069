"""Routed attention on the device: hand-written Triton kernels for prefill and decode.

One launch serves a batch whose sequences take different branches: ``route[b] != 0`` selects full
causal attention (FA) for sequence b, ``route[b] == 0`` the sparse pattern (SA: attention sinks +
local window, streaming or triangle).  The route, the key lengths and the query lengths are read by
the kernels from device memory: no host synchronisation, no recompilation when their values change,
and the launches can be captured in a CUDA graph and replayed with new values written in place.

Triton is imported inside the functions (``import fluxc.kernels.attention`` does not import it).
On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (tests); otherwise use
``reference.routed_attention_reference``.

Semantics: see ``reference.py`` (the two must agree; the tests check it).
"""

from __future__ import annotations

import functools
import os

import torch

from ._common import (
    LEN_DTYPES,
    LOG2E,
    ROUTE_DTYPES,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    Pattern,
    check_padded_prefill,
    check_qkv,
    check_vec,
    host_batch_facts,
    resolve_pattern,
    ring_capacity,
    ring_slot,
)
from .errors import KernelError

__all__ = ["routed_prefill", "routed_prefill_varlen", "routed_decode", "routed_decode_ring", "routed_decode_paged",
           "ring_capacity",
           "ring_slot", "routed_prefill_dispatch", "prefill_config", "decode_config", "ring_decode_config"]

_ROUTE_CONST = {None: 0, "fa": 1, "sa": 2}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and _interpret():
        return
    raise KernelError(
        f"device={t.device}: the Triton kernels need CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); "
        "use fluxc.kernels.reference.routed_attention_reference on CPU")


def _kernels():
    from . import _triton_attention  # lazy: keeps `import fluxc.kernels` Triton-free

    return _triton_attention


def _scratch_alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _ensure_triton_allocator() -> None:
    """Device-side tensor descriptors (TMA) need Triton's global-memory allocator; install a torch one
    unless the application already set its own.  Allocations come from torch's caching allocator, so
    they are CUDA-graph-capture safe."""
    import triton
    from triton.runtime import _allocation

    cur = _allocation._allocator
    cur = cur.get() if hasattr(cur, "get") else cur
    if isinstance(cur, _allocation.NullAllocator):
        triton.set_allocator(_scratch_alloc)


def _tma_ok(*ts: torch.Tensor) -> bool:
    """TMA descriptors: Hopper or newer, 16-byte aligned bases and strides."""
    t0 = ts[0]
    if t0.device.type != "cuda" or torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    for t in ts:
        isz = t.element_size()
        if t.data_ptr() % 16 or any((st * isz) % 16 for st in t.stride()[:-1]):
            return False
    return True


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Fixed launch configuration (no autotuning: deterministic, CUDA-graph and interpreter safe).
    D=128 bf16 values from the H100 sweep in benchmarks/results (128x64, 8 warps, 3 stages, plain
    pointer loads: 508 TFLOP/s FA / 443 SA at 16K, vs 468 / 402 with TMA descriptors)."""
    if device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if head_dim == 128:
        if dtype == torch.float32:  # tests only
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def decode_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_N=32, num_warps=4, num_stages=1, SPLIT_WAVES=2)
    if dtype == torch.float32:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2, SPLIT_WAVES=4)
    return dict(BLOCK_N=64, num_warps=4, num_stages=4, SPLIT_WAVES=4)


def ring_decode_config(head_dim: int, dtype: torch.dtype, device: torch.device, programs: int = 1) -> dict:
    """Launch configuration of ``routed_decode_ring`` for ``programs`` = batch * kv heads (H100 sweep,
    benchmarks/kernels.py --ring-sweep, 32 query / 8 kv heads, d128, 2176 slots): one 64-slot block
    per split is enough (the ring is only 34 blocks); no split at all (one launch, no combine) once the
    (batch, kv head) programs alone about fill the SMs; 3 stages, 2 with more than 3 programs per SM.
    B=1 / 8 / 16 / 32 / 64: 7.6 / 31 / 52 / 98 / 191 us under CUDA graphs (ideal 3.0 / 24 / 48 / 95 / 190)."""
    if device.type != "cuda":
        return dict(BLOCK_N=32, num_warps=4, num_stages=1, SPLIT_WAVES=2, RING_MIN_BLOCKS=1, NOSPLIT_PER_SM=1.5)
    if dtype == torch.float32:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2, SPLIT_WAVES=4, RING_MIN_BLOCKS=1, NOSPLIT_PER_SM=0.9)
    stages = 2 if programs >= 3 * _num_sms(device) else 3
    return dict(BLOCK_N=64, num_warps=4, num_stages=stages, SPLIT_WAVES=4, RING_MIN_BLOCKS=1, NOSPLIT_PER_SM=0.9)


def ring_num_splits(B: int, Hkv: int, C: int, device: torch.device, cfg: dict) -> int:
    """Slot splits for the ring decode from shapes only (never from n)."""
    if B * Hkv >= cfg.get("NOSPLIT_PER_SM", 0.9) * _num_sms(device):
        return 1
    return default_num_splits(B, Hkv, C, cfg["BLOCK_N"], device, cfg.get("SPLIT_WAVES", 4),
                              cfg.get("RING_MIN_BLOCKS", 1))


def _pattern_args(pat: Pattern, scale: float) -> dict:
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise KernelError(f"scale={scale!r}: expected a positive float (usually head_dim ** -0.5)")
    softcap = pat.softcap
    return dict(
        qk_scale=float(scale) * LOG2E,
        softcap_in=float(scale) / softcap if softcap > 0 else 1.0,
        softcap_out=softcap * LOG2E if softcap > 0 else 1.0,
        sink_end=pat.sink_end,
        window=pat.window,
        nw=pat.native_window,
    )


def _route_arg(route: torch.Tensor) -> torch.Tensor:
    route = route.contiguous()
    return route.view(torch.uint8) if route.dtype == torch.bool else route


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _route_mode(route_const) -> int:
    if route_const not in _ROUTE_CONST:
        raise KernelError(f"_route_const={route_const!r}: expected None (read from device), 'fa' or 'sa'")
    return _ROUTE_CONST[route_const]


def _tma_choice(requested, q, k, v) -> bool:
    """Whether the prefill kernel loads K/V through TMA descriptors. They measured slower than pointer
    loads on H100 at 128x64 (see prefill_config), so TMA is opt-in."""
    use_tma = bool(requested) and (q.device.type != "cuda" or _tma_ok(k, v))
    if use_tma and q.device.type == "cuda":
        _ensure_triton_allocator()
    return use_tma


def routed_prefill(q, k, v, route, kv_lens, q_lens, *, scale: float, sink: int, window: int, block: int,
                   block_exact: bool, pattern: str, n_last: int, softcap: float = 0.0, native_window: int = 0,
                   out=None, kv_start=None, _route_const=None, _config=None, _use_tma=None) -> torch.Tensor:
    """Routed prefill attention.

    q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D), Hq % Hkv == 0, D in {64, 128}, fp16/bf16 (fp32 too).
    route (B,) bool/int: nonzero = FA.  kv_lens/q_lens (B,) int32: sequence b has kv_lens[b] valid
    keys and its queries are the last q_lens[b] of them (q row i at position kv_lens[b]-q_lens[b]+i;
    rows >= q_lens[b] come out as zeros).  Preconditions not checked on the host (that would need a
    sync): q_lens[b] <= kv_lens[b] <= Tk and q_lens[b] <= Tq.
    kv_start (B,) int32/int64 or None (zeros): keys before kv_start[b] are padding (left padding):
    never read, and positions (causal, sink, window, blocks) count from kv_start[b]; query rows at
    positions before it see no key and come out as zeros.  Precondition: kv_start[b] <= kv_lens[b].

    Returns (B, Hq, Tq, D) in q's dtype (written into ``out`` when given).
    ``_route_const`` ('fa'/'sa'), ``_config`` and ``_use_tma`` are for benchmarks and tests: fix the
    route at compile time / override the launch configuration / force the key-value load path (TMA
    tensor descriptors, the default on Hopper, or plain pointer loads)."""
    pat = check_padded_prefill(q, k, v, route, kv_lens, q_lens, kv_start, sink=sink, window=window, block=block,
                               block_exact=block_exact, pattern=pattern, n_last=n_last, softcap=softcap,
                               native_window=native_window)
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    _check_device(q)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise KernelError(f"out: expected shape {tuple(q.shape)}, dtype {q.dtype}, device {q.device}, "
                          f"contiguous last dim; got {tuple(out.shape)}, {out.dtype}, {out.device}, "
                          f"strides {out.stride()}")
    if B == 0 or Hq == 0 or Tq == 0:
        return out
    cfg = dict(_config or prefill_config(D, q.dtype, q.device))
    BM, BN = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    tk = _kernels()
    use_tma = _tma_choice(_use_tma, q, k, v)
    num_m = -(-Tq // BM)
    dummy = kv_lens
    start = dummy if kv_start is None else kv_start.contiguous()
    tk._prefill_kernel[(num_m, B * Hq)](
        q, k, v, out, _route_arg(route), kv_lens.contiguous(), q_lens.contiguous(), start, dummy, dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, Tq, num_m, n_last=pat.n_last, **_pattern_args(pat, scale),
        HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, ROUTE_MODE=_route_mode(_route_const),
        BLOCK_EXACT=pat.block_exact, SA_BLOCK=pat.block, TRIANGLE=pat.triangle,
        HAS_NW=pat.native_window > 0, HAS_SOFTCAP=pat.softcap > 0, VARLEN=False,
        DOT_PREC=_dot_prec(q.dtype), USE_TMA=use_tma, HAS_START=kv_start is not None, **cfg)
    return out


def routed_prefill_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, route, *, max_seqlen_q: int, scale: float,
                          sink: int, window: int, block: int, block_exact: bool, pattern: str, n_last: int,
                          softcap: float = 0.0, native_window: int = 0, out=None, _config=None,
                          _use_tma=None) -> torch.Tensor:
    """Packed (varlen) routed prefill.  q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence b owns
    query rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) and keys [cu_seqlens_k[b], cu_seqlens_k[b+1]);
    its queries are the last q_len of its keys, as in ``routed_prefill``.  ``max_seqlen_q`` (a host
    int, >= every q_len) sizes the grid.  Rows past cu_seqlens_q[-1] come out as zeros."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise KernelError(f"{name}: expected a 3-dim (tokens, heads, head_dim) tensor for the packed layout")
    check_qkv(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), v.unsqueeze(0).transpose(1, 2))
    Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 2:
        raise KernelError(f"cu_seqlens_q.shape={tuple(cu_seqlens_q.shape)}: expected (batch + 1,)")
    B = cu_seqlens_q.shape[0] - 1
    check_vec(cu_seqlens_q[1:], "cu_seqlens_q[1:]", B, q.device, LEN_DTYPES)
    if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.shape != (B + 1,):
        raise KernelError(f"cu_seqlens_k: expected shape ({B + 1},) like cu_seqlens_q")
    check_vec(cu_seqlens_k[1:], "cu_seqlens_k[1:]", B, q.device, LEN_DTYPES)
    check_vec(route, "route", B, q.device, ROUTE_DTYPES)
    if not isinstance(max_seqlen_q, int) or max_seqlen_q < 0:
        raise KernelError(f"max_seqlen_q={max_seqlen_q!r}: expected a host int >= the longest query length")
    pat = resolve_pattern(sink=sink, window=window, block=block, block_exact=block_exact, pattern=pattern,
                          n_last=n_last, softcap=softcap, native_window=native_window)
    _check_device(q)
    if out is None:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise KernelError(f"out: expected shape {tuple(q.shape)}, dtype {q.dtype}, device {q.device}")
    if B == 0 or max_seqlen_q == 0 or Hq == 0:
        return out
    cfg = dict(_config or prefill_config(D, q.dtype, q.device))
    BM, BN = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    tk = _kernels()
    use_tma = _tma_choice(_use_tma, q, k, v)
    num_m = -(-max_seqlen_q // BM)
    cq, ck = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    tk._prefill_kernel[(num_m, B * Hq)](
        q, k, v, out, _route_arg(route), cq, cq, cq, cq, ck,
        0, q.stride(1), q.stride(0), 0, k.stride(1), k.stride(0),
        0, v.stride(1), v.stride(0), 0, out.stride(1), out.stride(0),
        Hq, Hq // Hkv, Tq, num_m, n_last=pat.n_last, **_pattern_args(pat, scale),
        HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, ROUTE_MODE=0,
        BLOCK_EXACT=pat.block_exact, SA_BLOCK=pat.block, TRIANGLE=pat.triangle,
        HAS_NW=pat.native_window > 0, HAS_SOFTCAP=pat.softcap > 0, VARLEN=True,
        DOT_PREC=_dot_prec(q.dtype), USE_TMA=use_tma, HAS_START=False, **cfg)
    return out


def default_num_splits(B: int, Hkv: int, Tk: int, block_n: int, device: torch.device, waves: int = 4,
                       min_blocks: int = 4) -> int:
    """Key splits for decode: enough (batch * kv head * split) programs for ``waves`` per SM, at
    least ``min_blocks`` key blocks per split.  Host arithmetic on shapes only (no sync)."""
    programs = max(B * Hkv, 1)
    want = -(-waves * _num_sms(device) // programs)
    useful = max(1, -(-Tk // (min_blocks * block_n)))
    return int(max(1, min(want, useful, 512)))


def _check_splits(num_splits) -> int:
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise KernelError(f"num_splits={num_splits!r}: expected a positive int or None (automatic)")
    return num_splits


def _split_partials(out: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split outputs (B, Hq, S, D) and log-sum-exps (B, Hq, S) in float32 for the combine kernel; with one
    split the kernel writes `out` directly and these are placeholders."""
    if num_splits == 1:
        return out, out
    B, Hq, _, D = out.shape
    return (torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=out.device),
            torch.empty((B, Hq, num_splits), dtype=torch.float32, device=out.device))


def _launch_decode(q, k, v, route_arg, lens, pat: Pattern, scale: float, num_splits: int, cfg: dict, *,
                   route_mode: int, ring_c: int, kv_start=None) -> torch.Tensor:
    """Split kernel + combine kernel (one launch when num_splits == 1); allocations depend on shapes
    only (CUDA-graph safe)."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, Hq, 1, D)
    if B == 0 or Hq == 0:
        return out
    BN = cfg.pop("BLOCK_N")
    group = Hq // Hkv
    block_g = max(16, 1 << (group - 1).bit_length())
    direct = num_splits == 1
    part_o, part_lse = _split_partials(out, num_splits)
    tk = _kernels()
    tk._decode_kernel[(num_splits, B * Hkv)](
        q, k, v, part_o, part_lse, out, route_arg, lens, lens if kv_start is None else kv_start.contiguous(),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        Hq, Hkv, group, num_splits, **_pattern_args(pat, scale), ring_c=ring_c,
        HEAD_DIM=D, BLOCK_G=block_g, BLOCK_N=BN, ROUTE_MODE=route_mode,
        BLOCK_EXACT=pat.block_exact, SA_BLOCK=pat.block, HAS_NW=pat.native_window > 0,
        HAS_SOFTCAP=pat.softcap > 0, DOT_PREC=_dot_prec(q.dtype), RING=ring_c > 0, DIRECT=direct,
        HAS_START=kv_start is not None, **cfg)
    if direct:
        return out
    block_s = max(16, 1 << (num_splits - 1).bit_length())
    tk._combine_kernel[(B * Hq,)](part_o, part_lse, out, Hq, num_splits, out.stride(0), out.stride(1),
                                  HEAD_DIM=D, BLOCK_S=block_s, num_warps=4 if block_s <= 64 else 8)
    return out


def routed_decode(q, k_cache, v_cache, route, kv_lens, *, scale: float, sink: int, window: int, block: int,
                  block_exact: bool, softcap: float = 0.0, native_window: int = 0, num_splits: int | None = None,
                  kv_start=None, _route_const=None, _config=None) -> torch.Tensor:
    """Routed decode (flash-decoding).  q (B, Hq, 1, D); k_cache/v_cache (B, Hkv, Tk, D) with
    kv_lens[b] valid keys; the query sits at position kv_lens[b] - 1.  FA sequences read all their
    keys, SA sequences only the sink and window blocks (streaming rule; triangle layers decode as
    streaming).  kv_start (B,) or None: keys before kv_start[b] are padding, positions count from it
    (as in ``routed_prefill``).  Two launches (split kernel, combine kernel), one when num_splits == 1.
    Returns (B, Hq, 1, D)."""
    check_qkv(q, k_cache, v_cache, names=("q", "k_cache", "v_cache"))
    B, Hq, Tq, D = q.shape
    if Tq != 1:
        raise KernelError(f"q.shape={tuple(q.shape)}: decode takes one query token per sequence "
                          "(dim 2 must be 1); use routed_prefill for more")
    Hkv, Tk = k_cache.shape[1], k_cache.shape[2]
    check_vec(route, "route", B, q.device, ROUTE_DTYPES)
    check_vec(kv_lens, "kv_lens", B, q.device, LEN_DTYPES)
    if kv_start is not None:
        check_vec(kv_start, "kv_start", B, q.device, LEN_DTYPES)
    pat = resolve_pattern(sink=sink, window=window, block=block, block_exact=block_exact, pattern="streaming",
                          n_last=0, softcap=softcap, native_window=native_window)
    _check_device(q)
    cfg = dict(_config or decode_config(D, q.dtype, q.device))
    waves = cfg.pop("SPLIT_WAVES", 4)
    if num_splits is None:
        num_splits = default_num_splits(B, Hkv, Tk, cfg["BLOCK_N"], q.device, waves)
    num_splits = _check_splits(num_splits)
    return _launch_decode(q, k_cache, v_cache, _route_arg(route), kv_lens.contiguous(), pat, scale, num_splits,
                          cfg, route_mode=_route_mode(_route_const), ring_c=0, kv_start=kv_start)


def routed_decode_ring(q, k_ring, v_ring, n, *, scale: float, sink: int, window: int, block: int,
                       block_exact: bool, softcap: float = 0.0, num_splits: int | None = None,
                       _config=None) -> torch.Tensor:
    """SA decode over an evicted KV cache: each sequence keeps only its sink and window keys in a
    ring buffer of C = sink + window slots, key of real index r in slot ``ring_slot(r)`` (see
    ``_common.ring_slot``; block-exact needs sink and window to be multiples of block).

    q (B, Hq, 1, D); k_ring/v_ring (B, Hkv, C, D), Hq % Hkv == 0, D in {64, 128}, fp16/bf16 (fp32 too).
    n (B,) int32/int64 on the device: real keys written so far, the query's own included (the query
    sits at real position n[b] - 1; n[b] == 0 gives zeros).  The query attends the keys the SA rule
    keeps (``fluxc.patterns.ring_valid``).  Slots the rule excludes are never read (they may hold anything, NaN included).

    Flash-decoding split over the C slots (split count from C and the batch, never from n): no host
    sync, no reads of n on the host, allocations depend on shapes only (CUDA-graph safe).
    Returns (B, Hq, 1, D) in q's dtype."""
    check_qkv(q, k_ring, v_ring, names=("q", "k_ring", "v_ring"))
    B, Hq, Tq, D = q.shape
    if Tq != 1:
        raise KernelError(f"q.shape={tuple(q.shape)}: decode takes one query token per sequence "
                          "(dim 2 must be 1)")
    check_vec(n, "n", B, q.device, LEN_DTYPES)
    pat = resolve_pattern(sink=sink, window=window, block=block, block_exact=block_exact, pattern="streaming",
                          softcap=softcap)
    Hkv, C = k_ring.shape[1], k_ring.shape[2]
    want_c = ring_capacity(sink=sink, window=window, block=block, block_exact=block_exact)
    if C != want_c:
        raise KernelError(f"k_ring.shape={tuple(k_ring.shape)}: a ring for sink={sink} + window={window} has "
                          f"{want_c} slots (dim 2); allocate (B, Hkv, {want_c}, D)")
    if num_splits is not None:
        _check_splits(num_splits)
    _check_device(q)
    cfg = dict(_config or ring_decode_config(D, q.dtype, q.device, B * Hkv))
    if num_splits is None:
        num_splits = ring_num_splits(B, Hkv, C, q.device, cfg)
    num_splits = _check_splits(num_splits)
    for key in ("SPLIT_WAVES", "RING_MIN_BLOCKS", "NOSPLIT_PER_SM"):
        cfg.pop(key, None)
    lens = n.contiguous()
    return _launch_decode(q, k_ring, v_ring, lens, lens, pat, scale, num_splits, cfg,
                          route_mode=_ROUTE_CONST["sa"], ring_c=C)


def routed_decode_paged(q, k_pages, v_pages, block_table, seq_lens, route, *, scale: float, sink: int, window: int,
                        block: int, block_exact: bool, softcap: float = 0.0, num_splits: int | None = None,
                        _config=None) -> torch.Tensor:
    """Routed decode over a paged KV cache (vLLM's layout).  q (B, Hq, 1, D); k_pages/v_pages
    (num_pages, page_size, Hkv, D) shared by all sequences; block_table (B, W) int32, sequence b's pages in
    order; seq_lens (B,) its keys, the query's own included (the query sits at position seq_lens[b] - 1;
    0: zeros); route (B,) on the device.  A full-attention sequence's table covers keys 0..seq_lens-1 (key r at
    slot r); a sparse one's covers its ring of sink + window slots (``fluxc.patterns.ring_slot``), whose
    keys the SA rule keeps (``ring_valid``).  No host sync, allocations from shapes only (CUDA-graph safe):
    one launch serves every mix of routes.  Returns (B, Hq, 1, D)."""
    for name, t in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise KernelError(f"{name}: expected a 4-dim tensor (q: batch, heads, 1, head_dim; pages: num_pages, "
                              f"page_size, kv_heads, head_dim), got {getattr(t, 'shape', type(t).__name__)}")
    B, Hq, Tq, D = q.shape
    if Tq != 1:
        raise KernelError(f"q.shape={tuple(q.shape)}: decode takes one query token per sequence (dim 2 must be 1)")
    if k_pages.shape != v_pages.shape:
        raise KernelError(f"k_pages.shape={tuple(k_pages.shape)} != v_pages.shape={tuple(v_pages.shape)}")
    _, page, Hkv, Dk = k_pages.shape
    if q.dtype not in SUPPORTED_DTYPES or k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise KernelError(f"q / k_pages / v_pages dtypes {q.dtype} / {k_pages.dtype} / {v_pages.dtype}: one of "
                          f"float16, bfloat16, float32 for all three")
    if k_pages.device != q.device or v_pages.device != q.device:
        raise KernelError(f"q / k_pages / v_pages devices {q.device} / {k_pages.device} / {v_pages.device} differ")
    if D not in SUPPORTED_HEAD_DIMS or Dk != D:
        raise KernelError(f"head_dim {D} (q) / {Dk} (pages): the kernels take equal head dims in "
                          f"{SUPPORTED_HEAD_DIMS}; use the reference implementation for others")
    if Hkv == 0 or Hq % Hkv:
        raise KernelError(f"query heads {Hq} and kv heads {Hkv}: query heads must be a multiple of kv heads")
    if k_pages.stride(-1) != 1 or k_pages.stride(1) != Hkv * D or v_pages.stride() != k_pages.stride():
        raise KernelError("k_pages / v_pages must be contiguous (num_pages, page_size, kv_heads, head_dim) tensors")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != B:
        raise KernelError(f"block_table: expected a ({B}, pages per sequence) int32 tensor, got "
                          f"{getattr(block_table, 'shape', type(block_table).__name__)}")
    if block_table.dtype != torch.int32 or block_table.device != q.device or block_table.stride(-1) != 1:
        raise KernelError(f"block_table: int32 on {q.device} with a contiguous last dim, got {block_table.dtype} on "
                          f"{block_table.device}")
    check_vec(seq_lens, "seq_lens", B, q.device, LEN_DTYPES)
    check_vec(route, "route", B, q.device, ROUTE_DTYPES)
    pat = resolve_pattern(sink=sink, window=window, block=block, block_exact=block_exact, softcap=softcap)
    ring_c = ring_capacity(sink=sink, window=window, block=block, block_exact=block_exact)
    if block_table.shape[1] * page < ring_c:
        raise KernelError(f"block_table has {block_table.shape[1]} pages of {page} per sequence, fewer than a "
                          f"sparse sequence's ring of {ring_c} slots needs")
    _check_device(q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, Hq, 1, D)
    if B == 0 or Hq == 0:
        return out
    cfg = dict(_config or decode_config(D, q.dtype, q.device))
    waves = cfg.pop("SPLIT_WAVES", 4)
    if num_splits is None:
        num_splits = default_num_splits(B, Hkv, block_table.shape[1] * page, cfg["BLOCK_N"], q.device, waves)
    num_splits = _check_splits(num_splits)
    group = Hq // Hkv
    block_g = max(16, 1 << (group - 1).bit_length())
    direct = num_splits == 1
    part_o, part_lse = _split_partials(out, num_splits)
    args = _pattern_args(pat, scale)
    del args["nw"]
    tk = _kernels()
    tk._paged_decode_kernel[(num_splits, B * Hkv)](
        q, k_pages, v_pages, part_o, part_lse, out, _route_arg(route), seq_lens.contiguous(), block_table,
        q.stride(0), q.stride(1), k_pages.stride(1), k_pages.stride(2), v_pages.stride(1), v_pages.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1), Hq, Hkv, group, num_splits, **args, ring_c=ring_c,
        HEAD_DIM=D, BLOCK_G=block_g, PAGE=page, BLOCK_EXACT=pat.block_exact, SA_BLOCK=pat.block,
        HAS_SOFTCAP=pat.softcap > 0, DOT_PREC=_dot_prec(q.dtype), DIRECT=direct, **cfg)
    if direct:
        return out
    block_s = max(16, 1 << (num_splits - 1).bit_length())
    tk._combine_kernel[(B * Hq,)](part_o, part_lse, out, Hq, num_splits, out.stride(0), out.stride(1),
                                  HEAD_DIM=D, BLOCK_S=block_s, num_warps=4 if block_s <= 64 else 8)
    return out


def routed_prefill_dispatch(q, k, v, route, kv_lens, q_lens, *, scale: float, sink: int, window: int, block: int,
                            block_exact: bool, pattern: str, n_last: int, softcap: float = 0.0,
                            native_window: int = 0, out=None, kv_start=None) -> torch.Tensor:
    """Prefill that lets the FA branch use the fastest library kernel.

    Reads route and lengths on the host (ONE device sync; not CUDA-graph capturable, unlike
    ``routed_prefill``).  When every sequence is FA, unpadded (q_lens == kv_lens == Tk) and
    the options are plain (no soft-cap, no native window, no kv_start padding), it runs PyTorch SDPA (cuDNN, else
    flash/efficient, whichever PyTorch picks first) with is_causal=True; otherwise the routed Triton
    kernel.  Same semantics either way."""
    check_padded_prefill(q, k, v, route, kv_lens, q_lens, kv_start, sink=sink, window=window, block=block,
                         block_exact=block_exact, pattern=pattern, n_last=n_last, softcap=softcap,
                         native_window=native_window)
    Hq, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    all_full, unpadded, no_left_padding = host_batch_facts(q, k, route, kv_lens, q_lens, kv_start)
    if (q.device.type == "cuda" and Tq == Tk and softcap == 0 and native_window == 0 and all_full and unpadded
            and no_left_padding):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                          SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
            res = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                 enable_gqa=k.shape[1] != Hq)
        if out is not None:
            out.copy_(res)
            return out
        return res
    return routed_prefill(q, k, v, route, kv_lens, q_lens, scale=scale, sink=sink, window=window, block=block,
                          block_exact=block_exact, pattern=pattern, n_last=n_last, softcap=softcap,
                          native_window=native_window, out=out, kv_start=kv_start)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def paged_write_prompt(k_pages, v_pages, k_new, v_new, block_table, seq_lens) -> None:
    """Write a prompt's keys and values into the pages in one launch.  k_new/v_new (B, Hkv, T, D), each
    sequence's last T keys (key r at slot r: a prompt takes full-attention slots); pages (num_pages, page_size,
    Hkv, D) contiguous; block_table (B, W) int32; seq_lens (B,) keys after the write.  Rows before a
    sequence's first key (left padding) write nothing.  No host sync."""
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages), ("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise KernelError(f"{name}: expected a 4-dim tensor, got {getattr(t, 'shape', type(t).__name__)}")
        _check_device(t)
    B, Hkv, T, D = k_new.shape
    if v_new.shape[:3] != k_new.shape[:3] or k_pages.shape[2:] != (Hkv, D) or v_pages.shape[2] != Hkv \
            or v_pages.shape[3] != v_new.shape[3] or v_pages.shape[:2] != k_pages.shape[:2]:
        raise KernelError(f"shapes: k_new {tuple(k_new.shape)}, v_new {tuple(v_new.shape)}, k_pages "
                          f"{tuple(k_pages.shape)}, v_pages {tuple(v_pages.shape)} do not fit one layout")
    if not (k_pages.is_contiguous() and v_pages.is_contiguous()):
        raise KernelError("k_pages / v_pages must be contiguous (num_pages, page_size, kv_heads, head_dim)")
    if k_new.stride(3) != 1 or v_new.stride(3) != 1:
        raise KernelError("k_new / v_new need a contiguous last dim")
    if B == 0 or T == 0:
        return
    table = block_table.contiguous()
    Dv = v_new.shape[3]
    _kernels()._paged_write_kernel[(B * T,)](
        k_new, v_new, k_pages, v_pages, table, seq_lens.contiguous(), T,
        k_new.stride(0), k_new.stride(1), k_new.stride(2), v_new.stride(0), v_new.stride(1), v_new.stride(2),
        table.stride(0), PAGE=k_pages.shape[1], HEADS=Hkv, DIM=D, VDIM=Dv,
        BLOCK_K=_pow2(Hkv * D), BLOCK_V=_pow2(Hkv * Dv))
