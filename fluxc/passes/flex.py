"""Routing FlexAttention sites: the flex call stays, its score_mod becomes a routed one.

The routed score_mod keeps the model's score_mod and sets scores outside the SA pattern to -inf for
sequences routed sparse (the model's block mask still applies). Per-sequence route, query positions and
sequence starts enter as extra score_mod buffers. Positions are read off the model's own mask_mod at
O(B * T) points (its diagonal and its last row), never as a dense T x T mask.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fluxc.config import FluxConfig
from fluxc.patterns import sa_allowed


def flex_positions(mask_mod, q: torch.Tensor, k: torch.Tensor, *buffers: torch.Tensor):
    """(qpos (B, Tq), valid (B, Tq), key_start (B,), last (B,)) for a flex site; queries are the last Tq keys."""
    batch, q_len, kv_len = q.shape[0], q.shape[2], k.shape[2]
    device = q.device
    b = torch.arange(batch, device=device)[:, None]  # (B, 1)
    h = torch.zeros((), dtype=torch.long, device=device)
    rows = torch.arange(q_len, device=device)[None, :]  # (1, Tq)
    qpos = (rows + (kv_len - q_len)).expand(batch, q_len)  # (B, Tq)
    valid = mask_mod(b, h, rows, qpos, *buffers).expand(batch, q_len)  # a real query sees itself
    keys = torch.arange(kv_len, device=device)[None, :]  # (1, Tk)
    last_row = torch.full_like(keys, kv_len - 1)
    seen = mask_mod(b, h, last_row + (q_len - kv_len), keys, *buffers).expand(batch, kv_len)  # (B, Tk)
    key_start = torch.where(seen, keys, kv_len).amin(dim=1).clamp_max(kv_len - 1)  # (B,)
    last = torch.where(valid, qpos, -1).amax(dim=1)  # (B,) last real query position
    return qpos.contiguous(), valid.contiguous(), key_start, last


def routed_score_mod(original: fx.GraphModule, n_buffers: int, config: FluxConfig, prefill: bool) -> fx.GraphModule:
    """score_mod(score, b, h, q, kv, *model_buffers, route, qpos, key_start, last) for a routed flex site."""
    graph = fx.Graph()
    score, b, h, qi, kv = (graph.placeholder(n) for n in ("score", "b", "h", "q_idx", "kv_idx"))
    buffers = [graph.placeholder(f"model_buffer_{i}") for i in range(n_buffers)]
    route, qpos, key_start, last = (graph.placeholder(n) for n in ("route", "qpos", "key_start", "last"))
    # the model's score_mod, inlined (Inductor's CPU flex template lowers one flat graph)
    inputs = [n for n in original.graph.nodes if n.op == "placeholder"]
    modded = graph.graph_copy(original.graph, dict(zip(inputs, (score, b, h, qi, kv, *buffers))))
    # the SA rule of fluxc.patterns, traced on proxies: positions count from the sequence's first key
    proxy = fx.Proxy
    start = proxy(graph.call_function(operator.getitem, (key_start, b)))
    q = proxy(graph.call_function(operator.getitem, (qpos, (b, qi)))) - start
    k = proxy(kv) - start
    dense_rows = config.pattern == "triangle" and prefill
    last_b = proxy(graph.call_function(operator.getitem, (last, b))) - start if dense_rows else None
    keep = sa_allowed(q, k, sink=config.sink, window=config.window, block=config.block,
                      block_exact=config.block_exact, n_last=config.n_last, last=last_b).node
    keep = graph.call_function(operator.or_, (graph.call_function(operator.getitem, (route, b)), keep))
    graph.output(graph.call_function(torch.where, (keep, modded, float("-inf"))))
    return fx.GraphModule(original, graph, class_name="RoutedScoreMod")
