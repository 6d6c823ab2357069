"""ONNX translations of fluxc's ops for ``torch.onnx.export(..., dynamo=True)`` (standard ONNX, opset 18 ops;
the exporter converts the model to the requested opset afterwards).

- `fluxc::positions` -> query positions, real-token flags, sequence starts read off the mask;
- `fluxc::causal_positions` (a mask read as structure) -> the same from its index vectors and key mask;
- `fluxc::router_logits` -> masked first/last pooling and the router MLP;
- `fluxc::routed_attention` -> masked attention: the model's mask AND (route OR the sparse pattern);
  or, with ``fused=True``, one ``fluxc.RoutedAttention`` node (custom domain) for runtimes with a kernel;
- `fluxc::full_attention` (the FA branch of a choice) -> masked attention under the model's mask.
The per-layer choice itself is a ``torch.cond`` in the program, which the exporter writes as ``If``.

Imported only by `fluxc.export_onnx` (needs onnxscript).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import TypeVar, Union

import onnx
import onnx_ir as ir
import torch
from onnx.defs import OpSchema
from onnxscript import BFLOAT16, BOOL, DOUBLE, FLOAT, FLOAT16, INT8, INT32, INT64, UINT8
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

from fluxc.errors import ExportError
from fluxc.ops.cache import DENSE, RING
from fluxc.patterns import dense_from, ring_capacity, ring_valid, sa_allowed
from fluxc.spec import SiteSpec

log = logging.getLogger("fluxc")

TFloat = TypeVar("TFloat", bound=Union[FLOAT16, FLOAT, DOUBLE, BFLOAT16])  # noqa: UP007 (onnxscript reads the hint)
TMask = TypeVar("TMask", bound=Union[BOOL, FLOAT16, FLOAT, DOUBLE, BFLOAT16])  # noqa: UP007

#: Custom domain of the fused node (``fused=True``); attributes are `routed_attention`'s static arguments.
FLUXC_DOMAIN = "fluxc"
FLUXC_DOMAIN_VERSION = 1
_fluxc = Opset(FLUXC_DOMAIN, FLUXC_DOMAIN_VERSION)

_I64_MIN = -(2**62)


def _ints(*values: int):
    return op.Constant(value=ir.tensor(list(values), dtype=ir.DataType.INT64))


def _dim(x, axis: int):
    """Scalar int64 size of `x` along `axis`."""
    return op.Squeeze(op.Shape(x, start=axis, end=axis + 1 if axis != -1 else None), _ints(0))


def _allowed(q, k, attn_mask, is_causal: bool, bottom_right: bool, native_window: int, bool_mask: bool | None = None):
    """The model's own mask as bool (B, H', Tq, Tk), H' in {1, H} (fluxc.ops.masks.allowed_mask)."""
    q_len, kv_len = _dim(q, 2), _dim(k, 2)
    if attn_mask is None:
        batch_shape = op.Concat(op.Shape(q, start=0, end=1), _ints(1), op.Shape(q, start=2, end=3),
                                op.Shape(k, start=2, end=3), axis=0)
        if not is_causal:
            return op.Expand(op.Constant(value=ir.tensor(True)), batch_shape)
        offset = op.Sub(kv_len, q_len) if bottom_right else op.Constant(value=ir.tensor(0, dtype=ir.DataType.INT64))
        rows = op.Unsqueeze(op.Add(op.Range(0, q_len, 1), offset), _ints(1))  # (Tq, 1)
        keys = op.Unsqueeze(op.Range(0, kv_len, 1), _ints(0))  # (1, Tk)
        causal = op.LessOrEqual(keys, rows)  # (Tq, Tk)
        if native_window > 0:
            causal = op.And(causal, op.Less(op.Sub(rows, keys), native_window))
        return op.Expand(causal, batch_shape)
    if bool_mask if bool_mask is not None else _is_bool(attn_mask):
        allowed = attn_mask
    else:
        low = float(torch.finfo(_torch_dtype(attn_mask.dtype)).min) / 2
        allowed = op.Greater(attn_mask, op.CastLike(low, attn_mask))
    rank = 4 if attn_mask.shape is None else len(attn_mask.shape)
    if rank < 4:
        allowed = op.Unsqueeze(allowed, _ints(*range(4 - rank)))
    target = op.Concat(op.Shape(q, start=0, end=1), _ints(1), op.Shape(q, start=2, end=3),
                       op.Shape(k, start=2, end=3), axis=0)
    return op.Expand(allowed, target)  # broadcast batch; H' stays


