"""Shared by the kernel tests (CPU interpreter worker and GPU tests): loading the kernels package,
random cases, and the error rule.

Error rule (FlashAttention's): a kernel's max-abs error against a float64 reference must be at most
2x the error PyTorch itself makes computing the same reference in the low-precision dtype (for
float32 inputs: the float32 reference), plus a tiny floor (1e-5 fp32, 1e-4 fp16/bf16) so that a
lucky, nearly exact PyTorch result does not make the bound vanish.  NaN never passes.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import pathlib
import random

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_kernels():
    """The ``fluxc.kernels`` package (the checkout's ``fluxc/`` or an installed fluxc)."""
    return importlib.import_module("fluxc.kernels")


def submodule(pkg, name):
    return importlib.import_module(f"{pkg.__name__}.{name}")


FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_prefill_inputs(case: dict, device: str):
    g = torch.Generator(device="cpu").manual_seed(case["seed"])
    B, Hkv, grp, D = case["B"], case["Hkv"], case["group"], case["D"]
    Hq = Hkv * grp
    Tk = case["Tk"]
    Tq = case.get("Tq", Tk)
    dt = DTYPES[case["dtype"]]
    kv_lens, q_lens = case["kv_lens"], case["q_lens"]
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dt)
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(dt)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(dt)
    if case.get("layout") == "bthd":  # non-contiguous heads: (B, T, H, D) storage viewed as (B, H, T, D)
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    # garbage (NaN) beyond each sequence's valid keys: must never leak into the output
    for b in range(B):
        k[b, :, kv_lens[b]:] = float("nan")
        v[b, :, kv_lens[b]:] = float("nan")
        if "kv_start" in case:  # left padding: never read either
            k[b, :, : case["kv_start"][b]] = float("nan")
            v[b, :, : case["kv_start"][b]] = float("nan")
    route = torch.tensor(case["route"], dtype=torch.bool)
    to = dict(device=device)
    return (q.to(**to), k.to(**to), v.to(**to), route.to(**to),
            torch.tensor(kv_lens, dtype=torch.int32, device=device),
            torch.tensor(q_lens, dtype=torch.int32, device=device))


def pattern_kwargs(case: dict) -> dict:
    return dict(scale=case["D"] ** -0.5, sink=case["sink"], window=case["window"], block=case["block"],
                block_exact=case["block_exact"], pattern=case.get("pattern", "streaming"),
                n_last=case.get("n_last", 0), softcap=case.get("softcap", 0.0),
                native_window=case.get("native_window", 0))


def start_kwargs(case: dict, device) -> dict:
    """kv_start for the kernels and the reference, when the case has left padding."""
    if "kv_start" not in case:
        return {}
    return {"kv_start": torch.tensor(case["kv_start"], dtype=torch.int32, device=device)}


