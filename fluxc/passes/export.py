"""Export post-pass over a Flux-rewritten graph (runs after `flux_pass`, never changes it).

A deployed program has no `RouteState` to mutate and needs its decisions as data:
- the `record_routes` node goes; the prefill program returns the per-layer routes as a (B, L) bool output and
  the decode program takes them as an input (the decision stored at prefill);
- with routers, each routed site becomes ``torch.cond(route.all(), full attention, routed attention)``:
  the data-dependent per-layer choice (an ONNX ``If``); the routed branch is `fluxc::routed_attention`,
  which keeps per-sequence routes exact when a batch mixes both;
- with a fixed route, full layers become plain attention and sparse layers keep the routed op with its
  constant route: no choice is left in the program;
- a site whose mask the rewrite read as structure (`fluxc::causal_positions`: causal + a key mask, the
  kernels' input) stays one `fluxc::routed_attention`, with the router's or the fixed route: the op makes the
  per-sequence FA/SA choice itself (the Triton kernels on a GPU), so a `torch.cond` would only duplicate it;
- a decode step over the decode engine's cache writes the token functionally (`cache_write_functional`):
  the program returns the updated buffers instead of mutating its inputs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import Tensor

from fluxc.errors import ExportError
from fluxc.ops.attention import full_attention_reference
from fluxc.ops.cache import write_slots
from fluxc.spec import SiteSpec

STATE_ATTR = "flux_state.route"

def full_site(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, spec: str) -> Tensor:
    """FA branch of a site whose route is fixed to full; left visible to the compiler, which lowers it like the
    model's own attention."""
    return full_attention_reference(q, k, v, attn_mask, SiteSpec.decode(spec))


def choose_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, route: Tensor, qpos: Tensor,
                     key_start: Tensor, spec: str) -> Tensor:
    """The per-layer choice: FA when every sequence of the batch is routed full, else the routed op."""

    # Opaque contiguous copies: Inductor compiles each branch for contiguous operands, but lays out a plain
    # `.contiguous()` clone of a view (q/k/v are transposed projections) in whichever order it likes; the results
    # go through the same copy so that both branches hand back one fresh contiguous buffer (the layout tested)
    dense = torch.ops.fluxc.dense_copy.default

    def fa(q, k, v, route, qpos, key_start, *mask):
        # an opaque op: AOTInductor's C++ wrapper inlines branches, and its size names (ps0, ...) of Triton
        # kernels inside a branch collide with the enclosing graph's (wrong sizes on CUDA, torch 2.11)
        return dense(torch.ops.fluxc.full_attention.default(q, k, v, mask[0] if mask else None, spec))

    def routed(q, k, v, route, qpos, key_start, *mask):
        return dense(torch.ops.fluxc.routed_attention.default(q, k, v, mask[0] if mask else None, route, qpos,
                                                              key_start, spec))

    q, k, v = dense(q), dense(k), dense(v)
    operands = (q, k, v, route, qpos, key_start) + (() if attn_mask is None else (dense(attn_mask),))
    return torch.cond(route.all(), fa, routed, operands)


def cache_write_functional(k_store: Tensor, v_store: Tensor, k_new: Tensor, v_new: Tensor, lengths: Tensor,
                           layout: int, spec: str, route: Tensor) -> tuple[Tensor, Tensor]:
    """`fluxc::cache_write` without mutation: the buffers (B, Hkv, C, D) with this token (B, Hkv, 1, D) written at
    its slot (real index lengths - 1; its ring slot in a ring layer)."""
    batch, heads = k_new.shape[:2]
    index = write_slots(lengths, layout, SiteSpec.decode(spec)).view(batch, 1, 1, 1)
    keys = k_store.scatter(2, index.expand(batch, heads, 1, k_new.shape[-1]), k_new.to(k_store.dtype))
    values = v_store.scatter(2, index.expand(batch, heads, 1, v_new.shape[-1]), v_new.to(v_store.dtype))
    return keys, values


