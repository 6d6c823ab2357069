"""Regional compilation: Inductor compiles each distinct stretch of the graph between fluxc's ops once.

Dynamo traces a decoder whole, so its graph repeats one layer N times, and AOTAutograd and Inductor would
trace, lower and schedule every copy (most of a 30-layer model's warm-up). fluxc's own ops (attention, KV
writes, route records) are opaque to Inductor anyway: Inductor calls them between its kernels. Cutting the
graph at them leaves regions that are each "the rest of layer i-1 and the start of layer i"; regions whose
code and input metadata are equal share one compiled function, so a uniform decoder compiles a head, one
layer region and a tail (vLLM's piecewise compilation, with the dedupe done here rather than by a cache).

Every node gets a level: fluxc ops sit one level above the regions they read; any other node sits at the
highest level of its inputs, so work that depends only on the model's inputs (rotary tables, positions,
the per-layer reads of the route state) moves into the first region instead of making each layer's region
differ. Views of the graph's inputs and of fluxc ops' results (a layer's block table column) stay outside,
as do fluxc ops: the compiled regions see only tensors, never a layer index.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.node import map_arg

from fluxc.passes.graph import meta_value
from fluxc.passes.rewrite import counters

log = logging.getLogger("fluxc")

# Views that stay outside the regions when all their inputs do (a layer's column of a block table).
_VIEW_FUNCTIONS = {operator.getitem, torch.select, torch.narrow, torch.Tensor.select, torch.Tensor.narrow,
                   torch.Tensor.size}
_VIEW_METHODS = {"select", "narrow", "size", "__getitem__"}
_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.iand, operator.ior, operator.ixor}


def _is_fluxc_op(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function":
        return False
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.startswith("fluxc::")
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "fluxc"


def _is_view(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
            or (node.op == "call_method" and node.target in _VIEW_METHODS))


def _mutates(node: fx.Node) -> bool:
    """An in-place op other than fluxc's (whose mutated arguments are graph inputs, tracked by level)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not node.target.startswith("_")
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    if getattr(target, "__module__", None) == "_operator" or target in _IN_PLACE_OPERATORS:
        return target in _IN_PLACE_OPERATORS  # operator.and_ is not in place, operator.iand is
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")  # torch.relu_, Tensor.add_


