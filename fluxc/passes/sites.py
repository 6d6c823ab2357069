"""Find attention sites in a Dynamo FX graph: SDPA (both HF forms), eager matmul-softmax-matmul
(with scaling, softcapping, additive or masked_fill masks), and flash-attn calls.

Each matcher returns a `SiteMatch`: the nodes the rewrite needs and the site's parameters. A site that
looks like attention but cannot be routed safely is still returned, with `reason` set; the rewrite keeps
it as-is and `fluxc.sites` reports why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fluxc.passes.graph import (
    arg,
    is_parameter_like,
    is_scalar,
    is_target,
    meta_value,
    same_shape,
    same_size,
    shape_of,
)

Node = fx.Node


@dataclass
class SiteMatch:
    kind: str  # "sdpa" | "eager" | "flash_attn"
    anchor: Node  # node whose value the routed op replaces: (B, Hq, Tq, Dv) for sdpa/eager
    q: Node
    k: Node
    v: Node
    mask: Node | None
    is_causal: bool
    scale: float
    softcap: float = 0.0
    math: str = "sdpa"
    softmax_fp32: bool = False
    mask_is_disallow: bool = False  # masked_fill masks mark positions to hide
    layout: str = "bhtd"  # flash-attn uses (B, T, H, D)
    bottom_right: bool = False  # causal aligned so that the queries are the last Tq keys (flash-attn)
    native_window: int = 0
    kept: list[str] = field(default_factory=list)
    reason: str | None = None

    @property
    def routable(self) -> bool:
        return self.reason is None


def _peel_repeat_kv(node: Node) -> tuple[Node, int]:
    """If `node` is repeat_kv(x) (x[:, :, None].expand(B, Hkv, n, T, D).reshape(B, Hkv*n, T, D)), return
    (x, n); else (node, 1). Shapes are checked, so only the exact repeat-interleave form is peeled."""
    if not (is_target(node, "reshape", "view") and isinstance(node.args[0], Node)):
        return node, 1
    expanded = node.args[0]
    if not (is_target(expanded, "expand") and isinstance(expanded.args[0], Node)):
        return node, 1
    inserted = expanded.args[0]
    source = None
    if is_target(inserted, "getitem") and isinstance(inserted.args[0], Node):
        index = inserted.args[1]
        full = slice(None, None, None)
        if isinstance(index, tuple) and len(index) == 5 and index[2] is None and all(
                i == full for j, i in enumerate(index) if j != 2):
            source = inserted.args[0]
        if isinstance(index, tuple) and len(index) == 4 and index[0] == full and index[1] == full \
                and index[2] is None and index[3] is Ellipsis:
            source = inserted.args[0]
    elif is_target(inserted, "unsqueeze") and arg(inserted, 1, "dim") == 2 and isinstance(inserted.args[0], Node):
        source = inserted.args[0]
    if source is None:
        return node, 1
    src, exp, out = shape_of(source), shape_of(expanded), shape_of(node)
    if src is None or exp is None or out is None or len(src) != 4 or len(exp) != 5 or len(out) != 4:
        return node, 1
    b, hkv, t, d = src
    if not same_shape(exp, (b, hkv, exp[2], t, d)) or not same_shape(out, (b, hkv * exp[2], t, d)):
        return node, 1
    return source, exp[2]


def _one_query_one_key(q: Node, k: Node, *, time_dim: int) -> bool:
    """One query over one key (a one-token prompt): causal and bidirectional attention are the same."""
    q_shape, k_shape = shape_of(q), shape_of(k)
    return (q_shape is not None and k_shape is not None and len(q_shape) == len(k_shape) == 4
            and same_size(q_shape[time_dim], 1) and same_size(k_shape[time_dim], 1))


def match_sdpa(node: Node) -> SiteMatch | None:
    if not is_target(node, "scaled_dot_product_attention"):
        return None
    q, k, v = node.args[0], arg(node, 1, "key"), arg(node, 2, "value")
    mask = arg(node, 3, "attn_mask")
    dropout = arg(node, 4, "dropout_p", 0.0)
    is_causal = bool(arg(node, 5, "is_causal", False))
    scale = arg(node, 6, "scale", None)
    enable_gqa = bool(arg(node, 7, "enable_gqa", False))
    q_shape = shape_of(q)
    if q_shape is None or len(q_shape) != 4:
        return None
    head_dim = q_shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    site = SiteMatch("sdpa", node, q, k, v, mask if isinstance(mask, Node) else None, is_causal,
                     float(scale) if is_scalar(scale) else float("nan"))
    if mask is not None and not isinstance(mask, Node):
        site.reason = f"attn_mask is a constant {type(mask).__name__}, not a tensor in the graph"
    if not is_scalar(scale):
        site.reason = "scale is not a constant"
    if not (is_scalar(dropout) and float(dropout) == 0.0):
        site.reason = f"attention dropout is active (dropout_p={dropout}); the routed op has no dropout"
    if mask is None and not is_causal and _one_query_one_key(q, k, time_dim=2):
        site.is_causal = True  # a one-token prompt: transformers drops is_causal for one query, the same attention
    elif mask is None and not is_causal:
        site.reason = "bidirectional attention (no mask, is_causal=False): not a causal decoder site"
    if mask is not None and is_causal:
        site.reason = "attn_mask together with is_causal=True is not a valid SDPA call"
    k_src, n_rep_k = _peel_repeat_kv(k)
    v_src, n_rep_v = _peel_repeat_kv(v)
    if n_rep_k > 1 and n_rep_k == n_rep_v:
        site.k, site.v = k_src, v_src
        site.kept.append(f"GQA repeat_kv x{n_rep_k} folded into the op")
    elif enable_gqa:
        site.kept.append("native GQA (enable_gqa=True)")
    if site.mask is not None:
        site.kept.append("model mask (" + ("bool" if meta_value(site.mask).dtype == torch.bool else "additive") + ")")
    return site


def node_dtypes(node: Node) -> list[torch.dtype]:
    """torch.dtype values among a node's arguments (softmax's dtype= is positional or keyword)."""
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.dtype)]


def _softmax_dim_is_last(node: Node) -> bool:
    dim = arg(node, 1, "dim")
    shape = shape_of(node)
    return shape is not None and dim is not None and (dim == -1 or dim == len(shape) - 1)


def _is_transpose_last2(node: Node) -> Node | None:
    """k for a node computing k.transpose(-2, -1) (4D); None otherwise."""
    if is_target(node, "transpose") and isinstance(node.args[0], Node):
        shape = shape_of(node.args[0])
        if shape is None or len(shape) != 4:
            return None
        dims = {d % 4 for d in (arg(node, 1, "dim0"), arg(node, 2, "dim1")) if isinstance(d, int)}
        return node.args[0] if dims == {2, 3} else None
    if is_target(node, "permute") and isinstance(node.args[0], Node):
        perm = node.args[1:] if not isinstance(node.args[1], (tuple, list)) else node.args[1]
        return node.args[0] if tuple(perm) == (0, 1, 3, 2) else None
    return None


def match_eager(softmax: Node) -> SiteMatch | None:
    """softmax(mask(softcap(scale * q @ k^T))) [-> cast] [-> dropout] @ v, matched from the softmax."""
    if not is_target(softmax, "softmax", "_softmax") or not _softmax_dim_is_last(softmax):
        return None
    softmax_fp32 = torch.float32 in (*node_dtypes(softmax),)
    # Walk back from the softmax input to the q @ k^T matmul.
    chain: list[tuple[str, object]] = []
    node = softmax.args[0]
    mask: Node | None = None
    disallow = False
    for _ in range(16):
        if not isinstance(node, Node):
            return None
        if is_target(node, "matmul"):
            break
        if is_target(node, "add") and len(node.args) == 2 and all(isinstance(a, Node) for a in node.args):
            a, b = node.args
            # the scores operand is the one on the matmul side; the other one is the additive mask
            scores, other = (a, b) if _reaches_matmul(a) else (b, a)
            if mask is not None or not _reaches_matmul(scores) or _reaches_matmul(other):
                return None
            mask, node = other, scores
            chain.append(("mask", other))
            continue
        if is_target(node, "masked_fill") and isinstance(node.args[0], Node):
            fill = arg(node, 2, "value")
            if mask is not None or not (is_scalar(fill) and float(fill) < -1e30 or fill == float("-inf")):
                return None
            mask, disallow, node = arg(node, 1, "mask"), True, node.args[0]
            chain.append(("mask", mask))
            continue
        if is_target(node, "mul") and len(node.args) == 2:
            a, b = node.args
            tensor, scalar = (a, b) if isinstance(a, Node) else (b, a)
            if not is_scalar(scalar) or not isinstance(tensor, Node):
                return None
            chain.append(("mul", float(scalar)))
            node = tensor
            continue
        if is_target(node, "truediv", "div") and len(node.args) == 2 and is_scalar(node.args[1]):
            chain.append(("div", float(node.args[1])))
            node = node.args[0]
            continue
        if is_target(node, "tanh"):
            chain.append(("tanh", None))
            node = node.args[0]
            continue
        if is_target(node, "float") or (is_target(node, "to") and torch.float32 in (*node.args[1:], *node.kwargs.values())):
            softmax_fp32 = True
            node = node.args[0]
            continue
        return None
    else:
        return None
    matmul = node
    q, kt = matmul.args[0], matmul.args[1]
    k = _is_transpose_last2(kt)
    if k is None or not isinstance(q, Node) or is_parameter_like(q) or is_parameter_like(k):
        return None
    # Forward from the softmax: optional casts and an inactive dropout, then probs @ v.
    node = softmax
    kept: list[str] = []
    reason = None
    for _ in range(4):
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if is_target(user, "to", "type_as", "type", "half", "bfloat16", "float"):
            node = user
            continue
        if is_target(user, "dropout"):
            p = arg(user, 1, "p", 0.5)
            training = arg(user, 2, "training", True)
            if not (is_scalar(p) and float(p) == 0.0) and training is not False:
                reason = f"attention dropout is active (p={p}); the routed op has no dropout"
            node = user
            continue
        break
    pv = list(node.users)[0] if len(node.users) == 1 else None
    if pv is None or not is_target(pv, "matmul") or pv.args[0] is not node or not isinstance(pv.args[1], Node):
        return None
    v = pv.args[1]
    q_shape, k_shape, v_shape = shape_of(q), shape_of(k), shape_of(v)
    if q_shape is None or k_shape is None or v_shape is None or not (len(q_shape) == len(k_shape) == len(v_shape) == 4):
        return None
    if not (same_size(q_shape[-1], k_shape[-1]) and same_size(k_shape[2], v_shape[2])
            and same_size(k_shape[1], v_shape[1])):
        return None
    # Interpret the chain (matmul outward): scaling, then optional softcap (div c, tanh, mul c), then mask.
    ops = list(reversed(chain))
    scale, softcap, i = 1.0, 0.0, 0
    while i < len(ops) and ops[i][0] in ("mul", "div") and not (
            i + 1 < len(ops) and ops[i][0] == "div" and ops[i + 1][0] == "tanh"):
        scale = scale * ops[i][1] if ops[i][0] == "mul" else scale / ops[i][1]
        i += 1
    if i + 2 < len(ops) and ops[i][0] == "div" and ops[i + 1][0] == "tanh" and ops[i + 2][0] == "mul" \
            and ops[i][1] == ops[i + 2][1]:
        softcap = ops[i][1]
        i += 3
    if i < len(ops) and ops[i][0] == "mask":
        i += 1
    if i != len(ops):
        return None  # something between matmul and softmax we do not understand: not a site
    site = SiteMatch("eager", pv, q, k, v, mask, False, scale, softcap, math="eager",
                     softmax_fp32=softmax_fp32, mask_is_disallow=disallow, reason=reason)
    if mask is None and not _one_query_one_key(q, k, time_dim=2):
        site.reason = site.reason or "no mask: bidirectional attention is not a causal decoder site"
    k_src, n_rep_k = _peel_repeat_kv(k)
    v_src, n_rep_v = _peel_repeat_kv(v)
    if n_rep_k > 1 and n_rep_k == n_rep_v:
        site.k, site.v = k_src, v_src
        kept.append(f"GQA repeat_kv x{n_rep_k} folded into the op")
    if softcap:
        kept.append(f"softcap {softcap:g}")
    if mask is not None:
        kept.append("model mask (" + ("masked_fill" if disallow else "additive") + ")")
    if softmax_fp32:
        kept.append("softmax in float32")
    site.kept = kept
    return site


def _reaches_matmul(node: Node, depth: int = 8) -> bool:
    """True when `node` is, within a few elementwise steps, a q @ k^T product."""
    for _ in range(depth):
        if not isinstance(node, Node):
            return False
        if is_target(node, "matmul"):
            return _is_transpose_last2(node.args[1]) is not None if len(node.args) > 1 else False
        if is_target(node, "mul", "truediv", "div", "tanh", "float", "to") and isinstance(node.args[0], Node):
            node = node.args[0] if isinstance(node.args[0], Node) else node.args[1]
            continue
        return False
    return False


def match_flash_attn(node: Node) -> SiteMatch | None:
    """flash-attn >= 2.6's registered op `flash_attn::_flash_attn_forward(q, k, v, dropout_p, softmax_scale,
    causal, window_size_left, window_size_right, softcap, alibi_slopes, return_softmax)` in (B, T, H, D)
    layout, which Dynamo reaches by tracing through `flash_attn_func`. Only the output's [0] is rewired."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return None
    name = target._schema.name if isinstance(target, torch._ops.OpOverload) else target._qualified_op_name
    if name != "flash_attn::_flash_attn_forward":
        return None
    users = list(node.users)
    outs = [u for u in users if is_target(u, "getitem") and u.args[1] == 0]
    if len(outs) != 1:
        return None
    q, k, v = node.args[0], arg(node, 1, "k"), arg(node, 2, "v")
    q_shape = shape_of(q)
    if q_shape is None or len(q_shape) != 4:
        return None
    dropout = arg(node, 3, "dropout_p", 0.0)
    scale = arg(node, 4, "softmax_scale")
    causal = bool(arg(node, 5, "causal", False))
    left = arg(node, 6, "window_size_left", -1)  # window_size_right has no effect with causal=True
    softcap = float(arg(node, 8, "softcap", 0.0) or 0.0)
    alibi = arg(node, 9, "alibi_slopes")
    site = SiteMatch("flash_attn", outs[0], q, k, v, None, causal,
                     float(scale) if is_scalar(scale) else 1.0 / math.sqrt(q_shape[-1]), softcap,
                     layout="bthd", bottom_right=True)
    site.kept.append("flash-attn (B, T, H, D), bottom-right causal")
    if not causal:
        site.reason = "flash_attn causal=False is not a causal decoder site"
    elif not (is_scalar(dropout) and float(dropout) == 0.0):
        site.reason = f"attention dropout is active (dropout_p={dropout})"
    elif alibi is not None:
        site.reason = "ALiBi slopes are not supported by the routed op"
    elif len(users) != 1:
        site.reason = "the softmax statistics (lse) of this call are used downstream"
    elif is_scalar(left) and left >= 0:
        site.native_window = int(left) + 1  # keys with q - k <= left
        site.kept.append(f"native window {site.native_window}")
    return site


def match_flex(node: Node) -> SiteMatch | None:
    """The FlexAttention higher-order op: found and reported; not routed yet (kept as-is)."""
    if node.op != "call_function" or getattr(node.target, "__name__", "") != "flex_attention":
        return None
    if not isinstance(node.target, torch._ops.HigherOrderOperator):
        return None
    q, k, v = node.args[:3]
    q_shape = shape_of(q)
    if q_shape is None or len(q_shape) != 4:
        return None
    scale = node.args[5] if len(node.args) > 5 and is_scalar(node.args[5]) else 1.0 / math.sqrt(q_shape[-1])
    site = SiteMatch("flex", node, q, k, v, None, False, float(scale), math="flex")
    site.kept.append("flex_attention score_mod and block_mask (routed through score_mod)")
    block_mask = node.args[4] if len(node.args) > 4 else None
    if not (isinstance(block_mask, tuple) and block_mask and isinstance(block_mask[-1], Node)
            and block_mask[-1].op == "get_attr" and isinstance(node.args[3], Node) and node.args[3].op == "get_attr"):
        site.reason = "flex_attention call without a traced score_mod and block mask"
    return site


def find_sites(graph: fx.Graph) -> list[SiteMatch]:
    """All attention sites of `graph`, in graph (= layer) order."""
    found: list[SiteMatch] = []
    for node in graph.nodes:
        site = match_sdpa(node) or match_eager(node) or match_flash_attn(node) or match_flex(node)
        if site is not None:
            found.append(site)
    return found


__all__ = ["SiteMatch", "find_sites", "match_eager", "match_sdpa", "match_flash_attn", "match_flex"]
