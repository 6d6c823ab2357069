"""Router cost at prefill: `fluxc::router_logits` on one layer's (1, T, 32, 128) bf16 pre-RoPE query, Llama-3.1-8B
shape, router MLP (1024, 256, 512, 128), run as the custom op (eager, as export and training run it) and inlined
and compiled by Inductor as `fluxc.compile` runs it: the pooled tokens' positions (a scan of the mask) once per
forward for all 32 layers, each layer's gather, pooling and MLP on its own.
- `inductor`: one compiled function of the scan and 32 layers' routers (each its own weights), as one forward
  of the compiled model runs them, replayed as a CUDA graph (device time: in a prefill the host launches hide
  behind attention) and divided by 32;
- `inductor_call`: one compiled call per layer, CUDA events (its Dynamo guards and launches in every call: the
  upper bound), layer_ms + index_ms / 32;
- `op`: the custom op alone. Medians over 50 calls after 10 warm-up calls.
JSON (provenance, rows, targets of benchmarks/targets.toml with bench "router_op") to `out`.

    python benchmarks/router_op.py out.json     # needs `import fluxc` (scripts/gpu.sh puts the checkout on PYTHONPATH)
"""

from __future__ import annotations

import argparse

import torch

import fluxc  # noqa: F401  (registers torch.ops.fluxc)
from fluxc.ops.router import LayerRouter, pooled_token_index, router_logits_at

import harness
import measures

POOL_SIZE = 150  # FluxConfig's default: tokens pooled at each end of the prompt
LAYERS = 32  # Llama-3.1-8B: the layers one forward's mask scan serves


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="result JSON")
    args = parser.parse_args(argv)
    routers = [LayerRouter(128, (1024, 256, 512, 128)).cuda() for _ in range(LAYERS)]
    per_layer = [[w.detach() for w in r.weights()] for r in routers]
    weights = per_layer[0]  # the single-layer rows' router
    command = None if argv is None else ["benchmarks/router_op.py", *argv]
    results = harness.Results(args.out, harness.provenance(command, timing="CUDA events, median of 50 calls after 10"),
                              targets=[])
    # as the compiled model runs it: inlined tensor ops (passes/lower.py), compiled by Inductor
    index_fn = torch.compile(pooled_token_index, dynamic=False)
    layer_fn = torch.compile(router_logits_at, dynamic=False)

    @torch.compile(dynamic=False)
    def forward_fn(query: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        index = pooled_token_index(valid, POOL_SIZE)  # (1, 2P), once for every layer
        return torch.stack([router_logits_at(query, index, w) for w in per_layer])  # (layers, 1, 2)

    for seq in (32768, 131072):
        query = torch.randn(1, seq, 32, 128, device="cuda", dtype=torch.bfloat16)  # (1, T, H, D)
        valid = torch.ones(1, seq, dtype=torch.bool, device="cuda")  # (1, T)
        op = harness.iter_ms(lambda q=query, v=valid: torch.ops.fluxc.router_logits(q, v, weights, POOL_SIZE),
                             iters=50, warm=10, cuda=True)
        results.add(T=seq, impl="op", pool_size=POOL_SIZE, ms=harness.median(op))
        index = index_fn(valid, POOL_SIZE)  # (1, 2P)
        index_ms = harness.median(harness.iter_ms(lambda v=valid: index_fn(v, POOL_SIZE), iters=50, warm=10, cuda=True))
        layer_ms = harness.median(harness.iter_ms(lambda q=query, i=index: layer_fn(q, i, weights), iters=50, warm=10,
                                                  cuda=True))
        results.add(T=seq, impl="inductor_call", pool_size=POOL_SIZE, ms=layer_ms + index_ms / LAYERS,
                    layer_ms=layer_ms, index_ms=index_ms, layers=LAYERS)
        forward_ms = harness.do_bench_ms(lambda q=query, v=valid: forward_fn(q, v), graph=True)
        results.add(T=seq, impl="inductor", pool_size=POOL_SIZE, ms=forward_ms / LAYERS, forward_ms=forward_ms,
                    layers=LAYERS)
    results.data["targets"] = measures.targets_for("router_op", results.data)
    results.flush()
    harness.print_targets(results.data["targets"])


if __name__ == "__main__":
    main()