@dataclass
class ExportGraph:
    """What `export_pass` did: the layer count and the route of each routed layer (None: router)."""

    num_layers: int
    routed_layers: list[int]
    conds: int
    routes_input: bool
    structural_sites: int = 0  # routed sites left as one op on a structural mask (no choice in the program)


def _is_op(node: fx.Node, op: Any) -> bool:
    return node.op == "call_function" and node.target is op


def _is_structural_mask(mask: object) -> bool:
    """True when a routed site's mask is the key mask of `fluxc::causal_positions` (a structural mask)."""
    return (isinstance(mask, fx.Node) and _is_op(mask, operator.getitem)
            and isinstance(mask.args[0], fx.Node) and _is_op(mask.args[0], torch.ops.fluxc.causal_positions.default))


def export_pass(gm: fx.GraphModule, *, step: Literal["prefill", "decode"], fixed: tuple[bool, ...] | None,
                num_layers: int) -> ExportGraph:
    """Rewrite the Flux graph `gm` in place into its export form (see the module docstring).

    `fixed` is the per-layer forced route (True = full) or None for routers. The prefill graph gains a
    (B, L) bool `routes` output after its own outputs; a router-routed decode graph gains a (B, L) bool
    `routes` input after its own placeholders.
    """
    graph = gm.graph
    if any(n.op == "call_function" and getattr(n.target, "__name__", "") in ("flex_positions", "materialize")
           or _is_op(n, torch.ops.fluxc.materialize.default) for n in graph.nodes):
        raise ExportError("the model's attention runs through FlexAttention, which fluxc does not export yet; "
                          "load the model with attn_implementation='sdpa' or 'eager' and export again")
    _functional_cache_writes(graph)
    route_of: dict[int, fx.Node] = {}
    dead: list[fx.Node] = []
    for node in [n for n in graph.nodes if _is_op(n, torch.ops.fluxc.record_routes.default)]:
        _, _, routes, layers, _ = node.args
        route_of.update((int(layer), route) for layer, route in zip(layers, routes))
        # the undecided-row count is a serving diagnostic on the route state: a program keeps no state
        dead.extend(n for n in node.all_input_nodes if n not in routes)  # before erasing: erase clears args
        graph.erase_node(node)
    for node in [n for n in graph.nodes if _is_op(n, torch.ops.fluxc.record_margins.default)]:
        dead.extend(node.all_input_nodes)  # the margins are a serving diagnostic too: a program keeps no state
        graph.erase_node(node)
    layer_of_route = {route: layer for layer, route in route_of.items()}
    sites = [n for n in graph.nodes if _is_op(n, torch.ops.fluxc.routed_attention.default)]
    site_layer = {}
    for site in sites:
        if site.args[4] not in layer_of_route:
            raise ExportError(f"internal: routed site {site.name} has no recorded route; the rewrite and the export "
                              f"pass disagree (please report)")
        site_layer[site] = layer_of_route[site.args[4]]

    routes_input = False
    if step == "decode" and fixed is None and route_of:
        # the decision stored at prefill arrives as data: (B, L) bool, column l for layer l
        last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last_placeholder):
            routes = graph.placeholder("routes")
        routes.meta["example_value"] = None
        for layer, route in route_of.items():
            with graph.inserting_after(routes):
                column = graph.call_method("select", (routes, 1, layer))  # (B,)
            route.replace_all_uses_with(column)
            dead.append(route)
            route_of[layer] = column
        routes_input = True
    else:
        _drop_state_reads(gm, num_layers)

    conds = structural = 0
    for site in sites:
        layer = site_layer[site]
        q, k, v, mask, route, qpos, key_start, spec = site.args
        if _is_structural_mask(mask):
            structural += 1
            continue  # the op chooses per sequence; a fixed route is already its constant route input
        with graph.inserting_before(site):
            if fixed is not None and fixed[layer]:
                new = graph.call_function(full_site, (q, k, v, mask, spec))
            elif fixed is not None:
                continue  # fixed sparse: the routed op with its constant route (masked attention)
            else:
                new = graph.call_function(choose_attention, tuple(site.args))
                conds += 1
        site.replace_all_uses_with(new)
        graph.erase_node(site)

    if step == "prefill":
        _add_routes_output(graph, route_of, num_layers)
    _erase_dead(graph, dead)
    if any(n.op == "get_attr" and str(n.target) == STATE_ATTR for n in graph.nodes):
        raise ExportError("internal: the route state is still read after the export pass (please report)")
    graph.lint()
    gm.recompile()
    return ExportGraph(num_layers, sorted(route_of), conds, routes_input, structural)


