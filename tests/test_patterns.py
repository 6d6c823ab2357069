"""Every consumer of the sparse-attention rule agrees with its one definition, `fluxc.patterns`.

The expected sets come from the definition evaluated on Python ints, one (query, key) pair at a time; the
definition itself is checked against the released code's rule, written out independently. Consumers:
the op's mask reference (`fluxc.ops.masks`), the kernels' reference, the FlexAttention mask_mod and its
block mask (eager flex attention), the routed score_mod of FlexAttention sites, the ONNX translation
(onnxscript, eager), the decode ring's key selection (ops, kernels' reference, ONNX), and the Triton
prefill, decode, ring-decode and paged-decode kernels (interpreter, in one subprocess started with TRITON_INTERPRET=1).

Attention kernels are read with queries of zeros and values that are one-hot per key: every allowed key
gets the same weight, so a row's output is nonzero exactly at its allowed keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch
import torch.fx as fx

from fluxc import patterns
from fluxc.config import FluxConfig
from fluxc.kernels import flex as kflex
from fluxc.kernels import reference as kref
from fluxc.ops import cache as ops_cache
from fluxc.ops.masks import sparse_allowed
from fluxc.passes.flex import routed_score_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD_DIM = 64  # >= every key count below: values are one-hot per key


@dataclass(frozen=True)
class Case:
    pattern: str
    block_exact: bool
    kv_len: int  # keys of every sequence; the queries are the last q_len of them
    q_len: int
    start: int  # left padding of sequence 0 (sequence 1 has none)
    group: int  # query heads per kv head
    block: int
    sink: int
    window: int
    n_last: int

    @property
    def name(self) -> str:
        rule = "block" if self.block_exact else "token"
        return (f"{self.pattern}-{rule}-T{self.kv_len}q{self.q_len}-pad{self.start}-g{self.group}-b{self.block}"
                f"-s{self.sink}w{self.window}")

    @property
    def rule(self) -> dict:
        return dict(sink=self.sink, window=self.window, block=self.block, block_exact=self.block_exact)


SHAPES = [  # (kv_len, q_len, start, group, block, sink, window, n_last)
    (19, 19, 0, 1, 2, 2, 4, 3),
    (23, 23, 3, 2, 4, 4, 8, 5),
    (40, 12, 5, 4, 4, 8, 4, 6),  # a chunk: the queries are the last 12 keys
]
CASES = [Case(pattern, exact, *shape) for pattern in patterns.PATTERNS for exact in (False, True)
         for shape in SHAPES]
ROUTES = (False, True)  # sequence 0 sparse, sequence 1 full
DECODE_LENS = (1, 3, 9, 17, 33, 40)  # keys written before a decode query, the query's own included


def _starts(case: Case) -> tuple[int, int]:
    return case.start, 0


def expected(case: Case) -> np.ndarray:
    """(B, Tq, Tk) bool: key k is allowed to query row i, from the definition on ints."""
    out = np.zeros((len(ROUTES), case.q_len, case.kv_len), dtype=bool)
    for b, (full, s) in enumerate(zip(ROUTES, _starts(case))):
        last = case.kv_len - 1 - s if case.pattern == "triangle" and case.q_len > 1 else None
        for i in range(case.q_len):
            p = case.kv_len - case.q_len + i
            for k in range(s, p + 1):
                out[b, i, k] = full or bool(patterns.sa_allowed(p - s, k - s, **case.rule, last=last,
                                                                n_last=case.n_last))
    return out


def decode_lengths(case: Case) -> list[int]:
    return [n for n in DECODE_LENS if n <= case.kv_len]


def expected_decode(case: Case, n: int) -> np.ndarray:
    """(Tk,) bool: the keys an SA decode query at position n - 1 attends (no padding)."""
    return np.array([k <= n - 1 and bool(patterns.sa_allowed(n - 1, k, **case.rule)) for k in range(case.kv_len)])


def _tensors(case: Case):
    route = torch.tensor(ROUTES)
    kv_lens = torch.full((2,), case.kv_len, dtype=torch.int32)
    q_lens = torch.full((2,), case.q_len, dtype=torch.int32)
    starts = torch.tensor(_starts(case), dtype=torch.int64)
    qpos = (torch.arange(case.q_len) + case.kv_len - case.q_len).expand(2, -1)  # (B, Tq) absolute positions
    return route, kv_lens, q_lens, starts, qpos


def _valid_keys(case: Case) -> np.ndarray:
    """(B, Tq, Tk): the model's own mask (causal, padding keys out), which SA-only consumers sit on."""
    out = np.zeros((2, case.q_len, case.kv_len), dtype=bool)
    for b, s in enumerate(_starts(case)):
        for i in range(case.q_len):
            out[b, i, s: case.kv_len - case.q_len + i + 1] = True
    return out


