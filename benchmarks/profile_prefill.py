"""Where a served prefill's time goes: SmolLM2-135M-Instruct (bf16) with its router, through the decode engine
(`fluxc.compile(model, router)`, warm), beside the untouched model's forward at the same lengths.

Per length: the engine's admission (prefill, route read, ring compaction, block tables; device synchronised),
the compiled model's forward alone on the same prompt, and transformers' own forward (SDPA); eight prompts
admitted in one forward against one by one; a decode step; then one admission under torch.profiler, its top
kernels by device time and the host time around them.

    python benchmarks/profile_prefill.py --out prefill.json [--lengths 1024,4096,8000] [--trace trace.json]
    python benchmarks/profile_prefill.py --smoke --out /tmp/prefill.json      # tiny model, CPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import fluxc
from fluxc.serve.engine import DecodeEngine

import harness
from request_stream import add_model_arguments, prompts_for, served_model


def timed(fn: Any, cuda: bool, repeat: int) -> float:
    """Median wall milliseconds of `fn()` after one untimed call (a first input layout compiles), synchronised."""
    fn()
    times = []
    for _ in range(repeat):
        harness.sync(cuda)
        start = time.perf_counter()
        fn()
        harness.sync(cuda)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def admit(engine: DecodeEngine, prompt: torch.Tensor) -> None:
    request = engine.add_request(prompt, 1)  # max_new_tokens=1: the prefill's token ends it
    engine.tokens_of(request)


def admit_all(engine: DecodeEngine, prompts: list[torch.Tensor]) -> None:
    for request in engine.add_requests(prompts, 1):
        engine.tokens_of(request)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 8000])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--trace", help="a Chrome trace of the profiled admission at the longest length")
    add_model_arguments(ap)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    model, tokenizer, router = served_model(args, "prefill")
    if args.smoke:
        args.lengths, args.repeat = [700, 900], 2
    device = next(model.parameters()).device
    results = harness.Results(args.out, harness.provenance(argv and ["benchmarks/profile_prefill.py", *argv],
                                                           model="tiny" if args.smoke else "SmolLM2-135M-Instruct"))
    fm = fluxc.compile(model, router)
    engine = DecodeEngine(fm, max_batch=8, max_len=max(args.lengths) + 8)
    results.add(kind="warmup", impl="fluxc", s=engine.warm_up(), compiles=engine.compiles)
    for length in args.lengths:
        prompt = prompts_for(tokenizer, 1, length, length, seed=length)[0].to(device)
        ids = prompt[None]  # (1, T)
        with torch.no_grad():
            engine_ms = timed(lambda p=prompt: admit(engine, p), cuda, args.repeat)
            forward_ms = timed(lambda x=ids: fm(input_ids=x, logits_to_keep=1), cuda, args.repeat)
            hf_ms = timed(lambda x=ids: model(input_ids=x, logits_to_keep=1), cuda, args.repeat)
        results.add(kind="prefill", tokens=prompt.numel(), engine_admission_ms=engine_ms,
                    fluxc_forward_ms=forward_ms, transformers_forward_ms=hf_ms,
                    full_layers=sum(fluxc.last_route(fm)[0].tolist()), compiles=engine.compiles)
    group = [p.to(device) for p in prompts_for(tokenizer, 8, min(args.lengths), max(args.lengths), seed=8)]
    with torch.no_grad():  # eight prompts admitted in one forward, and one by one
        together_ms = timed(lambda: admit_all(engine, group), cuda, args.repeat)
        alone_ms = timed(lambda: [admit(engine, p) for p in group], cuda, args.repeat)
    results.add(kind="prefill_group", prompts=len(group), tokens=sum(p.numel() for p in group),
                together_ms=together_ms, one_by_one_ms=alone_ms, compiles=engine.compiles)
    request = engine.add_request(prompt[:1024], 4 * args.repeat + 8)  # a decode step of one sequence, captured
    with torch.no_grad():
        step_ms = timed(engine.step, cuda, 4 * args.repeat)
    engine.finish(request)
    results.add(kind="decode_step", batch=1, ms=step_ms, compiles=engine.compiles)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
        admit(engine, prompt)
        harness.sync(cuda)
    averages = prof.key_averages()
    by_device = sorted(averages, key=lambda e: getattr(e, "self_device_time_total", 0.0), reverse=True)[:25]
    by_host = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]  # where a host-bound call goes
    for e in {e.key: e for e in by_device + by_host}.values():
        results.add(kind="op", name=e.key, calls=e.count, self_device_us=getattr(e, "self_device_time_total", 0.0),
                    self_cpu_us=e.self_cpu_time_total)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    if cuda:
        print(averages.table(sort_by="self_device_time_total", row_limit=25))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25))
    results.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