def _clean(t: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(t, nan=0.0)


def error_report(out: torch.Tensor, ref64: torch.Tensor, ref_low: torch.Tensor, dtype) -> dict:
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    torch_err = (ref_low.double() - ref64).abs().max().item() if out.numel() else 0.0
    tol = 2.0 * torch_err + FLOOR[dtype]
    nan = bool(torch.isnan(out).any().item())
    return dict(err=err, torch_err=torch_err, tol=tol, nan=nan, ok=(not nan) and err <= tol)


def run_prefill_case(K, case: dict, device: str) -> dict:
    attn = submodule(K, "attention")
    ref = submodule(K, "reference")
    q, k, v, route, kv_lens, q_lens = make_prefill_inputs(case, device)
    kw = {**pattern_kwargs(case), **start_kwargs(case, device)}
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    extra = {}
    if "tma" in case:
        extra["_use_tma"] = case["tma"]
    if "config" in case:
        extra["_config"] = case["config"]
    attn.routed_prefill(q, k, v, route, kv_lens, q_lens, out=out, **kw, **extra)
    kc, vc = _clean(k), _clean(v)
    ref64 = ref.routed_attention_reference(q.double(), kc.double(), vc.double(), route, kv_lens, q_lens, **kw)
    low = ref.routed_attention_reference(q, kc, vc, route, kv_lens, q_lens, **kw)
    rep = error_report(out, ref64, low, q.dtype)
    # padding rows must be exact zeros
    for b, ql in enumerate(case["q_lens"]):
        if ql < q.shape[2] and out[b, :, ql:].abs().max().item() != 0.0:
            rep["ok"] = False
            rep["padding_nonzero"] = True
    return rep


def run_decode_case(K, case: dict, device: str) -> dict:
    attn = submodule(K, "attention")
    ref = submodule(K, "reference")
    c = dict(case)
    c["q_lens"] = [1] * case["B"]
    c["Tq"] = 1
    q, k, v, route, kv_lens, _ = make_prefill_inputs(c, device)
    kw = {**pattern_kwargs(case), **start_kwargs(case, device)}
    kw.pop("pattern")
    kw.pop("n_last")
    out = attn.routed_decode(q, k, v, route, kv_lens, num_splits=case.get("num_splits"), **kw)
    kc, vc = _clean(k), _clean(v)
    ref64 = ref.routed_decode_reference(q.double(), kc.double(), vc.double(), route, kv_lens, **kw)
    low = ref.routed_decode_reference(q, kc, vc, route, kv_lens, **kw)
    return error_report(out, ref64, low, q.dtype)


def run_varlen_case(K, case: dict, device: str) -> dict:
    """Packed layout: the same sequences as the padded case, concatenated; compared with the
    padded reference row by row."""
    attn = submodule(K, "attention")
    ref = submodule(K, "reference")
    q, k, v, route, kv_lens, q_lens = make_prefill_inputs(case, device)
    kw = pattern_kwargs(case)
    B = q.shape[0]
    qs = [q[b, :, : case["q_lens"][b]].transpose(0, 1) for b in range(B)]
    ks = [k[b, :, : case["kv_lens"][b]].transpose(0, 1) for b in range(B)]
    vs = [v[b, :, : case["kv_lens"][b]].transpose(0, 1) for b in range(B)]
    qp, kp, vp = torch.cat(qs), torch.cat(ks).contiguous(), torch.cat(vs).contiguous()
    cu_q = torch.tensor([0] + list(_cumsum(case["q_lens"])), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(_cumsum(case["kv_lens"])), dtype=torch.int32, device=device)
    extra = {"_use_tma": case["tma"]} if "tma" in case else {}
    out = attn.routed_prefill_varlen(qp, kp, vp, cu_q, cu_k, route, max_seqlen_q=max(case["q_lens"]),
                                     **kw, **extra)
    kc, vc = _clean(k), _clean(v)
    ref64 = ref.routed_attention_reference(q.double(), kc.double(), vc.double(), route, kv_lens, q_lens, **kw)
    low = ref.routed_attention_reference(q, kc, vc, route, kv_lens, q_lens, **kw)
    r64 = torch.cat([ref64[b, :, : case["q_lens"][b]].transpose(0, 1) for b in range(B)])
    rlo = torch.cat([low[b, :, : case["q_lens"][b]].transpose(0, 1) for b in range(B)])
    return error_report(out, r64, rlo, q.dtype)


def run_skip_case(K, case: dict, device: str) -> dict:
    """SA must not read keys outside sink + window (+ the blocks they share): poison the keys
    between them with NaN; the output must stay finite and exact."""
    attn = submodule(K, "attention")
    ref = submodule(K, "reference")
    q, k, v, route, kv_lens, q_lens = make_prefill_inputs(case, device)
    kw = pattern_kwargs(case)
    lo, hi = case["poison"]
    kp, vp = k.clone(), v.clone()
    kp[:, :, lo:hi] = float("nan")
    vp[:, :, lo:hi] = float("nan")
    if case["kind"] == "decode":
        kw.pop("pattern")
        kw.pop("n_last")
        out = attn.routed_decode(q[:, :, -1:].contiguous(), kp, vp, route, kv_lens,
                                 num_splits=case.get("num_splits"), **kw)
        ref64 = ref.routed_decode_reference(q[:, :, -1:].double(), _clean(k).double(), _clean(v).double(), route,
                                            kv_lens, **kw)
        low = ref.routed_decode_reference(q[:, :, -1:], _clean(k), _clean(v), route, kv_lens, **kw)
    else:
        out = attn.routed_prefill(q, kp, vp, route, kv_lens, q_lens, **kw)
        ref64 = ref.routed_attention_reference(q.double(), _clean(k).double(), _clean(v).double(), route,
                                               kv_lens, q_lens, **kw)
        low = ref.routed_attention_reference(q, _clean(k), _clean(v), route, kv_lens, q_lens, **kw)
    return error_report(out, ref64, low, q.dtype)


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s


# ---------------------------------------------------------------------------------------------
# random cases


def random_prefill_case(seed: int, *, dtype: str, D: int, group: int, max_t: int, pattern: str,
                        block_exact: bool, block: int, **over) -> dict:
    rnd = random.Random(seed)
    B = over.pop("B", rnd.randint(2, 3))
    Hkv = over.pop("Hkv", rnd.choice([1, 2]))
    Tk = over.pop("Tk", rnd.randint(max_t // 2, max_t))
    if Tk % 16 == 0:
        Tk += 3  # lengths not multiples of the block
    kv_lens = [Tk] + [rnd.randint(max(2, Tk // 3), Tk) for _ in range(B - 1)]
    # first sequence: full prefill; others: a chunk at the end (chunked prefill) or the whole prompt
    q_lens = [Tk] + [rnd.choice([kl, max(1, kl // 2), rnd.randint(1, kl)]) for kl in kv_lens[1:]]
    Tq = max(q_lens)
    route = [rnd.random() < 0.5 for _ in range(B)]
    route[0], route[-1] = False, True  # mixed routes in every batch
    if block_exact:
        sink = block * rnd.choice([0, 1, 2])
        window = block * rnd.choice([1, 2, 3])
    else:
        sink = rnd.choice([0, 1, 5, block])
        window = rnd.choice([1, 7, block, 2 * block + 3])
    c = dict(seed=seed, dtype=dtype, D=D, B=B, Hkv=Hkv, group=group, Tk=Tk, Tq=Tq, kv_lens=kv_lens,
             q_lens=q_lens, route=route, sink=sink, window=window, block=block, block_exact=block_exact,
             pattern=pattern, n_last=rnd.choice([1, 13, block]) if pattern == "triangle" else 0)
    c.update(over)
    if "Tq" not in over:
        c["Tq"] = max(c["q_lens"])
    return c


def poison_range(case: dict, BN: int) -> tuple[int, int]:
    """Keys no SA query block may touch when every sequence is SA and its queries are the last
    q_len positions (a single query block), with key blocks of BN."""
    kl = min(case["kv_lens"])
    ql = max(case["q_lens"]) if case["kind"] == "prefill" else 1
    p_min = kl - ql
    if case["block_exact"]:
        bs = case["block"]
        sink_end = math.ceil(case["sink"] / bs) * bs
        w_lo = (p_min // bs - case["window"] // bs + 1) * bs
    else:
        sink_end = case["sink"]
        w_lo = p_min - case["window"] + 1
    lo = -(-sink_end // BN) * BN
    hi = (w_lo // BN) * BN
    return lo, hi


# ---------------------------------------------------------------------------------------------
# ring-buffer SA decode (evicted cache)


def _ring_from_dense(K, k, v, n: list[int], case: dict):
    """The ring each sequence would hold after writing its real keys 0..n-1 in order, built from the
    dense cache: sink keys, then the last `period` keys (each slot keeps the latest key written to
    it; period = window, block-exact: window // block * block, the same).  Slots never written and
    slots holding a key the query may not attend are poisoned with NaN: the kernel must not read them."""
    common = submodule(K, "_common")
    ref = submodule(K, "reference")
    pk = dict(sink=case["sink"], window=case["window"], block=case["block"], block_exact=case["block_exact"])
    C = common.ring_capacity(**pk)
    B, Hkv, _, D = k.shape
    kr = torch.full((B, Hkv, C, D), float("nan"), dtype=k.dtype, device=k.device)  # (B, Hkv, C, D)
    vr = kr.clone()
    sink_end, period = case["sink"], case["window"]
    lens = torch.tensor(n, dtype=torch.int64, device=k.device)
    allowed = ref.allowed_mask(torch.zeros(B, dtype=torch.bool, device=k.device), lens, torch.ones_like(lens), 1,
                               max(max(n), 1), **pk)[:, 0]  # (B, Tk): the dense rule for the decode query
    for b, nb in enumerate(n):
        lo = max(sink_end, nb - period)
        r = torch.cat([torch.arange(min(sink_end, nb)), torch.arange(lo, max(lo, nb))]).to(k.device)
        slots = common.ring_slot(r, **pk)
        assert slots.unique().numel() == slots.numel() and bool((slots < C).all()), (b, nb)
        keep = allowed[b, r]
        kr[b, :, slots[keep]] = k[b, :, r[keep]]
        vr[b, :, slots[keep]] = v[b, :, r[keep]]
    return kr, vr


def run_ring_case(K, case: dict, device: str) -> dict:
    """routed_decode_ring on a ring built from a dense cache, against the dense SA decode reference
    (routed_decode_reference, route False, kv_lens = n) in float64; PyTorch's own error is the dense
    reference in the low-precision dtype.  Also checks the ring reference against the dense one."""
    attn = submodule(K, "attention")
    ref = submodule(K, "reference")
    g = torch.Generator(device="cpu").manual_seed(case["seed"])
    n = case["n"]
    B, Hkv, grp, D = len(n), case["Hkv"], case["group"], case["D"]
    dt = DTYPES[case["dtype"]]
    Tk = max(max(n), 1)
    gd = torch.Generator(device=device).manual_seed(case["seed"]) if device != "cpu" else g
    q = torch.randn(B, Hkv * grp, 1, D, generator=gd, device=device).to(dt)
    k = torch.randn(B, Hkv, Tk, D, generator=gd, device=device).to(dt)
    v = torch.randn(B, Hkv, Tk, D, generator=gd, device=device).to(dt)
    lens = torch.tensor(n, dtype=torch.int32, device=device)
    kw = dict(scale=D ** -0.5, sink=case["sink"], window=case["window"], block=case["block"],
              block_exact=case["block_exact"], softcap=case.get("softcap", 0.0))
    kr, vr = _ring_from_dense(K, k, v, n, case)
    out = attn.routed_decode_ring(q, kr, vr, lens, num_splits=case.get("num_splits"), _config=case.get("config"),
                                  **kw)
    route = torch.zeros(B, dtype=torch.bool, device=device)
    ref64 = ref.routed_decode_reference(q.double(), k.double(), v.double(), route, lens, **kw)
    low = ref.routed_decode_reference(q, k, v, route, lens, **kw)
    rep = error_report(out, ref64, low, q.dtype)
    ring64 = ref.routed_decode_ring_reference(q.double(), kr.double(), vr.double(), lens, **kw)
    rep["ring_ref_err"] = (ring64 - ref64).abs().max().item()
    if not rep["ring_ref_err"] <= 1e-9:
        rep["ok"] = False
    return rep


def run_paged_case(K, case: dict, device: str) -> dict:
    """routed_decode_paged on a shared page pool (pages handed out in shuffled order, unused slots NaN), every
    sequence with its own route: full sequences' tables cover keys 0..n-1, sparse ones' their ring (built as
    `_ring_from_dense` does). Against the dense decode reference (routed_decode_reference with the same routes)
    in float64; PyTorch's own error is that reference in the low-precision dtype. Also checks the paged
    reference against the dense one."""
    attn = submodule(K, "attention")
    ref = submodule(K, "reference")
    common = submodule(K, "_common")
    g = torch.Generator(device="cpu").manual_seed(case["seed"])
    n, route_list, page = case["n"], case["route"], case["page"]
    B, Hkv, grp, D = len(n), case["Hkv"], case["group"], case["D"]
    dt = DTYPES[case["dtype"]]
    pk = dict(sink=case["sink"], window=case["window"], block=case["block"], block_exact=case["block_exact"])
    C = common.ring_capacity(**pk)
    Tk = max(max(n), C, 1)
    q = torch.randn(B, Hkv * grp, 1, D, generator=g).to(device, dt)
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(device, dt)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(device, dt)
    kr, vr = _ring_from_dense(K, k, v, n, case)  # (B, Hkv, C, D), NaN where nothing may be read
    width = max(-(-Tk // page), -(-C // page))
    num_pages = B * width + 3
    order = torch.randperm(num_pages, generator=g).tolist()  # pages out of order, as a pool hands them out
    k_pages = torch.full((num_pages, page, Hkv, D), float("nan"), dtype=dt, device=device)
    v_pages = k_pages.clone()
    table = torch.zeros(B, width, dtype=torch.int32)
    for b in range(B):
        src_k, src_v, slots = (k[b], v[b], n[b]) if route_list[b] else (kr[b], vr[b], C)
        for j in range(-(-slots // page)):
            pid = order.pop()
            table[b, j] = pid
            hi = min(page, slots - j * page, src_k.shape[1] - j * page)
            k_pages[pid, :hi] = src_k[:, j * page: j * page + hi].transpose(0, 1)
            v_pages[pid, :hi] = src_v[:, j * page: j * page + hi].transpose(0, 1)
    table = table.to(device)
    lens = torch.tensor(n, dtype=torch.int32, device=device)
    route = torch.tensor(route_list, dtype=torch.bool, device=device)
    kw = dict(scale=D ** -0.5, **pk, softcap=case.get("softcap", 0.0))
    out = attn.routed_decode_paged(q, k_pages, v_pages, table, lens, route, num_splits=case.get("num_splits"),
                                   _config=case.get("config"), **kw)
    ref64 = ref.routed_decode_reference(q.double(), k.double(), v.double(), route, lens, **kw)
    low = ref.routed_decode_reference(q, k, v, route, lens, **kw)
    rep = error_report(out, ref64, low, q.dtype)
    paged64 = ref.routed_decode_paged_reference(q.double(), k_pages.double(), v_pages.double(), table, lens, route,
                                                **kw)
    rep["paged_ref_err"] = (paged64 - ref64).abs().max().item()
    if not rep["paged_ref_err"] <= 1e-9:
        rep["ok"] = False
    return rep


def run_paged_write_case(K, case: dict, device: str) -> dict:
    """paged_write_prompt against a Python loop that copies each real row to its slot: key r of sequence b at
    page table[b, r // page], row r % page. Pools start NaN, pages come out of order, k/v arrive as the model's
    (B, T, H, D) -> (B, H, T, D) transposed views; every written value must be exact and nothing else touched."""
    attn = submodule(K, "attention")
    g = torch.Generator(device="cpu").manual_seed(case["seed"])
    n, page, Hkv, D = case["n"], case["page"], case["Hkv"], case["D"]
    dt = DTYPES[case["dtype"]]
    B, T = len(n), max(n)
    k = torch.randn(B, T, Hkv, D, generator=g).to(device, dt).transpose(1, 2)  # (B, Hkv, T, D) a view
    v = torch.randn(B, T, Hkv, D, generator=g).to(device, dt).transpose(1, 2)
    width = -(-T // page)
    num_pages = B * width + 2
    order = torch.randperm(num_pages - 1, generator=g) + 1  # page 0 stays scratch
    table = torch.zeros(B, width + 1, dtype=torch.int32)
    table[:, :width] = order[: B * width].view(B, width).to(torch.int32)
    k_pages = torch.full((num_pages, page, Hkv, D), float("nan"), dtype=dt, device=device)
    v_pages = k_pages.clone()
    want_k, want_v = k_pages.clone(), v_pages.clone()
    for b in range(B):
        for t in range(T):
            r = n[b] - T + t  # the row's key index; < 0: left padding
            if r >= 0:
                want_k[table[b, r // page], r % page] = k[b, :, t]
                want_v[table[b, r // page], r % page] = v[b, :, t]
    lens = torch.tensor(n, dtype=torch.int32, device=device)
    attn.paged_write_prompt(k_pages, v_pages, k, v, table.to(device), lens)
    same = torch.equal(k_pages.nan_to_num(7.0), want_k.nan_to_num(7.0)) and \
        torch.equal(v_pages.nan_to_num(7.0), want_v.nan_to_num(7.0))
    return dict(ok=same, nan=False, err=0.0 if same else 1.0, tol=0.0)
