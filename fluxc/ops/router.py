"""The Layer Router of Flux Attention: pooled pre-RoPE queries -> MLP -> 2 logits (index 1 = full attention)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxc.errors import ConfigError

ROUTER_PARAM_NAMES = (
    "feature.0.weight", "feature.0.bias", "feature.2.weight", "feature.2.bias",
    "head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias", "head.4.weight", "head.4.bias",
)


class LayerRouter(nn.Module):
    """Per-layer router MLP: Linear(D,h1) SiLU Linear(h1,h2) | Linear(h2,h3) SiLU Linear(h3,h4) SiLU Linear(h4,2)."""

    def __init__(self, head_dim: int, hidden: tuple[int, int, int, int] = (1024, 256, 512, 128)) -> None:
        super().__init__()
        h1, h2, h3, h4 = hidden
        self.head_dim = head_dim
        self.feature = nn.Sequential(nn.Linear(head_dim, h1), nn.SiLU(), nn.Linear(h1, h2))
        self.head = nn.Sequential(nn.Linear(h2, h3), nn.SiLU(), nn.Linear(h3, h4), nn.SiLU(), nn.Linear(h4, 2))

    def weights(self) -> list[Tensor]:
        """Parameters in the order `fluxc::router_logits` takes them."""
        named = dict(self.named_parameters())
        return [named[n] for n in ROUTER_PARAM_NAMES]

    def forward(self, query: Tensor, valid: Tensor | None, pool_size: int) -> Tensor:
        """query (B, T, H, D), valid (B, T) bool or None -> logits (B, 2) float32."""
        if valid is None:
            valid = torch.ones(query.shape[:2], dtype=torch.bool, device=query.device)
        return router_logits(query, valid, self.weights(), pool_size)


def pooled_token_index(valid: Tensor, pool_size: int) -> Tensor:
    """Positions of the first and last `pool_size` real tokens (concatenated), (B, 2P) int64, -1 where a prompt
    has fewer real tokens than the rank. valid (B, T) marks real (non-padding) tokens, left or right padded.

    Found by a search in the running count of real tokens (O(B * T) integers). It depends on the mask alone, so a
    compiled model computes it once per forward for every layer's router (`fluxc.passes.lower`)."""
    batch, seq = valid.shape
    count = torch.cumsum(valid.to(torch.int64), dim=1)  # (B, T) real tokens up to and including t
    n_real = count[:, -1:]  # (B, 1)
    j = torch.arange(pool_size, device=valid.device)  # (P,)
    ranks = torch.cat([j.expand(batch, -1), n_real - pool_size + j], dim=1)  # (B, 2P) ranks of the pooled tokens
    used = (ranks >= 0) & (ranks < n_real)  # (B, 2P) ranks that exist
    index = torch.searchsorted(count, (ranks + 1).clamp(1, seq).contiguous())  # (B, 2P) first t with count > rank
    return torch.where(used, index.clamp_max(seq - 1), -1)


def pool_queries_at(query: Tensor, index: Tensor) -> Tensor:
    """Mean over the tokens at `index` (B, 2P; -1 skipped), then over heads: (B, D) fp32. query (B, T, H, D).
    Reads only those 2P tokens, no copy of the queries."""
    used = index >= 0  # (B, 2P)
    gather = index.clamp_min(0)[:, :, None, None].expand(-1, -1, *query.shape[2:])  # (B, 2P, H, D)
    per_token = query.gather(1, gather).to(torch.float32).mean(dim=2)  # (B, 2P, D) mean over heads
    weight = used.to(torch.float32)  # (B, 2P)
    pooled = torch.einsum("bp,bpd->bd", weight, per_token)  # (B, D)
    return pooled / weight.sum(dim=1, keepdim=True).clamp_min(1.0)


def pool_queries(query: Tensor, valid: Tensor, pool_size: int) -> Tensor:
    """Mean over the first and last `pool_size` real tokens (concatenated), then over heads: (B, D) fp32.

    query (B, T, H, D); valid (B, T) marks real (non-padding) tokens, left or right padded. A token in both
    slices (a prompt shorter than 2 * pool_size) counts twice."""
    return pool_queries_at(query, pooled_token_index(valid, pool_size))


def router_logits_reference(query: Tensor, valid: Tensor, weights: list[Tensor], pool_size: int) -> Tensor:
    return router_mlp(pool_queries(query, valid, pool_size), weights)


