"""Public API: `compile`, `sites`, `last_route`, `last_route_margins`."""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from torch import nn

from fluxc.backend import (
    FluxBackend,
    RouteSpec,
    backend_from_options,
    flux_backend_of,
    parse_route,
    private_forward,
    resolve_config,
)
from fluxc.checkpoint import Fingerprint, read_checkpoint
from fluxc.config import FluxConfig
from fluxc.errors import ConfigError, FluxError, NotTracedError, RecompileLimitError
from fluxc.inputs import canonical_inputs, check_model_inputs
from fluxc.passes import RouteState, SiteInfo

log = logging.getLogger("fluxc")


def model_fingerprint(model: nn.Module) -> Fingerprint | None:
    """Fingerprint from an HF-style config, when the model has one."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    text = getattr(cfg, "get_text_config", lambda: cfg)()
    try:
        heads = text.num_attention_heads
        return Fingerprint(type(model).__name__, text.num_hidden_layers, heads,
                           getattr(text, "num_key_value_heads", None) or heads,
                           getattr(text, "head_dim", None) or text.hidden_size // heads)
    except AttributeError:
        return None


class FluxModule(nn.Module):
    """`model` running its Flux-rewritten graph; called exactly like `model`.

    Thread-safe by serialising: a forward, `generate` and the decode engine hold `lock` (an RLock), since the
    routes a prefill decides live in one shared `route_state`; other threads wait their turn. For throughput,
    hand many prompts to one `fluxc.generate` call: the engine batches them."""

    def __init__(self, model: nn.Module, backend: FluxBackend) -> None:
        super().__init__()
        self.model = model
        self.route_state = backend.state
        self.routers: nn.ModuleList | None = None
        self._backend = backend
        self.lock = threading.RLock()
        backend.on_routers = self._set_routers
        self._compiled = torch.compile(private_forward(model), backend=backend, fullgraph=True)

    def _set_routers(self, routers: nn.ModuleList) -> None:
        self.routers = routers

    @property
    def threshold(self) -> float:
        """The router's probability of full attention above which a layer runs full (0.5: its argmax)."""
        return self.route_state.threshold

    def set_threshold(self, threshold: float) -> None:
        """Move the operating point: higher runs more layers sparse. Takes effect at the next prefill, with no
        recompile and no CUDA-graph capture (the compiled graphs read it from device memory)."""
        with self.lock:
            self.route_state.set_threshold(threshold)

    @property
    def flux_config(self) -> FluxConfig:
        return self._backend.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        check_model_inputs(self.model, args, kwargs)
        args, kwargs = canonical_inputs(self.model, args, kwargs)
        with self.lock:
            try:
                return self._compiled(*args, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as exc:
                inner = getattr(exc, "inner_exception", None)
                if isinstance(inner, FluxError):  # surface fluxc's own error, not Dynamo's wrapper
                    raise inner.with_traceback(None) from None
                raise
            except torch._dynamo.exc.FailOnRecompileLimitHit as exc:
                limit = torch._dynamo.config.recompile_limit
                raise RecompileLimitError(
                    f"{type(self.model).__name__} compiled by fluxc met more than {limit} input layouts (batch of 1 "
                    f"vs more, mask kinds, dtypes: each traces and compiles again) and Dynamo stopped at its "
                    f"recompile_limit={limit}; serve prompts with fluxc.generate / DecodeEngine (one compile for every "
                    f"length and batch), keep one input layout per compiled model, or raise "
                    f"torch._dynamo.config.recompile_limit") from exc

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' `generate()` running the routed graph with a `fluxc.FluxCache` (see
        `fluxc.serve.cache.hf_generate`); `fluxc.generate` / `DecodeEngine` add a paged cache and CUDA graphs."""
        from fluxc.serve.cache import hf_generate  # transformers loads on first use

        with self.lock:
            return hf_generate(self, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


def compile(model: nn.Module, router_ckpt: str | None = None, *, config: FluxConfig | dict | None = None,
            route: RouteSpec = None, threshold: float = 0.5) -> FluxModule:
    """Return `model` with every attention site routed between full and sparse attention.

    `route=None` uses the routers of `router_ckpt`; `"full"`, `"sparse"` or one `"full"`/`"sparse"` per layer
    forces the branches. `threshold`: the router's probability of full attention above which a layer runs full
    (0.5, its argmax; higher is sparser; `FluxModule.set_threshold` moves it later without recompiling). The
    graph is traced on the first call (like `torch.compile`).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(config, dict):
        config = FluxConfig.from_dict(config)
    elif config is not None and not isinstance(config, FluxConfig):
        raise ConfigError(f"config must be a FluxConfig or a dict, got {type(config).__name__}")
    parse_route(route)
    ckpt = read_checkpoint(router_ckpt) if router_ckpt is not None else None
    config = resolve_config(config, ckpt)
    fingerprint = model_fingerprint(model)
    if ckpt is not None and fingerprint is not None:
        ckpt.check_model(fingerprint)  # fail before any tensor is touched
    backend = FluxBackend(config, checkpoint=ckpt, route=route, architecture=type(model).__name__,
                          require_sites=True)
    backend.state.set_threshold(threshold)  # validates it before anything is traced
    return FluxModule(model, backend)


