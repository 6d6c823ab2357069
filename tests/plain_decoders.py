"""Plain PyTorch decoders (no transformers), written the way gpt-fast and nanoGPT write them.

Each attention module accepts `reference_keep`, a (B, T, T) bool mask applied on top of its own causal
mask by the untouched code path: tests use it to build an independent sparse reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_table(seq: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(seq).float(), freqs)  # (T, D/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # (T, D/2, 2)


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """gpt-fast style rotation on (B, T, H, D) as pairs of floats."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    t = table.view(1, xs.shape[1], 1, xs.shape[3], 2)
    out = torch.stack([xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
                       xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


class FastAttention(nn.Module):
    """gpt-fast style: fused wqkv, RoPE on (B, T, H, D), SDPA with is_causal and native GQA."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wqkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.reference_keep: torch.Tensor | None = None
        self.last_pre_rope: torch.Tensor | None = None

    def forward(self, x, table):
        b, t, _ = x.shape
        kv = self.kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.heads * self.head_dim, kv, kv], dim=-1)
        q = q.view(b, t, self.heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        v = v.view(b, t, self.kv_heads, self.head_dim)
        if not torch.compiler.is_compiling():
            self.last_pre_rope = q.detach()
        q, k = apply_rotary(q, table), apply_rotary(k, table)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if self.reference_keep is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=(causal & self.reference_keep)[:, None],
                                               enable_gqa=True)
        return self.wo(y.transpose(1, 2).contiguous().view(b, t, -1))


class NanoAttention(nn.Module):
    """nanoGPT style: c_attn split, no RoPE, hand-written masked_fill softmax attention."""

    def __init__(self, dim: int, heads: int, max_seq: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.register_buffer("bias", torch.tril(torch.ones(max_seq, max_seq)).view(1, 1, max_seq, max_seq))
        self.reference_keep: torch.Tensor | None = None
        self.last_pre_rope: torch.Tensor | None = None

    def forward(self, x, table=None):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(c, dim=2)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        if not torch.compiler.is_compiling():
            self.last_pre_rope = q.detach().transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        if self.reference_keep is not None:
            att = att.masked_fill(~self.reference_keep[:, None], float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, attn: nn.Module, dim: int) -> None:
        super().__init__()
        self.attention = attn
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, table):
        x = x + self.attention(self.norm1(x), table)
        return x + self.mlp(self.norm2(x))


class PlainDecoder(nn.Module):
    def __init__(self, style: str, vocab: int = 97, dim: int = 64, layers: int = 3, heads: int = 4,
                 kv_heads: int = 2, max_seq: int = 64) -> None:
        super().__init__()
        self.style = style
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_seq, dim) if style == "nano" else None
        attn = (lambda: FastAttention(dim, heads, kv_heads)) if style == "fast" else (lambda: NanoAttention(dim, heads, max_seq))
        self.blocks = nn.ModuleList(Block(attn(), dim) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("table", rope_table(max_seq, dim // heads), persistent=False)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.embed(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x, self.table[:t])
        return self.out(self.norm(x))