def _mutated_inputs(node: fx.Node) -> list[fx.Node]:
    """The graph inputs a fluxc op writes (its schema's mutable arguments)."""
    target = node.target
    overload = target.default if isinstance(target, torch._ops.OpOverloadPacket) else target
    out = []
    for index, argument in enumerate(overload._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
        if isinstance(value, fx.Node):
            out.append(value)
    return out


@dataclass
class RegionPlan:
    """Where each node of a graph runs: `level[node]`, and the nodes compiled as regions, per level."""

    level: dict[fx.Node, int]
    regions: dict[int, list[fx.Node]]
    outside: set[fx.Node]
    reason: str = ""  # why the graph is compiled whole (empty: it is split)

    @property
    def split(self) -> bool:
        return not self.reason


def plan_regions(gm: fx.GraphModule) -> RegionPlan:
    """Assign every node of `gm` a level and say which nodes form compiled regions (see the module doc)."""
    level: dict[fx.Node, int] = {}
    outside: set[fx.Node] = set()
    written_at: dict[fx.Node, int] = {}  # a graph input -> the level of the last fluxc op that wrote it
    nodes = list(gm.graph.nodes)
    for node in nodes:
        inputs = node.all_input_nodes
        if node.op == "get_attr" and not isinstance(operator.attrgetter(node.target)(gm), torch.Tensor):
            # a higher-order op's subgraph (flex attention's score_mod): its region would have to own it
            return RegionPlan({}, {}, set(), f"{node.format_node()} is a subgraph, not a tensor")
        if node.op in ("placeholder", "get_attr"):
            level[node] = 0
            outside.add(node)
            continue
        if node.op == "output":
            continue
        if _is_fluxc_op(node):
            level[node] = max((level[i] + (i not in outside) for i in inputs), default=0)
            outside.add(node)
            for target in _mutated_inputs(node):
                written_at[target] = max(written_at.get(target, 0), level[node])
        elif _mutates(node):
            return RegionPlan({}, {}, set(), f"{node.format_node()} writes in place")
        else:
            level[node] = max((level[i] for i in inputs), default=0)
            if _is_view(node) and all(i in outside for i in inputs):
                outside.add(node)
        for i in inputs:  # a read after a write runs after it
            if i in written_at:
                level[node] = max(level[node], written_at[i])
    # a read before a write must still run before it: region levels run after the outside nodes of their level
    position = {node: index for index, node in enumerate(nodes)}
    for node in nodes:
        if _is_fluxc_op(node):
            for target in _mutated_inputs(node):
                for reader in target.users:
                    if reader is node or reader not in level or position[reader] > position[node]:
                        continue
                    late = level[reader] >= level[node] if reader not in outside else level[reader] > level[node]
                    if late:
                        return RegionPlan({}, {}, set(), f"{reader.format_node()} reads what {node.name} "
                                                         f"writes but would run after it")
    regions: dict[int, list[fx.Node]] = {}
    for node in nodes:
        if node in level and node not in outside:
            regions.setdefault(level[node], []).append(node)
    if len(regions) < 2:
        return RegionPlan(level, regions, outside, "the graph has a single region")
    return RegionPlan(level, regions, outside)


@dataclass
class _Region:
    graph_module: fx.GraphModule
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    key: tuple


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("T", str(value.dtype), str(value.device), tuple(str(s) for s in value.shape),
                tuple(str(s) for s in value.stride()), value.requires_grad)
    if isinstance(value, torch.SymInt):
        return ("S", str(value.node.expr))
    return ("V", repr(value))


def _region(nodes: list[fx.Node], values: dict[fx.Node, Any]) -> _Region:
    """`nodes` as a graph of their own with canonical names, its inputs and outputs (nodes of the outer graph)."""
    members = set(nodes)
    inputs: list[fx.Node] = []
    for node in nodes:
        for i in node.all_input_nodes:
            if i not in members and i not in inputs:
                inputs.append(i)
    outputs = [n for n in nodes if any(u not in members for u in n.users)]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for index, i in enumerate(inputs):
        env[i] = graph.placeholder(f"arg{index}")
        env[i].meta["example_value"] = env[i].meta["val"] = values[i]
    for index, node in enumerate(nodes):
        copy = graph.create_node(node.op, node.target, map_arg(node.args, env.__getitem__),
                                 map_arg(node.kwargs, env.__getitem__), name=f"v{index}")
        if node in values:  # the propagated value: Dynamo's may assume an SDPA output's layout upstream
            copy.meta["example_value"] = copy.meta["val"] = values[node]
        env[node] = copy
    graph.output(tuple(env[o] for o in outputs))
    module = fx.GraphModule(torch.nn.Module(), graph)
    key = (module.code, tuple(_describe(values[i]) for i in inputs))
    return _Region(module, inputs, outputs, key)


def _fake_values(gm: fx.GraphModule, fake_mode: Any) -> dict[fx.Node, Any]:
    """Every node's fake value, propagated from the placeholders' (Dynamo's example values). Not the nodes'
    own `example_value`: the pass gives its ops their anchors' (an SDPA output's strides), and a region's
    example inputs must be what its inputs are at run time."""
    values: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            values[node] = meta_value(node)
        elif node.op == "get_attr":
            attr = operator.attrgetter(node.target)(gm)
            values[node] = fake_mode.from_tensor(attr, static_shapes=True) if isinstance(attr, torch.Tensor) else attr
        elif node.op in ("call_function", "call_method"):
            args = map_arg(node.args, values.__getitem__)
            kwargs = map_arg(node.kwargs, values.__getitem__)
            # the Python dispatcher as Dynamo traces: without it, C++ composites (matmul) read symbolic sizes as
            # ints and specialise the dynamic dimensions
            with fake_mode, enable_python_dispatcher():
                if node.op == "call_method":
                    values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    values[node] = node.target(*args, **kwargs)
    return values


@dataclass
class RegionalCompile:
    """The outcome of `compile_regions` (inspection, tests)."""

    regions: int = 0
    compiled: int = 0


def _call_compiled(fn: Callable) -> Callable:
    # a Dynamo backend's result takes the graph's inputs unpacked (compile_fx's carries a misleading
    # `_boxed_call` copied from the function it wraps)
    def fluxc_region(*args: Any) -> Any:
        return fn(*args)

    return fluxc_region


def _in_mode(value: Any, mode: Any) -> Any:
    """`value` as an example input of `mode`: a fake tensor of the same sizes and strides (the same SymInts:
    both modes share one ShapeEnv), SymInts and constants as they are."""
    if isinstance(value, (tuple, list)):
        return type(value)(_in_mode(v, mode) for v in value)
    if not isinstance(value, torch.Tensor) or getattr(value, "fake_mode", None) is mode:
        return value
    with mode, enable_python_dispatcher():
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)


