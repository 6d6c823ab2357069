"""Locate a site's router input: the layer's query states after any q-norm and before RoPE.

No per-model code: the query's history is read off the graph.
1. The *cone*: the content-carrying ancestors of the site's q back to the q projection (a matmul with
   a parameter). Content = depends on model parameters through computation (hidden states), so
   cos/sin tables, masks and position ids are not content.
2. *Position-mixing* nodes of the cone combine q with a non-content tensor (RoPE's multiplications by
   cos/sin, complex-rotation tables, ...). The router input is the latest node that is an ancestor of all
   of them (the query just before the rotation); with no such nodes (no RoPE), the site's q itself.
3. Axis labels (B, T, H, D) are propagated forward from the projection output (B, T, C) through views,
   transposes and elementwise ops, so the router input can be brought to (B, T, H, D) whatever the model's
   layout, even when the number of heads equals the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fluxc.passes.graph import (
    is_parameter,
    is_parameter_like,
    is_target,
    known_less,
    meta_value,
    same_shape,
    same_size,
    shape_of,
)

Node = fx.Node

_PROJECTIONS = ("linear", "matmul", "addmm", "mm", "bmm", "baddbmm", "einsum")
_SAME_LAYOUT = ("contiguous", "float", "to", "type_as", "clone", "detach", "half", "bfloat16", "type",
                "neg", "mul", "add", "sub", "truediv", "div", "pow", "rsqrt", "sqrt", "tanh", "silu",
                "cat", "mean", "sum", "layer_norm", "rms_norm", "group_norm", "abs", "clamp",
                "where", "masked_fill", "scaled_dot_product_attention", "dropout", "exp", "sigmoid")


@dataclass(frozen=True)
class QueryInput:
    node: Node
    permutation: tuple[int, ...]  # permute node's axes to (B, T, H[, D]) order
    merged_heads: bool  # True when the node is (B, T, H*D) and needs a view to (B, T, H, D)


class ContentAnalysis:
    """Which nodes carry hidden-state content (depend on a parameter through computation)."""

    def __init__(self, graph: fx.Graph) -> None:
        self.content: set[Node] = set()
        for node in graph.nodes:
            if node.op in ("call_function", "call_method", "call_module") and not _is_size(node):
                if any(n in self.content or is_parameter(n) for n in node.all_input_nodes):
                    self.content.add(node)

    def is_content(self, node: object) -> bool:
        return isinstance(node, Node) and node in self.content


def _is_size(node: Node) -> bool:
    # a symbolic size (batch, length) read off the hidden states is not content: with dynamic shapes every view
    # takes one, and following it would pull the mask and position code into the query's cone
    return isinstance(meta_value(node), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def _is_projection(node: Node) -> bool:
    return is_target(node, *_PROJECTIONS) and any(is_parameter(n) for n in node.all_input_nodes)


def _cone(q: Node, content: ContentAnalysis, limit: int = 400) -> tuple[list[Node], Node | None]:
    """Content ancestors of q up to (and including) the q projection."""
    seen: set[Node] = set()
    order: list[Node] = []
    stack = [q]
    projection = None
    while stack and len(seen) < limit:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        order.append(node)
        if _is_projection(node):
            projection = node if projection is None else projection
            continue
        stack.extend(n for n in node.all_input_nodes if content.is_content(n))
    return order, projection


def _is_mixing(node: Node, content: ContentAnalysis) -> bool:
    for operand in node.all_input_nodes:
        if content.is_content(operand) or is_parameter_like(operand):
            continue
        value = meta_value(operand)
        if isinstance(value, torch.Tensor) and value.numel() > 1:
            return True
    return False


def _ancestors(node: Node, cone: set[Node]) -> set[Node]:
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        stack.extend(i for i in n.all_input_nodes if i in cone)
    return out


def _labels(node: Node, projection: Node, cone: set[Node], head_dim: int, memo: dict) -> tuple | None:
    """Axis labels of `node` ('B', 'T', 'H', 'D', 'C' = H*D, or '?'), propagated from the projection."""
    if node in memo:
        return memo[node]
    memo[node] = None  # cycle guard
    shape = shape_of(node)
    result = None
    if node is projection:
        result = ("B", "T", "C") if shape is not None and len(shape) == 3 else None
    elif is_target(node, "split", "chunk", "split_with_sizes", "tensor_split") or (
            is_target(node, "getitem") and isinstance(meta_value(node.args[0]), (tuple, list))):
        # pieces of a fused projection (q, k, v = qkv.split(...)) keep the axes of what was split
        source = node.args[0]
        result = _labels(source, projection, cone, head_dim, memo) if source in cone else None
    else:
        sources = [n for n in node.all_input_nodes if n in cone]
        primary = next((n for n in sources if same_shape(shape_of(n), shape)), sources[0] if sources else None)
        labels = _labels(primary, projection, cone, head_dim, memo) if primary is not None else None
        in_shape = shape_of(primary) if primary is not None else None
        if labels is not None and shape is not None and in_shape is not None:
            result = _transfer(node, labels, in_shape, shape, head_dim)
    memo[node] = result
    return result


def _transfer(node: Node, labels: tuple, in_shape: tuple, out_shape: tuple, head_dim: int) -> tuple | None:
    if is_target(node, "transpose"):
        dims = [d for d in node.args[1:3]] if len(node.args) >= 3 else [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
        if not all(isinstance(d, int) for d in dims):
            return None
        a, b = (d % len(labels) for d in dims)
        out = list(labels)
        out[a], out[b] = out[b], out[a]
        return tuple(out)
    if is_target(node, "permute"):
        perm = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return tuple(labels[p % len(labels)] for p in perm)
    if is_target(node, "view", "reshape", "unflatten", "flatten"):
        return _reshape_labels(labels, in_shape, out_shape, head_dim)
    if is_target(node, "split", "chunk", "split_with_sizes", "unbind", "tensor_split"):
        return labels if not is_target(node, "unbind") else None
    if is_target(node, "getitem"):
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(i is None for i in index):
            return None
        if Ellipsis in index:  # x[..., a:b]: only slices, every axis stays
            return labels if all(isinstance(i, slice) or i is Ellipsis for i in index) and len(in_shape) == len(out_shape) else None
        kept = [lab for lab, i in zip(labels, index) if not isinstance(i, int)] + list(labels[len(index):])
        return tuple(kept) if len(kept) == len(out_shape) else None
    if same_shape(in_shape, out_shape) or (len(in_shape) == len(out_shape) and is_target(node, *_SAME_LAYOUT)):
        return labels
    return None


def _reshape_labels(labels: tuple, in_shape: tuple, out_shape: tuple, head_dim: int) -> tuple | None:
    """Labels across a view: kept dims keep their label, C = H*D splits into (H, D), (H, D) merges to C."""
    out: list[str] = []
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        if same_size(in_shape[i], out_shape[j]):
            out.append(labels[i])
            i += 1
            j += 1
            continue
        # a C axis split into (..., H, D), e.g. a fused projection viewed as (3, H, D)
        if labels[i] == "C":
            size, m = 1, 0
            while j + m < len(out_shape) and known_less(size, in_shape[i]):
                size *= out_shape[j + m]
                m += 1
            if same_size(size, in_shape[i]) and m >= 2 and same_size(out_shape[j + m - 1], head_dim):
                out.extend(["?"] * (m - 2) + ["H", "D"])
                i += 1
                j += m
                continue
        # (H, D) merged into C
        if i + 1 < len(in_shape) and labels[i] == "H" and labels[i + 1] == "D" \
                and same_size(in_shape[i] * in_shape[i + 1], out_shape[j]):
            out.append("C")
            i += 2
            j += 1
            continue
        return None
    if i != len(in_shape) or j != len(out_shape):
        return None
    return tuple(out)


def locate_query(q: Node, content: ContentAnalysis, q_heads: int, head_dim: int) -> QueryInput | str:
    """The router input of a site whose (post-RoPE) query is `q`, or a reason string when not found."""
    if not content.is_content(q):
        return "the query does not come from the model's hidden states"
    order, projection = _cone(q, content)
    if projection is None:
        return "no query projection (matmul with a parameter) found upstream of the query"
    cone = set(order)
    mixing = [n for n in order if n is not projection and _is_mixing(n, content)]
    if mixing:
        common = set.intersection(*(_ancestors(m, cone) for m in mixing)) - set(mixing)
        if not common:
            return "no single pre-rotation query feeds the position-dependent ops"
        index = {n: i for i, n in enumerate(q.graph.nodes)}
        candidates = sorted(common, key=lambda n: index[n], reverse=True)
    else:
        candidates = [q]
    memo: dict = {}
    # Prefer the latest candidate whose axes are known (after q-norm, before RoPE); walk back through
    # layout-only steps (e.g. a float/reshape done by the rotation) until a (B,T,H,D)-like node is found.
    for node in candidates:
        labels = _labels(node, projection, cone, head_dim, memo)
        if labels is None:
            continue
        shape = shape_of(node)
        if set(labels) == {"B", "T", "H", "D"} and len(labels) == 4:
            perm = tuple(labels.index(x) for x in ("B", "T", "H", "D"))
            if same_size(shape[perm[2]], q_heads) and same_size(shape[perm[3]], head_dim):
                return QueryInput(node, perm, merged_heads=False)
        if len(labels) == 3 and set(labels) == {"B", "T", "C"} and same_size(shape[labels.index("C")], q_heads * head_dim):
            perm = tuple(labels.index(x) for x in ("B", "T", "C"))
            return QueryInput(node, perm, merged_heads=True)
    return "could not read the (batch, token, head, dim) layout of the pre-rotation query"