def _torch_dtype(dtype: ir.DataType) -> torch.dtype:
    table = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16,
             ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.DOUBLE: torch.float64}
    if dtype not in table:
        raise ExportError(f"an attention mask of ONNX type {dtype} cannot be translated; fluxc reads bool or "
                          f"floating-point masks")
    return table[dtype]


def fluxc_positions(q: TFloat, k: TFloat, attn_mask: TMask | None, is_causal: bool, bottom_right: bool,
                    native_window: int) -> tuple[INT64, BOOL, INT64]:
    """`fluxc::positions`: (qpos (B, Tq) int64, valid (B, Tq) bool, key_start (B,) int64)."""
    allowed = _allowed(q, k, attn_mask, is_causal, bottom_right, native_window)  # (B, H', Tq, Tk)
    seen = op.Greater(op.ReduceMax(op.Cast(allowed, to=ir.DataType.INT64), _ints(1), keepdims=0), 0)  # (B, Tq, Tk)
    q_len, kv_len = _dim(q, 2), _dim(k, 2)
    key_idx = op.Range(0, kv_len, 1)  # (Tk,)
    qpos = op.ReduceMax(op.Where(seen, key_idx, -1), _ints(-1), keepdims=0)  # (B, Tq)
    # max over earlier rows (the reference's shifted cummax): rows j < i of row i
    rows = op.Range(0, q_len, 1)
    earlier = op.Less(op.Unsqueeze(rows, _ints(0)), op.Unsqueeze(rows, _ints(1)))  # (Tq_i, Tq_j): j < i
    prev = op.ReduceMax(op.Where(earlier, op.Unsqueeze(qpos, _ints(1)), -1), _ints(2), keepdims=0)  # (B, Tq)
    valid = op.And(op.GreaterOrEqual(qpos, 0), op.Greater(qpos, prev))
    key_seen = op.Greater(op.ReduceMax(op.Cast(seen, to=ir.DataType.INT64), _ints(1), keepdims=0), 0)  # (B, Tk)
    key_start = op.ReduceMin(op.Where(key_seen, key_idx, kv_len), _ints(-1), keepdims=0)  # (B,)
    key_start = op.Min(key_start, op.Sub(kv_len, 1))
    return qpos, valid, key_start


def fluxc_causal_positions(q: TFloat, k: TFloat, q_index: INT64, k_index: INT64, keys_allowed: BOOL | None,
                           check_contiguous: bool) -> tuple[INT64, BOOL, INT64, BOOL]:
    """`fluxc::causal_positions`: (qpos (B, Tq), valid (B, Tq), key_start (B,), key_mask (B, 1, 1, Tk)). The
    contiguity check is the kernels' (one run of real keys); masked attention takes any key mask."""
    q_len, kv_len = _dim(q, 2), _dim(k, 2)
    key_mask = op.Expand(op.Constant(value=ir.tensor(True)),
                         op.Concat(op.Shape(q, start=0, end=1), _ints(1, 1), op.Shape(k, start=2, end=3), axis=0))
    if keys_allowed is not None:
        key_mask = op.And(key_mask, op.Cast(keys_allowed, to=ir.DataType.BOOL))  # (B, 1, 1, Tk)
    batch_keys = op.Concat(op.Shape(q, start=0, end=1), op.Shape(k, start=2, end=3), axis=0)
    keys = op.Reshape(key_mask, batch_keys)  # (B, Tk)
    q_at = op.Unsqueeze(op.Cast(q_index, to=ir.DataType.INT64), _ints(1))  # (Tq, 1)
    k_at = op.Unsqueeze(op.Cast(k_index, to=ir.DataType.INT64), _ints(0))  # (1, Tk)
    # index vectors are increasing aranges: the last key at or before a query = (keys at or before it) - 1
    raw = op.Sub(op.ReduceSum(op.Cast(op.LessOrEqual(k_at, q_at), to=ir.DataType.INT64), _ints(1), keepdims=0), 1)
    raw = op.Min(raw, op.Sub(kv_len, 1))  # (Tq,)
    batch_queries = op.Concat(op.Shape(q, start=0, end=1), op.Reshape(q_len, _ints(1)), axis=0)
    qpos = op.Expand(op.Unsqueeze(raw, _ints(0)), batch_queries)  # (B, Tq)
    own = op.GatherElements(op.Cast(keys, to=ir.DataType.INT64), op.Max(qpos, op.CastLike(0, qpos)), axis=1)
    valid = op.And(op.GreaterOrEqual(qpos, 0), op.Greater(own, 0))  # (B, Tq)
    key_idx = op.Range(0, kv_len, 1)  # (Tk,)
    seen = op.And(keys, op.LessOrEqual(key_idx, op.ReduceMax(raw, keepdims=0)))  # (B, Tk)
    key_start = op.Min(op.ReduceMin(op.Where(seen, key_idx, kv_len), _ints(1), keepdims=0), op.Sub(kv_len, 1))
    return qpos, valid, key_start, key_mask


