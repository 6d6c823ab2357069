"""The CPU interpreter cases (small sizes, fp16/fp32, head dim 64; one head-dim-128 case)."""

from __future__ import annotations

from _kernel_harness import poison_range, random_prefill_case


def cases() -> dict[str, dict]:
    out: dict[str, dict] = {}
    seed = 100
    # prefill: streaming token/block exact, triangle; GQA 1 and 4; fp32 and fp16; TMA and pointer loads
    for dtype in ("fp32", "fp16"):
        for group in (1, 4):
            for pattern, be in (("streaming", False), ("streaming", True), ("triangle", True),
                                ("triangle", False)):
                seed += 1
                c = random_prefill_case(seed, dtype=dtype, D=64, group=group, max_t=160, pattern=pattern,
                                        block_exact=be, block=16, tma=bool(seed % 2))
                out[f"prefill-{dtype}-g{group}-{pattern}-{'block' if be else 'token'}"] = dict(kind="prefill", **c)
    seed += 1
    out["prefill-fp32-softcap-nativewindow"] = dict(kind="prefill", **random_prefill_case(
        seed, dtype="fp32", D=64, group=2, max_t=150, pattern="streaming", block_exact=False, block=16,
        softcap=3.0, native_window=40))
    seed += 1
    out["prefill-fp32-d128-bthd"] = dict(kind="prefill", **random_prefill_case(
        seed, dtype="fp32", D=128, group=4, max_t=100, pattern="streaming", block_exact=True, block=32,
        Hkv=1, layout="bthd"))
    seed += 1
    out["prefill-fp16-all-fa"] = dict(kind="prefill", **random_prefill_case(
        seed, dtype="fp16", D=64, group=1, max_t=130, pattern="streaming", block_exact=False, block=16,
        route=[True, True, True], B=3))
    seed += 1
    out["prefill-fp16-config-64x16"] = dict(kind="prefill", **random_prefill_case(
        seed, dtype="fp16", D=64, group=4, max_t=140, pattern="streaming", block_exact=True, block=16,
        config=dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1), Hkv=1))
    # varlen (packed)
    for i, (pattern, be) in enumerate((("streaming", True), ("triangle", False))):
        seed += 1
        out[f"varlen-fp32-{pattern}"] = dict(kind="varlen", **random_prefill_case(
            seed, dtype="fp32", D=64, group=2, max_t=120, pattern=pattern, block_exact=be, block=16,
            tma=bool(i)))
    # decode: random splits, token/block exact, GQA 1/4, softcap
    for dtype in ("fp32", "fp16"):
        for group in (1, 4):
            for be in (False, True):
                seed += 1
                c = random_prefill_case(seed, dtype=dtype, D=64, group=group, max_t=200, pattern="streaming",
                                        block_exact=be, block=16, num_splits=[1, 3, 8, None][seed % 4])
                out[f"decode-{dtype}-g{group}-{'block' if be else 'token'}"] = dict(kind="decode", **c)
    seed += 1
    out["decode-fp32-softcap-nw"] = dict(kind="decode", **random_prefill_case(
        seed, dtype="fp32", D=64, group=4, max_t=180, pattern="streaming", block_exact=False, block=16,
        softcap=2.0, native_window=50, num_splits=4))
    # SA must skip: NaN keys between the sinks and the window never reach the output
    for kind in ("prefill", "decode"):
        for be in (False, True):
            seed += 1
            c = dict(kind=kind, seed=seed, dtype="fp32", D=64, B=2, Hkv=1, group=4, Tk=230, Tq=20,
                     kv_lens=[230, 220], q_lens=[20, 12] if kind == "prefill" else [1, 1], route=[False, False],
                     sink=32 if be else 20, window=64 if be else 50, block=32, block_exact=be,
                     pattern="streaming", num_splits=5)
            c["poison"] = poison_range(c, BN=32)
            assert c["poison"][1] - c["poison"][0] >= 64, c["poison"]
            out[f"skip-{kind}-{'block' if be else 'token'}"] = c
    return out
