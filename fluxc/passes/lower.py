"""Lowering for Inductor: fluxc's router op as the tensor ops it is made of.

`fluxc::router_logits` is an opaque custom op so that export can translate it (ONNX) and training can see its
inputs; run as such inside an Inductor graph it is ~25 separate kernel launches per layer (pooling, weight
casts, five small linears). Inlined, Inductor fuses the pooling gather, the head mean and the MLP's pointwise
work into a few kernels of the layer's graph, and the pooled tokens' positions (a scan of the mask: the
costliest part at long prompts) are found once per forward for every layer that shares the mask.
"""

from __future__ import annotations

import functools
import hashlib
import inspect

import torch
import torch.fx as fx

from fluxc.ops import router
from fluxc.ops.router import pooled_token_index, router_logits_at
from fluxc.passes.rewrite import counters


def inline_router_ops(gm: fx.GraphModule) -> int:
    """Replace every `fluxc::router_logits` call in `gm` by its decomposition, the pooled tokens' positions
    computed once per (mask, pool size); returns how many calls."""
    inlined = 0
    index_of: dict[tuple[fx.Node, int], fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.fluxc.router_logits.default:
            query, valid, weights, pool_size = node.args
            key = (valid, pool_size)
            if key not in index_of:  # before the first router: every later layer's router comes after it
                with gm.graph.inserting_before(node):
                    index_of[key] = gm.graph.call_function(pooled_token_index, (valid, pool_size))
            node.target = router_logits_at
            node.args = (query, index_of[key], weights)
            inlined += 1
    if inlined:
        gm.recompile()
        counters["router_ops_inlined"] += inlined
        counters["router_pool_indices"] += len(index_of)
    return inlined


@functools.cache
def cacheable_inlined() -> dict[str, str]:
    """Inductor's `unsafe_marked_cacheable_functions` entry for the inlined router: AOTAutograd's cache skips a
    graph calling a Python function unless it is marked; its key is the digest of the function's module source,
    so an edit to the router invalidates what was cached."""
    digest = hashlib.sha256(inspect.getsource(router).encode()).hexdigest()[:16]
    return {f"{f.__module__}.{f.__name__}": digest for f in (pooled_token_index, router_logits_at)}
