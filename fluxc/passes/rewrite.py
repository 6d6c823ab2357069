"""The Flux rewrite: one router node per layer and one routed-attention op per attention site.

Per routable site, the rewrite inserts (before the site):
  positions = fluxc::positions(q, k, mask, is_causal)            # once per distinct mask; a causal + padding
                                                                 # mask read as structure: causal_positions
  route     = forced constant | (logit_full - logit_sparse of fluxc::router_logits(q_pre_rope, valid, W_l))
              > state.full_bias (the operating point; 0 = argmax) for sequences
              whose step starts at their first token; later steps reuse the route stored at prefill
  out       = fluxc::routed_attention(q, k, v, mask, route, qpos, key_start, spec)  (a SiteSpec's text)
and replaces every use of the site's output with `out`. After the last site, one
  fluxc::record_routes(state, counter, [route_l], [l], [undecided_l])  # keeps the decisions with the model

A site with the model's own sliding window no wider than the sparse branch's window (a local layer: Gemma 3's
512 keys against SA's 2048) is rewritten with the route fixed to its own attention and gets no router: the sparse
branch would not change it, so only the global layers are routed. A wider native window stays routed.
"""

from __future__ import annotations

import collections
import logging
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

import fluxc.ops  # noqa: F401  (registers torch.ops.fluxc.*)
from fluxc.config import FluxConfig
from fluxc.errors import ConfigError, RouteError
from fluxc.ops.dispatch import interpreting
from fluxc.ops.router import ROUTER_PARAM_NAMES, gumbel_route, record_sample, router_valid
from fluxc.passes.flex import flex_positions, routed_score_mod
from fluxc.passes.graph import layer_number, meta_value, module_path, shape_of
from fluxc.passes.masks import native_window, read_causal_key_mask
from fluxc.passes.query import ContentAnalysis, QueryInput, locate_query
from fluxc.passes.sites import SiteMatch, find_sites
from fluxc.patterns import window_reach
from fluxc.spec import SiteSpec

log = logging.getLogger("fluxc")

#: Rewrite counters, read by tests (Inductor's `counters` idiom). Reset with `counters.clear()`.
counters: collections.Counter[str] = collections.Counter()

STATE_UNSET = -1


class RouteState(nn.Module):
    """Per-sequence, per-layer decisions of the last prefill: int8 (max_batch, layers), 1 full, 0 sparse,
    -1 unset. Decode steps read it, so decisions taken at prefill are reused (no host sync)."""

    def __init__(self, max_batch: int = 256) -> None:
        super().__init__()
        self.max_batch = max_batch
        self.register_buffer("route", torch.full((max_batch, 0), STATE_UNSET, dtype=torch.int8), persistent=False)
        # sequences whose router gave NaN / inf logits (routed full instead: never a silent wrong route)
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.int64), persistent=False)
        # the operating point: a layer runs full attention when logit_full - logit_sparse > full_bias
        self.register_buffer("full_bias", torch.zeros((), dtype=torch.float32), persistent=False)
        # per sequence and layer, the last prefill's logit_full - logit_sparse - full_bias (NaN: no router decided)
        self.register_buffer("margin", torch.full((max_batch, 0), math.nan), persistent=False)
        self.threshold = 0.5

    def ensure(self, num_layers: int, device: torch.device) -> None:
        if self.route.shape[1] != num_layers or self.route.device != device:
            self.route = torch.full((self.max_batch, num_layers), STATE_UNSET, dtype=torch.int8, device=device)
            self.margin = torch.full((self.max_batch, num_layers), math.nan, device=device)
            self.nonfinite = self.nonfinite.to(device)
            self.full_bias = self.full_bias.to(device)

    def set_threshold(self, threshold: float) -> None:
        """Route a layer to full attention when the router's probability of full exceeds `threshold` (0.5: the
        router's own argmax). Written in place: compiled graphs read this tensor, so nothing recompiles."""
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ConfigError(f"threshold={threshold!r} must be a number strictly between 0 and 1 (the router's "
                              f"probability of full attention above which a layer runs full; 0.5 is its argmax); "
                              f"to force routes use route='full' / 'sparse'")
        self.threshold = float(threshold)
        self.full_bias.fill_(math.log(threshold / (1.0 - threshold)))

    def last(self) -> torch.Tensor:
        """bool (batch, layers) of the last prefill (True = full attention)."""
        return self.route[self._last_rows()] == 1

    def last_margins(self) -> torch.Tensor:
        """float32 (batch, layers) of the last prefill: each router's logit_full - logit_sparse over the operating
        point (> 0 ran full attention; near 0 a near-tied decision); NaN where no router decided (forced routes,
        the model's own local layers)."""
        return self.margin[self._last_rows()]

    def _last_rows(self) -> torch.Tensor:
        if not self.route.shape[1]:
            return self.route.new_zeros(0, dtype=torch.bool)
        return (self.route != STATE_UNSET).all(dim=1)


