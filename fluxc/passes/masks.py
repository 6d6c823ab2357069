"""Read a site's materialised mask as structure: causal order between two index vectors AND per-key factors.

HF models traced by Dynamo build a bool (B, 1, Tq, Tk) mask from index vectors (transformers skips the mask and
passes `is_causal` only outside tracing): `kv_idx <= q_idx` with `q_idx = arange(Tq) + offset` and
`kv_idx = arange(Tk) + offset`, AND a padding term `attention_mask[b, kv_idx]` of shape (B, 1, 1, Tk), then
`expand`; a sliding-window layer ANDs `kv_idx > q_idx - W` too (the model's own window of W keys). At 128K tokens that mask is 16 GiB and the kernels cannot take it. When the mask node is an AND of
exactly such terms, the rewrite passes the index vectors and the per-key factors to `fluxc::causal_positions`
instead, so the (Tq, Tk) tensor is never built and the kernels get `is_causal` + per-sequence key ranges.

Anything else (chunked or bidirectional blocks, unknown ops) is not read: the site keeps its mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fluxc.passes.graph import arg, is_target, meta_value, same_size, shape_of

Node = fx.Node

_AND = ("and_", "__and__", "logical_and", "bitwise_and", "__iand__")
_PASS_THROUGH = ("expand", "contiguous", "clone", "expand_as")


@dataclass(frozen=True)
class CausalKeyMask:
    """mask[b, 0, i, j] == (k_index[j] <= q_index[i]) and (window == 0 or q_index[i] - k_index[j] < window)
    and all(f[b, 0, 0, j] for f in key_factors)."""

    q_index: Node  # (Tq,) integer positions of the queries, arange + offset
    k_index: Node  # (Tk,) integer positions of the keys, arange + offset
    key_factors: tuple[Node, ...]  # bool, each broadcastable to (B, 1, 1, Tk)
    window: int = 0  # the model's own sliding window (keys per query, itself included); 0: none


def _same_dtype_source(node: Node) -> Node | None:
    """x for `x.to(...)` that keeps x's dtype (a device move), else None."""
    if not (is_target(node, "to") and isinstance(node.args[0], Node)):
        return None
    source, value = meta_value(node.args[0]), meta_value(node)
    return node.args[0] if source is not None and value is not None and source.dtype == value.dtype else None


def _strip(node: object) -> object:
    """Skip ops that keep a bool mask's values: expand, contiguous, `.to(device)` / `.to(torch.bool)`."""
    for _ in range(8):
        if not isinstance(node, Node):
            return node
        if is_target(node, *_PASS_THROUGH) and isinstance(node.args[0], Node):
            node = node.args[0]
            continue
        source = _same_dtype_source(node)
        if source is None:
            return node
        node = source
    return node


def _and_terms(node: object, terms: list[object]) -> None:
    node = _strip(node)
    if isinstance(node, Node) and is_target(node, *_AND) and len(node.args) == 2:
        for side in node.args:
            _and_terms(side, terms)
        return
    terms.append(node)


def _is_true_constant(node: object) -> bool:
    """`x.new_ones(..., dtype=torch.bool)`, `torch.ones(..., dtype=torch.bool)` or the literal True."""
    if node is True:
        return True
    if not isinstance(node, Node):
        return False
    value = meta_value(node)
    return (is_target(node, "new_ones", "ones", "ones_like") and value is not None and value.dtype == torch.bool)


def _is_symbolic_size(node: Node) -> bool:
    """A graph input holding a size (a SymInt under dynamic shapes: the past length of a decode step)."""
    return isinstance(node.meta.get("example_value"), (int, torch.SymInt))


def _affine_arange(node: object) -> bool:
    """`arange(...)`, optionally plus or minus a number / 0-d tensor, possibly moved with `.to(device)`."""
    for _ in range(6):
        if not isinstance(node, Node):
            return False
        if is_target(node, "arange"):
            return arg(node, 2, "step", 1) == 1
        if is_target(node, "to"):
            node = _same_dtype_source(node)
            continue
        if is_target(node, "add", "sub", "__add__", "__sub__", "__radd__") and len(node.args) == 2:
            a, b = node.args
            vector, other = (a, b) if isinstance(a, Node) and len(shape_of(a) or ()) == 1 else (b, a)
            if is_target(node, "sub", "__sub__") and vector is not a:
                return False  # c - arange counts down
            other_shape = () if not isinstance(other, Node) or _is_symbolic_size(other) else shape_of(other)
            if other_shape is None or len(other_shape) > 1 or (len(other_shape) == 1 and not same_size(other_shape[0], 1)):
                return False
            node = vector
            continue
        return False
    return False


