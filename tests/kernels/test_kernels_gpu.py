"""GPU tests of the routed-attention kernels: the interpreter cases plus large sizes, bf16, head dims
64/128, GQA 1/4/8, CUDA-graph capture with routes changed in place, no recompilation on route
changes, and the compiled FlexAttention lowering.  Skipped without CUDA."""

from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _interpret_cases import cases as interp_cases  # noqa: E402
from _kernel_harness import (  # noqa: E402
    load_kernels,
    make_prefill_inputs,
    pattern_kwargs,
    poison_range,
    random_prefill_case,
    run_decode_case,
    run_paged_case,
    run_prefill_case,
    run_ring_case,
    run_skip_case,
    run_varlen_case,
    submodule,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RUN = {"prefill": run_prefill_case, "decode": run_decode_case, "varlen": run_varlen_case, "ring": run_ring_case,
       "paged": run_paged_case}


def gpu_cases() -> dict[str, dict]:
    """Chosen combinations (each distinct set of compile-time flags is one Triton compile, seconds
    each on the GPU machine): every dtype, head dim, GQA ratio, pattern and load path appears."""
    out = {}
    seed = 5000
    prefill = [  # dtype, D, group, pattern, block_exact, tma (None = automatic)
        ("bf16", 128, 4, "streaming", True, None), ("bf16", 128, 8, "streaming", False, None),
        ("bf16", 128, 1, "triangle", True, None), ("bf16", 64, 4, "streaming", True, None),
        ("bf16", 64, 8, "triangle", False, None), ("fp16", 128, 4, "triangle", False, None),
        ("fp16", 64, 1, "streaming", False, None), ("bf16", 128, 4, "streaming", True, False),
        ("fp16", 128, 8, "streaming", True, None), ("bf16", 128, 4, "triangle", True, None),
    ]
    for dtype, D, group, pattern, be, tma in prefill:
        seed += 1
        extra = {} if tma is None else {"tma": tma}
        c = random_prefill_case(seed, dtype=dtype, D=D, group=group, max_t=2500, pattern=pattern, block_exact=be,
                                block=128, Hkv=2 if group < 8 else 1, **extra)
        out[f"prefill-{dtype}-d{D}-g{group}-{pattern}-{'block' if be else 'token'}-tma{tma}"] = dict(
            kind="prefill", **c)
    decode = [("bf16", 128, 4, True, None), ("bf16", 128, 8, False, 1), ("bf16", 64, 1, True, 7),
              ("fp16", 128, 4, False, 64), ("fp16", 64, 8, True, None), ("bf16", 128, 1, False, 3)]
    for dtype, D, group, be, splits in decode:
        seed += 1
        c = random_prefill_case(seed, dtype=dtype, D=D, group=group, max_t=6000, pattern="streaming",
                                block_exact=be, block=128, Hkv=2, num_splits=splits)
        out[f"decode-{dtype}-d{D}-g{group}-{'block' if be else 'token'}-s{splits}"] = dict(kind="decode", **c)
    seed += 1
    out["prefill-bf16-long-sa-8k"] = dict(kind="prefill", **random_prefill_case(
        seed, dtype="bf16", D=128, group=4, max_t=8200, pattern="streaming", block_exact=True, block=128,
        B=2, Hkv=1, sink=128, window=2048, Tk=8200, kv_lens=[8200, 5000], q_lens=[8200, 3000],
        route=[False, True]))
    seed += 1
    out["prefill-bf16-softcap-nw-bthd"] = dict(kind="prefill", **random_prefill_case(
        seed, dtype="bf16", D=128, group=4, max_t=2000, pattern="streaming", block_exact=False, block=128,
        softcap=30.0, native_window=700, layout="bthd"))
    for i, pattern in enumerate(("streaming", "triangle")):
        seed += 1
        out[f"varlen-bf16-{pattern}"] = dict(kind="varlen", **random_prefill_case(
            seed, dtype="bf16", D=128, group=4, max_t=3000, pattern=pattern, block_exact=True, block=128,
            tma=bool(i)))
    for kind in ("prefill", "decode"):
        for be in (False, True):
            seed += 1
            c = dict(kind=kind, seed=seed, dtype="bf16", D=128, B=2, Hkv=2, group=4, Tk=5000, Tq=100,
                     kv_lens=[5000, 4500], q_lens=[100, 64] if kind == "prefill" else [1, 1],
                     route=[False, False], sink=128, window=1024, block=128, block_exact=be,
                     pattern="streaming", num_splits=16)
            c["poison"] = poison_range(c, BN=128)
            out[f"skip-{kind}-{'block' if be else 'token'}"] = c
    # left padding (kv_start): HF layout at up to 2.5K keys (TMA and pointer loads), decode
    for i, (kind, be, tma) in enumerate((("prefill", True, True), ("prefill", False, False), ("decode", True, None))):
        seed += 1
        c = random_prefill_case(seed, dtype="bf16", D=128, group=4, max_t=2500, pattern="streaming", block_exact=be,
                                block=128, Hkv=2, B=3, sink=128, window=512, num_splits=None)
        c["kv_lens"] = [c["Tk"]] * 3
        c["q_lens"] = [c["Tk"]] * 3 if kind == "prefill" else [1] * 3
        c["Tq"] = max(c["q_lens"])
        c["kv_start"] = [0, c["Tk"] // 3 + i, c["Tk"] - 200]
        if tma is not None:
            c["tma"] = tma
        out[f"kvstart-{kind}-bf16-d128-{'block' if be else 'token'}-tma{tma}"] = dict(kind=kind, **c)
    # ring-buffer SA decode at the released pattern (sink 128, window 2048, block 128): n below the
    # sinks, inside the first window, one past the ring, at block boundaries (p % 128 == 0 / 127),
    # up to 200K keys (the dense reference reads all of them)
    ring = [  # dtype, D, group, Hkv, block_exact, n, num_splits, softcap
        ("bf16", 128, 4, 2, True, [1, 60, 128, 129, 2176, 2177, 2304, 128 * 50 + 1, 128 * 50], None, 0.0),
        ("bf16", 128, 8, 1, True, [200_000, 128 * 1000 + 1, 128 * 1000, 3000], None, 0.0),
        ("bf16", 128, 8, 1, False, [200_000, 128 * 1000 + 1, 50, 2177, 131_072], None, 0.0),
        ("bf16", 64, 1, 4, True, [129, 4000, 128 * 40, 128 * 40 + 1, 70_001], 7, 0.0),
        ("fp16", 128, 4, 2, False, [5, 2176, 9_999, 40_000], 1, 30.0),
        ("bf16", 128, 4, 8, True, [32_768] * 3 + [32_769], None, 0.0),
    ]
    for dtype, D, group, Hkv, be, n, splits, softcap in ring:
        seed += 1
        out[f"ring-{dtype}-d{D}-g{group}-{'block' if be else 'token'}-n{max(n)}-s{splits}"] = dict(
            kind="ring", seed=seed, dtype=dtype, D=D, group=group, Hkv=Hkv, sink=128, window=2048, block=128,
            block_exact=be, n=n, num_splits=splits, softcap=softcap)
    # paged decode at the released pattern on the engine's page size: mixed routes in one launch, the ring
    # wrapping many times, sequences shorter than the sinks, up to 64K keys
    paged = [  # dtype, D, group, Hkv, block_exact, page, n, route, num_splits
        ("bf16", 128, 4, 2, True, 16, [1, 130, 2177, 9_000, 65_536, 40_001], [0, 1, 0, 1, 1, 0], None),
        ("bf16", 64, 8, 1, False, 64, [128 * 40 + 1, 3, 2176, 20_000], [0, 0, 1, 1], 5),
        ("fp16", 128, 1, 4, True, 256, [5000, 2305, 70], [1, 0, 0], None),
    ]
    for dtype, D, group, Hkv, be, page, n, route, splits in paged:
        seed += 1
        out[f"paged-{dtype}-d{D}-g{group}-{'block' if be else 'token'}-page{page}-n{max(n)}"] = dict(
            kind="paged", seed=seed, dtype=dtype, D=D, group=group, Hkv=Hkv, sink=128, window=2048, block=128,
            block_exact=be, page=page, n=n, route=route, num_splits=splits)
    return out


# the interpreter cases too (fp32 and fp16 at small sizes), except the fp32 ones that would only add
# compiles of the fp32 variant: one fp32 prefill and one fp32 decode case are kept
_INTERP = {k: v for k, v in interp_cases().items()
           if v["dtype"] != "fp32" or k in ("prefill-fp32-g4-streaming-block", "decode-fp32-g4-token")}
ALL = {**{f"interp-{k}": v for k, v in _INTERP.items()}, **gpu_cases()}


@pytest.fixture(scope="module")
def K():
    return load_kernels()


@pytest.mark.parametrize("name", list(ALL))
def test_kernel_matches_reference_gpu(K, name):
    case = ALL[name]
    fn = run_skip_case if "skip-" in name else RUN[case["kind"]]
    rep = fn(K, case, "cuda")
    assert not rep["nan"], f"{name}: NaN"
    assert not rep.get("padding_nonzero"), f"{name}: padding rows not zero"
    assert rep["err"] <= rep["tol"], f"{name}: max error {rep['err']:.3g} > tolerance {rep['tol']:.3g}"


def _graph_inputs(decode: bool):
    case = random_prefill_case(77, dtype="bf16", D=128, group=4, max_t=3000, pattern="streaming",
                               block_exact=True, block=128, B=4, Hkv=2, sink=128, window=512)
    if decode:
        case["q_lens"], case["Tq"] = [1] * 4, 1
    q, k, v, route, kv_lens, q_lens = make_prefill_inputs(case, "cuda")
    return case, q, torch.nan_to_num(k), torch.nan_to_num(v), route, kv_lens, q_lens


@pytest.mark.parametrize("decode", [False, True])
def test_cuda_graph_reads_route_from_memory(K, decode):
    """Capture with route A, write route B into the same tensor, replay: the output follows B."""
    attn = submodule(K, "attention")
    ref = submodule(K, "reference")
    case, q, k, v, route, kv_lens, q_lens = _graph_inputs(decode)
    kw = pattern_kwargs(case)
    route_a = torch.tensor([True, False, True, False], device="cuda")
    route_b = torch.tensor([False, True, True, False], device="cuda")
    route.copy_(route_a)

    if decode:
        kw.pop("pattern"), kw.pop("n_last")

        def step():
            return attn.routed_decode(q, k, v, route, kv_lens, **kw)
    else:
        def step():
            return attn.routed_prefill(q, k, v, route, kv_lens, q_lens, **kw)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile + warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    for want in (route_b, route_a):
        route.copy_(want)
        g.replay()
        torch.cuda.synchronize()
        if decode:
            r = ref.routed_decode_reference(q.double(), k.double(), v.double(), want, kv_lens, **kw)
        else:
            r = ref.routed_attention_reference(q.double(), k.double(), v.double(), want, kv_lens, q_lens, **kw)
        err = (out.double() - r).abs().max().item()
        assert err < 3e-2, err
    # and lengths are read from memory too: shorten sequence 0 in place
    kv_lens[0] -= 37
    if not decode:
        q_lens[0] = min(int(q_lens[0]), int(kv_lens[0]))
    g.replay()
    torch.cuda.synchronize()
    if decode:
        r = ref.routed_decode_reference(q.double(), k.double(), v.double(), route, kv_lens, **kw)
    else:
        r = ref.routed_attention_reference(q.double(), k.double(), v.double(), route, kv_lens, q_lens, **kw)
    assert (out.double() - r).abs().max().item() < 3e-2


def _n_compiled(fn) -> int:
    """Compiled variants of a JITFunction (triton 3.6 and 3.9: device_caches values are tuples whose
    first item is the kernel cache)."""
    dc = getattr(fn, "device_caches", None)
    if dc is not None:
        return sum(len(v[0]) if isinstance(v, tuple) else len(v) for v in dc.values())
    return sum(len(c) for c in fn.cache.values())


def test_no_recompile_when_routes_change(K):
    attn = submodule(K, "attention")
    tk = attn._kernels()
    case, q, k, v, route, kv_lens, q_lens = _graph_inputs(False)
    kw = pattern_kwargs(case)
    attn.routed_prefill(q, k, v, route, kv_lens, q_lens, **kw)
    n0 = _n_compiled(tk._prefill_kernel)
    for r in ([True] * 4, [False] * 4, [True, False, False, True]):
        route.copy_(torch.tensor(r, device="cuda"))
        attn.routed_prefill(q, k, v, route, kv_lens, q_lens, **kw)
        kv_lens[1] -= 5  # lengths change too
        q_lens[1] = torch.minimum(q_lens[1], kv_lens[1])
    assert _n_compiled(tk._prefill_kernel) == n0


@pytest.mark.parametrize("decode", [False, True])
def test_flex_lowering_compiled(K, decode):
    flex = submodule(K, "flex")
    ref = submodule(K, "reference")
    case, q, k, v, route, kv_lens, q_lens = _graph_inputs(decode)
    kw = pattern_kwargs(case)
    if decode:
        kw.pop("pattern"), kw.pop("n_last")
        out = flex.routed_decode_flex(q, k, v, route, kv_lens, **kw)
        r = ref.routed_decode_reference(q.double(), k.double(), v.double(), route, kv_lens, **kw)
        low = ref.routed_decode_reference(q, k, v, route, kv_lens, **kw)
    else:
        out = flex.routed_prefill_flex(q, k, v, route, kv_lens, q_lens, **kw)
        r = ref.routed_attention_reference(q.double(), k.double(), v.double(), route, kv_lens, q_lens, **kw)
        low = ref.routed_attention_reference(q, k, v, route, kv_lens, q_lens, **kw)
    err = (out.double() - r).abs().max().item()
    torch_err = (low.double() - r).abs().max().item()
    assert err <= 2 * torch_err + 1e-4, (err, torch_err)


@pytest.mark.parametrize("routes", [[True, True], [True, False]])
def test_prefill_dispatch(K, routes):
    """All-FA unpadded batches go to SDPA, anything else to the routed kernel; same results."""
    attn = submodule(K, "attention")
    ref = submodule(K, "reference")
    torch.manual_seed(3)
    q = torch.randn(2, 8, 700, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 700, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 2, 700, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((2,), 700, dtype=torch.int32, device="cuda")
    route = torch.tensor(routes, device="cuda")
    kw = dict(scale=128 ** -0.5, sink=128, window=256, block=128, block_exact=True, pattern="streaming", n_last=0)
    out = attn.routed_prefill_dispatch(q, k, v, route, lens, lens, **kw)
    r = ref.routed_attention_reference(q.double(), k.double(), v.double(), route, lens, lens, **kw)
    low = ref.routed_attention_reference(q, k, v, route, lens, lens, **kw)
    assert (out.double() - r).abs().max().item() <= 2 * (low.double() - r).abs().max().item() + 1e-4


@pytest.mark.parametrize("block_exact", [False, True])
def test_cuda_graph_ring_decode_steps(K, block_exact):
    """Capture routed_decode_ring once, then run decode steps by writing the new key into its ring slot
    and bumping n in place (across a block boundary and past the ring's wrap); each replay must match
    the dense SA reference over all keys so far.  Also: no recompilation as n changes."""
    attn = submodule(K, "attention")
    ref = submodule(K, "reference")
    tk = attn._kernels()
    torch.manual_seed(11)
    B, Hkv, Hq, D, steps = 3, 2, 8, 128, 4
    pk = dict(sink=128, window=2048, block=128, block_exact=block_exact)
    n0 = [128 * 40 - 2, 2175, 126]  # crosses p % 128 == 0, fills the ring then wraps, ends below the sinks
    Tk = max(n0) + steps
    k = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=torch.bfloat16)
    qs = torch.randn(steps + 1, B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    C = attn.ring_capacity(**pk)
    kr = torch.zeros(B, Hkv, C, D, device="cuda", dtype=torch.bfloat16)
    vr = torch.zeros_like(kr)
    for b, nb in enumerate(n0):  # the keys written so far, in order (later writes win)
        r = torch.arange(nb, device="cuda")
        for lo, hi in [(0, 128)] + [(x, x + 2048) for x in range(128, nb, 2048)]:  # distinct slots per write
            rr = r[lo:hi]
            slots = attn.ring_slot(rr, **pk)
            kr[b, :, slots] = k[b, :, rr]
            vr[b, :, slots] = v[b, :, rr]
    n = torch.tensor(n0, dtype=torch.int32, device="cuda")
    q = qs[0].clone()

    def step():
        return attn.routed_decode_ring(q, kr, vr, n, scale=D ** -0.5, **pk)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    n_compiled = _n_compiled(tk._decode_kernel)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    route = torch.zeros(B, dtype=torch.bool, device="cuda")
    for t in range(steps + 1):
        if t:
            r = n.long()  # the new token's real index
            slots = attn.ring_slot(r, **pk)
            bi = torch.arange(B, device="cuda")
            kr[bi, :, slots] = k[bi, :, r]
            vr[bi, :, slots] = v[bi, :, r]
            n += 1
            q.copy_(qs[t])
        g.replay()
        torch.cuda.synchronize()
        want = ref.routed_decode_reference(q.double(), k.double(), v.double(), route, n, scale=D ** -0.5, **pk)
        low = ref.routed_decode_reference(q, k, v, route, n, scale=D ** -0.5, **pk)
        err = (out.double() - want).abs().max().item()
        tol = 2 * (low.double() - want).abs().max().item() + 1e-4
        assert err <= tol, (t, err, tol)
        eager = step()
        assert (eager.double() - want).abs().max().item() <= tol
    assert _n_compiled(tk._decode_kernel) == n_compiled
