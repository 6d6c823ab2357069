"""Gradient checkpointing of the rewritten graph, one segment per decoder layer.

Training runs the rewritten FX graph eagerly, so the graph itself can be cut: every node gets the layer
number of the module that produced it (Dynamo's ``nn_module_stack``; nodes the rewrite inserted, and
model-level nodes between layers, join the segment in progress), the graph is split into consecutive
segments, and each segment runs under `torch.utils.checkpoint` (non-reentrant). Only the tensors that
cross segment boundaries (the residual stream, positions, the mask) are kept for backward; each layer's
activations are recomputed during backward, with the RNG state of the forward, so the Gumbel samples of
the recomputation are the ones the loss saw.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint

from fluxc.api import FluxModule, compile_for_training
from fluxc.backend import FluxBackend
from fluxc.config import FluxConfig

log = logging.getLogger("fluxc")

_INDEX = re.compile(r"(?:\.|\[)(\d+)(?=\]|\.|$)")


def node_layer(node: fx.Node) -> int | None:
    """Layer number of the module that produced `node`: the first integer component of its innermost module
    path ('model.layers.7.mlp.experts.3' -> 7), or None for nodes outside numbered modules."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = str(list(stack.values())[-1][0])
    m = _INDEX.search(path)
    return int(m.group(1)) if m else None


def layer_segments(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Segment of every computing node: non-decreasing in graph order, so segments only feed later ones."""
    seg: dict[fx.Node, int] = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        layer = node_layer(node)
        if layer is not None and layer > current:
            current = layer
        seg[node] = current
    return seg


class CheckpointedSegment(nn.Module):
    """One segment of the split graph, run under non-reentrant `torch.utils.checkpoint`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(*args)
        return checkpoint(self.inner, *args, use_reentrant=False, preserve_rng_state=True)


def _attributes_inside(gm: fx.GraphModule) -> None:
    """Read tensor attributes (router weights, the route state) inside the segment that uses them.

    `split_module` passes a tensor attribute to a segment as an input, and checkpointing keeps inputs for the
    recomputation, checking that none changed in place; the route state does change (each layer records its
    decision into it). Fetching the owning module instead and reading the tensor off it inside the segment
    keeps such tensors out of the inputs."""
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or "." not in node.target:
            continue
        owner, _, attr = node.target.rpartition(".")
        if not isinstance(gm.get_submodule(owner), nn.Module) or not isinstance(getattr(gm.get_submodule(owner), attr), torch.Tensor):
            continue
        with gm.graph.inserting_before(node):
            module_node = gm.graph.get_attr(owner)
            read = gm.graph.call_function(getattr, (module_node, attr))
        read.meta = dict(node.meta)
        node.replace_all_uses_with(read)
        gm.graph.erase_node(node)
    gm.recompile()


def checkpoint_layers(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` split into per-layer segments, each recomputed during backward. Returns a new GraphModule that
    computes the same outputs from the same inputs."""
    _attributes_inside(gm)
    seg = layer_segments(gm)
    if not seg:
        return gm
    split = split_module(gm, gm, lambda node: seg[node], keep_original_order=True)
    count = 0
    for name, child in list(split.named_children()):
        if name.startswith("submod_"):
            setattr(split, name, CheckpointedSegment(child))
            count += 1
    log.info("fluxc: gradient checkpointing over %d segments", count)
    split.flux_segments = count
    return split


class CheckpointingBackend(FluxBackend):
    """The training backend, with the rewritten graph run segment by segment under checkpointing."""

    def _compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if self.config.compiler != "eager":  # training always runs eagerly (compile_for_training)
            return super()._compile(gm, example_inputs)
        return checkpoint_layers(gm).forward


def compile_for_training_checkpointed(model: nn.Module, config: FluxConfig, recorder: nn.Module, *,
                                      routers: nn.ModuleList | None = None) -> FluxModule:
    """`fluxc.api.compile_for_training` with per-layer gradient checkpointing of the rewritten graph."""
    return compile_for_training(model, config, recorder, routers=routers, backend_class=CheckpointingBackend)