@dataclass(frozen=True)
class SiteInfo:
    """One attention site as `fluxc.sites` reports it."""

    layer: int
    module: str
    kind: str
    q_heads: int
    kv_heads: int
    head_dim: int
    scale: float
    mask: str
    softcap: float
    routable: bool
    reason: str | None
    kept: tuple[str, ...]
    router_input: str | None
    router_reason: str | None = None
    local_window: int = 0  # the model's own sliding window (keys): a local layer, not routed; 0: a global layer

    @property
    def routed(self) -> bool:
        """Whether a router decides this site's branch (routable and not one of the model's local layers)."""
        return self.routable and not self.local_window

    def __str__(self) -> str:
        if self.local_window:
            status = f"local (own window of {self.local_window} keys), not routed"
        else:
            status = "routed" if self.routable else f"kept as-is: {self.reason}"
        return (f"layer {self.layer:>3} {self.module or '?':<28} {self.kind:<10} q{self.q_heads}/kv{self.kv_heads} "
                f"d{self.head_dim} scale {self.scale:.4g} mask {self.mask:<9} {status}")


@dataclass
class PassOptions:
    config: FluxConfig
    route: tuple[bool, ...] | None  # forced per-layer route (True = full), or None: use routers
    routers: nn.ModuleList | None
    state: RouteState
    recorder: nn.Module | None = None  # training mode: both branches, mixed by a Gumbel sample
    # read materialised causal + padding masks as structure (`fluxc.passes.masks`): None = where kernels can run
    # (a CUDA graph whose impl is not "reference"); True/False force it (tests; export keeps the mask)
    structural_masks: bool | None = None


@dataclass
class PassResult:
    sites: list[SiteInfo] = field(default_factory=list)
    prefill: bool = True


def _mask_kind(site: SiteMatch) -> str:
    if site.kind == "flex":
        return "block_mask"
    if site.mask is None:
        return "causal" if site.is_causal else "none"
    value = meta_value(site.mask)
    if site.mask_is_disallow:
        return "fill"
    return "bool" if value is not None and value.dtype == torch.bool else "additive"


