"""Export of the Flux-rewritten graph: torch.export programs (prefill and decode step), AOTInductor
packages and ONNX models.

    program = fluxc.export(fm, (input_ids, attention_mask))              # routers kept, per-layer torch.cond
    program = fluxc.export(model, (input_ids, attention_mask), route="sparse")   # a fixed route baked in
    step = fluxc.export(fm, (input_ids, attention_mask), step="decode")   # one decode step with a KV cache
    fluxc.export_onnx(fm, (input_ids, attention_mask), "model.onnx")     # onnxruntime-ready
    fluxc.export_aoti(program, "model.pt2")                              # AOTInductor package

How: Dynamo traces a small step function around the model with the `FluxBackend` (the same pass as
`fluxc.compile`), `passes/export.py` turns routes into data, and `torch.export` (non-strict) traces a
module that calls that graph with the model's own parameters, so the program owns its weights.

Programs take and return flat tensors, named as in `ProgramSignature` (and in the ONNX file):
- prefill: the example inputs' names (e.g. input_ids, attention_mask, position_ids) -> ``logits (B, T, V)``,
  ``routes (B, L)`` bool (True = full attention), ``present_key_{l}, present_value_{l}`` (HF-style models;
  other models return their own outputs, then ``routes``).
- decode, dense KV layout (every layer keeps every key; a sparse layer applies its pattern as a mask, "SA
  without eviction"): ``input_ids (B, 1), position_ids (B, 1), attention_mask (B, S + 1)``, ``routes (B, L)``
  bool (with routers: the prefill's routes), ``past_key_{l}, past_value_{l} (B, Hkv, S, D)`` -> ``logits
  (B, 1, V), present_key_{l}, present_value_{l} (B, Hkv, S + 1, D)``.
- KV layout "engine" (fixed routes; the decode engine's `FluxCache` layout, `fluxc.ops.cache`): padding
  dropped, key r of a sequence in slot r; layers routed sparse keep only sink + window slots (a ring).
  The prefill returns the caches in that layout (full layers T slots: extend them to the capacity you need),
  the decode step takes ``input_ids (B, 1), position_ids (B, 1)`` (the token's real index, = keys before it)
  and ``past_*`` buffers and returns ``logits`` and the buffers, same shapes, with the token written.
  Prompts are left-padded, with ``position_ids`` counting real tokens (``cumsum(mask) - 1``).

Importing this module imports neither onnx nor onnxscript nor Inductor.
"""

from __future__ import annotations

import inspect
import itertools
import keyword
import logging
import os
import types
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from fluxc.backend import FluxBackend, RouteSpec, flux_backend_of, parse_route
from fluxc.config import FluxConfig
from fluxc.errors import ExportError, FluxError
from fluxc.hf_compat import cache_keyword
from fluxc.ops.cache import DENSE, LAYOUT_NAMES, MIXED, RING, ring_capacity, ring_supported
from fluxc.passes.export import export_pass
from fluxc.serve.cache import FluxCache, _Layer

log = logging.getLogger("fluxc")

Step = Literal["prefill", "decode"]
KVLayout = Literal["auto", "dense", "engine"]
_ids = itertools.count()

#: ONNX opsets fluxc's translations are tested with (torch.onnx's dynamo exporter starts at 18).
ONNX_OPSETS = (18, 25)


@dataclass(frozen=True)
class ProgramSignature:
    """Names of a program's flat inputs and outputs, in order (ONNX names them the same)."""

    step: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    num_layers: int
    routes_input: bool
    dynamic: bool
    route: tuple[bool, ...] | None  # the fixed route baked in (True = full), None: routers
    kv_layout: str = "dense"  # "dense" or "engine"
    layouts: tuple[str, ...] = ()  # engine layout of each layer ("full", "sparse-ring", "mixed")
    structural_masks: bool = False  # causal + padding masks read as structure (no (Tq, Tk) mask; kernels run)


# --------------------------------------------------------------------------------------------------- inputs


