"""Models and router checkpoints the benchmarks build: a Llama of any shape with random weights filled on the
device, zero-cost attention (for non-attention floors), and routers whose decisions are forced."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

import fluxc
from fluxc.ops.router import LayerRouter

from e2e_spec import Spec

NOATTN = "fluxc_e2e_noattn"


def build_model(spec: Spec, dtype: torch.dtype, device: str) -> Any:
    """Llama of `spec`'s shape on `device`: HF init skipped, weights filled on the device (seeded).

    N(0, 0.02) matrices and unit norms: speed does not depend on the weights, but zeros can run faster than
    real data, so they are avoided."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": min(8192, max(spec.lengths))}
    common = dict(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.inter,
                  num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                  head_dim=spec.head_dim, max_position_embeddings=max(131072, 2 * max(spec.lengths)),
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    try:
        cfg = LlamaConfig(**common, rope_parameters=rope)
    except (TypeError, ValueError):  # an older config API: plain RoPE costs the same
        cfg = LlamaConfig(**common)
    cfg._attn_implementation = "sdpa"
    try:
        from transformers.initialization import no_init_weights
        skip_init: Any = no_init_weights()
    except ImportError:
        skip_init = contextlib.nullcontext()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), skip_init:
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
    return model


def noattn(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Zero-cost attention for the non-attention floor: (B, H, T, D) -> (B, T, H, D) view of the query."""
    return query.transpose(1, 2), None


def register_noattn() -> None:
    """Make `NOATTN` an attention implementation transformers knows."""
    from transformers import AttentionInterface

    AttentionInterface.register(NOATTN, noattn)


@contextlib.contextmanager
def attention_impl(model: Any, name: str) -> Iterator[None]:
    """Switch the HF attention implementation of `model` (restored after)."""
    saved = model.config._attn_implementation

    def switch(to: str) -> None:
        try:
            model.set_attn_implementation(to)
        except (ValueError, KeyError, TypeError):  # an older API: the config is shared by every layer
            model.config._attn_implementation = to
    switch(name)
    try:
        yield
    finally:
        switch(saved)


def param_bytes(model: Any) -> tuple[int, int]:
    """(all parameter bytes, bytes without the input embedding: what one decode step reads)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    return total, total - emb.numel() * emb.element_size()


def fingerprint(model: Any) -> fluxc.Fingerprint:
    """What fluxc checks a router checkpoint against, read off an HF config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    return fluxc.Fingerprint(type(model).__name__, cfg.num_hidden_layers, heads,
                             getattr(cfg, "num_key_value_heads", None) or heads,
                             getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


def forced_routers(model: Any, config: fluxc.FluxConfig, routes: Sequence[str], path: str | os.PathLike[str],
                   made_by: str) -> str:
    """A router checkpoint whose layer i always decides routes[i] ("full" / "sparse"): random weights, then a
    zero last layer with a bias, so the router MLP runs in full and its decisions are known."""
    routers = torch.nn.ModuleList(LayerRouter(fingerprint(model).head_dim, config.router_hidden) for _ in routes)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for router, want in zip(routers, routes):
            for p in router.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            last = router.head[4]
            last.weight.zero_()
            last.bias.copy_(torch.tensor([1.0, -1.0] if want == "sparse" else [-1.0, 1.0]))  # index 1 = FA
    fluxc.save_routers(path, routers, config, fingerprint(model),
                       {"made_by": made_by, "decisions": "forced by a zero last layer + bias"})
    return os.fspath(path)