def compile_for_training(model: nn.Module, config: FluxConfig, recorder: nn.Module, *,
                         routers: nn.ModuleList | None = None,
                         backend_class: type[FluxBackend] = FluxBackend) -> FluxModule:
    """`model` rewritten in training mode: every layer runs both branches, mixed by a straight-through
    Gumbel sample of its router (recorded in `recorder`). Fresh routers are created at the first trace
    when none are given. The graph runs eagerly (autograd through fluxc's ops). `backend_class` is a
    `FluxBackend` subclass that changes how the rewritten graph runs (gradient checkpointing)."""
    backend = backend_class(config.replace(compiler="eager"), routers=routers, init_routers=routers is None,
                            architecture=type(model).__name__, require_sites=True, recorder=recorder)
    module = FluxModule(model, backend)
    if routers is not None:
        module.routers = routers
    return module


def _backend_of(m: Any) -> FluxBackend:
    backend = flux_backend_of(m)
    if backend is not None:
        return backend
    callback = getattr(getattr(m, "dynamo_ctx", None), "callback", None)  # torch.compile(..., backend="flux")
    if callback is not None:
        from torch._dynamo.eval_frame import innermost_backend

        callback = innermost_backend(callback)
    options = getattr(callback, "kwargs", {}).get("options") if callback is not None else None
    if isinstance(options, dict):
        return backend_from_options(options)
    if isinstance(callback, FluxBackend):
        return callback
    raise ConfigError(f"{type(m).__name__} is not a fluxc-compiled model; use fluxc.compile(model, ...) or "
                      f"torch.compile(model, backend='flux', options={{...}})")


def sites(m: Any, *example_args: Any, **example_kwargs: Any) -> list[SiteInfo]:
    """The attention sites found in `m`'s traced graph, one record per site (routed or kept as-is).

    Traced on the first call of `m`; pass example inputs to trace now (they are run once, without grad).
    """
    backend = _backend_of(m)
    if backend.sites is None and (example_args or example_kwargs):
        with torch.no_grad():
            m(*example_args, **example_kwargs)
    if backend.sites is None:
        raise NotTracedError("the model has not been traced yet: call it once, or pass example inputs to "
                             "fluxc.sites(m, *args, **kwargs)")
    return list(backend.sites)


def last_route_margins(m: Any) -> torch.Tensor:
    """float32 [batch, num_layers] of the last prefill: each router's logit_full - logit_sparse over the operating
    point (> 0 ran full attention, near 0 a near-tied decision); NaN where no router decided."""
    return _prefilled_state(m).last_margins()


def last_route(m: Any) -> torch.Tensor:
    """bool [batch, num_layers] of the last prefill's decisions (True = full attention)."""
    return _prefilled_state(m).last()


def _prefilled_state(m: Any) -> RouteState:
    if isinstance(m, RouteState):
        return m
    backend = _backend_of(m)
    if backend.sites is None:
        raise NotTracedError("no prefill has run yet: call the model first")
    return backend.state
