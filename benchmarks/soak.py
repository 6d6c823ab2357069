"""Soak: a long request stream through the decode engine with cancellations and injected failures; nothing may
be lost or leaked.

Model: SmolLM2-135M-Instruct (bf16) with its shipped router (`fluxc.compile(model, router)`, the default
config). Prompts: held-out chat prompts of lengths drawn from [min-len, max-len]; `new` greedy tokens each.
The engine (8 slots) is warmed up, then serves the stream as a server loop would: admit while pages allow,
`step`, `collect` what finished. Faults, by a seeded draw per request:
- `cancel`: cancelled after a random number of its tokens (a client going away);
- `fail-prefill` / `fail-decode`: its page allocation fails at admission / on a later page (`failing_allocations`);
- `nan`: its prompt holds a token whose embedding is NaN (`poison_token`, hooked in before compiling);
- `oov`: its prompt holds a token id outside the vocabulary (rejected at admission).
Afterwards: pages in use and reserved (0 wanted), device memory against its level after warm-up, compiles and
CUDA-graph captures after warm-up (0 wanted), and every unaffected request against a clean run of the same
prompts through the same server loop on the same engine (other neighbours in its decode batches), token for
token (0 lost wanted). The engine runs `batch_invariant=True` (one decode bucket): a fault changes a request's
neighbours, and only a batch-invariant decode makes its tokens independent of them (`--no-batch-invariant`
measures the default buckets, where a bf16 near-tie may tip either way when the batch size differs).

    python benchmarks/soak.py --out soak.json [--requests 1000] [--gguf path.gguf]   # GPU
    python benchmarks/soak.py --smoke --out /tmp/soak.json                            # tiny, CPU
"""

from __future__ import annotations

import argparse
import collections
import random
import time
from typing import Any

import torch

import fluxc
from fluxc.serve.engine import DecodeEngine
from fluxc.serve.faults import failing_allocations, poison_token

import harness
import measures
from request_stream import add_model_arguments, prompts_for, served_model

FAULTS = ("cancel", "fail-prefill", "fail-decode", "nan", "oov")


def plan_faults(count: int, cancel: float, fail: float, seed: int) -> list[str]:
    """Per request: 'clean' or one fault; failures split evenly over the four failure kinds."""
    rng = random.Random(seed)
    plan = []
    for _ in range(count):
        u = rng.random()
        plan.append("cancel" if u < cancel else rng.choice(FAULTS[1:]) if u < cancel + fail else "clean")
    return plan