def compile_regions(gm: fx.GraphModule, plan: RegionPlan, compile_fn: Callable[[fx.GraphModule, list], Callable],
                    modes: tuple[Any, Any], report: RegionalCompile | None = None) -> Callable:
    """Compile `plan`'s regions of `gm` with `compile_fn` (each distinct one once) and return the function that
    runs the graph: outside nodes as they are, regions as their compiled functions, in level order. `modes`:
    the fake mode of the graph's example values and the one the compiler runs under."""
    meta_mode, backend_mode = modes
    report = report if report is not None else RegionalCompile()
    start = time.perf_counter()
    values = {n: _in_mode(v, backend_mode) for n, v in _fake_values(gm, meta_mode).items()}
    log.debug("fluxc: the regions' example inputs took %.2f s", time.perf_counter() - start)
    compiled: dict[tuple, Callable] = {}
    top = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    nodes = list(gm.graph.nodes)
    outside_by_level: dict[int, list[fx.Node]] = {}
    for node in nodes:
        if node.op == "placeholder":
            env[node] = top.node_copy(node, env.__getitem__)
        elif node in plan.outside:
            outside_by_level.setdefault(plan.level[node], []).append(node)
    levels = sorted(set(plan.regions) | set(outside_by_level))
    for lvl in levels:
        for node in outside_by_level.get(lvl, []):
            env[node] = top.node_copy(node, env.__getitem__)
        if lvl not in plan.regions:
            continue
        region = _region(plan.regions[lvl], values)
        report.regions += 1
        fn = compiled.get(region.key)
        if fn is None:
            fn = _call_compiled(compile_fn(region.graph_module, [values[i] for i in region.inputs]))
            compiled[region.key] = fn
            report.compiled += 1
        call = top.call_function(fn, tuple(env[i] for i in region.inputs))
        for index, out in enumerate(region.outputs):
            env[out] = top.call_function(operator.getitem, (call, index))
            env[out].meta = dict(out.meta)
    output = next(n for n in reversed(nodes) if n.op == "output")
    top.node_copy(output, env.__getitem__)
    counters["regions"] += report.regions
    counters["regions_compiled"] += report.compiled
    runner = fx.GraphModule(gm, top)
    return runner.forward


def compile_graph_in_regions(gm: fx.GraphModule, example_inputs: Sequence[Any],
                             compile_fn: Callable[[fx.GraphModule, list], Callable]) -> tuple[Callable, str]:
    """`gm` compiled region by region where it splits (returns the callable and ""), else whole (and why not)."""
    plan = plan_regions(gm)
    # Dynamo's example values live in its tracing mode; the backend compiles under a second mode on the same
    # ShapeEnv (the tracing context's), which the regions' example inputs must belong to
    meta_mode = next((v.fake_mode for n in gm.graph.nodes if n.op == "placeholder"
                      for v in [meta_value(n)] if isinstance(v, FakeTensor)), None)
    context = torch._guards.TracingContext.try_get()
    backend_mode = context.fake_mode if context is not None else None
    if plan.split and (meta_mode is None or backend_mode is None):
        plan.reason = "no fake values to compile its regions with (not traced by Dynamo)"
    if not plan.split:
        return compile_fn(gm, list(example_inputs)), plan.reason
    report = RegionalCompile()
    runner = compile_regions(gm, plan, compile_fn, (meta_mode, backend_mode), report)
    log.info("fluxc: Inductor compiled %d distinct region(s) for the %d regions between fluxc's ops",
             report.compiled, report.regions)
    return runner, ""
