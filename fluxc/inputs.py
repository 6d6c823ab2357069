"""Checks of what users pass: token ids and attention masks. Every failure is a ConfigError naming the argument,
the value and the fix; nothing is accepted that the model would silently misread.

Shapes and dtypes are always checked (host metadata, free). Values (token ids inside the vocabulary, masks of
0 and 1 with at least one real token per row) need a read of the tensor: they are checked where that read
costs no device sync (host tensors), and by the generation APIs, which read each prompt at admission anyway.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fluxc.errors import ConfigError
from fluxc.hf_compat import CACHE_KEYWORDS

_MASK_DTYPES = (torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.bfloat16, torch.float32, torch.float64)


def vocab_size(model: Any) -> int | None:
    """The vocabulary of an HF-style model (its config's vocab_size), or None."""
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    size = getattr(text, "vocab_size", None)
    return size if isinstance(size, int) else None


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def check_token_ids(ids: Any, *, name: str = "input_ids", dims: int = 2, vocab: int | None = None,
                    values: bool = True) -> None:
    """An integer tensor of `dims` dims whose ids (with `values`) lie in [0, vocab)."""
    if not isinstance(ids, Tensor):
        raise ConfigError(f"{name} must be a tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ConfigError(f"{name}.dtype={ids.dtype}: token ids are integers; pass torch.long ids (a tokenizer's "
                          f"input_ids)")
    if ids.dim() != dims:
        layout = "(batch, length)" if dims == 2 else "(length,)"
        raise ConfigError(f"{name}.shape={tuple(ids.shape)}: expected {dims} dims {layout}")
    if ids.numel() == 0 and dims == 1:
        raise ConfigError(f"{name} is empty: a prompt needs at least one token")
    if values and ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab is not None and high >= vocab):
            raise ConfigError(f"{name} holds ids in [{low}, {high}], outside the model's vocabulary [0, "
                              f"{vocab if vocab is not None else 'inf'}); tokenize with the model's tokenizer")


def check_attention_mask(mask: Any, batch: int, length: int, *, values: bool = True) -> None:
    """A (batch, length) mask of 0 / 1 (bool, integer or float) with at least one 1 per row (with `values`)."""
    if not isinstance(mask, Tensor):
        raise ConfigError(f"attention_mask must be a tensor, got {type(mask).__name__}")
    if mask.dtype not in _MASK_DTYPES:
        raise ConfigError(f"attention_mask.dtype={mask.dtype}: use bool or integer 0 / 1")
    if mask.dim() == 4:  # a custom (batch, heads, queries, keys) mask, as transformers takes it: read as given
        if mask.shape[0] not in (1, batch):
            raise ConfigError(f"attention_mask.shape={tuple(mask.shape)}: a 4-dim mask's batch must be 1 or {batch}")
        return
    if tuple(mask.shape) != (batch, length):
        raise ConfigError(f"attention_mask.shape={tuple(mask.shape)} but the inputs need ({batch}, {length}) (batch, "
                          f"keys: the cached ones and these tokens); pass one 0 / 1 per key")
    if values and mask.numel():
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ConfigError("attention_mask holds values other than 0 and 1; pass 1 for real tokens, 0 for padding")
        empty = (mask == 0).all(dim=1).nonzero().flatten().tolist()
        if empty:
            raise ConfigError(f"attention_mask rows {empty} are all zeros (a sequence without tokens); drop those "
                              f"rows or give each at least one real token")


def check_model_inputs(model: Any, args: tuple, kwargs: dict[str, Any]) -> None:
    """input_ids and attention_mask of a call of an HF-style causal LM (a model with a config), before tracing."""
    if getattr(model, "config", None) is None:
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        return  # inputs_embeds: the model's own checks apply
    check_token_ids(ids, vocab=vocab_size(model), values=ids.device.type == "cpu")
    weight = next(model.parameters(), None) if hasattr(model, "parameters") else None
    if weight is not None and ids.device != weight.device:
        raise ConfigError(f"input_ids are on {ids.device} but the model is on {weight.device}; move them with "
                          f"input_ids.to({str(weight.device)!r})")
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is None:
        return
    if isinstance(mask, Tensor) and mask.device != ids.device:
        raise ConfigError(f"attention_mask is on {mask.device} but input_ids on {ids.device}; put both on "
                          f"{ids.device}")
    cache = next((kwargs[k] for k in CACHE_KEYWORDS if kwargs.get(k) is not None), None)
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    past = past if isinstance(past, int) else 0
    check_attention_mask(mask, ids.shape[0], past + ids.shape[1], values=mask.device.type == "cpu" and past == 0)


def canonical_inputs(model: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """An HF-style model's input_ids and 2-D attention_mask as int64 (what tokenizers give): an int32 or bool
    variant of the same call then reuses the compiled graph instead of tracing and compiling again."""
    if getattr(model, "config", None) is None:
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    for position, name in ((0, "input_ids"), (1, "attention_mask")):
        where = kwargs if name in kwargs else (args if len(args) > position else None)
        key = name if where is kwargs else position
        value = where[key] if where is not None else None
        if (isinstance(value, Tensor) and value.dtype != torch.int64 and not value.is_floating_point() and not
                value.is_complex() and (name == "input_ids" or value.dim() == 2)):
            where[key] = value.to(torch.int64)
    return tuple(args), kwargs