def analyse(graph: fx.Graph, config: FluxConfig) -> tuple[list[SiteMatch], list[SiteInfo], list[QueryInput | None]]:
    """Find the sites of a graph and their router inputs, without changing the graph. `config`'s SA window decides
    which native-window sites are local (not routed)."""
    reach = window_reach(config.window, config.block, config.block_exact)
    matches = find_sites(graph)
    content = ContentAnalysis(graph)
    infos: list[SiteInfo] = []
    queries: list[QueryInput | None] = []
    paths = [module_path(m.anchor) for m in matches]
    numbers = [layer_number(p) for p in paths]
    use_numbers = None not in numbers and len(set(numbers)) == len(numbers)
    for ordinal, (match, path) in enumerate(zip(matches, paths)):
        q_shape, k_shape = shape_of(match.q), shape_of(match.k)
        if match.layout == "bthd":
            q_heads, kv_heads, head_dim = q_shape[2], k_shape[2], q_shape[3]
        else:
            q_heads, kv_heads, head_dim = q_shape[1], k_shape[1], q_shape[3]
        if match.kind in ("sdpa", "eager") and match.mask is not None and not match.mask_is_disallow \
                and not match.native_window:
            match.native_window = native_window(match.mask, q_shape[2], k_shape[2])
            if match.native_window:
                match.kept.append(f"native window {match.native_window}")
        local = match.routable and 0 < match.native_window <= reach
        query: QueryInput | None = None
        router_reason = None
        if match.routable and not local:
            found = locate_query(match.q, content, q_heads, head_dim)
            if isinstance(found, str):
                router_reason = found  # forced routes still work; routing by a router does not
            else:
                query = found
        queries.append(query)
        infos.append(SiteInfo(
            layer=numbers[ordinal] if use_numbers else ordinal, module=path, kind=match.kind, q_heads=q_heads,
            kv_heads=kv_heads, head_dim=head_dim, scale=match.scale, mask=_mask_kind(match), softcap=match.softcap,
            routable=match.routable, reason=match.reason, kept=tuple(match.kept),
            router_input=None if query is None else query.node.name, router_reason=router_reason,
            local_window=match.native_window if local else 0))
    return matches, infos, queries


def router_layers(infos: list[SiteInfo]) -> list[int]:
    """Site ordinals that have a router, in order: router j routes site `router_layers(infos)[j]`."""
    return [i for i, info in enumerate(infos) if info.routed]


def check_route(route: tuple[bool, ...] | None, infos: list[SiteInfo], use_routers: bool) -> None:
    """Raise `RouteError` when a route asks for something the sites cannot do."""
    if route is not None and len(route) != len(infos):
        raise RouteError(f"route has {len(route)} entries but the model has {len(infos)} attention sites; "
                         f"give one 'full'/'sparse' per layer, or 'full'/'sparse' for all")
    for i, info in enumerate(infos):
        if info.routed and use_routers and info.router_input is None:
            raise RouteError(f"layer {info.layer} ({info.module}): the router input (pre-RoPE query) was not found "
                             f"({info.router_reason}); route this model with route='full'/'sparse'/per-layer")
        if info.routable:
            continue
        if route is None and use_routers:
            raise RouteError(f"layer {info.layer} ({info.module}) cannot be routed ({info.reason}) but the router "
                             f"checkpoint routes it; pass route='full' or a per-layer route with 'full' there")
        if route is not None and not route[i]:
            raise RouteError(f"route[{i}]='sparse' asks to route layer {info.layer} ({info.module}), which is kept "
                             f"as-is: {info.reason}; use 'full' for that layer")


@dataclass
class RouteRecords:
    """The routes a forward decides, recorded by one `fluxc::record_routes` after the last site (one op per
    forward: a per-layer op costs host launches, and a prefill is host-bound)."""

    routes: list[fx.Node] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    undecided: list[fx.Node] = field(default_factory=list)  # (B,) bool: router logits not finite
    # per router-routed layer: (layer, (B,) float margin over the operating point, (B,) bool this step is a prefill)
    margins: list[tuple[int, fx.Node, fx.Node]] = field(default_factory=list)

    def add(self, route: fx.Node, layer: int) -> None:
        self.routes.append(route)
        self.layers.append(layer)

    def emit(self, graph: fx.Graph) -> None:
        if not self.routes:
            return
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        with graph.inserting_before(output):
            graph.call_function(torch.ops.fluxc.record_routes.default,
                                (graph.get_attr("flux_state.route"), graph.get_attr("flux_state.nonfinite"),
                                 list(self.routes), list(self.layers), list(self.undecided)))
            if self.margins:
                layers, margins, starts = zip(*self.margins)
                graph.call_function(torch.ops.fluxc.record_margins.default,
                                    (graph.get_attr("flux_state.margin"), list(margins), list(starts), list(layers)))


