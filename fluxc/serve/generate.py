"""`fluxc.generate`: the decode engine for fluxc-compiled models, a plain DynamicCache loop otherwise."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import DynamicCache

from fluxc.backend import flux_backend_of
from fluxc.errors import ConfigError
from fluxc.hf_compat import cache_keyword, output_cache
from fluxc.serve.engine import DecodeEngine, split_prompts
from fluxc.serve.sampling import SamplingConfig, select_tokens

log = logging.getLogger("fluxc")


def generate(model: Any, input_ids: torch.Tensor | list[torch.Tensor], max_new_tokens: int, *,
             attention_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None, engine: bool | None = None,
             cuda_graphs: bool | str = "auto") -> torch.Tensor | list[torch.Tensor]:
    """Prompts and their answers, greedy or sampled (temperature / top-k / top-p): a left-padded (B, T) batch
    gives (B, T + new); a list of 1-D prompts of any lengths gives a list of 1-D tensors.

    A `fluxc.compile` model runs on its `DecodeEngine` (routes fixed at prefill, sparse layers keep their sink +
    window in a paged cache, one CUDA graph per batch bucket for every routing mask); `engine=False` (or any
    other HF-style model) runs a plain loop with HF's DynamicCache, keeping every key (SA without eviction).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    compiled = flux_backend_of(model) is not None
    if engine and not compiled:
        raise ConfigError(f"engine=True needs a fluxc.compile(...) model, got {type(model).__name__}")
    if max_new_tokens == 0 or len(input_ids) == 0:
        return input_ids
    if compiled and engine is not False:
        decode = getattr(model, "_fluxc_engine", None)
        prompts = split_prompts(input_ids, attention_mask) if isinstance(input_ids, torch.Tensor) else input_ids
        batch = min(len(prompts), 8)
        longest = max(int(p.shape[-1]) for p in prompts) + max_new_tokens
        if decode is None or decode.cuda_graphs != cuda_graphs or decode.max_batch < batch or decode.max_len < longest:
            try:  # an engine sized for this call (its pool and buckets); kept for the next calls that fit
                decode = DecodeEngine(model, cuda_graphs=cuda_graphs, max_batch=batch,
                                      max_len=-(-longest // 1024) * 1024)
            except ConfigError as exc:
                if engine:
                    raise
                log.info("fluxc.generate: the DynamicCache loop runs instead of the decode engine: %s", exc)
                decode = None
            object.__setattr__(model, "_fluxc_engine", decode)  # not a submodule: keep it out of state_dict
        if decode is not None:
            return decode.generate(input_ids, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
                                   temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id)
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id)
    if isinstance(input_ids, torch.Tensor):
        return _generate_dynamic(model, input_ids, max_new_tokens, attention_mask=attention_mask, **sampling)
    return [_generate_dynamic(model, prompt[None], max_new_tokens, attention_mask=None, **sampling)[0]
            for prompt in input_ids]


@torch.no_grad()
def _generate_dynamic(model: Any, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None,
                      do_sample: bool, temperature: float, top_k: int, top_p: float,
                      eos_token_id: int | None) -> torch.Tensor:

    keyword = cache_keyword(model)
    if keyword is None:
        raise ConfigError(f"{type(model).__name__}.forward takes no KV cache (neither cache= nor past_key_values=); "
                          f"fluxc.generate serves Hugging Face-style causal LMs")
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
    ids = input_ids
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    cache = DynamicCache()
    step_ids = ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -step_ids.shape[1]:]  # left padding aware
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{keyword: cache})
        cache = output_cache(out)
        next_ids = select_tokens(out.logits[:, -1], sampling)  # (B, 1)
        if eos_token_id is not None:
            next_ids = torch.where(done[:, None], torch.full_like(next_ids, eos_token_id), next_ids)
            done = done | (next_ids[:, 0] == eos_token_id)
        ids = torch.cat([ids, next_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        step_ids = next_ids
        if eos_token_id is not None and bool(done.all()):
            break
    return ids
