"""Analytical floors of the end-to-end benchmark: what they are built from (device copy bandwidth, cuDNN
attention per shape, the router op alone), the floor of every fluxc measurement, and the targets.

  prefill(r, B, L) = non-attention time (the model with a zero-cost attention, scaled by tokens)
                     + per layer: FA = SDPA cuDNN at (B, L); SA = executed-pair fraction at L x that
  decode(r, B, L)  = non-attention decode step (CUDA graph) + KV bytes the step reads / copy bandwidth
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import harness
import measures
from e2e_run import Run

# SDPA cuDNN prefill at B=1 on an H100 (ms), measured earlier: used only when the in-run measurement fails.
H100_CUDNN_MS = {32768: 15.0, 65536: 57.1, 131072: 249.0}


def floors_phase(run: Run) -> None:
    """Device copy bandwidth, SDPA cuDNN prefill per layer at every prefill shape, router op alone."""
    spec = run.spec
    n = spec.copy_bytes

    def copy() -> None:
        x = torch.empty(n // 2, dtype=torch.bfloat16, device=spec.device).normal_()  # (n / 2,) bf16: n bytes
        y = torch.empty_like(x)
        ms = harness.median(run.bench(lambda: y.copy_(x), iters=20))
        run.copy_gbps = 2 * n / (ms * 1e-3) / 1e9  # read + write
        run.rec.add(kind="copy", impl="torch copy_", bytes=2 * n, ms=ms, gbps=run.copy_gbps)
    run.copy_gbps = 3000.0 if run.cuda else 10.0
    run.step("copy bandwidth", 2, copy)
    run.rec.meta["copy_gbps"] = run.copy_gbps
    short, mid, long = spec.lengths
    for batch, length in ((1, short), (1, mid), (1, long), (spec.big_batch, short)):
        est = 2 + 6 * batch * 0.249 * (length / 131072) ** 2
        run.step(f"sdpa cudnn {batch}x{length}", est, lambda b=batch, t=length: sdpa_floor(run, b, t))
        run.free(collect=False)
    for length in (short, long):
        run.step(f"router op {length}", 3, lambda t=length: router_op(run, t))
        run.free(collect=False)


def sdpa_floor(run: Run, batch: int, length: int) -> None:
    """One layer's causal SDPA (cuDNN on the GPU) at (B, L): the FA term of the prefill floor."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    spec = run.spec
    q = torch.randn(batch, spec.heads, length, spec.head_dim, dtype=run.dtype, device=spec.device)  # (B, H, L, D)
    k = torch.randn(batch, spec.kv_heads, length, spec.head_dim, dtype=run.dtype, device=spec.device)  # (B, Hkv, L, D)
    v = torch.randn_like(k)
    backend = SDPBackend.CUDNN_ATTENTION if run.cuda else SDPBackend.MATH
    gqa = "native"

    def native() -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    fn: Callable[[], torch.Tensor] = native
    try:
        native()
        harness.sync(run.cuda)
    except RuntimeError:  # the backend refuses native GQA: expand K/V outside the timed region
        grp = spec.heads // spec.kv_heads
        ke, ve = k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1)  # (B, H, L, D)
        gqa = "expanded"

        def expanded() -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        fn = expanded
    guess = max(1.0, batch * 249.0 * (length / 131072) ** 2)
    iters = max(3, min(20, int(1500 / guess))) if run.cuda else 3
    ms_all = run.bench(fn, iters=iters, warm=1)
    run.rec.add(kind="attn_floor", impl="sdpa_cudnn" if run.cuda else "sdpa_math_cpu", B=batch, L=length,
                ms=harness.median(ms_all), ms_all=ms_all, gqa=gqa)


def router_op(run: Run, length: int) -> None:
    """`fluxc::router_logits` alone for one layer."""
    from fluxc.ops.router import LayerRouter

    spec = run.spec
    router = LayerRouter(spec.head_dim, spec.router_hidden).to(spec.device)
    q = torch.randn(1, length, spec.heads, spec.head_dim, dtype=run.dtype, device=spec.device)  # (1, T, H, D)
    valid = torch.ones(1, length, dtype=torch.bool, device=spec.device)  # (1, T)
    weights = router.weights()
    ms_all = run.bench(lambda: torch.ops.fluxc.router_logits(q, valid, weights, run.cfg.pool_size),
                       iters=20 if run.cuda else 3, warm=3 if run.cuda else 1)
    run.rec.add(kind="router_op", impl="fluxc::router_logits", B=1, L=length, ms=harness.median(ms_all),
                ms_all=ms_all, note="one layer's router on a (1, T, 32, 128) pre-RoPE query, valid mask all true")


