"""Plain greedy generation with an HF-style cache (the decode engine of issue 4 builds on this)."""

from __future__ import annotations

from typing import Any

import torch

from fluxc.errors import ConfigError


@torch.no_grad()
def generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
             eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding: prefill once (routes decided there), then one token per step reusing the cache.

    `model` is called like an HF causal LM (input_ids, attention_mask, position_ids, past_key_values).
    Returns (B, T + new) token ids.
    """
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 0")
    from transformers import DynamicCache

    ids = input_ids
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    cache = DynamicCache()
    step_ids = ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -step_ids.shape[1]:]  # left padding aware
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True)
        cache = out.past_key_values
        next_ids = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        if eos_token_id is not None:
            next_ids = torch.where(done[:, None], torch.full_like(next_ids, eos_token_id), next_ids)
            done = done | (next_ids[:, 0] == eos_token_id)
        ids = torch.cat([ids, next_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        step_ids = next_ids
        if eos_token_id is not None and bool(done.all()):
            break
    return ids