def fluxc_router_logits(query: TFloat, valid: BOOL, weights: Sequence[TFloat], pool_size: int) -> FLOAT:
    """`fluxc::router_logits`: (B, 2) float32 from pre-RoPE queries (B, T, H, D)."""
    real = op.Cast(valid, to=ir.DataType.INT64)  # (B, T)
    rank = op.Sub(op.CumSum(real, _ints(1)), 1)  # index among real tokens
    n_real = op.ReduceSum(real, _ints(1), keepdims=1)  # (B, 1)
    first = op.Cast(op.Less(rank, pool_size), to=ir.DataType.FLOAT)
    last = op.Cast(op.GreaterOrEqual(rank, op.Sub(n_real, pool_size)), to=ir.DataType.FLOAT)
    weight = op.Mul(op.Add(first, last), op.Cast(valid, to=ir.DataType.FLOAT))  # (B, T)
    per_token = op.ReduceMean(op.Cast(query, to=ir.DataType.FLOAT), _ints(2), keepdims=0)  # (B, T, D)
    pooled = op.Squeeze(op.MatMul(op.Unsqueeze(weight, _ints(1)), per_token), _ints(1))  # (B, D)
    pooled = op.Div(pooled, op.Max(op.ReduceSum(weight, _ints(1), keepdims=1), op.Constant(value_float=1.0)))
    w = [op.Cast(t, to=ir.DataType.FLOAT) for t in weights]

    def linear(x, i):
        return op.Add(op.MatMul(x, op.Transpose(w[2 * i], perm=[1, 0])), w[2 * i + 1])

    def silu(x):
        return op.Mul(x, op.Sigmoid(x))

    x = linear(silu(linear(pooled, 0)), 1)
    x = silu(linear(x, 2))
    x = silu(linear(x, 3))
    return linear(x, 4)


def _floor_div(a, b: int):
    # ONNX integer Div truncates; positions left of a sequence start are negative, so floor explicitly
    return op.Div(op.Sub(a, op.Mod(a, op.CastLike(b, a))), op.CastLike(b, a))


class _Value:
    """An ONNX value with Python's integer operators, so that `fluxc.patterns`' rule evaluates on the graph
    being built (floor `//` and a remainder `%` with the divisor's sign, as in Python)."""

    def __init__(self, value) -> None:
        self.value = value

    def _other(self, other):
        return other.value if isinstance(other, _Value) else op.CastLike(other, self.value)

    def __add__(self, other):
        return _Value(op.Add(self.value, self._other(other)))

    __radd__ = __add__

    def __sub__(self, other):
        return _Value(op.Sub(self.value, self._other(other)))

    def __rsub__(self, other):
        return _Value(op.Sub(self._other(other), self.value))

    def __mul__(self, other):
        return _Value(op.Mul(self.value, self._other(other)))

    __rmul__ = __mul__

    def __floordiv__(self, other: int):
        return _Value(_floor_div(self.value, other))

    def __mod__(self, other: int):
        return _Value(op.Mod(self.value, self._other(other)))

    def __lt__(self, other):
        return _Value(op.Less(self.value, self._other(other)))

    def __le__(self, other):
        return _Value(op.LessOrEqual(self.value, self._other(other)))

    def __gt__(self, other):
        return _Value(op.Greater(self.value, self._other(other)))

    def __ge__(self, other):
        return _Value(op.GreaterOrEqual(self.value, self._other(other)))

    def __or__(self, other):
        return _Value(op.Or(self.value, other.value))

    def __and__(self, other):
        return _Value(op.And(self.value, other.value))


