"""`fluxc::routed_attention`: one attention site with a per-sequence FA/SA choice.

The custom op is the boundary between the graph pass and the implementations: the reference below
runs anywhere (plain PyTorch); GPU kernels (``fluxc.kernels``) plug in through ``impl``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from fluxc.ops.dispatch import resolve_impl, run_kernel
from fluxc.ops.masks import allowed_mask, sparse_allowed
from fluxc.spec import SiteSpec

log = logging.getLogger("fluxc")


def _expand_kv(x: Tensor, n_rep: int) -> Tensor:
    # (B, Hkv, T, D) -> (B, Hkv * n_rep, T, D), query head h reads kv head h // n_rep.
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def routed_attention_reference(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, route: Tensor,
                               qpos: Tensor, key_start: Tensor, spec: SiteSpec) -> Tensor:
    """Plain-PyTorch routed attention. q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D), route (B,) bool.

    The model's mask is `attn_mask` (bool or additive, broadcast to (B, H', Tq, Tk)), or `is_causal` alone, or
    both: `is_causal` with a bool key mask (B, 1, 1, Tk) means key j is visible to query i iff j <= qpos[b, i],
    qpos[b, i] - j < native_window (when the spec has one) and the key mask holds (a structural mask,
    `fluxc::causal_positions`)."""
    batch, q_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    is_causal = spec.is_causal
    sa = sparse_allowed(qpos, key_start, kv_len, pattern=spec.pattern, n_last=spec.n_last, prefill=q_len > 1,
                        **spec.rule)  # (B, Tq, Tk)
    keep = (route.view(batch, 1, 1) | sa).unsqueeze(1)  # (B, 1, Tq, Tk): full rows keep everything
    if attn_mask is not None and is_causal:  # a structural mask: causal by query position AND a key mask
        back = qpos[:, :, None] - torch.arange(kv_len, device=q.device)  # (B, Tq, Tk) keys behind each query
        causal = back >= 0
        if spec.native_window > 0:  # the model's own sliding window, read off its mask
            causal = causal & (back < spec.native_window)
        attn_mask = causal.unsqueeze(1) & attn_mask  # (B, 1, Tq, Tk)
        is_causal = False
    if spec.math == "sdpa" and spec.softcap == 0.0:  # SDPA has no softcap: softcapped sites compute eagerly
        if attn_mask is None:
            mask = allowed_mask(None, is_causal, batch, q_len, kv_len, q.device, bottom_right=spec.bottom_right,
                                native_window=spec.native_window) & keep
        elif attn_mask.dtype == torch.bool:
            mask = attn_mask & keep
        else:
            mask = torch.where(keep, attn_mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale,
                                              enable_gqa=q_heads != k.shape[1])
    if attn_mask is None and is_causal:
        attn_mask = allowed_mask(None, True, batch, q_len, kv_len, q.device, bottom_right=spec.bottom_right,
                                 native_window=spec.native_window)
    return _eager_attention(q, k, v, attn_mask, keep, scale=spec.scale, softcap=spec.softcap,
                            softmax_fp32=spec.softmax_fp32)


def _eager_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, keep: Tensor | None, *,
                     scale: float, softcap: float, softmax_fp32: bool) -> Tensor:
    """matmul-softmax-matmul under the model's mask (bool "may attend" or additive) and a bool `keep`; GQA."""
    n_rep = q.shape[1] // k.shape[1]
    scores = torch.matmul(q, _expand_kv(k, n_rep).transpose(2, 3)) * scale  # (B, Hq, Tq, Tk)
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if softmax_fp32:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, _expand_kv(v, n_rep))