def _as_named(example_inputs: Any, model: nn.Module) -> dict[str, Tensor]:
    """`example_inputs` (a tensor, a tuple of positional tensors, or a dict of keyword tensors) by name."""
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        named = dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(example_inputs) > len(params):
            raise ExportError(f"example_inputs has {len(example_inputs)} positional tensors but "
                              f"{type(model).__name__}.forward takes {len(params)}; pass a dict of keyword inputs")
        named = {p.name: x for p, x in zip(params, example_inputs)}
    else:
        raise ExportError(f"example_inputs={type(example_inputs).__name__} is not a tensor, a tuple of tensors or a "
                          f"dict of tensors; pass e.g. (input_ids, attention_mask)")
    for name, value in list(named.items()):
        if value is None:
            del named[name]
        elif not isinstance(value, Tensor):
            raise ExportError(f"example_inputs[{name!r}] is a {type(value).__name__}; only tensors are exported "
                              f"(constants belong in the model or its config)")
        elif not name.isidentifier() or keyword.iskeyword(name):
            raise ExportError(f"example_inputs key {name!r} is not a valid input name")
    if not named:
        raise ExportError("example_inputs is empty; pass e.g. (input_ids, attention_mask)")
    return named


def _hf_cache_keyword(model: nn.Module) -> str | None:
    """The cache keyword of an HF-style causal LM ('cache' or 'past_key_values'); None for other models."""
    return cache_keyword(model) if hasattr(model, "config") else None


# ----------------------------------------------------------------------------------------- route and model


@dataclass
class _Setup:
    model: nn.Module
    config: FluxConfig
    route: tuple[bool, ...] | str | None
    checkpoint: Any
    routers: nn.ModuleList | None


def _setup(model: nn.Module, route: RouteSpec, config: FluxConfig | None) -> _Setup:
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module or a fluxc.compile(...) result, got {type(model).__name__}")
    try:
        route = parse_route(route)
    except FluxError as exc:
        raise ExportError(f"route: {exc}") from None
    backend = flux_backend_of(model)
    if backend is not None:
        if config is not None and config.method_dict() != backend.config.method_dict():
            raise ExportError(f"config={config!r} differs from the compiled module's {backend.config!r}; drop config= "
                              f"(the module's own is used) or compile the model with it")
        config = backend.config if config is None else config
        if backend.recorder is not None:
            raise ExportError("the module was compiled for training (both branches mixed by a Gumbel sample); "
                              "export a model compiled with fluxc.compile(model, router_ckpt) instead")
        if route is None:
            route = backend.route
        routers = backend.routers if backend.routers is not None else model.routers
        return _Setup(model.model, config, route, backend.checkpoint, routers)
    if route is None:
        raise ExportError(f"route=None asks for the router, but {type(model).__name__} has none: export "
                          f"fluxc.compile(model, router_ckpt), or pass route='full' / 'sparse' / one per layer")
    return _Setup(model, config or FluxConfig(), route, None, None)


# ------------------------------------------------------------------------------------------- traced steps


def _flat_cache(cache: Any) -> list[Tensor]:
    """[key_0, value_0, key_1, ...] of an HF DynamicCache or a fluxc FluxCache."""
    layers = cache.flux_layers if hasattr(cache, "flux_layers") else cache.layers
    return [t for layer in layers for t in (layer.keys, layer.values)]


# The cache class is a keyword default of the traced steps, never imported inside them: Dynamo of torch 2.11
# cannot trace an import from transformers' lazy module.
def _prefill_step(*args: Tensor, _fluxc_model: nn.Module, _fluxc_names: tuple[str, ...], _fluxc_cache_kw: str | None,
                  _fluxc_cache_class: type) -> Any:
    kwargs = dict(zip(_fluxc_names, args))
    if _fluxc_cache_kw is None:
        return tuple(torch.utils._pytree.tree_leaves(_fluxc_model(**kwargs)))
    cache = _fluxc_cache_class()
    out = _fluxc_model(**kwargs, **{_fluxc_cache_kw: cache}, use_cache=True)
    return (out.logits, *_flat_cache(cache))


def _decode_step(input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, *past: Tensor,
                 _fluxc_model: nn.Module, _fluxc_cache_kw: str, _fluxc_cache_class: type) -> Any:
    cache = _fluxc_cache_class(ddp_cache_data=list(zip(past[0::2], past[1::2])))  # dense layers: no eviction
    out = _fluxc_model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                       **{_fluxc_cache_kw: cache}, use_cache=True)
    return (out.logits, *_flat_cache(cache))