def flux_pass(gm: fx.GraphModule, options: PassOptions) -> PassResult:
    """Rewrite `gm` in place. Returns the sites found (routed and kept)."""
    graph = gm.graph
    matches, infos, queries = analyse(graph, options.config)
    counters["graphs"] += 1
    counters["sites_found"] += len(matches)
    if not matches:
        return PassResult([], True)
    cache_writes = _cache_writes(graph)
    if cache_writes and all(m.k in cache_writes for m in matches):
        # A decode step over the engine's compacted cache: routes were fixed at prefill and travel with the
        # cache writes, so there is nothing to route or check here (and the site's own mask is not used).
        for match, write in zip(matches, [cache_writes.pop(m.k) for m in matches]):
            _rewrite_cache_site(graph, match, write, options.config)
            counters["sites_rewritten"] += 1
            counters["rewrite_cache_decode"] += 1
        graph.lint()
        gm.recompile()
        return PassResult(infos, False)
    views = _paged_views(graph)
    if views and all(m.k in views and m.v in views for m in matches):
        # A decode step over the paged cache: routes, tables and lengths are device data of the step, so one
        # graph serves every routing mask (nothing to route or check here; the site's mask is not used).
        for match in matches:
            _rewrite_paged_site(graph, match, views[match.k], views[match.v], options.config)
            counters["sites_rewritten"] += 1
            counters["rewrite_paged_decode"] += 1
        graph.lint()
        gm.recompile()
        return PassResult(infos, False)
    use_routers = options.route is None
    check_route(options.route, infos, use_routers)
    if use_routers:
        if options.routers is None:
            raise ConfigError("route=None asks for routers but no router checkpoint was given; pass router_ckpt "
                              "or a route ('full', 'sparse', or one per layer)")
    routed = router_layers(infos)
    if use_routers:
        if len(options.routers) != len(routed):
            local = len(matches) - len(routed)
            raise ConfigError(f"the router checkpoint has {len(options.routers)} layer routers but the model has "
                              f"{len(routed)} routed attention sites" + (f" ({local} more are the model's own local "
                                                                        f"layers, which are not routed)" if local else ""))
        for info, router in zip([infos[i] for i in routed], options.routers):
            if router.head_dim != info.head_dim:
                raise ConfigError(f"layer {info.layer}: router input dim {router.head_dim} != head dim {info.head_dim}")
    device = meta_value(matches[0].q).device
    batch = shape_of(matches[0].q)[0]
    if isinstance(batch, int) and batch > options.state.max_batch:
        raise ConfigError(f"batch size {batch} exceeds RouteState.max_batch={options.state.max_batch}; "
                          f"build the module with a larger max_batch")
    options.state.ensure(len(matches), device)
    if "flux_state" not in dict(gm.named_children()):
        gm.add_module("flux_state", options.state)
    if use_routers and "flux_routers" not in dict(gm.named_children()):
        gm.add_module("flux_routers", options.routers)
    if options.recorder is not None:
        if not use_routers:
            raise ConfigError("training mode needs routers (route=None); a forced route has nothing to train")
        unsupported = [i.layer for i, m in zip(infos, matches) if m.kind == "flex" and m.routable]
        if unsupported:
            raise ConfigError(f"training on FlexAttention sites is not supported yet (layers {unsupported})")
        gm.add_module("flux_recorder", options.recorder)
    _register_sources(gm)
    cfg = options.config
    prefill = True
    positions_memo: dict[tuple, tuple[fx.Node, ...]] = {}
    # the Triton interpreter runs the kernels on CPU tensors (tests of the production path)
    kernels_possible = cfg.impl != "reference" and (device.type == "cuda" or (cfg.impl == "triton" and interpreting()))
    structural = kernels_possible if options.structural_masks is None else options.structural_masks
    router_of = {layer: j for j, layer in enumerate(routed)}
    records = RouteRecords()
    for layer, (match, _info, query) in enumerate(zip(matches, infos, queries)):
        if not match.routable:
            counters["sites_kept"] += 1
            continue
        q_len = shape_of(match.q)[1 if match.layout == "bthd" else 2]
        site_prefill = not (isinstance(q_len, int) and q_len == 1)
        prefill = prefill and site_prefill
        router = router_of.get(layer)  # None: a local layer (its own attention, no router)
        if match.kind == "flex":
            _rewrite_flex(graph, gm, options, layer, router, match, query, site_prefill, records)
            counters["sites_rewritten"] += 1
            counters["rewrite_flex"] += 1
            counters["routers_inserted"] += int(use_routers and router is not None)
            continue
        with graph.inserting_before(match.anchor):
            q, k, v = match.q, match.k, match.v
            if match.layout == "bthd":  # flash-attn (B, T, H, D) -> (B, H, T, D)
                q, k, v = (graph.call_function(torch.transpose, (t, 1, 2)) for t in (q, k, v))
            mask, is_causal = match.mask, match.is_causal
            structure = None
            if structural and mask is not None and match.kind == "sdpa":  # SDPA masks are "may attend" bool/additive
                structure = read_causal_key_mask(mask, shape_of(q)[2], shape_of(k)[2])
            if structure is not None:
                # the (Tq, Tk) mask is never built: positions from its index vectors, a (B, 1, 1, Tk) key mask
                key = ("structure", match.mask)
                if key not in positions_memo:
                    # the AND of the per-key factors as one optional tensor (None: no factor)
                    keys_allowed = None
                    for factor in structure.key_factors:
                        keys_allowed = factor if keys_allowed is None else graph.call_function(
                            operator.and_, (keys_allowed, factor))
                    pos = graph.call_function(torch.ops.fluxc.causal_positions.default,
                                              (q, k, structure.q_index, structure.k_index, keys_allowed,
                                               kernels_possible))
                    positions_memo[key] = tuple(graph.call_function(operator.getitem, (pos, i)) for i in range(4))
                    counters["structural_masks"] += 1
                qpos, valid, key_start, mask = positions_memo[key]
                is_causal = True
            else:
                if mask is not None and match.mask_is_disallow:
                    mask = graph.call_function(torch.logical_not, (mask,))
                # one positions node per distinct mask, shared by all layers; mask-free sites share one per
                # causal form and (B, Tq, Tk) (sizes as text: comparing SymInts would add guards)
                if mask is not None:
                    key = (match.mask, match.mask_is_disallow)
                else:
                    q_shape, k_shape = shape_of(match.q), shape_of(match.k)
                    seq = 1 if match.layout == "bthd" else 2
                    key = ("maskless", match.is_causal, match.bottom_right, match.native_window,
                           *(str(s) for s in (q_shape[0], q_shape[seq], k_shape[seq]))) \
                        if q_shape is not None and k_shape is not None else (match.q, match.k)
                if key not in positions_memo:
                    pos = graph.call_function(torch.ops.fluxc.positions.default,
                                              (q, k, mask, match.is_causal, match.bottom_right, match.native_window))
                    positions_memo[key] = tuple(graph.call_function(operator.getitem, (pos, i)) for i in range(3))
                qpos, valid, key_start = positions_memo[key]
            spec = SiteSpec.for_config(cfg, is_causal=is_causal, scale=match.scale, softcap=match.softcap,
                                       math=match.math, softmax_fp32=match.softmax_fp32,
                                       bottom_right=match.bottom_right, native_window=match.native_window).encode()
            if options.recorder is None or router is None:
                route = _route_node(graph, options, layer, router, query, valid, qpos, key_start, q, records)
                records.add(route, layer)
                out = graph.call_function(torch.ops.fluxc.routed_attention.default,
                                          (q, k, v, mask, route, qpos, key_start, spec))
            else:
                out = _mixed_branches(graph, options, layer, router, query, valid, q, k, v, mask, qpos, key_start,
                                      spec, records)
            if match.layout == "bthd":
                out = graph.call_function(torch.transpose, (out, 1, 2))
        _replace_site(match.anchor, out)
        _erase_dead_site(graph, match.anchor)
        counters["sites_rewritten"] += 1
        counters[f"rewrite_{match.kind}"] += 1
        if use_routers and router is not None:
            counters["routers_inserted"] += 1
    if cache_writes:
        layers = sorted({int(w.args[5]) for w in cache_writes.values()})
        raise RouteError(f"{len(cache_writes)} fluxc cache writes (layouts {layers}) feed no attention site the pass "
                         f"could route; the decode engine needs every attention site of the model routed")
    records.emit(graph)
    graph.lint()
    gm.recompile()
    return PassResult(infos, prefill)