def _sparse_allowed(q, qpos, key_start, kv_len, pattern: str, sink: int, window: int, block: int, block_exact: bool,
                    n_last: int):
    """SA pattern (B, Tq, Tk) bool in positions counted from each sequence's start (`fluxc.patterns`)."""
    start = op.Unsqueeze(key_start, _ints(1, 2))  # (B, 1, 1)
    keys = _Value(op.Sub(op.Unsqueeze(op.Range(0, kv_len, 1), _ints(0, 1)), start))  # (B, 1, Tk)
    rows = _Value(op.Sub(op.Unsqueeze(qpos, _ints(2)), start))  # (B, Tq, 1)
    sa = sa_allowed(rows, keys, sink=sink, window=window, block=block, block_exact=block_exact).value
    if pattern == "triangle":  # the last n_last prompt queries are dense at prefill (more than one query)
        last = _Value(op.Sub(op.Unsqueeze(op.ReduceMax(qpos, _ints(1), keepdims=1), _ints(2)), start))  # (B, 1, 1)
        dense = (rows >= dense_from(last, n_last)).value
        sa = op.Or(sa, op.And(dense, op.Greater(_dim(q, 2), 1)))
    return sa


def _expand_heads(x, n_rep: int):
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D), query head h reads kv head h // n_rep."""
    if n_rep == 1:
        return x
    shape = op.Shape(x)
    wide = op.Concat(op.Slice(shape, _ints(0), _ints(2)), _ints(n_rep), op.Slice(shape, _ints(2), _ints(4)), axis=0)
    out = op.Concat(op.Slice(shape, _ints(0), _ints(1)), _ints(-1), op.Slice(shape, _ints(2), _ints(4)), axis=0)
    return op.Reshape(op.Expand(op.Unsqueeze(x, _ints(2)), wide), out)


def _heads(x) -> int:
    h = x.shape[1]
    if not isinstance(h, int):
        raise ExportError(f"the head count of an attention input must be static to translate it, got {h!r}")
    return h


def fluxc_routed_attention(q: TFloat, k: TFloat, v: TFloat, attn_mask: TMask | None, route: BOOL, qpos: INT64,
                           key_start: INT64, spec: str) -> TFloat:
    """`fluxc::routed_attention` as masked attention: keep = route OR sparse pattern, on top of the model's mask."""
    bool_mask = attn_mask is not None and _is_bool(attn_mask)
    return _routed_attention(q, k, v, attn_mask, bool_mask, route, qpos, key_start, SiteSpec.decode(spec))


def fluxc_full_attention(q: TFloat, k: TFloat, v: TFloat, attn_mask: TMask | None, spec: str) -> TFloat:
    """`fluxc::full_attention` (the FA branch of a per-layer choice): masked attention under the model's mask."""
    bool_mask = attn_mask is not None and _is_bool(attn_mask)
    return _routed_attention(q, k, v, attn_mask, bool_mask, None, None, None, SiteSpec.decode(spec))


def _is_bool(x) -> bool:
    if x.dtype is None:
        raise ExportError("internal: an attention mask's ONNX type is unknown while translating (please report)")
    return x.dtype == ir.DataType.BOOL


def _routed_attention(q, k, v, attn_mask, bool_mask: bool, route, qpos, key_start, spec: SiteSpec):
    keep = None  # route None: the FA branch, the model's mask alone
    if route is not None:
        sa = _sparse_allowed(q, qpos, key_start, _dim(k, 2), spec.pattern, spec.sink, spec.window, spec.block,
                             spec.block_exact, spec.n_last)
        keep = op.Unsqueeze(op.Or(op.Unsqueeze(route, _ints(1, 2)), sa), _ints(1))  # (B, 1, Tq, Tk)
    n_rep = _heads(q) // _heads(k)
    k, v = _expand_heads(k, n_rep), _expand_heads(v, n_rep)  # (B, Hq, Tk, D)
    scores = op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2]))  # (B, Hq, Tq, Tk)
    scores = op.Mul(scores, op.CastLike(spec.scale, scores))
    if spec.softcap > 0.0:
        cap = op.CastLike(spec.softcap, scores)
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    neg_inf = op.CastLike(float("-inf"), scores)
    if attn_mask is not None and not bool_mask:
        scores = op.Add(scores, op.CastLike(attn_mask, scores))  # additive mask, then the pattern
        allowed = keep
    else:
        allowed = _allowed(q, k, attn_mask, spec.is_causal, spec.bottom_right, spec.native_window, bool_mask)
        if attn_mask is not None and spec.is_causal:  # a structural mask: causal by query position AND the key mask
            if qpos is None:
                raise ExportError("internal: a structural mask reached the FA branch's translation (please report)")
            keys = op.Unsqueeze(op.Range(0, _dim(k, 2), 1), _ints(0, 1))  # (1, 1, Tk)
            rows = op.Unsqueeze(qpos, _ints(2))  # (B, Tq, 1)
            causal = op.LessOrEqual(keys, rows)
            if spec.native_window > 0:  # the model's own sliding window, read off its mask
                causal = op.And(causal, op.Less(op.Sub(rows, keys), spec.native_window))
            allowed = op.And(allowed, op.Unsqueeze(causal, _ints(1)))
        allowed = allowed if keep is None else op.And(allowed, keep)
    if allowed is not None:
        scores = op.Where(allowed, scores, neg_inf)
    if spec.softmax_fp32 and q.dtype != ir.DataType.FLOAT:
        probs = op.CastLike(op.Softmax(op.Cast(scores, to=ir.DataType.FLOAT), axis=-1), q)
    else:
        probs = op.Softmax(scores, axis=-1)
    if spec.math == "sdpa" and spec.softcap == 0.0:  # SDPA gives 0 for a row that sees no key (e.g. left padding), not NaN
        seen = op.Greater(op.ReduceMax(scores, _ints(-1), keepdims=1), neg_inf)  # (B, Hq, Tq, 1)
        probs = op.Where(seen, probs, op.CastLike(0.0, probs))
    return op.MatMul(probs, v)


