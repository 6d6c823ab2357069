"""The decode engine: routes fixed at prefill, CUDA graphs specialised per routing mask, KV eviction.

    engine = fluxc.DecodeEngine(fluxc.compile(model, router_ckpt))
    ids = engine.generate(input_ids, max_new_tokens=64)

Prefill runs the routed graph once (routers on the device, no host sync between layers). Its (B, L)
routing mask is then read once and fixes each layer's cache layout (`fluxc.ops.cache`): FA layers keep
every key, layers where every sequence is SA keep only sink + window (a ring: memory follows the
routes), layers mixing both keep everything and route per sequence. Decode steps run a graph traced
for that mask: one `fluxc::cache_attention` per layer, no router, no branch, no host sync; on CUDA it is
captured once as a CUDA graph and replayed. Graphs (and the cache they own) live in a bounded LRU.
"""

from __future__ import annotations

import collections
import inspect
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from fluxc.backend import flux_backend_of, private_forward
from fluxc.config import FluxConfig
from fluxc.errors import ConfigError, RouteError
from fluxc.hf_compat import cache_keyword, pop_cache_argument
from fluxc.ops.cache import DENSE, LAYOUT_NAMES, MIXED, RING, ring_capacity, ring_keys, ring_supported
from fluxc.spec import SiteSpec

if TYPE_CHECKING:
    from fluxc.api import FluxModule

log = logging.getLogger("fluxc")


