"""transformers-facing KV caches: `FluxCache` (transformers' own `generate()` and exported decode steps over a
compacted cache) and what every fluxc cache answers to HF's model and mask code.

`FluxCache` phase "prefill" keeps the prompt's keys; `compact` then moves each layer to the layout its routes
allow (fluxc.ops.cache): DENSE (every sequence FA), RING (every sequence SA: sink + window slots, the
eviction), MIXED (dense, routed per sequence). Decode steps write with `fluxc::cache_write` and the pass turns
the attention site into `fluxc::cache_attention`. The serving engine's cache is paged (`fluxc.serve.paged`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache

from fluxc.config import FluxConfig
from fluxc.errors import ConfigError
from fluxc.hf_compat import cache_keyword, pop_cache_argument
from fluxc.ops.cache import DENSE, LAYOUT_NAMES, MIXED, RING, ring_capacity, ring_keys, ring_supported
from fluxc.patterns import window_reach
from fluxc.spec import SiteSpec

if TYPE_CHECKING:
    from fluxc.api import FluxModule


def sliding_layers(model: nn.Module) -> dict[int, int]:
    """{layer: window} of an HF config's sliding-window layers (`layer_types`, else every layer when
    `sliding_window` is set and used)."""
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    if text is None:
        return {}
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types:
        return {i: int(window) for i, t in enumerate(types) if t == "sliding_attention" and window}
    if window and getattr(text, "use_sliding_window", True):
        return dict.fromkeys(range(text.num_hidden_layers), int(window))
    return {}


def check_engine_model(model: nn.Module, config: FluxConfig | None = None) -> str:
    """The cache keyword of an HF-style causal LM the engines can serve; else a ConfigError that says what to
    use instead. With the model's `config` (the decode engine), sliding-window layers are served when the SA
    window would not narrow them (local layers: a ring of their window); without it (FluxCache), none are."""
    keyword = cache_keyword(model)
    if keyword is None:
        raise ConfigError(f"{type(model).__name__}.forward takes no KV cache (neither cache= nor past_key_values=); "
                          f"the decode engine serves Hugging Face-style causal LMs")
    windows = sliding_layers(model)
    if not windows:
        return keyword
    if config is None:
        raise ConfigError(f"the model has native sliding-window layers (sliding_window={max(windows.values())}); "
                          f"transformers' generate with a FluxCache serves full-attention decoders; use "
                          f"fluxc.generate (the decode engine) or fluxc.generate(..., engine=False)")
    reach = window_reach(config.window, config.block, config.block_exact)
    wide = {layer: w for layer, w in windows.items() if w > reach}
    if wide:
        raise ConfigError(f"layers {sorted(wide)} have a sliding window of {max(wide.values())} keys, wider than the "
                          f"{reach} the SA window keeps, so they are routed inside their window; the decode engine "
                          f"serves local layers only within the SA window: use fluxc.generate(..., engine=False) "
                          f"(HF DynamicCache path) or a wider FluxConfig.window")
    return keyword


def layer_layouts(routes: Tensor, ring_ok: bool) -> tuple[int, ...]:
    """Cache layout of each layer for a (B, L) bool routing mask on the host (DENSE / RING / MIXED)."""
    per_layer = routes.to(torch.bool).t().tolist()
    return tuple(DENSE if all(col) else (RING if ring_ok and not any(col) else MIXED) for col in per_layer)


class RoutedCache(Cache):
    """What HF's model and mask code ask of a fluxc cache. Its decode-step attention never reads HF's mask (the
    pass replaces those sites), so the mask is sized one key wide: it broadcasts against any layer's keys."""

    is_compileable = False  # HF generate must not compile the unrouted forward around this cache
    phase = "prefill"

    def __init__(self) -> None:
        super().__init__(layers=[])

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        # (kv_length, kv_offset) of the mask HF builds: the prompt at prefill, one key wide at decode
        q_len = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return (q_len, 0) if self.phase == "prefill" else (1, 0)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_initialized(self) -> bool:  # type: ignore[override]
        return self.num_layers > 0

    @property
    def is_sliding(self) -> list[bool]:  # type: ignore[override]
        return [False] * self.num_layers

    @property
    def is_linear(self) -> list[bool]:  # type: ignore[override]
        return [False] * self.num_layers

    @property
    def is_dummy(self) -> list[bool]:  # type: ignore[override]
        return [False] * self.num_layers