def _schema(name: str, inputs: list[tuple[str, str, bool]], attributes: dict[str, str]) -> onnx.defs.OpSchema:
    """Schema of a fluxc-domain node (not registered with onnx: it only shapes the node the exporter writes)."""
    kinds = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT, "str": OpSchema.AttrType.STRING}
    option = OpSchema.FormalParameterOption
    params = [OpSchema.FormalParameter(n, t, param_option=option.Optional if optional else option.Single)
              for n, t, optional in inputs]
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    return OpSchema(name, FLUXC_DOMAIN, FLUXC_DOMAIN_VERSION, inputs=params,
                    outputs=[OpSchema.FormalParameter("output", "T")],
                    type_constraints=[("T", floats, "queries, keys, values"), ("M", ["tensor(bool)", *floats], "mask")],
                    attributes=[OpSchema.Attribute(n, kinds[k], required=True) for n, k in attributes.items()])


_KINDS = {bool: "int", int: "int", float: "float", str: "str"}
# the fused nodes carry what the site computes; how fluxc computes it (math, softmax_fp32, impl) stays behind
_ROUTED_ATTRS = {f.name: _KINDS[type(f.default)] for f in dataclasses.fields(SiteSpec)
                 if f.name not in ("math", "softmax_fp32", "impl")}
_CACHE_ATTRS = {"layout": "int", **{n: _ROUTED_ATTRS[n] for n in ("scale", "softcap", "sink", "window", "block",
                                                                   "block_exact")}}


def _attributes(spec: SiteSpec, names) -> dict:
    return {n: int(v) if isinstance(v, bool) else v for n, v in dataclasses.asdict(spec).items() if n in names}


@functools.cache
def _fused_op(name: str) -> Op:
    if name == "RoutedAttention":
        inputs = [("q", "T", False), ("k", "T", False), ("v", "T", False), ("attn_mask", "M", True),
                  ("route", "tensor(bool)", False), ("qpos", "tensor(int64)", False),
                  ("key_start", "tensor(int64)", False)]
        return Op(_fluxc, name, _schema(name, inputs, _ROUTED_ATTRS))
    inputs = [("q", "T", False), ("k_store", "T", False), ("v_store", "T", False), ("lengths", "tensor(int64)", False),
              ("route", "tensor(bool)", False)]
    return Op(_fluxc, name, _schema(name, inputs, _CACHE_ATTRS))


def fluxc_routed_attention_fused(q: TFloat, k: TFloat, v: TFloat, attn_mask: TMask | None, route: BOOL, qpos: INT64,
                                 key_start: INT64, spec: str) -> TFloat:
    """One ``fluxc.RoutedAttention`` node with `routed_attention`'s semantics (for a runtime's fused kernel)."""
    return _fused_op("RoutedAttention")(q, k, v, attn_mask, route, qpos, key_start,
                                        **_attributes(SiteSpec.decode(spec), _ROUTED_ATTRS))


def _ring_valid(n, sink: int, window: int, block: int, block_exact: bool):
    """(B, C) bool: ring slot j holds a key the query at position n - 1 may attend (`fluxc.patterns.ring_valid`)."""
    slots = _Value(op.Unsqueeze(op.Range(0, ring_capacity(sink, window), 1), _ints(0)))  # (1, C)
    p = _Value(op.Unsqueeze(op.Sub(n, 1), _ints(1)))  # (B, 1) query position
    return ring_valid(slots, p, sink=sink, window=window, block=block, block_exact=block_exact).value