def router_logits_at(query: Tensor, index: Tensor, weights: list[Tensor]) -> Tensor:
    """`router_logits_reference` given the pooled tokens' `pooled_token_index`: one layer's share of the work."""
    return router_mlp(pool_queries_at(query, index), weights)


def router_mlp(x: Tensor, weights: list[Tensor]) -> Tensor:
    """The router's MLP on pooled inputs (B, D) -> logits (B, 2) float32."""
    w1, b1, w2, b2, w3, b3, w4, b4, w5, b5 = (w.to(torch.float32) for w in weights)
    x = F.linear(F.silu(F.linear(x.to(torch.float32), w1, b1)), w2, b2)
    x = F.silu(F.linear(x, w3, b3))
    x = F.silu(F.linear(x, w4, b4))
    return F.linear(x, w5, b5)  # (B, 2)


_CAPTURES: list[list[Tensor]] = []


@contextlib.contextmanager
def capture_router_inputs() -> Iterator[list[Tensor]]:
    """Collect the pooled router input (B, D) float32 of every `fluxc::router_logits` call run eagerly inside
    the block, in call (= layer) order: calibration statistics for router training."""
    found: list[Tensor] = []
    _CAPTURES.append(found)
    try:
        yield found
    finally:
        _CAPTURES.remove(found)


@torch.library.custom_op("fluxc::router_logits", mutates_args=())
def router_logits(query: Tensor, valid: Tensor, weights: list[Tensor], pool_size: int) -> Tensor:
    """Router logits (B, 2) float32 of one layer from its pre-RoPE queries (B, T, H, D)."""
    if _CAPTURES:
        _CAPTURES[-1].append(pool_queries(query, valid, pool_size).detach().clone())
    return router_logits_reference(query, valid, weights, pool_size)


@router_logits.register_fake
def _(query, valid, weights, pool_size):
    return query.new_empty((query.shape[0], 2), dtype=torch.float32)


@torch.library.custom_op("fluxc::router_logits_backward", mutates_args=())
def router_logits_backward(grad: Tensor, query: Tensor, valid: Tensor, weights: list[Tensor],
                           pool_size: int) -> list[Tensor]:
    """Gradients w.r.t. (query, *weights) by recomputation (`torch.func.vjp`: custom-op bodies run below
    autograd)."""
    _, pullback = torch.func.vjp(lambda q_, *ws: router_logits_reference(q_, valid, list(ws), pool_size),
                                 query, *weights)
    return [g.contiguous() for g in pullback(grad)]


@router_logits_backward.register_fake
def _(grad, query, valid, weights, pool_size):
    return [torch.empty_like(query)] + [torch.empty_like(w) for w in weights]


def _setup_context(ctx, inputs, output):
    query, valid, weights, pool_size = inputs
    ctx.save_for_backward(query, valid, *weights)
    ctx.pool_size = pool_size


def _backward(ctx, grad):
    query, valid, *weights = ctx.saved_tensors
    grads = router_logits_backward(grad.contiguous(), query, valid, weights, ctx.pool_size)
    return grads[0], None, grads[1:], None


router_logits.register_autograd(_backward, setup_context=_setup_context)


def _layer_columns(layers: list[int]) -> list[tuple[slice | int, slice | int]]:
    """(state columns, value columns) pairs writing values column i to state column layers[i]: one slice when the
    layers are consecutive (the usual case), else one pair per layer. Python indices only: a host-side index
    tensor would be a copy a CUDA graph cannot capture."""
    first = layers[0]
    if list(layers) == list(range(first, first + len(layers))):
        return [(slice(first, first + len(layers)), slice(None))]
    return list(zip(layers, range(len(layers))))


@torch.library.custom_op("fluxc::record_routes", mutates_args=("state", "counter"))
def record_routes(state: Tensor, counter: Tensor, routes: list[Tensor], layers: list[int],
                  undecided: list[Tensor]) -> None:
    """state[:B, layers[i]] = routes[i] (B,) and rows >= B unset: keeps a forward's decisions for the decode steps;
    counter += the rows of `undecided` (each (B,) bool: a sequence whose router logits were not finite, routed
    full). One op per forward, after its last layer: a prefill is host-bound, and per-layer ops cost launches."""
    batch = routes[0].shape[0]
    decided = torch.stack(routes, dim=1).to(state.dtype)  # (B, n)
    for into, of in _layer_columns(layers):
        state[:batch, into].copy_(decided[:, of])
        state[batch:, into].fill_(-1)  # a smaller batch must not inherit older rows
    if undecided:
        counter.add_(torch.stack(undecided).sum().to(counter.dtype))


