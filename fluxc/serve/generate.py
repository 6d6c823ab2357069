"""`fluxc.generate`: the decode engine for fluxc-compiled models, a plain DynamicCache loop otherwise."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from transformers import DynamicCache

from fluxc.backend import flux_backend_of
from fluxc.errors import ConfigError, RequestError
from fluxc.hf_compat import cache_keyword, output_cache
from fluxc.inputs import check_token_ids, vocab_size
from fluxc.serve.engine import DecodeEngine, request_error, split_prompts
from fluxc.serve.sampling import SamplingConfig, select_tokens

log = logging.getLogger("fluxc")


def generate(model: Any, input_ids: torch.Tensor | list[torch.Tensor], max_new_tokens: int, *,
             attention_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None, engine: bool | None = None,
             cuda_graphs: bool | str = "auto", errors: str = "raise") -> Any:
    """Prompts and their answers, greedy or sampled (temperature / top-k / top-p): a left-padded (B, T) batch
    gives (B, T + new); a list of 1-D prompts of any lengths gives a list of 1-D tensors.

    A `fluxc.compile` model runs on its `DecodeEngine` (routes fixed at prefill, sparse layers keep their sink +
    window in a paged cache, one CUDA graph per batch bucket for every routing mask); `engine=False` (or any
    other HF-style model) runs a plain loop with HF's DynamicCache, keeping every key (SA without eviction).
    `errors="return"` (the engine, a list of prompts): a request that fails or is invalid gives its
    `RequestError` in its place and the others their answers; "raise" raises it.

    One call at a time drives a compiled model (its `lock`): concurrent calls from other threads wait.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    if engine is not None and not isinstance(engine, bool):
        raise ConfigError(f"engine={engine!r}: use None (the decode engine where it serves the model), True or False")
    if not (isinstance(cuda_graphs, bool) or (isinstance(cuda_graphs, str) and cuda_graphs == "auto")):
        raise ConfigError(f"cuda_graphs={cuda_graphs!r}: use True, False or 'auto'")
    vocab = vocab_size(model)
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                     or eos_token_id < 0 or (vocab is not None and eos_token_id >= vocab)):
        raise ConfigError(f"eos_token_id={eos_token_id!r} must be a token id in [0, {vocab}) or None")
    SamplingConfig(do_sample, temperature, top_k, top_p)  # checks the sampling values
    if not isinstance(errors, str) or errors not in ("raise", "return"):
        raise ConfigError(f"errors={errors!r}: use 'raise' or 'return'")
    if isinstance(input_ids, torch.Tensor):
        prompts = split_prompts(input_ids, attention_mask)
    elif isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise ConfigError("attention_mask is for a left-padded (batch, length) tensor; a list of prompts has no "
                              "padding: drop attention_mask")
        prompts = list(input_ids)
    else:
        raise ConfigError(f"input_ids must be a (batch, length) tensor or a list of 1-D prompts, got "
                          f"{type(input_ids).__name__}")
    compiled = flux_backend_of(model) is not None
    if engine and not compiled:
        raise ConfigError(f"engine=True needs a fluxc.compile(...) model, got {type(model).__name__}")
    if errors == "return" and (not compiled or engine is False or isinstance(input_ids, torch.Tensor)):
        raise ConfigError("errors='return' needs the decode engine (a fluxc.compile model, engine=None or True) and "
                          "a list of prompts (a failed row has no place in a (B, T) tensor); use errors='raise'")
    invalid: dict[int, RequestError] = {}
    for i, prompt in enumerate(prompts):
        try:
            check_token_ids(prompt, name=f"prompt {i}" if isinstance(input_ids, list) else f"input_ids[{i}]", dims=1,
                            vocab=vocab)
        except ConfigError as exc:
            if errors == "raise":
                raise
            invalid[i] = request_error(i, exc)  # the engine answers it the same way
    if max_new_tokens == 0 or not prompts:
        return [invalid.get(i, prompt) for i, prompt in enumerate(prompts)] if errors == "return" else input_ids
    lock = getattr(model, "lock", None) if compiled else None
    with lock or contextlib.nullcontext():  # one call at a time drives a compiled model's engine and route state
        return _generate(model, input_ids, prompts, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
                         temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                         engine=engine, cuda_graphs=cuda_graphs, compiled=compiled, errors=errors)


def _generate(model: Any, input_ids: torch.Tensor | list[torch.Tensor], prompts: list[torch.Tensor],
              max_new_tokens: int, *, attention_mask: torch.Tensor | None, do_sample: bool, temperature: float,
              top_k: int, top_p: float, eos_token_id: int | None, engine: bool | None, cuda_graphs: bool | str,
              compiled: bool, errors: str) -> Any:
    if compiled and engine is not False:
        decode = getattr(model, "_fluxc_engine", None)
        batch = min(len(prompts), 8)
        longest = max((int(p.shape[-1]) for p in prompts if isinstance(p, torch.Tensor) and p.dim() == 1),
                      default=1) + max_new_tokens
        if decode is None or decode.cuda_graphs != cuda_graphs or decode.max_batch < batch or decode.max_len < longest:
            try:  # an engine sized for this call (its pool and buckets); kept for the next calls that fit
                decode = DecodeEngine(model, cuda_graphs=cuda_graphs, max_batch=batch,
                                      max_len=-(-longest // 1024) * 1024)
            except ConfigError as exc:
                if engine or errors == "return":
                    raise
                log.info("fluxc.generate: the DynamicCache loop runs instead of the decode engine: %s", exc)
                decode = None
            object.__setattr__(model, "_fluxc_engine", decode)  # not a submodule: keep it out of state_dict
        if decode is not None:
            return decode.generate(input_ids, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
                                   temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                  errors=errors)
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id)
    if isinstance(input_ids, torch.Tensor):
        return _generate_dynamic(model, input_ids, max_new_tokens, attention_mask=attention_mask, **sampling)
    return [_generate_dynamic(model, prompt[None], max_new_tokens, attention_mask=None, **sampling)[0]
            for prompt in input_ids]


@torch.no_grad()
def _generate_dynamic(model: Any, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None,
                      do_sample: bool, temperature: float, top_k: int, top_p: float,
                      eos_token_id: int | None, logits: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The plain DynamicCache loop; `logits`, when given, receives each step's next-token logits (B, V)."""

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
        _mark_lengths_dynamic(step_ids, mask, positions, cache)
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{keyword: cache})
        cache = output_cache(out)
        if logits is not None:
            logits.append(out.logits[:, -1].float())  # (B, V)
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


def _mark_lengths_dynamic(step_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> None:
    """Sequence lengths dynamic from the first trace, so a compiled model traces the prefill and the decode step
    once each (Dynamo's automatic dynamic would compile each a second time, at the second length it sees)."""
    for tensor in (step_ids, positions, mask) if step_ids.shape[1] > 1 else (mask,):
        torch._dynamo.maybe_mark_dynamic(tensor, 1)
    for layer in getattr(cache, "layers", ()):  # transformers' DynamicCache: (B, H, T, D) keys and values
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 4:
                torch._dynamo.maybe_mark_dynamic(tensor, 2)