def _erase_dead(graph: fx.Graph, roots: list[fx.Node]) -> None:
    # Only what the export pass made dead goes (the router of a decode step): a global DCE would also drop
    # in-place writes FX does not mark impure (the engine layout's `copy_` into its buffers).
    work = list(roots)
    while work:
        node = work.pop()
        if getattr(node, "_erased", False):  # already gone (the prefill drops its state reads itself)
            continue
        if (node.users or node.op not in ("call_function", "call_method", "get_attr") or node.is_impure()
                or (node.op == "call_method" and str(node.target).endswith("_"))):
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        work.extend(inputs)


def _functional_cache_writes(graph: fx.Graph) -> None:
    """Replace each in-place `cache_write` by `cache_write_functional`; later readers see the written buffers."""
    writes = [n for n in graph.nodes if n.op == "call_function"
              and n.target in (torch.ops.fluxc.cache_write, torch.ops.fluxc.cache_write.default)]
    for write in writes:
        k_store, v_store = write.args[0], write.args[1]
        with graph.inserting_after(write):
            new = graph.call_function(cache_write_functional, tuple(write.args), dict(write.kwargs))
        with graph.inserting_after(new):
            keys = graph.call_function(operator.getitem, (new, 0))
        with graph.inserting_after(keys):
            values = graph.call_function(operator.getitem, (new, 1))
        order = {n: i for i, n in enumerate(graph.nodes)}
        for store, written in ((k_store, keys), (v_store, values)):
            for user in list(store.users):
                if user not in (write, new) and order[user] > order[values]:
                    user.replace_input_with(store, written)
            for user in list(written.users):  # a copy of a functional result is the result
                if (user.op == "call_method" and user.target == "clone") or _is_op(user, torch.clone):
                    user.replace_all_uses_with(written)
                    graph.erase_node(user)
        graph.erase_node(write)


def _drop_state_reads(gm: fx.GraphModule, num_layers: int) -> None:
    """Prefill programs start fresh sequences: every read of the stored decisions sees 'unset' (-1)."""
    graph = gm.graph
    for node in [n for n in graph.nodes if n.op == "get_attr" and str(n.target) == STATE_ATTR]:
        state = gm.get_submodule("flux_state").route
        for user in list(node.users):
            if _is_op(user, torch.narrow) and user.args[1:3] == (0, 0):
                batch = user.args[3]  # (B, L) int8 of -1, B the traced batch size
                with graph.inserting_before(user):
                    unset = graph.call_function(torch.full, ((batch, num_layers), -1),
                                                {"dtype": torch.int8, "device": state.device})
                user.replace_all_uses_with(unset)
                graph.erase_node(user)
            else:
                raise ExportError(f"internal: unexpected reader {user.format_node()} of the route state "
                                  f"(please report)")
        graph.erase_node(node)


def _add_routes_output(graph: fx.Graph, route_of: dict[int, fx.Node], num_layers: int) -> None:
    output = next(n for n in graph.nodes if n.op == "output")
    outs = output.args[0]
    flat = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    with graph.inserting_before(output):
        first = flat[0]
        batch = graph.call_method("size", (first, 0))
        value = first.meta.get("example_value")
        device = value.device if isinstance(value, Tensor) else torch.device("cpu")
        columns = []
        for layer in range(num_layers):
            if layer in route_of:
                columns.append(route_of[layer])
            else:  # a site kept as-is always computes full attention
                columns.append(graph.call_function(torch.ones, ((batch,),), {"dtype": torch.bool, "device": device}))
        routes = graph.call_function(torch.stack, (columns, 1))  # (B, L) bool, True = full attention
    output.args = ((*flat, routes),)
