"""Tiny random HF decoders built from configs (no downloads), and an independent routed reference.

The reference runs the *untouched* HF model through a registered attention function that builds the
sparse pattern as an explicit dense mask with Python loops over (batch, query, key): it shares no code
with fluxc.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM
from transformers.masking_utils import sdpa_mask

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0)

ARCHS = {
    "llama": (transformers.LlamaConfig, dict(head_dim=16)),
    "qwen2": (transformers.Qwen2Config, dict()),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),
    "mistral": (transformers.MistralConfig, dict(head_dim=16, sliding_window=5)),
    "gemma": (transformers.GemmaConfig, dict(head_dim=16)),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=16, sliding_window=6, attn_logit_softcapping=20.0)),
    "gemma3": (transformers.Gemma3TextConfig, dict(head_dim=16, sliding_window=6, layer_types=None)),
    "phi3": (transformers.Phi3Config, dict(num_key_value_heads=2)),
}

# (architecture, attention implementation) pairs the issue lists; Gemma2 exists only as eager.
CASES = [(a, i) for a in ARCHS for i in ("sdpa", "eager") if not (a == "gemma2" and i == "sdpa")]


def tiny_model(arch: str, impl: str, layers: int = 3, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, extra = ARCHS[arch]
    kwargs = {**COMMON, **extra, "num_hidden_layers": layers, **overrides}
    if kwargs.get("layer_types", 0) is None:
        kwargs.pop("layer_types")
    config = config_cls(**kwargs)
    config._attn_implementation = impl
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger random weights than HF's 0.02 init, so attention patterns matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    return model


def random_router_file(path, config, seed: int, layers: int = 3, head_dim: int = 16, std: float = 1.0):
    """Routers with N(0, std) weights for `tiny_model("llama", ...)` saved at `path`; returns (path, routers).
    Large weights make their decisions differ between prompts."""
    import fluxc

    torch.manual_seed(seed)
    routers = torch.nn.ModuleList(fluxc.ops.LayerRouter(head_dim, config.router_hidden) for _ in range(layers))
    with torch.no_grad():
        for p in routers.parameters():
            p.normal_(0, std)
    fluxc.save_routers(path, routers, config, fluxc.Fingerprint("LlamaForCausalLM", layers, 4, 2, head_dim))
    return str(path), routers


def batch(seq: int = 12, left_pad: int = 3, vocab: int = 128, size: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (size, seq), generator=g)
    mask = torch.ones(size, seq, dtype=torch.long)
    if left_pad:
        mask[-1, :left_pad] = 0
        ids[-1, :left_pad] = 0
    return ids, mask


def dense_sa_mask(model_allowed: torch.Tensor, pads: list[int], *, sink: int, window: int, block: int,
                  block_exact: bool) -> torch.Tensor:
    """Streaming pattern on top of the model's (B, Tq, Tk) bool mask, by explicit loops (prefill, Tq == Tk)."""
    b_, tq, tk = model_allowed.shape
    out = torch.zeros_like(model_allowed)
    for b in range(b_):
        pad = pads[b]
        for i in range(tq):
            for k in range(tk):
                if not model_allowed[b, i, k]:
                    continue
                pk, pq = k - pad, i - pad
                if block_exact:
                    ok = pk // block < sink // block or pk // block > pq // block - window // block
                else:
                    ok = pk < sink or pq - pk < window
                out[b, i, k] = ok
    return out


class Reference:
    """Routes for the reference run: per layer 'full'/'sparse', or a router callback."""

    def __init__(self, routes, pads, sink, window, block, block_exact, router=None):
        self.routes, self.pads, self.router = routes, pads, router
        self.sink, self.window, self.block, self.block_exact = sink, window, block, block_exact
        self.decisions: dict[int, torch.Tensor] = {}


ACTIVE: list[Reference] = []


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                         sliding_window=None, **kwargs):
    ref = ACTIVE[-1]
    b, h, tq, d = query.shape
    tk = key.shape[2]
    n_rep = h // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    if attention_mask is None:
        allowed = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq).expand(b, tq, tk)
    else:
        allowed = attention_mask[:, 0, :, :tk] if attention_mask.dtype == torch.bool else attention_mask[:, 0, :, :tk] > -1e30
        allowed = allowed.expand(b, tq, tk)
    layer = module.layer_idx
    if ref.router is not None:
        full = ref.router(module, layer)  # (B,) bool
    else:
        full = torch.full((b,), ref.routes[layer] == "full")
    ref.decisions[layer] = full
    sa = dense_sa_mask(allowed, ref.pads, sink=ref.sink, window=ref.window, block=ref.block,
                       block_exact=ref.block_exact)
    final = torch.where(full[:, None, None], allowed, sa)  # (B, Tq, Tk)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else d ** -0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~final[:, None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(query.dtype)
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register("flux_reference", _reference_attention)
AttentionMaskInterface.register("flux_reference", sdpa_mask)


def run_reference(model, ids, mask, ref: Reference) -> torch.Tensor:
    """Logits of the untouched model with attention replaced by the loop-built routed reference."""
    saved = model.config._attn_implementation
    model.set_attn_implementation("flux_reference")
    ACTIVE.append(ref)
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        ACTIVE.pop()
        model.set_attn_implementation(saved)


def reference_router(model, weights_per_layer, pool: int, pads: list[int]):
    """Flux Attention's router re-implemented directly: pre-RoPE queries captured by hooks on q_norm / q_proj."""
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for layer, block in enumerate(model.model.layers):
        attn = block.self_attn
        heads = model.config.num_attention_heads
        hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // heads

        def grab(mod, inputs, output, layer=layer, heads=heads, hd=hd):
            q = output
            if q.dim() == 3:  # q_proj / fused qkv output (B, T, C): the query part, as (B, T, H, D)
                q = q[..., : heads * hd].reshape(q.shape[0], q.shape[1], heads, hd)
            elif q.shape[1] == heads and q.shape[2] != heads:  # q_norm after the transpose (Gemma3): (B, H, T, D)
                q = q.transpose(1, 2)
            captured[layer] = q

        target = getattr(attn, "q_norm", None) or getattr(attn, "q_proj", None) or attn.qkv_proj
        hooks.append(target.register_forward_hook(grab))

    margins: dict[int, torch.Tensor] = {}

    def route(module, layer):
        q = captured[layer].float()  # (B, T, H, D)
        w = weights_per_layer[layer]
        decisions, margin = [], []
        for b in range(q.shape[0]):
            real = q[b, pads[b]:]  # (n, H, D) real tokens only
            first, last = real[:pool], real[-pool:]
            pooled = torch.cat([first, last], dim=0).mean(dim=0).mean(dim=0)  # (D,)
            x = F.linear(F.silu(F.linear(pooled, w["feature.0.weight"], w["feature.0.bias"])),
                         w["feature.2.weight"], w["feature.2.bias"])
            x = F.silu(F.linear(x, w["head.0.weight"], w["head.0.bias"]))
            x = F.silu(F.linear(x, w["head.2.weight"], w["head.2.bias"]))
            logits = F.linear(x, w["head.4.weight"], w["head.4.bias"])
            decisions.append(bool(logits.argmax() == 1))
            margin.append(logits[1] - logits[0])
        margins[layer] = torch.stack(margin)
        return torch.tensor(decisions)

    return route, hooks, margins
