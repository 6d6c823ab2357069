"""CPU tests of the routed-attention kernels.

The Triton kernels run under the Triton interpreter in ONE subprocess (``_interpret_worker.py``,
started with TRITON_INTERPRET=1 by a module-scoped fixture); each case is then asserted here.  The
environment variable therefore never touches this pytest process: Triton decides interpreter vs
compiler when a kernel is defined, so setting it in-process would depend on import order and leak
into other tests.  Everything else here (argument errors, import hygiene, FlexAttention lowering in
eager mode) runs in-process and needs no Triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _interpret_cases import cases  # noqa: E402
from _kernel_harness import ROOT, load_kernels, make_prefill_inputs, pattern_kwargs, submodule  # noqa: E402

CASES = cases()

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # noqa: BLE001
    HAVE_TRITON = False


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    path = tmp_path_factory.mktemp("interp") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_interpret_worker.py"), str(path)], env=env,
                          cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not path.exists():
        pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_interpreted(interpreter_results, name):
    rep = interpreter_results[name]
    assert "error" not in rep, rep.get("tb", rep)
    assert not rep["nan"], f"{name}: NaN in the output"
    assert not rep.get("padding_nonzero"), f"{name}: padding rows not zero"
    assert rep["err"] <= rep["tol"], f"{name}: max error {rep['err']:.3g} > tolerance {rep['tol']:.3g}"
    assert rep["ok"]


# ----------------------------------------------------------------------------- in-process checks


@pytest.fixture(scope="module")
def K():
    return load_kernels()


def test_import_has_no_triton():
    code = (f"import sys; sys.path.insert(0, {HERE!r}); from _kernel_harness import load_kernels; K = load_kernels(); "
            "import importlib; [importlib.import_module(K.__name__ + '.' + m) for m in ('attention', 'flex', "
            "'reference')]; bad = [m for m in sys.modules if m == 'triton' or m.startswith('triton.')]; "
            "assert not bad, bad; assert not __import__('torch').cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT),
                   env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})


def _small(dtype=torch.float16, D=64, Hq=4, Hkv=2):
    q = torch.randn(1, Hq, 8, D, dtype=dtype)
    k = torch.randn(1, Hkv, 8, D, dtype=dtype)
    lens = torch.tensor([8], dtype=torch.int32)
    return q, k, k.clone(), torch.tensor([True]), lens, lens.clone()


KW = dict(scale=0.125, sink=4, window=4, block=4, block_exact=False, pattern="streaming", n_last=0)


@pytest.mark.parametrize("bad, match", [
    (dict(D=96), "head_dim=96"),
    (dict(Hq=3, Hkv=2), "multiple of kv heads"),
    (dict(dtype=torch.float64), "float16, bfloat16 or float32"),
])
def test_errors_name_argument(K, bad, match):
    attn = submodule(K, "attention")
    q, k, v, route, kl, ql = _small(**bad)
    with pytest.raises(K.KernelError, match=match):
        attn.routed_prefill(q, k, v, route, kl, ql, **KW)


@pytest.mark.parametrize("kw, match", [
    (dict(block_exact=True, sink=3, block=4), "multiples of block"),
    (dict(block_exact=True, window=2, block=4, sink=0), "multiples of block"),
    (dict(window=0), "window=0"),
    (dict(pattern="xattn"), "pattern='xattn'"),
    (dict(softcap=-1.0), "softcap"),
])
def test_pattern_errors(K, kw, match):
    attn = submodule(K, "attention")
    q, k, v, route, kl, ql = _small()
    with pytest.raises(K.KernelError, match=match):
        attn.routed_prefill(q, k, v, route, kl, ql, **{**KW, **kw})


def test_cpu_without_interpreter_is_an_error(K, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    attn = submodule(K, "attention")
    q, k, v, route, kl, ql = _small()
    with pytest.raises(K.KernelError, match="CUDA tensors"):
        attn.routed_prefill(q, k, v, route, kl, ql, **KW)


def test_decode_rejects_multi_token_query(K):
    attn = submodule(K, "attention")
    q, k, v, route, kl, _ = _small()
    with pytest.raises(K.KernelError, match="one query token"):
        attn.routed_decode(q, k, v, route, kl, scale=0.1, sink=4, window=4, block=4, block_exact=False)


@pytest.mark.parametrize("name", ["prefill-fp32-g4-streaming-block", "prefill-fp32-g1-triangle-token",
                                  "prefill-fp32-softcap-nativewindow", "decode-fp32-g4-token"])
def test_flex_lowering_eager_matches_reference(K, name):
    """The FlexAttention lowering (eager on CPU; compiled on GPU in test_kernels_gpu.py)."""
    flex = submodule(K, "flex")
    ref = submodule(K, "reference")
    case = dict(CASES[name])
    decode = case["kind"] == "decode"
    if decode:
        case["q_lens"], case["Tq"] = [1] * case["B"], 1
    q, k, v, route, kv_lens, q_lens = make_prefill_inputs(case, "cpu")
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)  # flex needs finite keys past kv_lens
    kw = pattern_kwargs(case)
    if decode:
        kw.pop("pattern"), kw.pop("n_last")
        out = flex.routed_decode_flex(q, k, v, route, kv_lens, compile=False, **kw)
        r64 = ref.routed_decode_reference(q.double(), k.double(), v.double(), route, kv_lens, **kw)
    else:
        out = flex.routed_prefill_flex(q, k, v, route, kv_lens, q_lens, compile=False, **kw)
        r64 = ref.routed_attention_reference(q.double(), k.double(), v.double(), route, kv_lens, q_lens, **kw)
    assert not torch.isnan(out).any()
    assert (out.double() - r64).abs().max().item() < 1e-4


@pytest.mark.parametrize("pattern,block_exact,native_window", [("streaming", True, 0), ("streaming", False, 0),
                                                                 ("triangle", True, 0), ("streaming", False, 40)])
def test_flex_block_lists_bound_the_mask(K, pattern, block_exact, native_window):
    """The closed-form block lists against the mask_mod evaluated on every token pair: every block holding an
    allowed pair is listed, a block listed as full allows every pair, and most covered blocks are found."""
    flex = submodule(K, "flex")
    g = torch.Generator().manual_seed(3)
    kw = dict(sink=32, window=64, block=32, block_exact=block_exact, pattern=pattern, n_last=48,
              native_window=native_window)
    for Tq, Tk in ((300, 300), (1, 300), (200, 333)):
        B = 5
        kv_lens = torch.randint(max(Tq, 1), Tk + 1, (B,), generator=g)
        q_lens = torch.minimum(kv_lens, torch.randint(1, Tq + 1, (B,), generator=g)) if Tq > 1 else torch.ones(B, dtype=torch.long)
        route = torch.tensor([1, 0, 0, 1, 0])
        partial, full = flex.sa_block_lists(route, kv_lens, q_lens, Tq, Tk, block_size=16, **kw)
        mask_mod = flex.make_mask_mod(route, kv_lens, q_lens, **kw)
        b, q, k = torch.arange(B)[:, None, None], torch.arange(Tq)[None, :, None], torch.arange(Tk)[None, None, :]
        allowed = mask_mod(b, 0, q, k)  # (B, Tq, Tk)
        pad = (-Tq % 16, -Tk % 16)
        grid = torch.nn.functional.pad(allowed, (0, pad[1], 0, pad[0])).view(B, -1, 16, (Tk + pad[1]) // 16, 16)
        any_pair, every_pair = grid.any(dim=(2, 4)), grid.all(dim=(2, 4))  # (B, Qb, Kb)
        partial, full = partial[:, 0], full[:, 0]
        assert not (partial & full).any()
        assert torch.equal(any_pair & ~(partial | full), torch.zeros_like(any_pair))  # nothing allowed is dropped
        assert not (full & ~every_pair).any()  # full blocks skip the mask_mod: they must allow every pair
        assert full.sum() >= 0.8 * every_pair.sum()


def test_reference_block_exact_rule_matches_brief(K):
    """Block-exact rule from the method: k//128 < sink_blocks or k//128 > q//128 - local_blocks."""
    ref = submodule(K, "reference")
    T = 1024
    m = ref.allowed_mask(torch.tensor([0]), torch.tensor([T]), torch.tensor([T]), T, T, sink=128, window=256,
                         block=128, block_exact=True)[0]
    qi = torch.arange(T)[:, None]
    ki = torch.arange(T)[None, :]
    want = (ki <= qi) & ((ki // 128 < 1) | (ki // 128 > qi // 128 - 2))
    assert torch.equal(m, want)


# ----------------------------------------------------------------------------- ring-buffer decode


@pytest.mark.parametrize("block_exact", [False, True])
def test_ring_slot_layout(K, block_exact):
    """ring_slot against the layout written out per key (the engine writes key r to this slot)."""
    common = submodule(K, "_common")
    sink, window, b = 16, 24, 8
    r = torch.arange(300)
    got = common.ring_slot(r, sink=sink, window=window, block=b, block_exact=block_exact)
    want = []
    for i in range(300):
        if i < sink:
            want.append(i)
        elif block_exact:
            want.append(sink + ((i // b - sink // b) % (window // b)) * b + i % b)
        else:
            want.append(sink + (i - sink) % window)
    assert got.tolist() == want
    assert common.ring_capacity(sink=sink, window=window, block=b, block_exact=block_exact) == sink + window


@pytest.mark.parametrize("block_exact", [False, True])
def test_ring_reference_matches_dense_reference(K, block_exact):
    """The ring reference (plain PyTorch, no Triton) against the dense SA decode on the same keys,
    for every n from 0 to several wraps of the ring."""
    ref = submodule(K, "reference")
    common = submodule(K, "_common")
    torch.manual_seed(0)
    sink, window, b, Tk = 8, 16, 4, 90
    pk = dict(sink=sink, window=window, block=b, block_exact=block_exact)
    n = torch.arange(Tk + 1, dtype=torch.int32)
    B = n.shape[0]
    q = torch.randn(B, 4, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 2, Tk, 16, dtype=torch.float64).expand(B, -1, -1, -1)
    v = torch.randn(1, 2, Tk, 16, dtype=torch.float64).expand(B, -1, -1, -1)
    C = common.ring_capacity(**pk)
    kr = torch.full((B, 2, C, 16), float("nan"), dtype=torch.float64)
    vr = kr.clone()
    for bi in range(B):  # write keys 0..n-1 in order, as a decode loop would
        for r in range(int(n[bi])):
            s = int(common.ring_slot(torch.tensor(r), **pk))
            kr[bi, :, s], vr[bi, :, s] = k[bi, :, r], v[bi, :, r]
    dense = ref.routed_decode_reference(q, k, v, torch.zeros(B, dtype=torch.bool), n, scale=0.25, **pk)
    ring = ref.routed_decode_ring_reference(q, kr, vr, n, scale=0.25, **pk)
    assert not torch.isnan(ring).any()
    assert (ring - dense).abs().max().item() < 1e-12


@pytest.mark.parametrize("kw, match", [
    (dict(C=30), r"k_ring.shape=.*has 32 slots"),
    (dict(sink=12), "multiples of block"),
    (dict(n=torch.tensor([5, 6], dtype=torch.int32)), r"n.shape=\(2,\)"),
    (dict(n=torch.tensor([5.0])), "n.dtype"),
    (dict(num_splits=0), "num_splits=0"),
])
def test_ring_errors_name_argument(K, kw, match):
    attn = submodule(K, "attention")
    C = kw.pop("C", 32)
    q = torch.randn(1, 4, 1, 64, dtype=torch.float16)
    kr = torch.randn(1, 2, C, 64, dtype=torch.float16)
    args = dict(scale=0.125, sink=16, window=16, block=8, block_exact=True)
    n = kw.pop("n", torch.tensor([5], dtype=torch.int32))
    args.update(kw)
    with pytest.raises(K.KernelError, match=match):
        attn.routed_decode_ring(q, kr, kr.clone(), n, **args)


@pytest.mark.parametrize("block_exact, pattern", [(True, "streaming"), (False, "triangle")])
def test_reference_kv_start_is_left_padding(K, block_exact, pattern):
    """The reference with kv_start on a left-padded batch equals the reference on each sequence with
    its padding cut off (sinks and windows count from the first real key); padded query rows are zeros."""
    ref = submodule(K, "reference")
    torch.manual_seed(1)
    B, H, T, D = 3, 2, 70, 16
    pk = dict(scale=0.25, sink=8, window=16, block=8, block_exact=block_exact, pattern=pattern, n_last=5)
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    start = torch.tensor([0, 9, 30], dtype=torch.int32)
    full = torch.full((B,), T, dtype=torch.int32)
    route = torch.tensor([False, False, True])
    out = ref.routed_attention_reference(q, k, v, route, full, full, kv_start=start, **pk)
    for b in range(B):
        s = int(start[b])
        n = torch.tensor([T - s], dtype=torch.int32)
        want = ref.routed_attention_reference(q[b:b + 1, :, s:], k[b:b + 1, :, s:], v[b:b + 1, :, s:], route[b:b + 1],
                                              n, n, **pk)
        assert (out[b:b + 1, :, s:] - want).abs().max().item() < 1e-12
        assert (out[b, :, :s] == 0).all()


def test_flash_backends_reject_unknown_names(K):
    """The sparse-branch and FlexAttention backend names are checked before any kernel is looked for."""
    fa4, flex = submodule(K, "fa4"), submodule(K, "flex")
    q, k, v, route, kl, ql = _small()
    with pytest.raises(K.KernelError, match="sparse='cudnn': use 'triton' or 'flash'"):
        fa4.routed_prefill_fa4(q, k, v, route, kl, ql, scale=0.1, sink=4, window=4, block=4, block_exact=False,
                               pattern="streaming", n_last=0, sparse="cudnn")
    with pytest.raises(K.KernelError, match="backend='CUTE': use 'TRITON' or 'FLASH'"):
        flex.routed_prefill_flex(q, k, v, route, kl, ql, scale=0.1, sink=4, window=4, block=4, block_exact=False,
                                 pattern="streaming", n_last=0, backend="CUTE")
