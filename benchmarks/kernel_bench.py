# ruff: noqa: B023  (closures over loop variables are called inside the same iteration, via guarded())
"""Routed-attention kernel benchmark: Llama-3-8B attention shape (32 query heads, 8 KV
heads, head dim 128), bf16, on one GPU, everything measured side by side in one run.

Prefill (B=1) at 8K/32K/64K/128K: SDPA flash, SDPA cuDNN, FlexAttention causal and with the SA mask
(compiled), ours Triton FA/SA (route read from device memory), ours FlexAttention lowering
(routed mask_mod), and the route fixed at compile time (routing cost).  Decode at (B, L) in
(1,32K) (1,128K) (8,32K) (32,32K): SDPA flash/cuDNN full, ours FA/SA, ours SA over the evicted
(ring-buffer) cache of sink + window slots, ours flex lowering.  Plus a device copy bandwidth.  Medians of
triton.testing.do_bench (decode also under CUDA-graph replay), through benchmarks/harness.py, which also
writes the provenance and the JSON (atomically, after every row).

TFLOP/s count executed (allowed) query-key pairs: 4 * pairs * head_dim * query heads.  Decode GB/s
count the K and V bytes the branch must read once.  SA pattern: sink 128, window 2048, 128-token
blocks, block-exact (the method's released config).  Targets: benchmarks/targets.toml (bench "kernels"),
evaluated into the JSON at the end of the run.

    python benchmarks/kernel_bench.py --out results.json [--sweep] [--lengths 8192,32768] [--decode-only]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import pathlib
import time
import traceback

import torch

from fluxc.ops.dispatch import resolve_impl, run_kernel
from fluxc.patterns import window_start
from fluxc.spec import SiteSpec

import harness
import measures

ROOT = pathlib.Path(__file__).resolve().parents[1]
HQ, HKV, D = 32, 8, 128
SINK, WINDOW, BLOCK = 128, 2048, 128
SA = dict(sink=SINK, window=WINDOW, block=BLOCK, block_exact=True)

# ------------------------------------------------------------------------------------ counting


def sa_keys_per_query(p: torch.Tensor, *, sink=SINK, window=WINDOW, block=BLOCK, block_exact=True) -> torch.Tensor:
    """Allowed keys for query position p (all keys valid, p the last query at most): the window
    [window_start(p), p] and the sinks before it (`fluxc.patterns`)."""
    ws = torch.clamp(window_start(p, window, block, block_exact), min=0)
    return (p - ws + 1) + torch.minimum(ws, torch.full_like(ws, sink))


def pairs_causal(L: int) -> int:
    return L * (L + 1) // 2


def pairs_sa(L: int, **kw) -> int:
    return int(sa_keys_per_query(torch.arange(L, dtype=torch.int64), **kw).sum())


def tflops(pairs: int, ms: float) -> float:
    return 4.0 * pairs * D * HQ / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------------ timing


def bench(fn, *, graph=False, rep=None):
    """Median ms of triton's do_bench (`graph`: replayed in a CUDA graph)."""
    return harness.do_bench_ms(fn, graph=graph, rep=rep or 100)


def guarded(rec, label, fn):
    """Run one measurement; a failure becomes an error row (one failing baseline must not sink the run)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (one failing baseline must not sink the run)
        rec.add(kind="error", label=label, error=f"{type(e).__name__}: {str(e)[:400]}")
        traceback.print_exc()
        return None
    finally:
        gc.collect()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ sections


def copy_bandwidth(rec):
    n = 1 << 30  # 1 GiB
    x = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), rep=200)
    gbps = 2 * n / (ms * 1e-3) / 1e9
    rec.add(kind="copy", impl="torch copy_", bytes=2 * n, ms=ms, gbps=gbps)
    return gbps


def sdpa_fn(q, k, v, backend, causal):
    """SDPA with native GQA (enable_gqa=True); if the backend refuses it, K/V expanded to all query
    heads outside the timed region (recorded in the row as gqa='expanded')."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def native():
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    try:
        native()
        torch.cuda.synchronize()
        native.gqa = "native"
        return native
    except RuntimeError:
        pass
    grp = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1)

    def expanded():
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, ke, ve, is_causal=causal)
    expanded.gqa = "expanded"
    return expanded


