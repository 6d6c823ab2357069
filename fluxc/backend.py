"""The `flux` torch.compile backend: run the Flux pass on Dynamo's graph, then compile it.

Registered through the ``torch_dynamo_backends`` entry point, so ``torch.compile(model, backend="flux",
options={...})`` works without importing fluxc first.
"""

from __future__ import annotations

import itertools
import logging
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fluxc.checkpoint import Fingerprint, RouterCheckpoint, read_checkpoint
from fluxc.config import FluxConfig
from fluxc.errors import ConfigError, NoAttentionError, RouteError
from fluxc.ops.router import LayerRouter
from fluxc.passes import PassOptions, RouteState, SiteInfo, flux_pass
from fluxc.passes.lower import cacheable_inlined, inline_router_ops
from fluxc.passes.regions import compile_graph_in_regions
from fluxc.passes.rewrite import analyse

log = logging.getLogger("fluxc")
_ids = itertools.count()

RouteSpec = str | Sequence[str] | Sequence[bool] | None
OPTION_KEYS = ("router_ckpt", "route", "config", "state", "compiler", "architecture", "threshold")


def parse_route(route: RouteSpec) -> str | tuple[bool, ...] | None:
    """None (routers), 'full', 'sparse', or a per-layer tuple (True = full)."""
    if route is None or (isinstance(route, str) and route in ("full", "sparse")):
        return route
    if isinstance(route, str) or not isinstance(route, (list, tuple)):
        raise RouteError(f"route={route!r} is not a route; use None (router), 'full', 'sparse', or a per-layer list "
                         f"of 'full' / 'sparse' (or True / False)")
    out = []
    for i, r in enumerate(route):
        if isinstance(r, bool):
            out.append(r)
        elif isinstance(r, str) and r in ("full", "sparse"):
            out.append(r == "full")
        else:  # an int 1 / 0 is not a route: `1 in ("full", True)` would have taken it silently
            raise RouteError(f"route[{i}]={r!r} is not 'full' or 'sparse' (or True / False)")
    return tuple(out)


def _forward(*args: Any, _fluxc_model: nn.Module, **kwargs: Any) -> Any:
    return _fluxc_model(*args, **kwargs)


def private_forward(model: nn.Module) -> types.FunctionType:
    """`model`'s forward as a function with a code object of its own: Dynamo caches per code object, so two
    compiled modules (or a module and a decode graph) never share, or exhaust, each other's cache entries."""
    code = _forward.__code__.replace(co_name=f"fluxc_forward_{next(_ids)}")
    fn = types.FunctionType(code, _forward.__globals__, code.co_name)
    fn.__kwdefaults__ = {"_fluxc_model": model}
    return fn


def flux_backend_of(module: Any) -> FluxBackend | None:
    """The backend of a `fluxc.compile` result (its `_backend`), or None for any other object."""
    backend = getattr(module, "_backend", None)
    return backend if isinstance(backend, FluxBackend) else None


