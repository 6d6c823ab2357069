"""Lowering for Inductor: fluxc's router op as the tensor ops it is made of.

`fluxc::router_logits` is an opaque custom op so that export can translate it (ONNX) and training can see its
inputs; run as such inside an Inductor graph it is ~25 separate kernel launches per layer (pooling, weight
casts, five small linears). Inlined, Inductor fuses the pooling gather, the head mean and the MLP's pointwise
work into a few kernels of the layer's graph.
"""

from __future__ import annotations

import functools
import hashlib
import inspect

import torch
import torch.fx as fx

from fluxc.ops import router
from fluxc.ops.router import router_logits_reference
from fluxc.passes.rewrite import counters


def inline_router_ops(gm: fx.GraphModule) -> int:
    """Replace every `fluxc::router_logits` call in `gm` by its reference decomposition; returns how many."""
    inlined = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.fluxc.router_logits.default:
            node.target = router_logits_reference  # same arguments: (query, valid, weights, pool_size)
            inlined += 1
    if inlined:
        gm.recompile()
        counters["router_ops_inlined"] += inlined
    return inlined


@functools.cache
def cacheable_inlined() -> dict[str, str]:
    """Inductor's `unsafe_marked_cacheable_functions` entry for the inlined router: AOTAutograd's cache skips a
    graph calling a Python function unless it is marked; its key is the digest of the function's module source,
    so an edit to the router invalidates what was cached."""
    digest = hashlib.sha256(inspect.getsource(router).encode()).hexdigest()[:16]
    return {f"{router_logits_reference.__module__}.{router_logits_reference.__name__}": digest}