def _engine_prefill_step(*args: Tensor, _fluxc_model: nn.Module, _fluxc_names: tuple[str, ...],
                         _fluxc_config: FluxConfig, _fluxc_route: tuple[bool, ...] | str, _fluxc_cache_kw: str) -> Any:
    kwargs = dict(zip(_fluxc_names, args))
    ids = kwargs["input_ids"]  # (B, T)
    prompt = FluxCache(_fluxc_config)
    out = _fluxc_model(**kwargs, **{_fluxc_cache_kw: prompt}, use_cache=True)
    mask = kwargs.get("attention_mask")
    n_real = mask.sum(dim=1) if mask is not None else ids.new_full((ids.shape[0],), ids.shape[1])  # (B,)
    route = _per_layer(_fluxc_route, len(prompt.flux_layers))
    layouts = engine_layouts(route, _fluxc_config)
    routes = torch.tensor(route, device=ids.device).expand(ids.shape[0], -1)  # (B, L) bool
    packed = FluxCache(_fluxc_config)  # the engine's own compaction: padding dropped, SA layers to the ring
    packed.allocate(prompt, layouts, routes, ids.shape[1])
    packed.load(prompt, n_real)
    return (out.logits, *_flat_cache(packed))


def _engine_decode_step(input_ids: Tensor, position_ids: Tensor, *past: Tensor, _fluxc_model: nn.Module,
                        _fluxc_config: FluxConfig, _fluxc_route: tuple[bool, ...], _fluxc_cache_kw: str) -> Any:
    cache = FluxCache(_fluxc_config)
    for i, layout in enumerate(engine_layouts(_fluxc_route, _fluxc_config)):
        layer = _Layer()
        layer.keys, layer.values, layer.layout = past[2 * i], past[2 * i + 1], layout  # (B, Hkv, C, D)
        layer.route = torch.full((input_ids.shape[0],), _fluxc_route[i], dtype=torch.bool, device=input_ids.device)
        cache.flux_layers.append(layer)
    cache.lengths = position_ids[:, 0] + 1  # (B,) real keys, this token's included
    cache.phase = "decode"
    out = _fluxc_model(input_ids=input_ids, position_ids=position_ids, **{_fluxc_cache_kw: cache}, use_cache=True)
    # the buffers are this step's inputs, written in place: Dynamo returns inputs from outside its graph, so
    # return copies (the export pass makes the write functional and drops the copies)
    return (out.logits, *[t.clone() for t in _flat_cache(cache)])


def _per_layer(route: tuple[bool, ...] | str, num_layers: int) -> tuple[bool, ...]:
    if isinstance(route, str):
        return tuple([route == "full"] * num_layers)
    if len(route) != num_layers:
        raise ExportError(f"route has {len(route)} entries but the model caches {num_layers} layers; give one "
                          f"'full'/'sparse' per layer")
    return route


def engine_layouts(route: tuple[bool, ...], config: FluxConfig) -> tuple[int, ...]:
    """The decode engine's cache layout of each layer for a fixed route (`fluxc.ops.cache`)."""
    ring = ring_supported(config.sink, config.window, config.block, config.block_exact) is None
    return tuple(DENSE if full else (RING if ring else MIXED) for full in route)


def _engine_problem(model: nn.Module) -> str | None:
    """Why the decode engine's layout cannot serve `model`, or None (the engine's own model check)."""
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    types_ = getattr(text, "layer_types", None) or []
    window = getattr(text, "sliding_window", None) if text is not None else None
    if any(t != "full_attention" for t in types_) or (window and getattr(text, "use_sliding_window", True)):
        return f"the model has native sliding-window layers (sliding_window={window})"
    return None


def _private(fn: Any, **kwdefaults: Any) -> types.FunctionType:
    # A code object of its own per export: Dynamo caches per code object, so exports never share entries.
    code = fn.__code__.replace(co_name=f"fluxc_export_{fn.__name__.strip('_')}_{next(_ids)}")
    new = types.FunctionType(code, fn.__globals__, code.co_name)
    new.__kwdefaults__ = kwdefaults
    return new


def _clone_inputs(inputs: Sequence[Tensor]) -> list[Tensor]:
    # Dynamo's dynamic markers live on the tensors: never set them on the caller's tensors.
    return [x.detach().clone() for x in inputs]


