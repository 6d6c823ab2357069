"""fluxc's custom ops and their plain-PyTorch references (the layer between passes and kernels)."""

from fluxc.ops.attention import routed_attention, routed_attention_reference
from fluxc.ops.cache import cache_attention, cache_write
from fluxc.ops.masks import allowed_mask, mask_positions, sparse_allowed
from fluxc.ops.paged import paged_attention, paged_view, paged_write
from fluxc.ops.positions import dense_copy, flux_positions
from fluxc.ops.router import LayerRouter, pool_queries, record_routes, router_logits

__all__ = [
    "LayerRouter", "allowed_mask", "cache_attention", "cache_write", "dense_copy", "flux_positions", "mask_positions", "paged_attention", "paged_view", "paged_write", "pool_queries", "record_routes",
    "routed_attention", "routed_attention_reference", "router_logits", "sparse_allowed",
]