@record_routes.register_fake
def _(state, counter, routes, layers, undecided):
    return None


@torch.library.custom_op("fluxc::record_margins", mutates_args=("state",))
def record_margins(state: Tensor, margins: list[Tensor], starts: list[Tensor], layers: list[int]) -> None:
    """state[:B, layers[i]] = margins[i] (B,) where starts[i] (a sequence's prefill), else kept: each router's
    margin over the operating point (> 0 runs full attention), kept beside the routes for calibration and for
    telling a near-tied decision from a clear one. The decode steps' rows keep their prefill's margins."""
    batch = margins[0].shape[0]
    new = torch.stack(margins, dim=1).to(state.dtype)  # (B, n)
    begin = torch.stack(starts, dim=1)  # (B, n)
    for into, of in _layer_columns(layers):
        held = state[:batch, into]
        held.copy_(torch.where(begin[:, of], new[:, of], held))


@record_margins.register_fake
def _(state, margins, starts, layers):
    return None


class RouteRecorder(nn.Module):
    """Training-mode companion of the rewritten graph: holds the Gumbel temperature and receives each
    layer's straight-through sample, so the loss can see per-sequence sparsity."""

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("tau", torch.tensor(float(tau)), persistent=False)
        self.records: dict[int, tuple[Tensor, Tensor]] = {}
        # (B, T) bool: the tokens the routers pool (the prompt, as at inference); None: every real token
        self.router_tokens: Tensor | None = None
        # (B, L, 2) uniform draws of the Gumbel samples, set per step by the trainer so that a sample is a function
        # of (seed, step, example) whatever the number of processes; None: drawn from torch's generator
        self.noise: Tensor | None = None
        # (B, L) 0/1 routes to take instead of sampling (1 = full attention): the target routes of route supervision
        self.forced: Tensor | None = None

    def clear(self) -> None:
        self.records = {}
        self.router_tokens = None
        self.noise = None
        self.forced = None

    def samples(self) -> Tensor:
        """(B, L) float straight-through samples of the last forward (1 = full attention)."""
        return torch.stack([self.records[i][0] for i in sorted(self.records)], dim=1)

    def logits(self) -> Tensor:
        """(B, L, 2) router logits of the last forward."""
        return torch.stack([self.records[i][1] for i in sorted(self.records)], dim=1)


def gumbel_route(logits: Tensor, tau: Tensor, recorder: RouteRecorder | None = None, layer: int = 0) -> Tensor:
    """Hard 0/1 sample (B,) of 'full attention' with a straight-through Gumbel-softmax gradient; its uniform draws
    are `recorder.noise[:, layer]` when the trainer set them; `recorder.forced[:, layer]` replaces the sample."""
    if recorder is not None and recorder.forced is not None:
        return recorder.forced[:, layer].to(device=logits.device, dtype=logits.dtype)  # (B,)
    noise = recorder.noise if recorder is not None else None
    if noise is not None:
        uniform = noise[:, layer].to(device=logits.device, dtype=logits.dtype).clamp(1e-10, 1.0 - 1e-7)  # (B, 2)
    else:
        uniform = torch.rand_like(logits).clamp_(1e-10, 1.0 - 1e-7)
    soft = torch.softmax((logits - torch.log(-torch.log(uniform))) / tau, dim=-1)  # (B, 2)
    hard = torch.nn.functional.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype)
    return (hard + soft - soft.detach())[:, 1]  # (B,) forward value exactly 0 or 1


def router_valid(recorder: RouteRecorder, valid: Tensor) -> Tensor:
    """The routers' token mask in training: the real tokens that are also `recorder.router_tokens` (all real
    tokens of a sequence that has none of them)."""
    tokens = recorder.router_tokens
    if tokens is None:
        return valid
    if tokens.shape != valid.shape:
        raise ConfigError(f"RouteRecorder.router_tokens has shape {tuple(tokens.shape)} but the batch's tokens are "
                          f"{tuple(valid.shape)}; set it from this batch's labels (or to None)")
    chosen = valid & tokens.to(device=valid.device, dtype=torch.bool)  # (B, T)
    return torch.where(chosen.any(dim=1, keepdim=True), chosen, valid)  # a sequence with none pools all its tokens


def record_sample(recorder: RouteRecorder, layer: int, sample: Tensor, logits: Tensor) -> Tensor:
    recorder.records[layer] = (sample, logits)
    return sample
