"""The transformers API differences fluxc meets, in one place.

transformers 5.24 renamed the KV-cache keyword of model forwards and of `generate()` from `past_key_values`
to `cache`, and the output field with it; 5.17-5.23 know only `past_key_values`. fluxc reads which name a
model takes off its `forward` signature, so both work without a version switch.

Importing this module imports nothing from transformers.
"""

from __future__ import annotations

import inspect
from typing import Any

from fluxc.errors import ConfigError

CACHE_KEYWORDS = ("cache", "past_key_values")  # the current name first


def cache_keyword(model: Any) -> str | None:
    """The keyword `model.forward` takes its KV cache by ('cache' or 'past_key_values'), or None.

    A wrapper whose forward is `(*args, **kwargs)` (a `fluxc.FluxModule`) answers for its `.model`."""
    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):
        return None
    found = next((name for name in CACHE_KEYWORDS if name in params), None)
    passthrough = params and all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values())
    if found is None and passthrough and getattr(model, "model", None) is not None:
        return cache_keyword(model.model)
    return found


def output_cache(out: Any) -> Any:
    """The KV cache of an HF model output, under whichever name its transformers version uses."""
    # ModelOutput's `keys()` holds only the fields that are set; reading the old name on >= 5.24 warns.
    keys = out.keys() if hasattr(out, "keys") else ()
    for name in CACHE_KEYWORDS:
        if name in keys:
            return out[name]
    return getattr(out, "past_key_values", None)


def pop_cache_argument(kwargs: dict[str, Any]) -> Any:
    """Remove and return a cache given under either name; both at once is an error (None when absent)."""
    given = [name for name in CACHE_KEYWORDS if name in kwargs]
    if len(given) > 1:
        raise ConfigError("both cache= and past_key_values= were given; pass the cache once, as cache= "
                          "(past_key_values= is transformers' older name)")
    return kwargs.pop(given[0]) if given else None