def full_attention_reference(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, spec: SiteSpec) -> Tensor:
    """Exactly the site's own attention (the FA branch): `routed_attention` with every route True.

    q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (B, Hq, Tq, Dv) contiguous."""
    batch, q_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    if attn_mask is None:
        allowed = allowed_mask(None, spec.is_causal, batch, q_len, kv_len, q.device, bottom_right=spec.bottom_right,
                               native_window=spec.native_window)  # (B, 1, Tq, Tk)
    else:
        allowed = attn_mask
    if spec.math == "sdpa" and spec.softcap == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=spec.scale,
                                              enable_gqa=q_heads != k.shape[1]).contiguous()
    return _eager_attention(q, k, v, allowed, None, scale=spec.scale, softcap=spec.softcap,
                            softmax_fp32=spec.softmax_fp32).contiguous()


@torch.library.custom_op("fluxc::full_attention", mutates_args=())
def full_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, spec: str) -> Tensor:
    """`full_attention_reference` as one opaque op: the FA branch of an exported program's per-layer choice.
    `spec`: a `SiteSpec`'s `encode()`."""
    return full_attention_reference(q, k, v, attn_mask, SiteSpec.decode(spec))


@full_attention.register_fake
def _(q, k, v, attn_mask, spec):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _full_setup_context(ctx, inputs, output):
    q, k, v, attn_mask, spec = inputs
    ctx.save_for_backward(q, k, v)
    ctx.attn_mask, ctx.spec = attn_mask, SiteSpec.decode(spec)


def _full_backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    _, pullback = torch.func.vjp(lambda *qkv: full_attention_reference(*qkv, ctx.attn_mask, ctx.spec), q, k, v)
    return (*pullback(grad), None, None)


full_attention.register_autograd(_full_backward, setup_context=_full_setup_context)


@torch.library.custom_op("fluxc::routed_attention", mutates_args=())
def routed_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, route: Tensor, qpos: Tensor,
                     key_start: Tensor, spec: str) -> Tensor:
    """Attention of one site: full for sequences with route True, sparse (SA pattern on top of the
    model's own mask) for the others. `spec`: a `SiteSpec`'s `encode()`. Returns (B, Hq, Tq, Dv), contiguous."""
    site = SiteSpec.decode(spec)
    chosen = resolve_impl(site.impl, q.device)
    if chosen != "reference":
        out = run_kernel(chosen, q, k, v, attn_mask, route, qpos, key_start, site, explicit=site.impl != "auto")
        if out is not None:
            # library kernels may return another layout (cuDNN SDPA: (B, T, H, D) memory); Inductor asserts the fake's
            return out.contiguous()
    return routed_attention_reference(q, k, v, attn_mask, route, qpos, key_start, site).contiguous()


@routed_attention.register_fake
def _(q, k, v, attn_mask, route, qpos, key_start, spec):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("fluxc::routed_attention_backward", mutates_args=())
def routed_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                              route: Tensor, qpos: Tensor, key_start: Tensor, spec: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the reference w.r.t. (q, k, v), by recomputation (the op stays opaque to tracing).

    Custom-op bodies run below autograd, so the recomputation differentiates with `torch.func.vjp`."""
    site = SiteSpec.decode(spec)

    def forward(q_, k_, v_):
        return routed_attention_reference(q_, k_, v_, attn_mask, route, qpos, key_start, site)

    _, pullback = torch.func.vjp(forward, q, k, v)
    gq, gk, gv = pullback(grad)
    return gq.contiguous(), gk.contiguous(), gv.contiguous()


@routed_attention_backward.register_fake
def _(grad, q, k, v, attn_mask, route, qpos, key_start, spec):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, route, qpos, key_start, spec = inputs
    ctx.save_for_backward(q, k, v, route, qpos, key_start)
    ctx.attn_mask = attn_mask  # never differentiated: the model's mask is not a trained quantity
    ctx.spec = spec


def _backward(ctx, grad):
    q, k, v, route, qpos, key_start = ctx.saved_tensors
    gq, gk, gv = routed_attention_backward(grad.contiguous(), q, k, v, ctx.attn_mask, route, qpos, key_start,
                                           ctx.spec)
    return gq, gk, gv, None, None, None, None, None


routed_attention.register_autograd(_backward, setup_context=_setup_context)