@dataclass(frozen=True)
class SamplingConfig:
    """How a decode step picks its token (part of the graph key: sampling is inside the graph)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0; use do_sample=False for greedy decoding")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")


@dataclass(frozen=True)
class DecodeKey:
    """What a decode graph is specialised on: the routing mask (per sequence and layer, True = full
    attention), the batch, the cache capacity bucket, dtype, device and the sampler."""

    routes: tuple[tuple[bool, ...], ...]
    capacity: int
    dtype: torch.dtype
    device: str
    sampling: SamplingConfig

    @classmethod
    def of(cls, host_routes: Tensor, capacity: int, dtype: torch.dtype, device: Any,
           sampling: SamplingConfig) -> DecodeKey:
        """The key of a (B, L) bool routing mask read to the host."""
        return cls(tuple(tuple(bool(x) for x in row) for row in host_routes.tolist()), capacity, dtype, str(device),
                   sampling)

    @property
    def batch(self) -> int:
        return len(self.routes)

    def layouts(self, ring_ok: bool) -> tuple[int, ...]:
        """Cache layout of each layer (fluxc.ops.cache DENSE / RING / MIXED)."""
        per_layer = list(zip(*self.routes))
        return tuple(DENSE if all(col) else (RING if ring_ok and not any(col) else MIXED) for col in per_layer)


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


class FluxCache(Cache):
    """An HF `Cache` whose SA layers keep only sink + window keys once the routes are known.

    Phase "prefill": `update` keeps the prompt's keys as they are. `compact(...)` then moves every layer to
    its layout; phase "decode": `update` writes one token per sequence with `fluxc::cache_write` and hands
    the layer's buffers to the attention site, which the Flux pass turns into `fluxc::cache_attention`.
    """

    is_compileable = False  # HF generate must not compile the unrouted forward around this cache

    def __init__(self, config: FluxConfig) -> None:
        super().__init__(layers=[])
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

    # --- what HF's model and mask code ask of a cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        # (kv_length, kv_offset) of the mask HF builds: the prompt at prefill, the layer's buffer at decode
        # (the Flux pass replaces decode attention by `cache_attention`, which reads `lengths`, not the mask).
        # At decode HF's one mask for all layers is never read (the pass turns each site into `cache_attention`,
        # which reads `lengths`), but it must broadcast against every layer's buffer: one key wide does.
        q_len = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return (q_len, 0) if self.phase == "prefill" else (1, 0)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0 if self.phase == "prefill" else self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_initialized(self) -> bool:  # type: ignore[override]
        return bool(self.flux_layers)

    @property
    def is_sliding(self) -> list[bool]:  # type: ignore[override]
        return [False] * len(self.flux_layers)

    @property
    def is_linear(self) -> list[bool]:  # type: ignore[override]
        return [False] * len(self.flux_layers)

    @property
    def is_dummy(self) -> list[bool]:  # type: ignore[override]
        return [False] * len(self.flux_layers)

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
        key = DecodeKey.of(host, capacity, routes.dtype, routes.device, SamplingConfig())
        decoded = FluxCache(cfg)
        decoded.allocate(self, key.layouts(ring_ok), routes, capacity)
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


@dataclass
class _Entry:
    """A decode graph and what it owns: its cache, token buffer, compiled step and CUDA graph."""

    key: DecodeKey
    cache: FluxCache
    tokens: Tensor  # (B, 1) the step's input, overwritten with its output
    step_fn: Any
    graph: Any = None
    logits: Tensor | None = None  # (B, V) float32, the last step's logits
    owner: int = -1
    steps_run: int = 0

    def release(self) -> None:
        """Free the CUDA graph's memory pool and the KV buffers now: Dynamo's trace keeps the cache object in
        reference cycles, which would hold the buffers until the next garbage collection."""
        self.graph = None
        for layer in self.cache.flux_layers:
            layer.keys = layer.values = None
        self.cache.flux_layers = []


@dataclass
class GenerationState:
    """One generation between `prefill` and `decode`."""

    key: DecodeKey
    next_tokens: Tensor  # (B, 1) the token prefill picked
    route: Tensor  # (B, L) bool on the host, True = full attention
    cache: FluxCache
    prompt_len: int
    max_new_tokens: int
    ident: int = 0
    decoded: int = 1  # tokens produced so far (prefill picks the first)
    stats: dict[str, Any] = field(default_factory=dict)


class DecodeEngine:
    """Generation for an HF-style causal LM compiled with `fluxc.compile`.

    `cuda_graphs`: "auto" (on for CUDA models), True (raise if impossible) or False (the same code eagerly).
    `max_graphs`: decode graphs kept (LRU); each owns its KV buffers, evicting one frees both.
    """

    def __init__(self, model: FluxModule, *, cuda_graphs: bool | str = "auto", max_graphs: int = 8) -> None:
        if flux_backend_of(model) is None:
            raise ConfigError(f"model must be a fluxc.compile(...) result (FluxModule), got {type(model).__name__}")
        if cuda_graphs not in (True, False, "auto"):
            raise ConfigError(f"cuda_graphs={cuda_graphs!r}: use True, False or 'auto'")
        if max_graphs < 1:
            raise ConfigError(f"max_graphs={max_graphs} must be >= 1")
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.max_graphs = max_graphs
        self.entries: collections.OrderedDict[DecodeKey, _Entry] = collections.OrderedDict()
        self.stats = collections.Counter()
        self._generation = 0
        params = inspect.signature(model.model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self._cache_kw = cache_keyword(model.model)
        self._check_model()

    def _check_model(self) -> None:
        if self._cache_kw is None:
            raise ConfigError(f"{type(self.model.model).__name__}.forward takes no KV cache (neither cache= nor "
                              f"past_key_values=); the decode engine serves Hugging Face-style causal LMs")
        cfg = getattr(self.model.model, "config", None)
        text = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
        types = getattr(text, "layer_types", None) or []
        window = getattr(text, "sliding_window", None) if text is not None else None
        if any(t != "full_attention" for t in types) or (window and getattr(text, "use_sliding_window", True)):
            raise ConfigError(f"the model has native sliding-window layers (sliding_window={window}); the "
                              f"decode engine's compacted cache serves full-attention decoders; use "
                              f"fluxc.generate(..., engine=False) (HF DynamicCache path)")

    def _use_graphs(self, device: torch.device) -> bool:
        if self.cuda_graphs == "auto":
            return device.type == "cuda"
        if self.cuda_graphs and device.type != "cuda":
            raise ConfigError(f"cuda_graphs=True needs a CUDA model, got device {device}; use cuda_graphs='auto'")
        return bool(self.cuda_graphs)

    # --- prefill
    @torch.no_grad()
    def prefill(self, input_ids: Tensor, *, max_new_tokens: int, attention_mask: Tensor | None = None,
                sampling: SamplingConfig | None = None) -> GenerationState:
        """Run the prompt, fix the routes, compact the cache into the decode graph's buffers."""
        if input_ids.dim() != 2:
            raise ConfigError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
        sampling = sampling or SamplingConfig()
        batch, t = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        if mask.shape != input_ids.shape:
            raise ConfigError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        n_real = mask.sum(dim=1)  # (B,)
        if attention_mask is not None:  # one host check of the prompt layout (the prompt is an input anyway)
            packed = torch.arange(t, device=mask.device)[None, :] >= (t - n_real)[:, None]
            if not bool((packed == mask.bool()).all()) or bool((n_real == 0).any()):
                raise ConfigError("attention_mask must be left-padded (zeros before each prompt) with at least one "
                                  "real token per row; pad on the left, as HF generate expects")
        state_rows = self.model.route_state.max_batch
        if batch > state_rows:
            raise ConfigError(f"batch {batch} exceeds RouteState.max_batch={state_rows}")
        prefill_cache = FluxCache(self.model.flux_config)
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0)  # (B, T) real index of each token
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        extra[self._cache_kw] = prefill_cache
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        first = select_tokens(out.logits[:, -1, :], sampling)  # (B, 1)
        routes = self.model.route_state.route[:batch].to(torch.bool)  # (B, L) on the device, decided above
        n_layers = len(prefill_cache.flux_layers)
        if routes.shape[1] != n_layers:
            raise RouteError(f"the model has {routes.shape[1]} routed attention sites but its cache has {n_layers} "
                             f"layers; the decode engine needs one routed site per cached layer")
        host_routes = routes.cpu()  # the one host read of the routing mask: it picks the decode graph
        capacity = _bucket(t + max_new_tokens)
        kv_dtype = prefill_cache.flux_layers[0].keys.dtype  # type: ignore[union-attr]
        key = DecodeKey.of(host_routes, capacity, kv_dtype, input_ids.device, sampling)
        entry = self._entry(key, prefill_cache, routes)
        entry.cache.load(prefill_cache, n_real, release=True)  # frees each prompt layer once copied
        entry.tokens.copy_(first)
        self._generation += 1
        entry.owner = self._generation
        del prefill_cache, out
        return GenerationState(key, first, host_routes, entry.cache, t, max_new_tokens, ident=self._generation)

    def _entry(self, key: DecodeKey, prefill_cache: FluxCache, routes: Tensor) -> _Entry:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.stats["graph_hits"] += 1
            return entry
        cfg = self.model.flux_config
        ring_why = ring_supported(cfg.sink, cfg.window, cfg.block, cfg.block_exact)
        if ring_why is not None and any(not any(col) for col in zip(*key.routes)):
            log.info("fluxc: SA layers keep their whole cache (no eviction): %s", ring_why)
        layouts = key.layouts(ring_why is None)
        while len(self.entries) >= self.max_graphs:  # evict first: the old buffers go before new ones exist
            _, old = self.entries.popitem(last=False)
            old.release()
            self.stats["graphs_evicted"] += 1
        cache = FluxCache(cfg)
        cache.allocate(prefill_cache, layouts, routes, key.capacity)  # buffers come in `load`
        tokens = torch.zeros((key.batch, 1), dtype=torch.long, device=routes.device)
        compiled = torch.compile(private_forward(self.model.model), backend=self.model._backend, fullgraph=True)
        entry = _Entry(key, cache, tokens, compiled)
        self.entries[key] = entry
        self.stats["graphs_built"] += 1
        return entry

    def clear(self) -> None:
        """Drop every decode graph and the KV buffers it owns (states from earlier prefills become stale)."""
        for entry in self.entries.values():
            entry.release()
        self.entries.clear()

    # --- decode
    def _step(self, entry: _Entry) -> None:
        cache = entry.cache
        assert cache.lengths is not None
        cache.lengths.add_(1)
        positions = (cache.lengths - 1).view(-1, 1)  # (B, 1)
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        extra[self._cache_kw] = cache
        try:
            out = entry.step_fn(input_ids=entry.tokens, position_ids=positions, use_cache=True, **extra)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            inner = getattr(exc, "inner_exception", None)
            if isinstance(inner, Exception) and type(inner).__module__.startswith("fluxc"):
                raise inner.with_traceback(None) from None
            raise
        logits = out.logits[:, -1, :]  # (B, V)
        if entry.logits is None:  # allocated by the first (warm-up) step, before any capture
            entry.logits = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        entry.logits.copy_(logits)
        entry.tokens.copy_(select_tokens(logits, entry.key.sampling))
        cache.seen += 1

    def _capture(self, entry: _Entry) -> None:
        cache = entry.cache
        assert cache.lengths is not None
        saved = cache.lengths.clone(), entry.tokens.clone(), cache.seen
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (traces, compiles, autotunes) off the capture
            self._step(entry)  # writes the slot the first real step rewrites; state restored below
        torch.cuda.current_stream().wait_stream(stream)
        cache.lengths.copy_(saved[0])
        entry.tokens.copy_(saved[1])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(entry)
        cache.lengths.copy_(saved[0])
        entry.tokens.copy_(saved[1])
        cache.seen = saved[2]
        entry.graph = graph
        self.stats["graphs_captured"] += 1

    @torch.no_grad()
    def decode(self, state: GenerationState, steps: int, *, logits: list[Tensor] | None = None) -> Tensor:
        """`steps` tokens per sequence after prefill's, (B, steps) on the device (no host sync inside).
        With a `logits` list, each step's (B, V) float32 logits are appended to it (copies)."""
        entry = self.entries.get(state.key)
        if entry is None or entry.owner != state.ident:
            raise ConfigError("this GenerationState's cache was reused by a later prefill or evicted from the graph "
                              "cache; decode each state before the next prefill (or raise max_graphs)")
        if state.decoded + steps > state.max_new_tokens:
            raise ConfigError(f"decoding {steps} more tokens after {state.decoded} exceeds max_new_tokens="
                              f"{state.max_new_tokens} given to prefill (the cache is sized for it)")
        out = torch.empty((state.key.batch, steps), dtype=torch.long, device=entry.tokens.device)
        graphs = self._use_graphs(entry.tokens.device)
        if graphs and entry.graph is None:
            self._capture(entry)
        for i in range(steps):
            if graphs:
                entry.graph.replay()
                entry.cache.seen += 1
                self.stats["replays"] += 1
            else:
                self._step(entry)
                self.stats["eager_steps"] += 1
            out[:, i : i + 1].copy_(entry.tokens)
            state.decoded += 1
            if logits is not None:
                assert entry.logits is not None
                logits.append(entry.logits.clone())
        return out

    def generate(self, input_ids: Tensor, max_new_tokens: int, *, attention_mask: Tensor | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | None = None, check_every: int = 32) -> Tensor:
        """(B, T + new) token ids: prefill, then decode steps on the mask's graph. With `eos_token_id`, a host
        check every `check_every` steps stops once every sequence is done; tokens after EOS are EOS."""
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
        state = self.prefill(input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                             sampling=sampling)
        pieces = [state.next_tokens]
        left = max_new_tokens - 1
        while left > 0:
            n = min(left, check_every) if eos_token_id is not None else left
            pieces.append(self.decode(state, n))
            left -= n
            if eos_token_id is not None and bool((torch.cat(pieces, 1) == eos_token_id).any(1).all()):
                break
        new = torch.cat(pieces, dim=1)  # (B, new)
        if eos_token_id is not None:
            after = (new == eos_token_id).cumsum(dim=1) - (new == eos_token_id).long() > 0
            new = new.masked_fill(after, eos_token_id)
        return torch.cat([input_ids, new], dim=1)


