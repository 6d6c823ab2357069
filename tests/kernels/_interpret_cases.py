"""The CPU interpreter cases (small sizes, fp16/fp32, head dim 64; one head-dim-128 case)."""

from __future__ import annotations

import random

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
    # left padding (kv_start): HF layout (every query row, padded ones too: they come out as zeros) and
    # chunks whose queries are all real; TMA and pointer loads; decode
    for name, kind, dtype, group, pattern, be, tma, hf in (
            ("prefill-fp16-g4-streaming-block-hfpad", "prefill", "fp16", 4, "streaming", True, True, True),
            ("prefill-fp32-g1-triangle-token-kvstart", "prefill", "fp32", 1, "triangle", False, False, False),
            ("decode-fp16-g4-block-kvstart", "decode", "fp16", 4, "streaming", True, None, False)):
        seed += 1
        rnd = random.Random(seed)
        c = random_prefill_case(seed, dtype=dtype, D=64, group=group, max_t=140, pattern=pattern, block_exact=be,
                                block=16, num_splits=3)
        if hf:
            c["kv_lens"] = c["q_lens"] = [c["Tk"]] * c["B"]
            c["Tq"] = c["Tk"]
            c["kv_start"] = [0] + [rnd.randint(1, c["Tk"] // 2) for _ in range(c["B"] - 1)]
        else:  # chunks: queries the last third of the keys, padding before them
            if kind == "prefill":
                c["q_lens"] = [max(1, kl // 3) for kl in c["kv_lens"]]
                c["Tq"] = max(c["q_lens"])
            ql = c["q_lens"] if kind == "prefill" else [1] * c["B"]
            c["kv_start"] = [rnd.randint(1, kl - q) for kl, q in zip(c["kv_lens"], ql)]
        if tma is not None:
            c["tma"] = tma
        out[name] = dict(kind=kind, **c)
    # ring-buffer SA decode (evicted cache): n below the sinks, inside the first window, exactly full,
    # wrapping several times, at block boundaries (p % block == 0 and == block - 1), n == 0
    # (BLOCK_N=16 in some: several slot blocks per sequence, so the splits partition a real list)
    ring = [  # name, dtype, D, group, Hkv, sink, window, block, block_exact, n, num_splits, softcap
        ("fp32-g1-token", "fp32", 64, 1, 2, 5, 24, 8, False, [0, 3, 20, 29, 30, 130], 3, 0.0),
        ("fp16-g4-token-nosink", "fp16", 64, 4, 2, 0, 24, 8, False, [1, 24, 25, 100], None, 0.0),
        ("fp16-g8-token-softcap", "fp16", 64, 8, 1, 8, 16, 8, False, [7, 9, 24, 25, 77], 2, 3.0),
        ("fp32-g4-block", "fp32", 64, 4, 1, 16, 24, 8, True, [5, 16, 17, 24, 41, 97, 104, 200], None, 0.0),
        ("fp16-g1-block", "fp16", 64, 1, 2, 8, 16, 8, True, [1, 8, 9, 16, 17, 33, 40, 71, 72], 5, 0.0),
        ("fp16-g8-block-nosink-d128", "fp16", 128, 8, 1, 0, 32, 16, True, [16, 17, 32, 33, 48, 100], 4, 0.0),
    ]
    for name, dtype, D, group, Hkv, sink, window, block, be, n, splits, softcap in ring:
        seed += 1
        out[f"ring-{name}"] = dict(kind="ring", seed=seed, dtype=dtype, D=D, group=group, Hkv=Hkv, sink=sink,
                                   window=window, block=block, block_exact=be, n=n, num_splits=splits,
                                   softcap=softcap)
        if "g4" in name or "g1-block" in name:
            out[f"ring-{name}"]["config"] = dict(BLOCK_N=16, num_warps=4, num_stages=1, SPLIT_WAVES=2)
    # paged decode (shared pool, block tables): routes mixed in one launch, pages smaller than, equal to and
    # larger than a key block, the ring wrapping, n == 0
    paged = [  # name, dtype, group, Hkv, sink, window, block, block_exact, page, n, route, num_splits
        ("fp32-g1-token-page8", "fp32", 1, 2, 5, 24, 8, False, 8, [0, 3, 29, 30, 130], [1, 0, 0, 1, 0], 3),
        ("fp16-g4-block-page16", "fp16", 4, 1, 16, 24, 8, True, 16, [5, 40, 41, 97, 200, 17], [0, 1, 0, 0, 1, 0],
         None),
        ("fp16-g8-block-page32", "fp16", 8, 1, 8, 16, 8, True, 32, [1, 9, 33, 72, 150], [1, 0, 0, 1, 0], 2),
    ]
    for name, dtype, group, Hkv, sink, window, block, be, page, n, route, splits in paged:
        seed += 1
        out[f"paged-{name}"] = dict(kind="paged", seed=seed, dtype=dtype, D=64, group=group, Hkv=Hkv, sink=sink,
                                    window=window, block=block, block_exact=be, page=page, n=n, route=route,
                                    num_splits=splits)
    out["paged-fp16-g4-block-page16"]["config"] = dict(BLOCK_N=16, num_warps=4, num_stages=1, SPLIT_WAVES=2)
    # a prompt's keys written into the pages (left-padded rows write nothing; heads x dim not a power of two)
    for name, dtype, Hkv, D, page, n in (("fp16-h3-page16", "fp16", 3, 64, 16, [37, 5, 1, 40]),
                                         ("fp32-h2-d128-page4", "fp32", 2, 128, 4, [9, 17])):
        seed += 1
        out[f"paged-write-{name}"] = dict(kind="paged_write", seed=seed, dtype=dtype, Hkv=Hkv, D=D, page=page, n=n)
    return out