def _routed(case: Case, sa: np.ndarray) -> np.ndarray:
    """An SA-only consumer's (B, Tq, Tk) set, routed and on the model's mask."""
    return _valid_keys(case) & (sa | np.array(ROUTES)[:, None, None])


def read_attention(out: torch.Tensor, kv_len: int) -> np.ndarray:
    """(B, Tq, Tk) allowed keys of the last head from an attention output with zero queries and one-hot values
    (the last head reads the last kv head: GQA's mapping counts)."""
    return (out[:, -1, :, :kv_len].float().abs() > 1e-6).numpy()


def attention_inputs(case: Case, q_len: int, kv_len: int, dtype=torch.float32):
    """Zero queries, random keys, one-hot values: (q (B, Hq, Tq, D), k, v (B, Hkv, Tk, D))."""
    hkv = 2
    q = torch.zeros(2, hkv * case.group, q_len, HEAD_DIM, dtype=dtype)
    k = torch.randn(2, hkv, kv_len, HEAD_DIM, dtype=dtype)
    v = torch.eye(HEAD_DIM, dtype=dtype)[:kv_len].expand(2, hkv, kv_len, HEAD_DIM).contiguous()
    return q, k, v


# ------------------------------------------------------------------------------------------- the definition


@pytest.mark.parametrize("block_exact", [False, True])
def test_definition_is_the_released_rule(block_exact):
    """The released code's streaming rule, written out: block-exact keeps k iff k // b < sink // b or
    k // b > q // b - window // b; token-exact keeps k iff k < sink or q - k < window."""
    sink, window, block = 4, 8, 4
    for q in range(60):
        for k in range(q + 1):
            if block_exact:
                want = k // block < sink // block or k // block > q // block - window // block
            else:
                want = k < sink or q - k < window
            got = patterns.sa_allowed(q, k, sink=sink, window=window, block=block, block_exact=block_exact)
            assert bool(got) == want, (q, k)
            dense = patterns.sa_allowed(q, k, sink=sink, window=window, block=block, block_exact=block_exact,
                                        last=59, n_last=5)
            assert bool(dense) == (want or q > 59 - 5), (q, k)


@pytest.mark.parametrize("block_exact", [False, True])
def test_ring_layout_keeps_exactly_the_window(block_exact):
    """Writing keys 0..n-1 to `ring_slot`, slot by slot, leaves in each slot the key `ring_key` names, and the
    slots `ring_valid` accepts hold exactly the keys the rule keeps."""
    sink, window, block = 4, 8, 4
    capacity = patterns.ring_capacity(sink, window)
    for n in range(1, 50):
        held = [-1] * capacity
        for r in range(n):
            held[r if r < sink else patterns.ring_slot(r, sink, window)] = r
        p = n - 1
        for j in range(capacity):
            if j <= p and j >= sink:
                assert patterns.ring_key(j, p, window) == held[j]
        kept = {held[j] for j in range(capacity)
                if patterns.ring_valid(j, p, sink=sink, window=window, block=block, block_exact=block_exact)}
        want = {k for k in range(n) if patterns.sa_allowed(p, k, sink=sink, window=window, block=block,
                                                              block_exact=block_exact)}
        assert kept == want, n


def test_pattern_problems_name_the_fix():
    assert patterns.pattern_problem(pattern="streaming", sink=4, window=8, block=4, block_exact=True, n_last=0) is None
    assert "multiples of block" in patterns.pattern_problem(pattern="streaming", sink=3, window=8, block=4,
                                                            block_exact=True, n_last=0)
    assert "is not a pattern" in patterns.pattern_problem(pattern="xattn", sink=4, window=8, block=4,
                                                          block_exact=False, n_last=0)
    assert "window=0" in patterns.pattern_problem(pattern="streaming", sink=4, window=0, block=4,
                                                  block_exact=False, n_last=0)


