"""How a decode step picks its token: greedy, or a sample with temperature / top-k / top-p."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fluxc.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How a decode step picks its token (inside the decode graph)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"do_sample={self.do_sample!r} must be True or False")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name}={value!r} must be a finite number")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ConfigError(f"top_k={self.top_k!r} must be an int (0 keeps every token)")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0; use do_sample=False for greedy decoding")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")


def select_tokens(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """(B, 1) next tokens from (B, V) logits: argmax, or a sample with temperature / top-k / top-p
    (Gumbel-max with the default generator: safe inside CUDA-graph capture)."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    scores = logits.float() / sampling.temperature  # (B, V)
    if sampling.top_k > 0:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > sampling.top_p  # keep the smallest prefix reaching top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    gumbel = -torch.log(-torch.log(torch.rand_like(scores).clamp_(1e-20, 1.0)))
    return (scores + gumbel).argmax(dim=-1, keepdim=True)
