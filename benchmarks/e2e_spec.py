"""Shapes and run sizes of the end-to-end benchmark: the H100 run, the CPU smoke runs, and the forced routes."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

GIB = float(1 << 30)


@dataclass(frozen=True)
class Spec:
    """Model shape and run sizes (the GPU run, or the CPU smoke run)."""

    name: str
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    lengths: tuple[int, int, int]  # prompt lengths: short (decode at big batch), mid, long
    big_batch: int
    warm: tuple[tuple[int, int], ...]  # (B, T) prefill warm-ups: static, dynamic length, dynamic batch
    verify_prompt: int
    sink: int
    window: int
    block: int
    router_hidden: tuple[int, int, int, int]
    decode_warm: int
    decode_reps: int
    decode_steps: int
    reps_short: int
    reps_long: int
    copy_bytes: int
    dtype: str
    device: str
    est_scale: float  # 1: H100 cost model gates the steps; 0: only the elapsed time does

    @property
    def new_tokens(self) -> int:
        """max_new_tokens of every prefill: room for the warm-up and timed decode steps."""
        return self.decode_warm + self.decode_reps * self.decode_steps + 8


LLAMA31_8B = Spec("llama-3.1-8b", 128256, 4096, 14336, 32, 32, 8, 128, (32768, 65536, 131072), 8,
                  ((1, 4096), (1, 8192), (2, 4096)), 4096, 128, 2048, 128, (1024, 256, 512, 128),
                  4, 3, 16, 3, 2, 1 << 30, "bfloat16", "cuda", 1.0)
SMOKE = Spec("smoke-tiny-llama", 256, 64, 128, 4, 4, 2, 16, (64, 128, 256), 2,
             ((1, 32), (1, 48), (2, 32)), 48, 8, 16, 8, (32, 16, 24, 8),
             2, 2, 3, 2, 2, 1 << 20, "float32", "cpu", 0.0)
# the test's run: two layers, one prompt length (no dynamic-length trace), one rep each: every code path with
# the fewest Dynamo traces (the full --smoke covers the three lengths and the dynamic shapes)
SMOKE_QUICK = replace(SMOKE, name="smoke-quick", layers=2, lengths=(40, 40, 40), warm=((1, 40), (2, 40)),
                      verify_prompt=16, decode_reps=1, decode_steps=2, reps_short=1, reps_long=1)


def route_for(r: float, layers: int) -> list[str]:
    """`layers` routes with a fraction r sparse, spread evenly (layer 0 full unless r = 1)."""
    return ["sparse" if math.floor((i + 1) * r + 1e-9) - math.floor(i * r + 1e-9) == 1 else "full"
            for i in range(layers)]