# ------------------------------------------------------------------------------------- plain-PyTorch consumers


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_op_mask_reference(case):
    route, kv_lens, q_lens, starts, qpos = _tensors(case)
    sa = sparse_allowed(qpos, starts, case.kv_len, pattern=case.pattern, n_last=case.n_last,
                        prefill=case.q_len > 1, **case.rule)
    np.testing.assert_array_equal(_routed(case, sa.numpy()), expected(case))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_reference(case):
    route, kv_lens, q_lens, starts, _ = _tensors(case)
    got = kref.allowed_mask(route, kv_lens, q_lens, case.q_len, case.kv_len, pattern=case.pattern,
                            n_last=case.n_last, kv_start=starts, **case.rule)
    np.testing.assert_array_equal(got.numpy(), expected(case))
    q, k, v = attention_inputs(case, case.q_len, case.kv_len, torch.float64)
    out = kref.routed_attention_reference(q, k, v, route, kv_lens, q_lens, scale=0.125, pattern=case.pattern,
                                          n_last=case.n_last, kv_start=starts, **case.rule)
    np.testing.assert_array_equal(read_attention(out, case.kv_len), expected(case))


@pytest.mark.parametrize("case", [c for c in CASES if c.start == 0], ids=lambda c: c.name)
def test_flex_mask_mod_and_block_mask(case):
    route, kv_lens, q_lens, _, _ = _tensors(case)
    mask_mod = kflex.make_mask_mod(route, kv_lens, q_lens, pattern=case.pattern, n_last=case.n_last, **case.rule)
    b = torch.arange(2)[:, None, None]
    got = mask_mod(b, torch.zeros((), dtype=torch.long), torch.arange(case.q_len)[None, :, None],
                   torch.arange(case.kv_len)[None, None, :])
    np.testing.assert_array_equal(got.numpy(), expected(case))
    q, k, v = attention_inputs(case, case.q_len, case.kv_len)
    out = kflex.routed_prefill_flex(q, k, v, route, kv_lens, q_lens, scale=0.125, pattern=case.pattern,
                                    n_last=case.n_last, compile=False, **case.rule)
    np.testing.assert_array_equal(read_attention(out, case.kv_len), expected(case))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_flex_site_score_mod(case):
    """The routed score_mod the pass gives FlexAttention sites (positions from the site's own mask_mod)."""
    route, _, _, starts, qpos = _tensors(case)
    config = FluxConfig(pattern=case.pattern, n_last=case.n_last, **case.rule)
    model_score_mod = fx.symbolic_trace(lambda score, b, h, q_idx, kv_idx: score)
    score_mod = routed_score_mod(model_score_mod, 0, config, prefill=case.q_len > 1)
    last = torch.full((2,), case.kv_len - 1)
    scores = score_mod(torch.zeros(2, case.q_len, case.kv_len), torch.arange(2)[:, None, None], 0,
                       torch.arange(case.q_len)[None, :, None], torch.arange(case.kv_len)[None, None, :],
                       route, qpos, starts, last)
    np.testing.assert_array_equal(_valid_keys(case) & torch.isfinite(scores).numpy(), expected(case))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_onnx_translation(case):
    onnx_ops = pytest.importorskip("fluxc.exporter.onnx")
    _, _, _, starts, qpos = _tensors(case)
    q = np.zeros((2, 1, case.q_len, 1), dtype=np.float32)
    sa = onnx_ops._sparse_allowed(q, qpos.numpy(), starts.numpy(), np.array(case.kv_len, dtype=np.int64),
                                  case.pattern, case.sink, case.window, case.block, case.block_exact, case.n_last)
    np.testing.assert_array_equal(_routed(case, np.asarray(sa.value, dtype=bool)), expected(case))


@pytest.mark.parametrize("case", [c for c in CASES if c.pattern == "streaming" and c.kv_len == 40],
                         ids=lambda c: c.name)
def test_decode_ring_key_selection(case):
    """The ring's key selection (ops, kernels' reference, ONNX) against the definition, as n grows."""
    onnx_ops = pytest.importorskip("fluxc.exporter.onnx")
    capacity = patterns.ring_capacity(case.sink, case.window)
    n = torch.tensor(DECODE_LENS)
    r_ops, valid_ops = ops_cache.ring_keys(n, **case.rule)
    r_ref, valid_ref = kref.ring_keys(n, capacity, **case.rule)
    valid_onnx = np.asarray(onnx_ops._ring_valid(n.numpy(), *case.rule.values()).value, dtype=bool)
    for row, count in enumerate(DECODE_LENS):
        want = expected_decode(case, count)
        for r, valid in ((r_ops, valid_ops), (r_ref, valid_ref), (r_ops, torch.from_numpy(valid_onnx))):
            seen = np.zeros(case.kv_len, dtype=bool)
            seen[r[row][valid[row]].numpy()] = True
            np.testing.assert_array_equal(seen, want, err_msg=f"n={count}")