def fluxc_cache_attention(q: TFloat, k_store: TFloat, v_store: TFloat, lengths: INT64, route: BOOL, layout: int,
                          spec: str) -> TFloat:
    """`fluxc::cache_attention` (the decode engine's layout): the keys a slot holds, as a mask, then routed
    attention, as `fluxc.ops.cache.cache_attention_reference` computes it."""
    site = SiteSpec.decode(spec)
    n = op.Cast(lengths, to=ir.DataType.INT64)  # (B,) keys, this token's included
    if layout == RING:
        valid = _ring_valid(n, **site.rule)  # (B, C) exactly the SA keys
    else:
        valid = op.Less(op.Unsqueeze(op.Range(0, _dim(k_store, 2), 1), _ints(0)), op.Unsqueeze(n, _ints(1)))
    if layout in (RING, DENSE):
        route = op.Expand(op.Constant(value=ir.tensor(True)), op.Shape(n))
    mask = op.Unsqueeze(valid, _ints(1, 2))  # (B, 1, 1, C)
    qpos = op.Unsqueeze(op.Sub(n, 1), _ints(1))  # (B, 1)
    return _routed_attention(q, k_store, v_store, mask, True, route, qpos, op.Sub(n, n),
                             site.replace(is_causal=False, pattern="streaming", bottom_right=False, native_window=0))


def fluxc_cache_attention_fused(q: TFloat, k_store: TFloat, v_store: TFloat, lengths: INT64, route: BOOL,
                                layout: int, spec: str) -> TFloat:
    """One ``fluxc.CacheAttention`` node (custom domain) with `cache_attention`'s semantics."""
    return _fused_op("CacheAttention")(q, k_store, v_store, lengths, route, layout=layout,
                                       **_attributes(SiteSpec.decode(spec), _CACHE_ATTRS))


TAny = TypeVar("TAny", bound=Union[BOOL, FLOAT16, FLOAT, DOUBLE, BFLOAT16, INT64, INT32, INT8, UINT8])  # noqa: UP007


def aten_where(condition: BOOL, x: TAny, y: TAny) -> TAny:
    """`aten.where.self`, bool operands included: onnxruntime has no bool `Where` kernel, and the route of a layer
    (the stored decision or the router's) is a bool `where`."""
    if x.dtype == ir.DataType.BOOL:
        return op.Or(op.And(condition, x), op.And(op.Not(condition), y))
    return op.Where(condition, x, y)


def fluxc_dense_copy(x: TAny) -> TAny:
    """`fluxc::dense_copy`: ONNX tensors have no strides, so the copy is the value itself."""
    return op.Identity(x)


def translation_table(fused: bool = False) -> dict:
    """``custom_translation_table`` for fluxc's ops (and bool `where`, which onnxruntime lacks)."""
    return {
        torch.ops.aten.where.self: aten_where,
        torch.ops.fluxc.positions.default: fluxc_positions,
        torch.ops.fluxc.causal_positions.default: fluxc_causal_positions,
        torch.ops.fluxc.dense_copy.default: fluxc_dense_copy,
        torch.ops.fluxc.router_logits.default: fluxc_router_logits,
        torch.ops.fluxc.full_attention.default: fluxc_full_attention,
        torch.ops.fluxc.routed_attention.default: fluxc_routed_attention_fused if fused else fluxc_routed_attention,
        torch.ops.fluxc.cache_attention.default: fluxc_cache_attention_fused if fused else fluxc_cache_attention,
    }


def onnx_export(program: torch.export.ExportedProgram, signature, path: str, *, opset: int, fused: bool,
                optimize: bool = True) -> None:
    """Write `program` to `path` at `opset` with fluxc's translations; inputs and outputs named by `signature`."""
    if optimize and opset >= 23:
        # the optimizer fuses attention into opset 23's Attention op, which the exports of opsets 23+ only survive with optimize=False
        log.info("fluxc: the ONNX optimizer is skipped at opset %d", opset)
        optimize = False
    kwargs = dict(custom_translation_table=translation_table(fused), opset_version=opset, dynamo=True,
                  input_names=list(signature.inputs), output_names=list(signature.outputs), optimize=optimize,
                  verbose=False)
    onnx_program = torch.onnx.export(program, (), **kwargs)
    onnx_program.save(path)
    log.info("fluxc: wrote %s (opset %d%s)", path, opset, ", fused fluxc.RoutedAttention nodes" if fused else "")