# ------------------------------------------------------------------------------------ floors of measurements


def rows_of(run: Run, kind: str) -> list[dict[str, Any]]:
    return [r for r in run.rec.rows if r.get("kind") == kind and r.get("ms") is not None]


def cudnn_ms(run: Run, batch: int, length: int) -> tuple[float | None, str]:
    row = run.rec.find(kind="attn_floor", B=batch, L=length)
    if row:
        return row["ms"], "measured"
    row = run.rec.find(kind="attn_floor", B=1, L=length)
    if row:
        return row["ms"] * batch, "measured at B=1, x B"
    if length in H100_CUDNN_MS and run.cuda:
        return H100_CUDNN_MS[length] * batch, "earlier H100 measurement"
    return None, "missing"


def nonattn_prefill_ms(run: Run, batch: int, length: int) -> tuple[float | None, str]:
    row = run.rec.find(kind="nonattn_prefill", B=batch, L=length)
    if row:
        return row["ms"], "measured"
    rows = [r for r in rows_of(run, "nonattn_prefill") if r["L"] >= run.spec.lengths[0]]
    if not rows:
        return None, "missing"
    ref = max(rows, key=lambda r: r["B"] * r["L"])
    return ref["ms"] * batch * length / (ref["B"] * ref["L"]), f"scaled by tokens from {ref['B']}x{ref['L']}"


def prefill_floor(run: Run, r: float, batch: int, length: int) -> dict[str, Any] | None:
    non, non_src = nonattn_prefill_ms(run, batch, length)
    fa, fa_src = cudnn_ms(run, batch, length)
    if non is None or fa is None:
        return None
    ns = run.n_sparse(r)
    frac = run.sa_frac(length)
    attn = (run.spec.layers - ns) * fa + ns * frac * fa
    return dict(ms=non + attn, nonattn_ms=non, nonattn_source=non_src, attn_ms=attn, fa_layer_ms=fa,
                fa_source=fa_src, sa_exec_frac=frac, full_layers=run.spec.layers - ns, sparse_layers=ns)


def decode_floor(run: Run, r: float, batch: int, length: int) -> dict[str, Any] | None:
    row = run.rec.find(kind="nonattn_decode", B=batch)
    spec = run.spec
    per_key = spec.kv_heads * spec.head_dim * 2 * torch.finfo(run.dtype).bits // 8  # K and V
    ns = run.n_sparse(r)
    kv = batch * per_key * ((spec.layers - ns) * length + ns * run.sa_keys(length))
    bw = run.copy_gbps * 1e9
    kv_ms = kv / bw * 1e3
    out = dict(kv_bytes=kv, kv_ms=kv_ms, copy_gbps=run.copy_gbps,
               bytes_floor_ms=(run.nonembed_bytes + kv) / bw * 1e3, sa_keys=run.sa_keys(length))
    if row is None:
        return out | dict(ms=None)
    return out | dict(ms=row["ms"] + kv_ms, nonattn_ms=row["ms"], nonattn_how=row.get("how"))


def evaluate(run: Run) -> None:
    """Floors for every measured fluxc shape, then every target of targets.toml (bench "e2e") with a pass flag."""
    floors: dict[str, Any] = dict(
        prefill_formula="nonattn(B,L) + sum over layers [FA: cuDNN(B,L); SA: exec_frac(L) x cuDNN(B,L)]",
        decode_formula="nonattn_decode(B) [CUDA graph] + KV bytes read (FA: L keys, SA: sink+window keys) / "
                       "copy bandwidth; bytes_floor_ms = (non-embedding weights + KV bytes) / copy bandwidth",
        prefill={}, decode={})
    of = {"prefill": prefill_floor, "decode": decode_floor}
    for row in run.rec.rows:
        if row.get("impl") != "fluxc" or row.get("ms") is None or row["kind"] not in of:
            continue
        floor = of[row["kind"]](run, row["r"], row["B"], row["L"])
        if floor is not None:
            floors[row["kind"]][f"r={row['r']} B={row['B']} L={row['L']}"] = floor | dict(
                measured_ms=row["ms"], ratio=row["ms"] / floor["ms"] if floor.get("ms") else None)
    run.rec.data["floors"] = floors
    run.rec.data["targets"] = measures.targets_for("e2e", run.rec.data)
    run.rec.data["fluxc_log"] = dict(run.tally.counts.most_common(40))
    run.rec.flush()