# ------------------------------------------------------------------------------ Triton kernels (interpreter)


def _triton_masks(case: Case) -> dict:
    """Allowed sets read off the Triton kernels for one case (run inside the TRITON_INTERPRET=1 worker)."""
    from fluxc.kernels import attention as katt

    route, kv_lens, q_lens, starts, _ = _tensors(case)
    q, k, v = attention_inputs(case, case.q_len, case.kv_len)
    prefill = katt.routed_prefill(q, k, v, route, kv_lens, q_lens, scale=0.125, pattern=case.pattern,
                                  n_last=case.n_last, kv_start=starts.to(torch.int32), **case.rule)
    decode, ring, paged = [], [], []
    capacity = patterns.ring_capacity(case.sink, case.window)
    for n in decode_lengths(case):
        qd, kd, vd = attention_inputs(case, 1, case.kv_len)
        lens = torch.full((2,), n, dtype=torch.int32)
        decode.append(read_attention(katt.routed_decode(qd, kd, vd, torch.zeros(2, dtype=torch.bool), lens,
                                                        scale=0.125, **case.rule), case.kv_len)[0, 0].tolist())
        k_ring = torch.zeros(2, 2, capacity, HEAD_DIM)
        v_ring = torch.zeros(2, 2, capacity, HEAD_DIM)
        for r in range(n):  # in order: a later key overwrites its slot
            slot = int(ops_cache.ring_slot(torch.tensor(r), **case.rule))
            k_ring[:, :, slot] = kd[:, :, r]
            v_ring[:, :, slot] = vd[:, :, r]  # the one-hot of the key's real index
        out = katt.routed_decode_ring(qd, k_ring, v_ring, lens, scale=0.125, **case.rule)
        ring.append(read_attention(out, case.kv_len)[0, 0].tolist())
        # the same ring in pages of 4 slots (the decode engine's paged cache), sequences routed sparse
        width = -(-capacity // 4)
        k_pages = torch.zeros(2 * width, 4, 2, HEAD_DIM)  # (pages, page, Hkv, D)
        v_pages = torch.zeros(2 * width, 4, 2, HEAD_DIM)
        table = torch.arange(2 * width, dtype=torch.int32).view(2, width)
        for b in range(2):
            for j in range(capacity):
                k_pages[table[b, j // 4], j % 4] = k_ring[b, :, j]
                v_pages[table[b, j // 4], j % 4] = v_ring[b, :, j]
        out = katt.routed_decode_paged(qd, k_pages, v_pages, table, lens, torch.zeros(2, dtype=torch.bool),
                                       scale=0.125, **case.rule)
        paged.append(read_attention(out, case.kv_len)[0, 0].tolist())
    return dict(prefill=read_attention(prefill, case.kv_len).tolist(), decode=decode, ring=ring, paged=paged)


@pytest.fixture(scope="module")
def triton_masks(tmp_path_factory):
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("patterns") / "triton.json"
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and path.exists(), proc.stderr[-3000:]
    return json.loads(path.read_text())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_kernels(triton_masks, case):
    got = triton_masks[case.name]
    assert "error" not in got, got.get("error")
    np.testing.assert_array_equal(np.array(got["prefill"]), expected(case))
    assert len(got["decode"]) == len(got["ring"]) == len(got["paged"]) == len(decode_lengths(case))
    for n, decode, ring, paged in zip(decode_lengths(case), got["decode"], got["ring"], got["paged"]):
        np.testing.assert_array_equal(np.array(decode), expected_decode(case, n), err_msg=f"decode n={n}")
        np.testing.assert_array_equal(np.array(ring), expected_decode(case, n), err_msg=f"ring n={n}")
        np.testing.assert_array_equal(np.array(paged), expected_decode(case, n), err_msg=f"paged n={n}")


if __name__ == "__main__":  # the worker: python tests/test_patterns.py OUT.json, with TRITON_INTERPRET=1
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    results = {}
    for case in CASES:
        try:
            results[case.name] = _triton_masks(case)
        except Exception as exc:  # noqa: BLE001  (reported per case, asserted by the test)
            results[case.name] = dict(error=f"{type(exc).__name__}: {exc}", case=asdict(case))
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