def _trace(setup: _Setup, step: Any, args: list[Tensor], dynamic_dims: dict[int, tuple[int, ...]],
           structural_masks: bool) -> tuple[torch.fx.GraphModule, tuple[Any, ...], FluxBackend]:
    """One Dynamo trace of `step(*args)` through the Flux pass; returns the rewritten graph and its inputs."""
    backend = FluxBackend(setup.config.replace(compiler="eager"), checkpoint=setup.checkpoint,
                          route=setup.route, routers=setup.routers, architecture=type(setup.model).__name__,
                          require_sites=True)
    backend.keep_inputs = True  # the program module binds the traced graph's placeholders to these
    backend.structural_masks = structural_masks  # False: the program keeps the model's (Tq, Tk) mask
    for index, dims in dynamic_dims.items():
        for dim in dims:
            torch._dynamo.maybe_mark_dynamic(args[index], dim)
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    try:
        with torch.no_grad():
            compiled(*args)
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        inner = getattr(exc, "inner_exception", None)
        if isinstance(inner, FluxError):
            raise inner.with_traceback(None) from None
        raise
    if backend.graphs != 1 or backend.last_graph is None:
        raise ExportError(f"expected one traced graph, got {backend.graphs}; the model must trace as one graph "
                          f"(fullgraph=True)")
    return backend.last_graph, backend.last_inputs, backend


# ------------------------------------------------------------------------------------------ program module