def _index_vector(node: object, axis: int) -> Node | None:
    """The 1-D affine-arange node that `node` broadcasts along 4-D dim `axis` (2: queries, 3: keys), or None."""
    if not isinstance(node, Node):
        return None
    shape = shape_of(node)
    if shape is None or len(shape) != 4 or not all(same_size(s, 1) for i, s in enumerate(shape) if i != axis):
        return None
    for _ in range(6):
        if not isinstance(node, Node):
            return None
        shape = shape_of(node)
        if shape is not None and len(shape) == 1:
            return node if _affine_arange(node) else None
        if is_target(node, "getitem", "unsqueeze", "view", "reshape", "__getitem__") and isinstance(node.args[0], Node):
            if is_target(node, "getitem", "__getitem__"):
                index = node.args[1]
                parts = index if isinstance(index, tuple) else (index,)
                if any(p is not None and p != slice(None) and p is not Ellipsis for p in parts):
                    return None  # a real index (not a new axis or a full slice) changes the values' order
            node = node.args[0]
            continue
        if is_target(node, "to") and isinstance(node.args[0], Node):
            node = node.args[0]
            continue
        return None
    return None


def _window_term(term: Node) -> tuple[Node, Node, int] | None:
    """(q_index, k_index, W) of `kv_idx > q_idx - W` (or `q_idx - W < kv_idx`) with W a positive int, else None."""
    if not (is_target(term, "gt", "lt", "__gt__", "__lt__") and len(term.args) == 2):
        return None
    key, shifted = term.args if is_target(term, "gt", "__gt__") else term.args[::-1]
    if not (isinstance(shifted, Node) and is_target(shifted, "sub", "__sub__") and len(shifted.args) == 2):
        return None
    query, window = shifted.args
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        return None
    k_index, q_index = _index_vector(key, 3), _index_vector(query, 2)
    if k_index is None or q_index is None:
        return None
    return q_index, k_index, window


def read_causal_key_mask(mask: Node, q_len: object, kv_len: object) -> CausalKeyMask | None:
    """The structure of a bool site mask (B', 1, Tq, Tk), or None when it is not causal AND per-key terms."""
    value = meta_value(mask)
    shape = shape_of(mask)
    if value is None or value.dtype != torch.bool or shape is None or len(shape) != 4 or not same_size(shape[1], 1):
        return None
    if not (same_size(shape[2], q_len) and same_size(shape[3], kv_len)):
        return None
    terms: list[object] = []
    _and_terms(mask, terms)
    causal: tuple[Node, Node] | None = None
    windows: list[tuple[Node, Node, int]] = []
    factors: list[Node] = []
    for term in terms:
        if _is_true_constant(term):
            continue
        if not isinstance(term, Node):
            return None
        window = _window_term(term)
        if window is not None:
            windows.append(window)
            continue
        if is_target(term, "le", "ge", "__le__", "__ge__") and len(term.args) == 2 and causal is None:
            low, high = term.args if is_target(term, "le", "__le__") else term.args[::-1]
            k_index, q_index = _index_vector(low, 3), _index_vector(high, 2)
            if k_index is None or q_index is None:
                return None
            if not (same_size(shape_of(k_index)[0], kv_len) and same_size(shape_of(q_index)[0], q_len)):
                return None
            causal = (q_index, k_index)
            continue
        term_shape = shape_of(term)
        term_value = meta_value(term)
        if (term_shape is not None and len(term_shape) == 4 and term_value is not None
                and term_value.dtype == torch.bool and all(same_size(term_shape[i], 1) for i in (1, 2))):
            factors.append(term)  # depends on (batch, key) only: a per-key factor, whatever computes it
            continue
        return None
    if causal is None or len(windows) > 1 or any((q, k) != causal for q, k, _ in windows):
        return None  # a window over other index vectors than the causal term's is not this structure
    return CausalKeyMask(causal[0], causal[1], tuple(factors), windows[0][2] if windows else 0)


def _allowed(mask: Node) -> Node:
    """The bool "may attend" mask behind an additive one built as `where(allowed, 0, very negative)` (eager
    attention's mask), else `mask` itself."""
    if is_target(mask, "where") and len(mask.args) == 3 and isinstance(mask.args[0], Node):
        zero, fill = mask.args[1], mask.args[2]
        zero_ok = (isinstance(zero, (int, float)) and zero == 0) or (
            isinstance(zero, Node) and is_target(zero, "zeros", "zeros_like", "new_zeros"))
        if zero_ok and isinstance(fill, (int, float)) and fill < -1e30:
            return mask.args[0]
    return mask


def native_window(mask: Node | None, q_len: object, kv_len: object) -> int:
    """The model's own sliding window read off a site's "may attend" mask (bool, or eager's additive
    `where(allowed, 0, min)`), 0 when the mask has none or is not causal AND per-key terms AND a window."""
    if mask is None:
        return 0
    structure = read_causal_key_mask(_allowed(mask), q_len, kv_len)
    return structure.window if structure is not None else 0


__all__ = ["CausalKeyMask", "native_window", "read_causal_key_mask"]