def _cache_writes(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Key store -> its `fluxc::cache_write` node (the decode engine's compacted cache)."""
    return {node.args[0]: node for node in graph.nodes
            if node.op == "call_function"
            and node.target in (torch.ops.fluxc.cache_write, torch.ops.fluxc.cache_write.default)}


def _rewrite_cache_site(graph: fx.Graph, match: SiteMatch, write: fx.Node, cfg: FluxConfig) -> None:
    """A decode site over the engine's compacted cache: one `cache_attention` on the layout fixed at prefill
    (no positions, no router, no branch: the routes are baked into the layout and the stored route)."""
    k_store, v_store, _k_new, _v_new, lengths, layout, write_spec, route = write.args
    if match.v is not v_store or match.layout != "bhtd" or match.kind not in ("sdpa", "eager"):
        raise RouteError(f"attention site {match.anchor.name} ({match.kind}) reads the fluxc cache in a form the "
                         f"decode engine does not support; use fluxc.generate(..., engine=False)")
    with graph.inserting_before(match.anchor):
        spec = SiteSpec.decode(write_spec).replace(scale=match.scale, softcap=match.softcap, math=match.math,
                                                   softmax_fp32=match.softmax_fp32, impl=cfg.impl)
        out = graph.call_function(torch.ops.fluxc.cache_attention.default,
                                  (match.q, k_store, v_store, lengths, route, layout, spec.encode()))
    _replace_site(match.anchor, out)
    _erase_dead_site(graph, match.anchor)


def _paged_views(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """The `fluxc::paged_view` nodes of a decode step over the paged cache (each is its own key)."""
    return {node: node for node in graph.nodes
            if node.op == "call_function"
            and node.target in (torch.ops.fluxc.paged_view, torch.ops.fluxc.paged_view.default)}


def _rewrite_paged_site(graph: fx.Graph, match: SiteMatch, k_view: fx.Node, v_view: fx.Node, cfg: FluxConfig) -> None:
    """A decode site over the paged cache: one `paged_attention`, which reads the routes on the device."""
    k_pages, table, lengths, route, view_spec = k_view.args
    v_pages, *v_rest = v_view.args
    if v_rest != [table, lengths, route, view_spec] or match.layout != "bhtd" or match.kind not in ("sdpa", "eager"):
        raise RouteError(f"attention site {match.anchor.name} ({match.kind}) reads the paged cache in a form the "
                         f"decode engine does not support; use fluxc.generate(..., engine=False)")
    with graph.inserting_before(match.anchor):
        spec = SiteSpec.decode(view_spec).replace(scale=match.scale, softcap=match.softcap, math=match.math,
                                                  softmax_fp32=match.softmax_fp32, impl=cfg.impl)
        out = graph.call_function(torch.ops.fluxc.paged_attention.default,
                                  (match.q, k_pages, v_pages, table, lengths, route, spec.encode()))
    _replace_site(match.anchor, out)
    _erase_dead_site(graph, match.anchor)


def _rewrite_flex(graph: fx.Graph, gm: fx.GraphModule, options: PassOptions, layer: int, router: int | None,
                  match: SiteMatch, query: QueryInput | None, prefill: bool, records: RouteRecords) -> None:
    """Route a FlexAttention site in place: positions from its mask_mod, a routed score_mod."""
    node = match.anchor
    args = list(node.args)
    score_attr, block_mask = args[3], args[4]
    score_buffers, mask_buffers = tuple(args[7]), tuple(args[8])
    mask_mod = block_mask[-1]
    with graph.inserting_before(node):
        pos = graph.call_function(flex_positions, (mask_mod, match.q, match.k, *mask_buffers))
        qpos, valid, key_start, last = (graph.call_function(operator.getitem, (pos, i)) for i in range(4))
        route = _route_node(graph, options, layer, router, query, valid, qpos, key_start, match.q, records)
        records.add(route, layer)
        name = f"flux_score_mod_{layer}"
        gm.add_submodule(name, routed_score_mod(getattr(gm, score_attr.target), len(score_buffers), options.config,
                                                prefill))
        args[3] = graph.get_attr(name)
    with graph.inserting_before(node):
        routed = [graph.call_function(torch.ops.fluxc.materialize.default, (t,)) for t in (route, qpos, key_start, last)]
    args[7] = (*score_buffers, *routed)
    node.args = tuple(args)


def _mixed_branches(graph: fx.Graph, options: PassOptions, layer: int, router: int, query: QueryInput | None,
                    valid: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, mask: fx.Node | None, qpos: fx.Node,
                    key_start: fx.Node, spec: str, records: RouteRecords) -> fx.Node:
    """Training mode: out = z * FA + (1 - z) * SA with z a straight-through Gumbel sample per sequence (site
    `layer`, router `router`: the recorder and the Gumbel draws are indexed by router)."""
    # the routers pool the prompt only, as they do at inference (the recorder holds the batch's prompt tokens)
    router_tokens = graph.call_function(router_valid, (graph.get_attr("flux_recorder"), valid))
    logits = _router_logits_node(graph, options, router, query, router_tokens)
    sample = graph.call_function(gumbel_route, (logits, graph.get_attr("flux_recorder.tau"),
                                                graph.get_attr("flux_recorder"), router))  # (B,)
    sample = graph.call_function(record_sample, (graph.get_attr("flux_recorder"), router, sample, logits))
    records.add(graph.call_function(operator.gt, (sample, 0.5)), layer)
    first_valid = graph.call_function(operator.getitem, (valid, (slice(None), 0)))
    full = graph.call_function(torch.full_like, (first_valid, True))
    sparse = graph.call_function(torch.full_like, (first_valid, False))
    fa = graph.call_function(torch.ops.fluxc.routed_attention.default, (q, k, v, mask, full, qpos, key_start, spec))
    sa = graph.call_function(torch.ops.fluxc.routed_attention.default, (q, k, v, mask, sparse, qpos, key_start, spec))
    weight = graph.call_method("view", (graph.call_method("type_as", (sample, fa)), -1, 1, 1, 1))  # (B, 1, 1, 1)
    return graph.call_function(operator.add, (sa, graph.call_function(operator.mul, (weight, graph.call_function(operator.sub, (fa, sa))))))


def _router_logits_node(graph: fx.Graph, options: PassOptions, router: int, query: QueryInput | None,
                        valid: fx.Node) -> fx.Node:
    assert query is not None  # checked in check_route
    x = graph.call_function(torch.permute, (query.node, query.permutation))
    if query.merged_heads:
        x = graph.call_function(torch.unflatten, (x, -1, (-1, options.routers[router].head_dim)))  # (B, T, H, D)
    weights = [graph.get_attr(f"flux_routers.{router}.{name}") for name in ROUTER_PARAM_NAMES]
    return graph.call_function(torch.ops.fluxc.router_logits.default, (x, valid, weights, options.config.pool_size))


def _replace_site(anchor: fx.Node, out: fx.Node) -> None:
    """Every use of the site's output reads `out`, which takes the site's example value (same shape and dtype):
    Dynamo's method calls on it keep a traced receiver, which AOTAutograd's cache requires."""
    if "example_value" in anchor.meta:
        out.meta.setdefault("example_value", anchor.meta["example_value"])
    anchor.replace_all_uses_with(out)


def _erase_dead_site(graph: fx.Graph, anchor: fx.Node) -> None:
    # Only the replaced site's own dead nodes go: a global DCE would also drop side-effecting calls that
    # FX does not mark impure (e.g. functorch's vmap nesting calls around FlexAttention mask creation).
    work = [anchor]
    while work:
        node = work.pop()
        if node.users or node.op not in ("call_function", "call_method") or node.is_impure():
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        work.extend(inputs)


def _register_sources(gm: fx.GraphModule) -> None:
    # aot_autograd lifts a Dynamo graph's parameters and buffers as inputs and needs a source for each:
    # give the router weights and the route state one, so Inductor passes the live tensors every call.
    table = getattr(gm, "_param_name_to_source", None)
    if table is None:
        return
    from torch._dynamo.source import ConstantSource

    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name.startswith(("flux_state.", "flux_routers.")) and name not in table:
            table[name] = ConstantSource(f"fluxc__{name.replace('.', '__')}")


def _route_node(graph: fx.Graph, options: PassOptions, layer: int, router: int | None, query: QueryInput | None,
                valid: fx.Node, qpos: fx.Node, key_start: fx.Node, q: fx.Node, records: RouteRecords) -> fx.Node:
    """bool (B,) route of site `layer` (True = full attention), decided by router `router`; a local layer
    (`router` None) always runs its own attention, the full branch under its native window.

    With routers: a sequence whose first real query is its first token (a prefill) is routed by the router;
    any later step (decode, a further prefill chunk) reuses the decision stored at its prefill. Chosen per
    sequence on the device, so no host sync and no retrace when a batch mixes both.
    """
    if options.route is not None or router is None:
        first_valid = graph.call_function(operator.getitem, (valid, (slice(None), 0)))  # (B,)
        full = router is None or bool(options.route[layer])
        return graph.call_function(torch.full_like, (first_valid, full))
    logits = _router_logits_node(graph, options, router, query, valid)
    finite = graph.call_function(torch.all, (graph.call_function(torch.isfinite, (logits,)), -1))  # (B,)
    margin = graph.call_function(operator.sub, (graph.call_function(operator.getitem, (logits, (slice(None), 1))),
                                                graph.call_function(operator.getitem, (logits, (slice(None), 0)))))
    # full when the margin beats the operating point (bias 0: the argmax); a router that cannot decide (NaN /
    # inf logits) routes full, counted: never a silent wrong sparse route
    chosen = graph.call_function(operator.gt, (margin, graph.get_attr("flux_state.full_bias")))  # (B,)
    routed = graph.call_function(operator.or_, (chosen, graph.call_function(operator.invert, (finite,))))
    first_pos = graph.call_function(torch.amin, (graph.call_function(torch.where, (valid, qpos, 2**62)), 1))  # (B,)
    starts = graph.call_function(operator.eq, (first_pos, key_start))  # (B,) this step begins the sequence
    records.undecided.append(graph.call_function(operator.and_, (graph.call_function(operator.invert, (finite,)),
                                                                  starts)))
    over = graph.call_function(operator.sub, (margin, graph.get_attr("flux_state.full_bias")))  # (B,) > 0: full
    records.margins.append((layer, over, starts))
    # the batch from the positions (computed once per graph), not from this layer's queries: the state's
    # column then reads outside the layer's compiled region (`fluxc.passes.regions`)
    batch = graph.call_method("size", (valid, 0))
    state = graph.call_function(torch.narrow, (graph.get_attr("flux_state.route"), 0, 0, batch))
    stored = graph.call_function(torch.select, (state, 1, layer))  # (B,) int8: 1 full, 0 sparse, -1 unset
    reuse = graph.call_function(operator.and_, (graph.call_function(operator.ge, (stored, 0)),
                                                graph.call_function(operator.invert, (starts,))))
    return graph.call_function(torch.where, (reuse, graph.call_function(operator.eq, (stored, 1)), routed))