def _bindings(gm: torch.fx.GraphModule, inputs: Sequence[Any], args: Sequence[Tensor],
              model: nn.Module) -> list[tuple[str, Any, Any]]:
    """How to feed each placeholder of `gm`: ("input", i) a program input, ("size", i, d) its size, ("tensor",
    name) a parameter or buffer of `model` (by identity with what Dynamo passed)."""
    owned = {id(t): name for name, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                                         model.named_buffers(remove_duplicate=False))}
    by_id = {id(t): i for i, t in enumerate(args)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sizes: dict[Any, tuple[int, int]] = {}
    out: list[tuple[str, Any, Any]] = []
    for node, value in zip(placeholders, inputs):
        if isinstance(value, Tensor) and id(value) in by_id:
            i = by_id[id(value)]
            fake = node.meta.get("example_value")
            for d, s in enumerate(fake.shape if isinstance(fake, Tensor) else ()):
                if isinstance(s, torch.SymInt):
                    sizes.setdefault(s.node.expr, (i, d))
    for node, value in zip(placeholders, inputs):
        if isinstance(value, Tensor) and id(value) in by_id:
            out.append(("input", by_id[id(value)], None))
        elif isinstance(value, Tensor) and id(value) in owned:
            out.append(("tensor", owned[id(value)], None))
        elif isinstance(node.meta.get("example_value"), torch.SymInt):
            expr = node.meta["example_value"].node.expr
            if expr not in sizes:
                raise ExportError(f"internal: graph input {node.name} ({expr}) is no size of an example input "
                                  f"(please report)")
            out.append(("size", *sizes[expr]))
        else:
            raise ExportError(f"graph input {node.name} ({type(value).__name__}) is neither an example input nor a "
                              f"parameter or buffer of the model; a tensor the model reads from outside itself "
                              f"cannot be exported")
    return out


class _Program(nn.Module):
    """Calls the rewritten graph with program inputs, their sizes and the model's own tensors."""

    def __init__(self, graph: torch.fx.GraphModule, model: nn.Module, bindings: list[tuple[str, Any, Any]],
                 traced: list[int], appended: list[int]) -> None:
        super().__init__()
        self.flux_graph = graph
        self.model = model
        self.bindings = bindings
        self.traced = traced  # program input index of each traced argument
        self.appended = appended  # program input indices of the placeholders the export pass appended (routes)
        self.param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}

    def run(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        args: list[Any] = []
        for kind, a, b in self.bindings:
            if kind == "input":
                args.append(inputs[self.traced[a]])
            elif kind == "size":
                args.append(inputs[self.traced[a]].size(b))
            else:
                args.append(self.model.get_parameter(a) if a in self.param_names else self.model.get_buffer(a))
        args.extend(inputs[i] for i in self.appended)
        return tuple(self.flux_graph(*args))


def _program_class(names: tuple[str, ...]) -> type[_Program]:
    """A `_Program` subclass whose forward names its inputs (torch.export and ONNX keep the names)."""
    params = ", ".join(names)
    source = f"def forward(self, {params}):\n    return self.run(({params},))\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, "<fluxc-export>", "exec"), namespace)  # names are checked identifiers
    return type("FluxProgram", (_Program,), {"forward": namespace["forward"]})


# ------------------------------------------------------------------------------------------------- export


def _dims(dims: tuple[int, ...]) -> dict[int, Any] | None:
    return {d: torch.export.Dim.DYNAMIC for d in dims} or None


def cache_tensor_names(prefix: str, num_layers: int) -> list[str]:
    """``{prefix}_key_{l}, {prefix}_value_{l}`` for every layer, in program order."""
    return [f"{prefix}_{kind}_{layer}" for layer in range(num_layers) for kind in ("key", "value")]


def export(model: nn.Module, example_inputs: Any, *, dynamic: bool = True, route: RouteSpec = None,
           step: Step = "prefill", kv_layout: KVLayout = "auto", config: FluxConfig | None = None,
           structural_masks: bool | None = None) -> torch.export.ExportedProgram:
    """`torch.export` program of `model`'s Flux-rewritten prefill or decode step.

    `model` is a `fluxc.compile(...)` module (its routers, or its forced route) or a plain model with `route`.
    `route` given bakes that route in ('full', 'sparse', or one per layer); otherwise the routers stay in the
    program and each layer chooses with `torch.cond`. `dynamic` makes batch and lengths dynamic.
    `step="decode"` exports one decode step; its example cache comes from running `example_inputs` as the
    prompt. `kv_layout`: "dense" (every layer keeps every key), "engine" (the decode engine's layout: sparse
    layers keep sink + window; fixed routes only) or "auto" (engine when the route is fixed and the model
    fits it). `structural_masks`: read the model's causal + padding masks as structure, so the program never
    builds a (Tq, Tk) mask and runs the Triton kernels on a GPU (each such site is one routed op that chooses
    per sequence, no ``torch.cond``); None (default) does so where the kernels can run (a CUDA model, impl not
    'reference'); other masks (sliding windows) keep the model's mask either way. Reload with
    ``torch.export.load`` after ``import fluxc``; the module docstring lists the program's inputs and outputs.
    """
    program, _ = export_with_signature(model, example_inputs, dynamic=dynamic, route=route, step=step,
                                       kv_layout=kv_layout, config=config, structural_masks=structural_masks)
    return program


# programs made here -> their signature (weak: a program's lifetime is the caller's)
_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def signature(program: torch.export.ExportedProgram) -> ProgramSignature:
    """The input and output names of a program made by `fluxc.export` in this process."""
    found = _SIGNATURES.get(program)
    if found is None:
        raise ExportError("this ExportedProgram was not made by fluxc.export in this process; export the model "
                          "with fluxc.export (or pass the model itself)")
    return found


def _choose_layout(kv_layout: str, setup: _Setup, hf: bool) -> str:
    if kv_layout not in ("auto", "dense", "engine"):
        raise ExportError(f"kv_layout={kv_layout!r} is not a layout; use 'auto', 'dense' or 'engine'")
    if kv_layout == "dense" or not hf:
        if kv_layout == "engine":
            raise ExportError(f"kv_layout='engine' needs a model called like a Hugging Face causal LM; "
                              f"{type(setup.model).__name__} is not")
        return "dense"
    if setup.route is None:
        why = "the routes are decided by the routers at run time (the engine layout needs fixed routes)"
    else:
        why = _engine_problem(setup.model)
    if why is None:
        return "engine"
    if kv_layout == "engine":
        raise ExportError(f"kv_layout='engine' cannot be used: {why}; pass kv_layout='dense' (every key kept)"
                          + ("" if setup.route is not None else ", or export with a fixed route=..."))
    if setup.route is not None:
        log.info("fluxc: export uses the dense KV layout, not the decode engine's: %s", why)
    return "dense"


def export_with_signature(model: nn.Module, example_inputs: Any, *, dynamic: bool = True, route: RouteSpec = None,
                          step: Step = "prefill", kv_layout: KVLayout = "auto", config: FluxConfig | None = None,
                          structural_masks: bool | None = None
                          ) -> tuple[torch.export.ExportedProgram, ProgramSignature]:
    """`export`, plus the names of the program's inputs and outputs."""
    if step not in ("prefill", "decode"):
        raise ExportError(f"step={step!r} is not a step; use 'prefill' or 'decode'")
    if not isinstance(dynamic, bool):
        raise ExportError(f"dynamic={dynamic!r} must be True or False")
    if structural_masks is not None and not isinstance(structural_masks, bool):
        raise ExportError(f"structural_masks={structural_masks!r} must be True, False or None (read masks as "
                          f"structure where the kernels can run)")
    setup = _setup(model, route, config)
    named = _as_named(example_inputs, setup.model)
    cache_kw = _hf_cache_keyword(setup.model)
    hf = cache_kw is not None
    if step == "decode" and not hf:
        raise ExportError(f"step='decode' needs a model called like a Hugging Face causal LM (input_ids, "
                          f"attention_mask, position_ids, cache or past_key_values); {type(setup.model).__name__} "
                          f"is not")
    layout = _choose_layout(kv_layout, setup, hf)
    if layout == "engine" and "input_ids" not in named:
        raise ExportError(f"the engine KV layout takes input_ids; example_inputs has {sorted(named)}")
    if dynamic:
        named = _widen_for_dynamic(named)
    config_ = setup.config.replace(compiler="eager")
    if step == "prefill":
        names = tuple(named)
        args = _clone_inputs(list(named.values()))
        dyn = {i: tuple(range(min(x.dim(), 2))) for i, x in enumerate(args)} if dynamic else {}
        if layout == "engine":
            fn = _private(_engine_prefill_step, _fluxc_model=setup.model, _fluxc_names=names, _fluxc_config=config_,
                          _fluxc_route=setup.route, _fluxc_cache_kw=cache_kw)
        else:
            fn = _private(_prefill_step, _fluxc_model=setup.model, _fluxc_names=names, _fluxc_cache_kw=cache_kw,
                          _fluxc_cache_class=DynamicCache)
    elif layout == "engine":
        names, args, fixed_route = _engine_decode_example(setup, named)
        dyn = {0: (0,), 1: (0,)}
        for i, layout_i in enumerate(engine_layouts(fixed_route, setup.config)):
            for j in (2 + 2 * i, 3 + 2 * i):
                dyn[j] = (0,) if layout_i == RING else (0, 2)  # ring slots are fixed: sink + window
        dyn = dyn if dynamic else {}
        fn = _private(_engine_decode_step, _fluxc_model=setup.model, _fluxc_config=config_, _fluxc_route=fixed_route,
                      _fluxc_cache_kw=cache_kw)
    else:
        names, args = _decode_example(setup.model, named)
        dyn = {0: (0,), 1: (0,), 2: (0, 1), **{i: (0, 2) for i in range(3, len(args))}} if dynamic else {}
        fn = _private(_decode_step, _fluxc_model=setup.model, _fluxc_cache_kw=cache_kw,
                      _fluxc_cache_class=DynamicCache)
    if structural_masks is None:  # where the kernels can run, as `fluxc.compile` does
        structural_masks = args[0].device.type == "cuda" and setup.config.impl != "reference"
    gm, inputs, backend = _trace(setup, fn, args, dyn, structural_masks)
    bindings = _bindings(gm, inputs, args, setup.model)
    num_layers = len(backend.sites or [])
    fixed = None if setup.route is None else _per_layer(setup.route, num_layers)
    result = export_pass(gm, step=step, fixed=fixed, num_layers=num_layers)

    input_names = list(names)
    program_args = list(args)
    dynamic_shapes: list[Any] = [_dims(dyn.get(i, ())) for i in range(len(args))]
    traced = list(range(len(args)))
    appended: list[int] = []
    if result.routes_input:  # (B, L) bool after the step inputs, before the cache
        at = 3
        input_names.insert(at, "routes")
        program_args.insert(at, torch.zeros(args[0].shape[0], num_layers, dtype=torch.bool, device=args[0].device))
        dynamic_shapes.insert(at, _dims((0,) if dynamic else ()))
        traced = [i if i < at else i + 1 for i in traced]
        appended = [at]
    cache_names = cache_tensor_names("present", num_layers)
    if step == "prefill":
        outputs = (["logits", *cache_names] if hf else [f"output_{i}" for i in range(_count_outputs(gm) - 1)])
        outputs.append("routes")
    else:
        outputs = ["logits", *cache_names]
    module = _program_class(tuple(input_names))(gm, setup.model, bindings, traced, appended)
    module.eval()
    try:
        program = torch.export.export(module, tuple(program_args),
                                      dynamic_shapes=tuple(dynamic_shapes) if dynamic else None, strict=False)
    except Exception as exc:  # torch's own message is long; keep it, lead with what failed
        if dynamic and "specializ" in str(exc).lower():
            raise ExportError(f"dynamic=True but torch.export specialised a dimension of the inputs {input_names}: "
                              f"{str(exc).splitlines()[0]}; export with dynamic=False, or example inputs of batch "
                              f">= 2 and length >= 2") from exc
        raise
    layouts = tuple(LAYOUT_NAMES[x] for x in engine_layouts(fixed, setup.config)) if layout == "engine" else ()
    sig = ProgramSignature(step, tuple(input_names), tuple(outputs), num_layers, result.routes_input, dynamic, fixed,
                           layout, layouts, result.structural_sites > 0)
    _SIGNATURES[program] = sig
    log.info("fluxc: exported %s program: %d layers, %d torch.cond choices, %d sites on structural masks, route %s, "
             "%s KV layout", step, num_layers, result.conds, result.structural_sites,
             "routers" if fixed is None else "fixed", layout)
    return program, sig


def _count_outputs(gm: torch.fx.GraphModule) -> int:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return len(output.args[0])


def _widen_for_dynamic(named: dict[str, Tensor]) -> dict[str, Tensor]:
    # Dynamo specialises sizes 0 and 1: a batch of one is traced as two copies so the batch stays dynamic.
    first = next(iter(named.values()))
    if first.dim() >= 1 and first.shape[0] == 1:
        log.info("fluxc: export traces a batch of 1 as 2 copies so that the batch size stays dynamic")
        named = {k: v.expand(2, *v.shape[1:]).clone() if v.dim() >= 1 and v.shape[0] == 1 else v
                 for k, v in named.items()}
    for name, value in named.items():
        if value.dim() >= 2 and value.shape[1] < 2:
            raise ExportError(f"example_inputs[{name!r}] has length {value.shape[1]}; a dynamic prefill needs an "
                              f"example of at least 2 tokens (or pass dynamic=False)")
    return named


@torch.no_grad()
def _prompt_cache(model: nn.Module, named: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, list[Tensor], Tensor]:
    """(ids, mask, positions, flat dense cache, greedy next token) of the example prompt on the untouched model."""
    unknown = set(named) - {"input_ids", "attention_mask", "position_ids"}
    if unknown or "input_ids" not in named:
        raise ExportError(f"step='decode' takes the prompt as example_inputs (input_ids and optionally "
                          f"attention_mask, position_ids); got {sorted(named)}")
    ids = named["input_ids"]
    mask = named.get("attention_mask", torch.ones_like(ids))
    if ids.shape[1] < 2:
        raise ExportError(f"step='decode' needs an example prompt of at least 2 tokens; got {ids.shape[1]}")
    positions = named.get("position_ids", (mask.cumsum(-1) - 1).clamp_min(0))
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **{cache_keyword(model): cache})
    next_ids = out.logits[:, -1:].argmax(-1)  # (B, 1)
    return ids, mask, positions, [t.detach().clone() for t in _flat_cache(cache)], next_ids


