"""How much attention work a routing decision saves at prefill, counted in causal query-key pairs.

A full-attention layer executes every causal pair of a prompt of n tokens, n (n + 1) / 2. A sparse layer
executes the pairs of the SA pattern (`fluxc.patterns`): per query, the sinks and the window
[window_start(i), i], counted in closed form, so long prompts cost O(n) and no masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fluxc.config import FluxConfig
from fluxc.errors import ConfigError
from fluxc.patterns import dense_from, window_start


def sparse_pairs(n: int, config: FluxConfig) -> int:
    """Causal query-key pairs the SA pattern of `config` keeps at the prefill of an n-token prompt."""
    if n <= 0:
        return 0
    i = torch.arange(n, dtype=torch.int64)  # query position, counted from the sequence's first key
    seen = i + 1  # causal keys 0..i
    sinks = seen.clamp_max(config.sink)  # keys 0 .. sink-1
    low = window_start(i, config.window, config.block, config.block_exact).clamp_min(0)  # the window: low..i
    local = seen - low
    both = (sinks - low).clamp_min(0)  # keys in the sinks and in the window
    per_query = sinks + local - both
    if config.pattern == "triangle":  # the last n_last prompt queries attend densely
        per_query = torch.where(i >= dense_from(n - 1, config.n_last), seen, per_query)
    return int(per_query.sum())


def attention_work(route: Tensor, prompt_lens: Tensor | Sequence[int], config: FluxConfig,
                   local_windows: dict[int, int] | None = None) -> dict[str, Tensor]:
    """Prefill attention work of routed sequences relative to the model's own attention.

    Args:
        route: bool [B, L], True where layer l of sequence b runs full attention (`fluxc.last_route`).
        prompt_lens: the B real (non-padding) prompt lengths.
        config: the FluxConfig whose SA pattern the sparse layers run.
        local_windows: {layer: window} of the model's own local layers (not routed: they cost their window in
            both counts, whatever `route` says); None: every layer is routed.

    Returns a dict of [B] tensors: ``dense_pairs`` (int64, the untouched model's causal pairs: full attention
    on routed layers, the window on local ones), ``executed_pairs`` (int64), ``executed`` (float64 fraction of
    dense) and ``skipped`` (1 - executed).
    """
    if not isinstance(route, Tensor) or route.dtype != torch.bool or route.dim() != 2:
        raise ConfigError(f"route must be a bool tensor [batch, layers], got {getattr(route, 'dtype', type(route))} "
                          f"of shape {tuple(getattr(route, 'shape', ()))}; use fluxc.last_route(model)")
    lens = [int(n) for n in (prompt_lens.tolist() if isinstance(prompt_lens, Tensor) else prompt_lens)]
    if len(lens) != route.shape[0]:
        raise ConfigError(f"prompt_lens has {len(lens)} entries but route has {route.shape[0]} sequences")
    if any(n < 0 for n in lens):
        raise ConfigError(f"prompt_lens={lens} must be >= 0")
    local = dict(local_windows or {})
    routed = [layer for layer in range(route.shape[1]) if layer not in local]
    layers = len(routed)
    full_layers = route[:, routed].sum(dim=1).cpu().to(torch.int64)  # [B]
    dense = torch.tensor([n * (n + 1) // 2 for n in lens], dtype=torch.int64)  # one layer
    sparse = torch.tensor([sparse_pairs(n, config) for n in lens], dtype=torch.int64)
    windows = [config.replace(pattern="streaming", sink=0, window=w, block_exact=False) for w in local.values()]
    own = torch.tensor([sum(sparse_pairs(n, w) for w in windows) for n in lens], dtype=torch.int64)  # local layers
    executed = full_layers * dense + (layers - full_layers) * sparse + own
    dense_all = dense * layers + own
    fraction = executed.double() / dense_all.clamp_min(1).double()
    fraction = torch.where(dense_all > 0, fraction, torch.ones_like(fraction))
    return {"dense_pairs": dense_all, "executed_pairs": executed, "executed": fraction, "skipped": 1.0 - fraction}