class _Layer:
    """One layer's KV storage: the prefill keys until `compact`, then the layout's fixed-size buffers."""

    def __init__(self) -> None:
        self.keys: Tensor | None = None  # (B, Hkv, T or C, D)
        self.values: Tensor | None = None
        self.layout = DENSE
        self.route: Tensor | None = None  # (B,) bool on the device
        self.shape: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)  # (B, Hkv, slots, Dk, Dv) once allocated

    def materialize(self, like: Tensor) -> None:
        """Zeroed buffers of `shape`, with `like`'s dtype and device."""
        batch, heads, slots, dim_k, dim_v = self.shape
        self.keys = like.new_zeros((batch, heads, slots, dim_k))  # (B, Hkv, C, Dk)
        self.values = like.new_zeros((batch, heads, slots, dim_v))  # (B, Hkv, C, Dv)


class FluxCache(RoutedCache):
    """An HF `Cache` whose SA layers keep only sink + window keys once the routes are known.

    Phase "prefill": `update` keeps the prompt's keys as they are. `compact(...)` then moves every layer to
    its layout; phase "decode": `update` writes one token per sequence with `fluxc::cache_write` and hands
    the layer's buffers to the attention site, which the Flux pass turns into `fluxc::cache_attention`.
    """

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        self.flux_config = config
        self.write_spec = SiteSpec.for_config(config).encode()  # the ring layout the cache writes follow
        self.flux_layers: list[_Layer] = []
        self.phase = "prefill"
        self.lengths: Tensor | None = None  # (B,) int64 real keys, the current token included
        self.seen = 0  # tokens given to the model so far, padding included (HF's get_seq_length)

    def __len__(self) -> int:
        return len(self.flux_layers)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.phase == "prefill":
            while len(self.flux_layers) <= layer_idx:
                self.flux_layers.append(_Layer())
            layer = self.flux_layers[layer_idx]
            if layer.keys is not None:
                raise ConfigError("FluxCache takes one prefill call per generation (chunked prefill is not supported); "
                                  "pass the whole prompt at once")
            layer.keys, layer.values = key_states, value_states
            if layer_idx == 0:
                self.seen += key_states.shape[2]
            return key_states, value_states
        layer = self.flux_layers[layer_idx]
        assert layer.keys is not None and layer.values is not None and self.lengths is not None and layer.route is not None
        torch.ops.fluxc.cache_write(layer.keys, layer.values, key_states, value_states, self.lengths, layer.layout,
                                    self.write_spec, layer.route)
        return layer.keys, layer.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0 if self.phase == "prefill" else self.seen

    @property
    def num_layers(self) -> int:
        return len(self.flux_layers)

    def layouts(self) -> list[str]:
        """Per-layer layout names ("full", "sparse-ring", "mixed")."""
        return [LAYOUT_NAMES[layer.layout] for layer in self.flux_layers]

    def nbytes(self) -> int:
        """Bytes held by the keys and values of every layer."""
        return sum(t.numel() * t.element_size() for layer in self.flux_layers
                   for t in (layer.keys, layer.values) if t is not None)

    # --- prefill -> decode
    def allocate(self, prefill: FluxCache, layouts: tuple[int, ...], routes: Tensor, capacity: int) -> None:
        """Layers for `layouts`, shaped like `prefill`'s keys (called once per decode graph). The buffers come
        in the first `load`, a layer at a time, each once the previous prefill layer is freed."""
        cfg = self.flux_config
        ring = ring_capacity(cfg.sink, cfg.window, cfg.block, cfg.block_exact)
        self.flux_layers = []
        for i, (src, layout) in enumerate(zip(prefill.flux_layers, layouts)):
            assert src.keys is not None and src.values is not None
            batch, heads, _, dim = src.keys.shape
            layer = _Layer()
            layer.layout = layout
            layer.route = routes[:, i].clone()  # (B,) bool
            layer.shape = (batch, heads, ring if layout == RING else capacity, dim, src.values.shape[-1])
            self.flux_layers.append(layer)
        self.lengths = torch.zeros(routes.shape[0], dtype=torch.int64, device=routes.device)
        self.phase = "decode"

    def compact(self, routes: Tensor, n_real: Tensor, capacity: int) -> None:
        """In place: move this prefill cache to the layouts of `routes` (B, L) bool (one host read)."""
        cfg = self.flux_config
        host = routes.cpu()
        ring_ok = ring_supported(cfg.sink, cfg.window, cfg.block, cfg.block_exact) is None
        decoded = FluxCache(cfg)
        decoded.allocate(self, layer_layouts(host, ring_ok), routes, capacity)
        decoded.load(self, n_real, release=True)
        self.flux_layers, self.lengths, self.phase = decoded.flux_layers, decoded.lengths, "decode"

    def load(self, prefill: FluxCache, n_real: Tensor, *, release: bool = False) -> None:
        """Copy `prefill`'s keys into this cache's buffers, left-packed (padding dropped), SA layers evicted
        to their sink + window: the eviction. On the device, no host sync. `release` frees each prefill layer
        once copied, so the peak is the prompt's cache plus one layer (not plus the whole decode cache)."""
        cfg = self.flux_config
        t = prefill.flux_layers[0].keys.shape[2]  # type: ignore[union-attr]
        pad = (t - n_real)[:, None]  # (B, 1) left padding
        for src, dst in zip(prefill.flux_layers, self.flux_layers):
            assert src.keys is not None and src.values is not None
            if dst.keys is None:
                dst.materialize(src.keys)
            assert dst.keys is not None and dst.values is not None
            slots = dst.keys.shape[2]
            if dst.layout == RING:
                r, _ = ring_keys(n_real, cfg.sink, cfg.window, cfg.block, cfg.block_exact)  # (B, C)
            else:
                r = torch.arange(min(slots, t), device=n_real.device)[None, :].expand(n_real.shape[0], -1)
            src_idx = (pad + r).clamp(0, t - 1)  # (B, C') column in the padded prompt
            for s, d in ((src.keys, dst.keys), (src.values, dst.values)):
                idx = src_idx[:, None, :, None].expand(s.shape[0], s.shape[1], -1, s.shape[3])
                d[:, :, : idx.shape[2]].copy_(torch.gather(s, 2, idx))
            if release:
                src.keys = src.values = None
        assert self.lengths is not None
        self.lengths.copy_(n_real)
        self.seen = prefill.seen