def _decode_example(model: nn.Module, named: dict[str, Tensor]) -> tuple[tuple[str, ...], list[Tensor]]:
    """Dense decode-step example: the prompt's cache and its greedy next token."""
    _, mask, positions, past, next_ids = _prompt_cache(model, named)
    step_mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)  # (B, S + 1)
    step_pos = positions[:, -1:] + 1  # (B, 1)
    names = ("input_ids", "position_ids", "attention_mask", *cache_tensor_names("past", len(past) // 2))
    return names, [next_ids.clone(), step_pos.clone(), step_mask.clone(), *past]


def _engine_decode_example(setup: _Setup, named: dict[str, Tensor]
                           ) -> tuple[tuple[str, ...], list[Tensor], tuple[bool, ...]]:
    """Engine-layout decode-step example: buffers shaped like the engine's (values do not matter to tracing)."""
    _, mask, _, past, next_ids = _prompt_cache(setup.model, named)
    route = _per_layer(setup.route, len(past) // 2)
    cfg = setup.config
    ring = ring_capacity(cfg.sink, cfg.window, cfg.block, cfg.block_exact)
    buffers = []
    for i, layout in enumerate(engine_layouts(route, cfg)):
        for t in past[2 * i: 2 * i + 2]:
            slots = ring if layout == RING else t.shape[2] + 1  # a full layer: room for this token
            buffers.append(t.new_zeros((t.shape[0], t.shape[1], slots, t.shape[3])))  # (B, Hkv, C, D)
    step_pos = mask.sum(dim=1, keepdim=True)  # (B, 1) the next token's real index
    names = ("input_ids", "position_ids", *cache_tensor_names("past", len(past) // 2))
    return names, [next_ids.clone(), step_pos.clone(), *buffers], route


# --------------------------------------------------------------------------------------- AOTInductor


def export_aoti(program: torch.export.ExportedProgram, path: str | os.PathLike, *,
                inductor_configs: Mapping[str, Any] | None = None) -> str:
    """Compile `program` with AOTInductor into the package `path` (``.pt2``); load it with
    ``torch._inductor.aoti_load_package`` after ``import fluxc`` (the package calls fluxc's ops).
    `inductor_configs` go to ``aoti_compile_and_package`` as given. With torch 2.11 on CUDA, loading a package
    in a fresh process can segfault in AOTInductor's runtime for any program; README (Export) has the work-around."""
    if not isinstance(program, torch.export.ExportedProgram):
        raise ExportError(f"program must be a torch.export.ExportedProgram (from fluxc.export), got "
                          f"{type(program).__name__}")
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ExportError(f"path={path!r}: AOTInductor packages end in '.pt2'")
    if inductor_configs is not None and not isinstance(inductor_configs, Mapping):
        raise ExportError(f"inductor_configs must be a mapping of Inductor config names to values, got "
                          f"{type(inductor_configs).__name__} {inductor_configs!r}: pass a dict such as "
                          f"{{'max_autotune': True}}")
    from torch._inductor import aoti_compile_and_package  # Inductor loads on use, not on import

    return aoti_compile_and_package(program, package_path=path,
                                    inductor_configs=dict(inductor_configs) if inductor_configs else None)


# ------------------------------------------------------------------------------------------------- ONNX


def export_onnx(model: nn.Module | torch.export.ExportedProgram, example_inputs: Any, path: str | os.PathLike, *,
                route: RouteSpec = None, opset: int | None = None, dynamic: bool = True, step: Step = "prefill",
                kv_layout: KVLayout = "auto", fused: bool = False, optimize: bool = True,
                config: FluxConfig | None = None) -> ProgramSignature:
    """Write an ONNX file through ``torch.onnx.export(..., dynamo=True)`` with fluxc's translations: the
    sparse branch as masked attention, the per-layer choice (``torch.cond``) as ``If``. Runs in onnxruntime.

    `model` as for `export` (same `route`, `dynamic`, `step`, `kv_layout`), or a program `fluxc.export` made
    (then `example_inputs` is None and those options come from the program). `opset` in ``ONNX_OPSETS``
    (inclusive; default the lowest). `fused=True` writes each routed site as one ``fluxc.RoutedAttention``
    (decode engine sites: ``fluxc.CacheAttention``) node in the custom ``fluxc`` domain, for runtimes that
    provide a fused kernel (onnxruntime does not). `optimize` runs the ONNX optimizer (slow on large models).
    Returns the input and output names.
    """
    opset = _check_opset(opset)
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError("export_onnx needs the onnx extras: pip install 'fluxc[onnx]' (onnx, onnxscript, "
                          "onnxruntime)") from exc
    if isinstance(model, torch.export.ExportedProgram):
        given = {"example_inputs": example_inputs, "route": route, "config": config}
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise ExportError(f"export_onnx got a program and {extra}; a program carries its own inputs and route: "
                              f"drop {extra}, or pass the model instead of the program")
        program, sig = model, signature(model)
    else:
        # the model's own mask: ONNX attention is masked attention whatever the mask's form
        program, sig = export_with_signature(model, example_inputs, dynamic=dynamic, route=route, step=step,
                                             kv_layout=kv_layout, config=config, structural_masks=False)
    from fluxc.exporter.onnx import onnx_export  # onnx and onnxscript load on use

    onnx_export(program, sig, os.fspath(path), opset=opset, fused=fused, optimize=optimize)
    return sig


def _check_opset(opset: Any) -> int:
    low, high = ONNX_OPSETS
    if opset is None:
        return low
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise ExportError(f"opset={opset!r} is not supported; fluxc's ONNX translations support opsets {low} to {high} "
                          f"(inclusive): pass one of them or leave opset unset ({low})")
    return opset


__all__ = ["ONNX_OPSETS", "ProgramSignature", "cache_tensor_names", "engine_layouts", "export", "export_aoti",
           "export_onnx", "export_with_signature", "signature"]