def prefill_section(rec, K, L, args):
    attn = importlib.import_module(K.__name__ + ".attention")
    flex = importlib.import_module(K.__name__ + ".flex")
    g = torch.Generator(device="cuda").manual_seed(L)
    q = torch.randn(1, HQ, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    lens = torch.tensor([L], dtype=torch.int32, device="cuda")
    fa_route = torch.ones(1, dtype=torch.bool, device="cuda")
    sa_route = torch.zeros(1, dtype=torch.bool, device="cuda")
    scale = D ** -0.5
    pc, ps = pairs_causal(L), pairs_sa(L)
    pst = pairs_sa(L, block_exact=False)
    base = dict(kind="prefill", L=L, B=1)

    def row(impl, mask, pairs, fn, **extra):
        ms = bench(fn, rep=args.rep)
        rec.add(**base, impl=impl, mask=mask, ms=ms, pairs=pairs, exec_frac=pairs / pc,
                tflops=tflops(pairs, ms), **extra)

    kw = dict(scale=scale, pattern="streaming", n_last=0, **SA)
    for be in ("flash", "cudnn"):
        def go(be=be):
            fn = sdpa_fn(q, k, v, be, True)
            row(f"sdpa_{be}", "causal", pc, fn, gqa=fn.gqa)
        guarded(rec, f"sdpa_{be} {L}", go)
    guarded(rec, f"ours_fa {L}", lambda: row("ours_triton", "causal", pc, lambda: attn.routed_prefill(
        q, k, v, fa_route, lens, lens, **kw), route="device"))
    guarded(rec, f"ours_dispatch_fa {L}", lambda: row("ours_dispatch", "causal", pc, lambda: attn.routed_prefill_dispatch(
        q, k, v, fa_route, lens, lens, **kw), route="host-sync"))
    fa4 = importlib.import_module(K.__name__ + ".fa4")
    if fa4.unavailable_reason(q.device) is None:  # flash-attn-4 itself beside fluxc's fa4 full branch
        from flash_attn.cute import flash_attn_func

        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        guarded(rec, f"fa4_direct {L}", lambda: row("fa4_direct", "causal", pc, lambda: flash_attn_func(
            qt, kt, vt, softmax_scale=scale, causal=True)))
        guarded(rec, f"ours_fa4 {L}", lambda: row("ours_fa4", "causal", pc, lambda: fa4.routed_prefill_fa4(
            q, k, v, fa_route, lens, lens, **kw), route="host-sync"))

        def sa_flash():  # the sparse branch on flash-attn-4 through FlexAttention, compiled once for every length
            import torch._dynamo.utils as dynamo_utils

            before = dict(dynamo_utils.counters["stats"])
            row("ours_fa4_sa_flash", "sa_block", ps, lambda: fa4.routed_prefill_fa4(
                q, k, v, sa_route, lens, lens, sparse="flash", **kw), route="host-sync",
                frames_compiled=dynamo_utils.counters["stats"]["unique_graphs"] - before.get("unique_graphs", 0))
        guarded(rec, f"ours_fa4_sa_flash {L}", sa_flash)
    else:
        rec.add(**base, impl="fa4_direct", mask="causal", skipped=fa4.unavailable_reason(q.device))
    # fluxc's routed op as the model runs it: the default choice (`impl="auto"`, logged) on this GPU
    for name, route, mask, pairs in (("fluxc_fa", fa_route, "causal", pc), ("fluxc_sa", sa_route, "sa_block", ps)):
        call, auto = default_routed(q, k, v, route)
        guarded(rec, f"{name} {L}", lambda call=call, auto=auto, name=name, mask=mask, pairs=pairs: row(
            name, mask, pairs, call, route="auto", backend=auto))
    guarded(rec, f"ours_sa {L}", lambda: row("ours_triton", "sa_block", ps, lambda: attn.routed_prefill(
        q, k, v, sa_route, lens, lens, **kw), route="device"))
    guarded(rec, f"ours_sa_tok {L}", lambda: row("ours_triton", "sa_token", pst, lambda: attn.routed_prefill(
        q, k, v, sa_route, lens, lens, **{**kw, "block_exact": False}), route="device"))
    if L in args.route_cost_lengths:
        guarded(rec, f"ours_fa_const {L}", lambda: row("ours_triton", "causal", pc, lambda: attn.routed_prefill(
            q, k, v, fa_route, lens, lens, _route_const="fa", **kw), route="constexpr"))
        guarded(rec, f"ours_sa_const {L}", lambda: row("ours_triton", "sa_block", ps, lambda: attn.routed_prefill(
            q, k, v, sa_route, lens, lens, _route_const="sa", **kw), route="constexpr"))
    if L in args.flex_lengths:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        cflex = torch.compile(flex_attention, dynamic=False)

        def causal(b, h, qi, ki):
            return ki <= qi

        def flex_plain(mask_mod, label, pairs, mask, backend="TRITON"):
            t0 = time.time()
            bm = create_block_mask(mask_mod, 1, None, L, L, device="cuda", BLOCK_SIZE=128, _compile=True)
            build_s = time.time() - t0
            import torch._dynamo.config as dc

            opts = {"BACKEND": backend} if backend != "TRITON" else None

            def run():
                with dc.patch(recompile_limit=64):  # every (length, mask) is a recompile; never fall back to eager
                    return cflex(q, k, v, block_mask=bm, scale=scale, enable_gqa=True, kernel_options=opts)
            row("flex_triton" if backend == "TRITON" else "flex_flash", mask, pairs, run, mask_build_s=build_s)

        sa_mm = flex.make_mask_mod(sa_route, lens, lens, routed=False, **SA)
        if L in args.flex_causal_lengths:
            guarded(rec, f"flex causal {L}", lambda: flex_plain(causal, "causal", pc, "causal"))
        guarded(rec, f"flex sa {L}", lambda: flex_plain(sa_mm, "sa", ps, "sa_block"))
        if fa4.unavailable_reason(q.device) is None:  # FlexAttention on flash-attn-4's CuTe kernel
            guarded(rec, f"flex_flash causal {L}", lambda: flex_plain(causal, "causal", pc, "causal", "FLASH"))
            guarded(rec, f"flex_flash sa {L}", lambda: flex_plain(sa_mm, "sa", ps, "sa_block", "FLASH"))

        def ours_flex(route, mask, pairs):
            bm = flex.build_block_mask(route, lens, lens, 1, L, L, compile_mask=True, **SA)
            ms_mask = bench(lambda: flex.build_block_mask(route, lens, lens, 1, L, L, compile_mask=True, **SA),
                            rep=20)
            row("ours_flex", mask, pairs, lambda: flex.routed_prefill_flex(
                q, k, v, route, lens, lens, block_mask=bm, **kw), route="device", mask_build_ms=ms_mask)

        if L in args.ours_flex_lengths:
            guarded(rec, f"ours_flex fa {L}", lambda: ours_flex(fa_route, "causal", pc))
            guarded(rec, f"ours_flex sa {L}", lambda: ours_flex(sa_route, "sa_block", ps))


def default_routed(q, k, v, route):
    """fluxc's routed op as a model runs it: the default kernel choice (`impl="auto"`) on this GPU, causal
    prefill of B sequences of L tokens. Returns (the call, the choice)."""
    B, L = q.shape[0], q.shape[2]
    auto = resolve_impl("auto", q.device)
    spec = SiteSpec(is_causal=True, scale=q.shape[-1] ** -0.5, **SA, n_last=0)
    qpos = torch.arange(L, device=q.device)[None].expand(B, -1)
    start = torch.zeros(B, dtype=torch.long, device=q.device)
    return (lambda: run_kernel(auto, q, k, v, None, route, qpos, start, spec, explicit=False)), auto


def full_matrix_section(rec, B, hq, hkv, L, args):
    """The full branch as the routed op runs it by default (`impl="auto"`) against cuDNN SDPA, at batch B and GQA
    hq:hkv: the routed model routed all-full must not be slower than the untouched one."""
    g = torch.Generator(device="cuda").manual_seed(B * 1000 + hkv + L)
    q = torch.randn(B, hq, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    pairs = B * pairs_causal(L)
    base = dict(kind="prefill_full", L=L, B=B, Hq=hq, Hkv=hkv)

    def row(impl, fn, **extra):
        ms = bench(fn, rep=args.rep)
        rec.add(**base, impl=impl, mask="causal", ms=ms, pairs=pairs,
                tflops=4.0 * pairs * D * hq / (ms * 1e-3) / 1e12, **extra)

    fn = sdpa_fn(q, k, v, "cudnn", True)
    guarded(rec, f"full {B}x{L} {hq}:{hkv} sdpa_cudnn", lambda: row("sdpa_cudnn", fn, gqa=fn.gqa))
    call, auto = default_routed(q, k, v, torch.ones(B, dtype=torch.bool, device="cuda"))
    guarded(rec, f"full {B}x{L} {hq}:{hkv} fluxc_fa", lambda: row("fluxc_fa", call, backend=auto))


def decode_section(rec, K, B, L, args):
    attn = importlib.import_module(K.__name__ + ".attention")
    flex = importlib.import_module(K.__name__ + ".flex")
    g = torch.Generator(device="cuda").manual_seed(B * 7 + L)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    fa_route = torch.ones(B, dtype=torch.bool, device="cuda")
    sa_route = torch.zeros(B, dtype=torch.bool, device="cuda")
    scale = D ** -0.5
    sa_keys = int(sa_keys_per_query(torch.tensor([L - 1]))[0])
    fa_bytes = B * HKV * L * D * 2 * 2
    sa_bytes = B * HKV * sa_keys * D * 2 * 2
    base = dict(kind="decode", L=L, B=B)

    def row(impl, mask, nbytes, fn, **extra):
        ms = bench(fn, rep=args.rep)
        try:
            ms_graph = bench(fn, graph=True, rep=args.rep)
        except Exception as e:  # noqa: BLE001
            ms_graph = None
            extra["graph_error"] = str(e)[:200]
        rec.add(**base, impl=impl, mask=mask, ms=ms, ms_graph=ms_graph, bytes=nbytes, gbps=nbytes / (ms * 1e-3) / 1e9,
                gbps_graph=(nbytes / (ms_graph * 1e-3) / 1e9) if ms_graph else None, **extra)

    kw = dict(scale=scale, **SA)
    for be in ("flash", "cudnn"):
        def go(be=be):
            fn = sdpa_fn(q, k, v, be, False)
            row(f"sdpa_{be}", "full", fa_bytes, fn, gqa=fn.gqa)
        guarded(rec, f"sdpa_{be} decode {B},{L}", go)
    guarded(rec, f"ours fa decode {B},{L}", lambda: row("ours_triton", "full", fa_bytes, lambda: attn.routed_decode(
        q, k, v, fa_route, lens, **kw), route="device"))
    guarded(rec, f"ours sa decode {B},{L}", lambda: row("ours_triton", "sa_block", sa_bytes, lambda: attn.routed_decode(
        q, k, v, sa_route, lens, **kw), route="device"))
    # SA over the evicted cache: a ring of sink + window slots per sequence (full: n = L)
    ring_c = SINK + WINDOW
    ring_bytes = B * HKV * ring_c * D * 2 * 2

    def ring_row():
        kr = torch.randn(B, HKV, ring_c, D, device="cuda", dtype=torch.bfloat16, generator=g)
        vr = torch.randn(B, HKV, ring_c, D, device="cuda", dtype=torch.bfloat16, generator=g)
        row("ours_triton", "sa_ring", ring_bytes, lambda: attn.routed_decode_ring(q, kr, vr, lens, **kw),
            route="ring", slots=ring_c)
    guarded(rec, f"ours sa ring decode {B},{L}", ring_row)
    if (B, L) in args.route_cost_decode:
        guarded(rec, f"ours fa const {B},{L}", lambda: row("ours_triton", "full", fa_bytes, lambda: attn.routed_decode(
            q, k, v, fa_route, lens, _route_const="fa", **kw), route="constexpr"))
        guarded(rec, f"ours sa const {B},{L}", lambda: row("ours_triton", "sa_block", sa_bytes,
                                                            lambda: attn.routed_decode(
                                                                q, k, v, sa_route, lens, _route_const="sa", **kw),
                                                            route="constexpr"))
    if (B, L) in args.flex_decode:
        for route, mask, nb in ((fa_route, "full", fa_bytes), (sa_route, "sa_block", sa_bytes)):
            def go(route=route, mask=mask, nb=nb):
                ones = torch.ones(B, dtype=torch.int32, device="cuda")
                bm = flex.build_block_mask(route, lens, ones, B, 1, L, compile_mask=True, **SA)
                row("ours_flex", mask, nb, lambda: flex.routed_decode_flex(q, k, v, route, lens, block_mask=bm, **kw),
                    route="device")
            guarded(rec, f"ours_flex decode {mask} {B},{L}", go)


def ring_sweep(rec, K, args):
    """Launch configurations of the ring decode (CUDA-graph medians) at the decode shapes."""
    attn = importlib.import_module(K.__name__ + ".attention")
    C = SINK + WINDOW
    for spec in [s for s in args.decode.split(",") if s]:
        B, L = (int(x) for x in spec.split("x"))
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        kr = torch.randn(B, HKV, C, D, device="cuda", dtype=torch.bfloat16)
        vr = torch.randn(B, HKV, C, D, device="cuda", dtype=torch.bfloat16)
        n = torch.full((B,), L, dtype=torch.int32, device="cuda")
        nbytes = B * HKV * C * D * 4
        for bn, w, st, waves, mb in args.ring_cfgs:
            cfg = dict(BLOCK_N=bn, num_warps=w, num_stages=st, SPLIT_WAVES=waves, RING_MIN_BLOCKS=mb)
            for splits in (None, 1, 2, 4, 9, 17, 34):  # None: the automatic choice

                def go():
                    fn = lambda: attn.routed_decode_ring(q, kr, vr, n, scale=D ** -0.5, _config=cfg,  # noqa: E731
                                                         num_splits=splits, **SA)
                    msg = bench(fn, graph=True, rep=30)
                    s = splits or attn.ring_num_splits(B, HKV, C, q.device, cfg)
                    rec.add(kind="sweep_ring", B=B, L=L, cfg=f"bn{bn}w{w}s{st}waves{waves}mb{mb}splits{s}"
                            + ("auto" if splits is None else ""), ms_graph=msg, ms=msg,
                            gbps=nbytes / (msg * 1e-3) / 1e9)
                guarded(rec, f"ring sweep {cfg} splits {splits}", go)


def sweep(rec, K, args):
    """Launch-configuration sweep (informs the fixed defaults in kernels/attention.py)."""
    attn = importlib.import_module(K.__name__ + ".attention")
    L = args.sweep_len
    q = torch.randn(1, HQ, L, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([L], dtype=torch.int32, device="cuda")
    kw = dict(scale=D ** -0.5, pattern="streaming", n_last=0, **SA)
    cfgs = [(128, 64, 8, 3, True), (128, 64, 8, 3, False), (128, 128, 8, 3, True), (128, 128, 8, 3, False),
            (128, 64, 8, 4, True), (128, 64, 8, 4, False)]
    for bm, bn, w, s, tma in cfgs:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
        for fa in (True, False):
            route = torch.full((1,), fa, dtype=torch.bool, device="cuda")
            pairs = pairs_causal(L) if fa else pairs_sa(L)

            def go():
                ms = bench(lambda: attn.routed_prefill(q, k, v, route, lens, lens, _config=cfg, _use_tma=tma, **kw))
                rec.add(kind="sweep_prefill", L=L, fa=fa, cfg=f"{bm}x{bn}w{w}s{s}{'tma' if tma else 'ptr'}", ms=ms,
                        tflops=tflops(pairs, ms))
            guarded(rec, f"sweep {cfg}", go)
    q = k = v = None  # free the prefill tensors before the decode sweep
    for B, Ld in ((1, 32768), (8, 32768)):
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, HKV, Ld, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, HKV, Ld, D, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((B,), Ld, dtype=torch.int32, device="cuda")
        nbytes = B * HKV * Ld * D * 4
        for bn, w, s, waves in ((64, 4, 3, 4), (64, 4, 4, 4), (64, 4, 3, 2), (64, 4, 4, 2), (64, 4, 4, 8)):
            cfg = dict(BLOCK_N=bn, num_warps=w, num_stages=s, SPLIT_WAVES=waves)
            route = torch.ones(B, dtype=torch.bool, device="cuda")

            def go():
                fn = lambda: attn.routed_decode(q, k, v, route, lens, scale=D ** -0.5, _config=cfg, **SA)  # noqa: E731
                ms = bench(fn)
                msg = bench(fn, graph=True)
                rec.add(kind="sweep_decode", B=B, L=Ld, cfg=f"bn{bn}w{w}s{s}waves{waves}", ms=ms, ms_graph=msg,
                        gbps=nbytes / (ms * 1e-3) / 1e9, gbps_graph=nbytes / (msg * 1e-3) / 1e9)
            guarded(rec, f"sweep decode {cfg}", go)


def evaluate(rec):
    """The targets of benchmarks/targets.toml (bench "kernels") on the rows measured so far."""
    rec.data["targets"] = measures.targets_for("kernels", rec.data)
    rec.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels_h100.json"))
    ap.add_argument("--lengths", default="8192,32768,65536,131072")
    ap.add_argument("--decode", default="1x32768,1x131072,8x32768,32x32768")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch configurations")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--sweep-len", type=int, default=16384)
    ap.add_argument("--flex-lengths", default="8192,32768,65536,131072", help="flex with the SA mask")
    ap.add_argument("--flex-causal-lengths", default="8192,32768")
    ap.add_argument("--ours-flex-lengths", default="32768,131072")
    ap.add_argument("--flex-decode", default="1x32768,8x32768")
    ap.add_argument("--skip-flex", action="store_true")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    ap.add_argument("--full-matrix", default="",
                    help="the full branch against cuDNN at BxL:Hq:Hkv points, e.g. 1x8192:32:8,8x32768:32:4 ('' skips)")
    ap.add_argument("--decode-only", action="store_true", help="copy bandwidth + the decode section only")
    ap.add_argument("--ring-sweep", action="store_true", help="also sweep the ring decode's launch configurations")
    args = ap.parse_args()
    if args.decode_only:
        args.lengths = ""
    args.ring_cfgs = [(64, 4, 2, 4, 1), (64, 4, 3, 4, 1), (64, 8, 3, 4, 1)]
    args.route_cost_lengths = {32768}
    args.route_cost_decode = {(8, 32768)}

    def ints(x):
        return set() if args.skip_flex else {int(t) for t in x.split(",") if t}
    args.flex_lengths = ints(args.flex_lengths)
    args.flex_causal_lengths = ints(args.flex_causal_lengths)
    args.ours_flex_lengths = ints(args.ours_flex_lengths)
    args.flex_decode = set() if args.skip_flex else {tuple(int(t) for t in x.split("x"))
                                                     for x in args.flex_decode.split(",") if x}
    K = importlib.import_module("fluxc.kernels")
    meta = harness.provenance(shape=dict(Hq=HQ, Hkv=HKV, D=D, dtype="bf16"), sa_pattern=SA,
                              timing="triton.testing.do_bench median (decode also do_bench_cudagraph median)",
                              kernels=K.__name__)
    rec = harness.Results(args.out, meta, targets=[])
    print(json.dumps(meta), flush=True)
    rec.meta["copy_gbps"] = copy_bandwidth(rec)
    if args.sweep or args.sweep_only:
        sweep(rec, K, args)
    if args.ring_sweep:
        ring_sweep(rec, K, args)
    if not args.sweep_only:
        for L in [int(x) for x in args.lengths.split(",") if x]:
            prefill_section(rec, K, L, args)
        for spec in [s for s in args.decode.split(",") if s]:
            B, L = (int(x) for x in spec.split("x"))
            decode_section(rec, K, B, L, args)
        for point in [s for s in args.full_matrix.split(",") if s]:
            shape, hq, hkv = point.split(":")
            B, L = (int(x) for x in shape.split("x"))
            full_matrix_section(rec, B, int(hq), int(hkv), L, args)
            torch.cuda.empty_cache()  # the next point's B x L operands
        evaluate(rec)
    rec.flush()
    print("\n== summary ==")
    for r in rec.rows:
        if "ms" in r:
            extra = f"{r['tflops']:.0f} TFLOP/s" if "tflops" in r else f"{r.get('gbps', 0):.0f} GB/s"
            print(f"{r['kind']:14s} {str(r.get('B', '')):>3s} {str(r.get('L', '')):>7s} {r.get('impl', r.get('cfg', '')):12s} "
                  f"{str(r.get('mask', r.get('cfg', ''))):14s} {str(r.get('route', '')):9s} {r['ms']:9.4f} ms  {extra}"
                  + (f"  graph {r['ms_graph']:.4f} ms" if r.get("ms_graph") else ""))
        elif r.get("kind") == "error":
            print("ERROR", r["label"], r["error"][:200])
    harness.print_targets(rec.data["targets"])


if __name__ == "__main__":
    main()