class FluxBackend:
    """Callable Dynamo backend holding what the rewrite needs across graphs of one model."""

    def __init__(self, config: FluxConfig, *, checkpoint: RouterCheckpoint | None = None, route: RouteSpec = None,
                 state: RouteState | None = None, architecture: str | None = None, require_sites: bool = False,
                 on_routers: Callable[[nn.ModuleList], None] | None = None, routers: nn.ModuleList | None = None,
                 init_routers: bool = False, recorder: nn.Module | None = None) -> None:
        self.config = config
        self.checkpoint = checkpoint
        self.route = parse_route(route)
        self.init_routers = init_routers
        self.recorder = recorder
        if self.route is None and checkpoint is None and routers is None and not init_routers:
            raise ConfigError("route=None asks for the router but no router checkpoint was given; pass router_ckpt, "
                              "or route='full' / 'sparse' / a per-layer list")
        self.state = state if state is not None else RouteState()
        self.architecture = architecture
        self.require_sites = require_sites
        self.routers: nn.ModuleList | None = routers
        self.on_routers = on_routers
        self.sites: list[SiteInfo] | None = None
        self.graphs = 0
        # the latest rewritten graph and, with keep_inputs, the inputs Dynamo called it with, in placeholder order
        # (export, inspection); off by default: they would keep a decode graph's KV buffers alive after eviction
        self.last_graph: fx.GraphModule | None = None
        self.last_inputs: tuple[Any, ...] = ()
        self.keep_inputs = False
        self.structural_masks: bool | None = None  # PassOptions.structural_masks (None: where kernels can run)
        # Inductor compiles the graph region by region, each distinct region once (`fluxc.passes.regions`);
        # False compiles it whole (one graph, cross-layer fusion, a compile that grows with the layers)
        self.regional = True

    def _routers_for(self, sites: list[SiteInfo], device: torch.device) -> nn.ModuleList | None:
        if self.route is not None:
            return None
        if self.routers is None and self.checkpoint is None:  # fresh routers (training from scratch)
            self.routers = nn.ModuleList(LayerRouter(s.head_dim, self.config.router_hidden)
                                         for s in sites if s.routed).to(device)
            if self.on_routers is not None:
                self.on_routers(self.routers)
        if self.routers is None:
            assert self.checkpoint is not None
            first = sites[0]
            theirs = self.checkpoint.fingerprint
            arch = self.architecture or (theirs.architecture if theirs is not None else "?")
            self.checkpoint.check_model(Fingerprint(arch, len(sites), first.q_heads, first.kv_heads, first.head_dim))
            self.routers = self.checkpoint.load_routers(device)
            if self.on_routers is not None:
                self.on_routers(self.routers)
        return self.routers

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        _, infos, _ = analyse(gm.graph, self.config)
        if not infos:
            if self.require_sites:
                raise NoAttentionError("no attention site found in the traced model (looked for SDPA, "
                                       "matmul-softmax-matmul attention and flash-attn calls); fluxc has nothing to route")
            log.info("fluxc: a graph with no attention site is compiled unchanged")
            return self._compile(gm, example_inputs)
        route = self.route
        if route in ("full", "sparse"):
            route = tuple([route == "full"] * len(infos))
        q_device = next((n.meta["example_value"].device for n in gm.graph.nodes
                         if isinstance(n.meta.get("example_value"), torch.Tensor)), torch.device("cpu"))
        routers = self._routers_for(infos, q_device)
        result = flux_pass(gm, PassOptions(self.config, route, routers, self.state, recorder=self.recorder,
                                                 structural_masks=self.structural_masks))
        if self.sites is None:
            local = [info.layer for info in result.sites if info.local_window]
            if local:  # an automatic choice: said once per model
                log.info("fluxc: layers %s keep the model's own sliding window (%s keys, no wider than the sparse "
                         "window) and are not routed", local, sorted({i.local_window for i in result.sites if i.local_window}))
        if result.prefill or self.sites is None:
            self.sites = result.sites
        self.graphs += 1
        self.last_graph = gm
        self.last_inputs = tuple(example_inputs) if self.keep_inputs else ()
        return self._compile(gm, example_inputs)

    def _compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if self.config.compiler == "eager":
            return gm.forward
        from torch._inductor.compile_fx import (
            compile_fx,  # Inductor (and Triton) load on first compile, not on import
        )

        inline_router_ops(gm)
        marks = {**torch._inductor.config.unsafe_marked_cacheable_functions, **cacheable_inlined()}
        with torch._inductor.config.patch(unsafe_marked_cacheable_functions=marks):
            if not self.regional:
                return compile_fx(gm, list(example_inputs))
            compiled, why_whole = compile_graph_in_regions(gm, example_inputs, compile_fx)
            if why_whole:
                log.info("fluxc: the graph is compiled whole: %s", why_whole)
            return compiled


# One backend per options dict of a torch.compile call (Dynamo calls the backend once per graph).
_BACKENDS: dict[int, tuple[dict, FluxBackend]] = {}


def backend_from_options(options: dict[str, Any] | None) -> FluxBackend:
    options = {} if options is None else options
    unknown = set(options) - set(OPTION_KEYS)
    if unknown:
        raise ConfigError(f"unknown flux backend option(s) {sorted(unknown)}; known: {list(OPTION_KEYS)}")
    key = id(options)
    if key in _BACKENDS and _BACKENDS[key][0] is options:
        return _BACKENDS[key][1]
    config = options.get("config")
    if isinstance(config, dict):
        config = FluxConfig.from_dict(config)
    ckpt = read_checkpoint(options["router_ckpt"]) if options.get("router_ckpt") is not None else None
    config = resolve_config(config, ckpt)
    if "compiler" in options:
        config = config.replace(compiler=options["compiler"])
    backend = FluxBackend(config, checkpoint=ckpt, route=options.get("route"), state=options.get("state"),
                          architecture=options.get("architecture"))
    if "threshold" in options:
        backend.state.set_threshold(options["threshold"])
    _BACKENDS[key] = (options, backend)
    return backend


def resolve_config(config: FluxConfig | None, ckpt: RouterCheckpoint | None) -> FluxConfig:
    """The user's config, checked against the checkpoint's method fields (no silent override)."""
    if ckpt is None:
        return config or FluxConfig()
    if config is None:
        return ckpt.config
    ours, theirs = config.method_dict(), ckpt.config.method_dict()
    diff = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    if diff:
        raise ConfigError(f"config differs from the router checkpoint's on {diff} (yours, checkpoint's); the routers "
                          f"were trained for the checkpoint's values: drop those fields or retrain")
    return config


def flux_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None,
                 mode: str | None = None) -> Callable:
    """Entry point of ``torch.compile(model, backend="flux", options={...})``.

    Options: ``router_ckpt`` (path), ``route`` (None | 'full' | 'sparse' | per-layer list), ``config``
    (FluxConfig or dict), ``state`` (a `RouteState` to read decisions from), ``compiler``
    ('inductor' | 'eager'), ``architecture`` (name checked against the checkpoint), ``threshold`` (the
    operating point, see `fluxc.compile`).
    """
    if mode is not None:
        raise ConfigError(f"mode={mode!r} is not supported by the flux backend; leave mode unset")
    return backend_from_options(options)(gm, example_inputs)
