"""Fault injection for testing a deployment of the decode engine: a token whose embedding turns NaN (its
request's logits go NaN, the others' must not) and page allocations that fail for chosen requests.

    handle = poison_token(model, token_id)        # before fluxc.compile: Dynamo traces the hook in
    with failing_allocations(engine.pool, {3, 7}):  # requests 3 and 7 get no more pages
        engine.generate(prompts, 64, errors="return")
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Container, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fluxc.errors import CapacityError, ConfigError
from fluxc.serve.paged import PagePool


def poison_token(model: nn.Module, token_id: int) -> RemovableHandle:
    """Make `token_id`'s input embedding NaN (a corrupted row of the table): every sequence holding it gets NaN
    hidden states, and only those. Register it before compiling; `.remove()` undoes it."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Module):
        raise ConfigError(f"{type(model).__name__} has no get_input_embeddings(); poison_token needs an HF-style model")
    vocab = getattr(embeddings, "num_embeddings", None)
    if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0 or (vocab and token_id >= vocab):
        raise ConfigError(f"token_id={token_id!r} must be a token id in [0, {vocab})")

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        ids = args[0]  # (B, T)
        return torch.where((ids == token_id)[..., None], torch.full((), float("nan"), dtype=out.dtype,
                                                                    device=out.device), out)

    return embeddings.register_forward_hook(hook)


@contextlib.contextmanager
def failing_allocations(pool: PagePool, owners: Container[int] | Callable[[int | None], bool]) -> Iterator[None]:
    """Inside the block, `pool.take` raises CapacityError for the requests in `owners` (ids or a predicate)."""
    if not isinstance(pool, PagePool):
        raise ConfigError(f"pool must be a PagePool (engine.pool, allocated by the first request), got "
                          f"{type(pool).__name__}")
    fails = owners if callable(owners) else owners.__contains__
    take = pool.take

    def failing(count: int, owner: int | None = None) -> list[int]:
        if owner is not None and fails(owner):
            raise CapacityError(f"injected: no page for request {owner}")
        return take(count, owner)

    pool.take = failing  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pool.take  # the class's method again