def hf_generate(fm: FluxModule, *args: Any, **kwargs: Any) -> Any:
    """`transformers`' own `generate()` on a fluxc-compiled model, with a `FluxCache`.

    The cache is given as `cache=` (or `past_key_values=`, transformers' name before 5.24), or made here.
    HF drives the loop (logits processors, stopping criteria, beam-free decoding strategies); each forward
    runs fluxc's rewritten graph. After prefill the cache is compacted to the routes (SA layers evicted);
    decode steps then run a decode graph per routing mask. No CUDA graphs here (use `DecodeEngine`).
    """
    given = pop_cache_argument(kwargs)
    cache = FluxCache(fm.flux_config) if given is None else given
    if not isinstance(cache, FluxCache):
        raise ConfigError(f"cache must be a fluxc.FluxCache (or None), got {type(cache).__name__}")
    max_new = kwargs.get("max_new_tokens")
    if not isinstance(max_new, int) or max_new < 1:
        raise ConfigError(f"max_new_tokens={max_new!r}: give generate() a positive max_new_tokens (it sizes the cache)")
    keyword = check_engine_model(fm.model)
    model = fm.model
    had_own_forward = "forward" in vars(model)
    original = model.forward
    inside = {"now": False}

    def routed(*a: Any, **k: Any) -> Any:
        if inside["now"]:  # Dynamo tracing fluxc's graph reaches the model's own forward here
            return original(*a, **k)
        c = k.get(keyword)
        if isinstance(c, FluxCache) and c.phase == "prefill" and c.flux_layers:
            mask = k.get("attention_mask")
            t = c.flux_layers[0].keys.shape[2]  # type: ignore[union-attr]
            n_real = mask[:, :t].sum(dim=1) if mask is not None else torch.full(
                (c.flux_layers[0].keys.shape[0],), t, device=c.flux_layers[0].keys.device)  # type: ignore[union-attr]
            c.compact(fm.route_state.route[: n_real.shape[0]].to(torch.bool), n_real, _bucket(t + max_new))
        if isinstance(c, FluxCache) and c.phase == "decode":
            assert c.lengths is not None
            c.lengths.add_(1)  # positions stay HF's own (given, or counted from get_seq_length)
        inside["now"] = True
        try:
            out = fm(*a, **k)
        finally:
            inside["now"] = False
        if isinstance(c, FluxCache) and c.phase == "decode":
            c.seen += 1
        return out

    model.forward = routed
    try:
        return model.generate(*args, **{keyword: cache}, **kwargs)
    finally:
        if had_own_forward:
            model.forward = original
        else:
            del model.forward


def _bucket(n: int) -> int:
    # Capacity buckets of 256 tokens: nearby prompt lengths share a decode graph and its buffers.
    return -(-n // 256) * 256