def serve(engine: DecodeEngine, prompts: list[torch.Tensor], new: int, plan: list[str], seed: int,
          check_every: int = 16) -> tuple[dict[int, Any], int]:
    """Serve `prompts` with the planned faults; returns (index -> tokens or RequestError, decode steps)."""
    rng = random.Random(seed + 1)
    cancel_after = {i: rng.randint(1, max(1, new - 1)) for i, p in enumerate(plan) if p == "cancel"}
    index_of: dict[int, int] = {}  # request id -> prompt index, ids taken at each admission attempt
    takes: collections.Counter = collections.Counter()

    def fails(owner: int | None) -> bool:
        kind = plan[index_of[owner]] if owner in index_of else "clean"
        takes[owner] += 1
        return kind == "fail-prefill" or (kind == "fail-decode" and takes[owner] > 1)

    waiting = collections.deque(range(len(prompts)))
    live: dict[int, int] = {}
    outcomes: dict[int, Any] = {}
    steps = 0
    assert engine.pool is not None, "warm the engine up first"
    with failing_allocations(engine.pool, fails):
        while waiting or live:
            while waiting and engine.can_admit(prompts[waiting[0]].numel(), new):
                index = waiting.popleft()
                index_of[engine.next_request_id] = index
                try:
                    request = engine.add_request(prompts[index], new)
                except fluxc.FluxError as exc:  # this request alone
                    outcomes[index] = exc
                    continue
                live[request] = index
            if not live:
                if waiting:
                    raise fluxc.CapacityError(f"prompt {waiting[0]} never fits the pool")
                break
            engine.step()
            steps += 1
            if steps % check_every == 0:
                engine.check_faults()
            for request, index in list(live.items()):
                if plan[index] == "cancel" and not engine.finished(request) and \
                        len(engine.tokens_of(request)) >= cancel_after[index]:
                    engine.cancel(request)
                if engine.finished(request):
                    outcomes[index] = engine.collect(request)
                    del live[request]
    return outcomes, steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--cancel", type=float, default=0.05)
    ap.add_argument("--fail", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True)
    add_model_arguments(ap)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    model, tokenizer, router = served_model(args, "soak")
    if args.smoke:
        args.requests, args.min_len, args.max_len, args.new = min(args.requests, 40), 700, 900, 6
        args.cancel, args.fail = max(args.cancel, 0.15), max(args.fail, 0.25)  # every fault kind shows up
    vocab = model.config.vocab_size
    poison = vocab - 1
    prompts = [p.masked_fill(p == poison, poison - 1) for p in prompts_for(tokenizer, args.requests, args.min_len,
                                                                           args.max_len, seed=args.seed)]
    plan = plan_faults(args.requests, args.cancel, args.fail, args.seed)
    served = [p if kind not in ("nan", "oov") else torch.cat([p[:-3], torch.tensor([poison if kind == "nan"
                                                                                    else vocab + 5]), p[-3:]])
              for p, kind in zip(prompts, plan)]
    results = harness.Results(args.out, harness.provenance(argv and ["benchmarks/soak.py", *argv],
                                                           model="tiny" if args.smoke else "SmolLM2-135M-Instruct"))
    poison_token(model, poison)  # before compiling: Dynamo traces the hook into the graphs
    fm = fluxc.compile(model, router)
    engine = DecodeEngine(fm, max_batch=8, max_len=args.max_len + args.new + 8, batch_invariant=args.batch_invariant)
    warm_s = engine.warm_up()
    harness.sync(cuda)
    base_memory = torch.cuda.memory_allocated() if cuda else None
    compiles, captures = engine.compiles, engine.stats["graphs_captured"]

    start = time.perf_counter()
    outcomes, steps = serve(engine, served, args.new, plan, args.seed)
    harness.sync(cuda)
    soak_s = time.perf_counter() - start
    leaked, reserved = engine.pages_in_use(), engine.reserved_pages
    memory_delta = torch.cuda.memory_allocated() - base_memory if cuda else None
    soak_compiles, soak_captures = engine.compiles - compiles, engine.stats["graphs_captured"] - captures

    # the clean run: the same prompts, no faults, through the same server loop on the same engine. Its batches
    # differ (no cancelled or failed neighbours); its admissions are one prompt per prefill as in the soak, since
    # a prompt prefilled in a left-padded group is not bitwise the prompt prefilled alone (bf16 GEMM shapes).
    unaffected = [i for i, kind in enumerate(plan) if not isinstance(outcomes.get(i), fluxc.FluxError)]
    clean, _ = serve(engine, [prompts[i] for i in unaffected], args.new, ["clean"] * len(unaffected), args.seed)
    lost = [i for k, i in enumerate(unaffected)  # an error or no answer in the clean run counts as lost too
            if not isinstance(clean.get(k), torch.Tensor) or not torch.equal(outcomes[i].cpu(), clean[k].cpu())]
    errors = {i: out for i, out in outcomes.items() if isinstance(out, fluxc.FluxError)}
    unexpected = [i for i in errors if plan[i] == "clean"]
    missing = [i for i in range(args.requests) if i not in outcomes]
    by_kind = collections.Counter(plan)
    hit = collections.Counter(plan[i] for i in errors)
    results.add(kind="warmup", impl="fluxc", s=warm_s)
    results.add(kind="soak", impl="fluxc", requests=args.requests, new=args.new, min_len=args.min_len,
                max_len=args.max_len, s=soak_s, decode_steps=steps, batch_invariant=args.batch_invariant,
                planned={k: by_kind[k] for k in ("clean", *FAULTS)}, ended_with_error={k: hit[k] for k in hit},
                leaked_pages=leaked, reserved_pages_left=reserved, memory_delta_bytes=memory_delta,
                compiles_after_warmup=soak_compiles, captures_after_warmup=soak_captures,
                unaffected=len(unaffected), lost_unaffected=len(lost) + len(unexpected) + len(missing),
                mismatched=lost[:20], unexpected_errors=[f"{i}: {errors[i]}" for i in unexpected[:5]],
                missing=missing[:20], nonfinite_routes=engine.stats["nonfinite_routes"],
                pages_after_clean_run=engine.pages_in_use())
    results.data["targets"] = measures.targets_for("soak", results.data)
    results.flush()
    harness.print_targets(results.data["targets"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
