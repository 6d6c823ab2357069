"""The Triton kernels lower for Hopper (sm_90) on a CPU machine: the interpreter runs kernels as Python, so a
construct only the compiler rejects (a constexpr that does not propagate into a `triton.jit` leaf of
`fluxc.patterns`, a dtype the interpreter tolerates) would otherwise first show on the GPU."""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

FLOATS = {"qk_scale", "softcap_in", "softcap_out"}
POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "OUT": "*bf16", "KP": "*bf16", "VP": "*bf16",
            "OP": "*fp32", "LSEP": "*fp32", "ROUTE": "*u8", "KV_LENS": "*i32", "Q_LENS": "*i32", "LENS": "*i32",
            "KV_START": "*i64", "CU_Q": "*i32", "CU_K": "*i32", "TABLE": "*i32"}
KERNELS = {
    "prefill": ("_prefill_kernel", dict(HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64, ROUTE_MODE=0, BLOCK_EXACT=True,
                                        SA_BLOCK=64, TRIANGLE=True, HAS_NW=False, HAS_SOFTCAP=False, VARLEN=False,
                                        DOT_PREC="tf32", USE_TMA=False, HAS_START=True)),
    "ring-decode": ("_decode_kernel", dict(HEAD_DIM=128, BLOCK_G=16, BLOCK_N=64, ROUTE_MODE=2, BLOCK_EXACT=True,
                                           SA_BLOCK=64, HAS_NW=False, HAS_SOFTCAP=False, DOT_PREC="tf32", RING=True,
                                           DIRECT=False, HAS_START=False)),
    "paged-decode": ("_paged_decode_kernel", dict(HEAD_DIM=128, BLOCK_G=16, BLOCK_N=64, PAGE=16, BLOCK_EXACT=False,
                                                  SA_BLOCK=64, HAS_SOFTCAP=True, DOT_PREC="tf32", DIRECT=False)),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_compiles_to_ptx_for_sm90(name, monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET=1 replaces the kernels by Python functions")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    from fluxc.kernels import _triton_attention as kernels

    fn_name, constexprs = KERNELS[name]
    fn = getattr(kernels, fn_name)
    signature = {p.name: "constexpr" if p.name in constexprs else POINTERS.get(
        p.name, "fp32" if p.name in FLOATS else "i32") for p in fn.params}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    ptx = compiled.asm["ptx"]
    assert ".target sm_90" in ptx and fn_name in ptx
    assert "mma" in ptx  # the dots lowered to tensor-core instructions