def hf_generate(fm: FluxModule, *args: Any, **kwargs: Any) -> Any:
    """`transformers`' own `generate()` on a fluxc-compiled model, with a `FluxCache`.

    The cache is given as `cache=` (or `past_key_values=`, transformers' name before 5.24), or made here.
    HF drives the loop (logits processors, stopping criteria, beam-free decoding strategies); each forward
    runs fluxc's rewritten graph. After prefill the cache is compacted to the routes (SA layers evicted);
    decode steps then run the decode graph of that routing mask. No CUDA graphs here (use `DecodeEngine`).
    """
    given = pop_cache_argument(kwargs)
    cache = FluxCache(fm.flux_config) if given is None else given
    if not isinstance(cache, FluxCache):
        raise ConfigError(f"cache must be a fluxc.FluxCache (or None), got {type(cache).__name__}")
    max_new = kwargs.get("max_new_tokens")
    if not isinstance(max_new, int) or max_new < 1:
        raise ConfigError(f"max_new_tokens={max_new!r}: give generate() a positive max_new_tokens (it sizes the cache)")
    engine = DecodeEngine(fm, cuda_graphs=False)  # the same model checks as the engine
    keyword = engine._cache_kw
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


def select_tokens(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """(B, 1) next tokens from (B, V) logits: argmax, or a sample with temperature / top-k / top-p
    (Gumbel-max with the default generator: safe inside CUDA-graph capture)."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    scores = logits.float() / sampling.temperature  # (B, V)
    if sampling.top_k > 0:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > sampling.top_p  # keep the smallest prefix reaching top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    gumbel = -torch.log(-torch.log(torch.rand_like(scores).clamp_(1e-20, 1.0)))
    return (scores + gumbel).argmax(dim=-1, keepdim=True)
