"""End-to-end benchmark: a Llama-3.1-8B-shaped model, fluxc against transformers, one run.

Model: `LlamaForCausalLM` built from a Llama-3.1-8B config (32 layers, 32 query / 8 KV heads, head dim 128,
hidden 4096, MLP 14336, vocabulary 128256, untied head, llama3 RoPE) directly on the GPU in bf16, HF weight
init skipped, then N(0, 0.02) matrices and unit norms (a few hundred fused fills, no CPU copy). Speed does
not depend on the weights; zeros are avoided on purpose (they can run faster than real data).

fluxc runs with *forced* routes (a fraction r of the layers sparse, spread evenly: r in 0, .5, .75, 1), so
speed does not depend on an untrained router; the default compiler (Inductor, region by region: the 32
layers' regions compile once; `--compiler eager` for the eager graph); `DecodeEngine(cuda_graphs=True)`. Baselines, same process, same weights:
  (a)  transformers SDPA as users run it (prefill with a DynamicCache, logits of the last token only);
  (a') the same with SDPA forced to FlashAttention-2 (`sdpa_kernel(FLASH_ATTENTION)`);
  (b)  transformers StaticCache + `torch.compile(model.forward, mode="reduce-overhead")` decode. Its cache
       is filled with random K/V and its position set to the prompt length instead of running a 32K x 8
       prefill through the static-cache path (which materialises a (B, 1, T, T+new) mask): a decode
       step reads the same bytes either way;
  (a) decode: DynamicCache filled with random K/V the same way (optional, last).

Measured: prefill wall time (synchronised before and after; B=1 at 32K/64K/128K, B=8 at 32K), decode
ms/token (median over `decode_reps` calls of `decode_steps` steps, after a warm-up call that traces and
captures; 32K B=8 and 128K B=1), peak memory per measurement (max_memory_allocated, reset before it),
per-sequence KV bytes (the pages a request holds), the largest batch that fits at 128K, routing costs.

Analytical floor (written into the JSON with its parts):
  prefill(r, B, L) = non-attention time measured on the same model with attention replaced by a
      zero-cost op (per token, B=1; other shapes scaled by tokens)
      + per layer: FA = SDPA cuDNN time measured here at (B, L) (the fastest dense kernel on
      H100), SA = (executed-pair fraction of the SA pattern at L) x that FA time.
  decode(r, B, L) = non-attention decode step measured as a CUDA graph (weights read, no attention)
      + KV bytes the step must read (FA: all L keys, SA: the sink + window keys the pattern allows) /
      measured device copy bandwidth (bytes read + written per second).
  Also `bytes_floor_ms` = (non-embedding weights + KV bytes) / copy bandwidth (the issue's ~17 ms).
Largest batch at 128K: B_max = floor((usable - weights - transient) / per_seq), usable = device memory
minus what lies outside PyTorch's allocator, per_seq = the engine's cache bytes per sequence after a 128K
prefill, transient = that prefill's peak minus memory before it (the engine's pool, which holds the cache,
exists before; sequences are prefilled one at a time, then decoded together). Verified (optional phase) on an engine with the default KV pool (90% of
free memory less a max_len prefill's activations) by prefilling B_max short prompts whose max_new_tokens make
their page reservation that of 128K + new tokens, decoding 2 steps, then trying B_max + 1. The timed phases'
engines get a pool sized to the run's largest prefill (B=8 at the short length, every layer full), so the
rest of the device is left to that prefill's activations.

Routing costs (optional, last): routers loaded from a fresh checkpoint whose last layer is zero with a bias
that picks the r = 0.75 routes (the router MLP runs in full, the decisions equal the forced ones), so the
router engine is compared with the forced r = 0.75 one at the same shapes; `fluxc::router_logits` alone on
a (1, T, 32, 128) query per layer.

Budget: `--time-budget` seconds (default 500) from the end of the imports. Phases, in priority order:
floors (copy bandwidth, cuDNN per shape, router op) | fluxc r = 0, 0.75, 1 | (a) prefill | non-attention
| (b) decode | fluxc r = 0.5 -- required -- then router engine | max-batch verification | (a') prefill |
(a) decode | (a) prefill at B=8 -- optional. Each step checks the time left against an H100 cost model
(Dynamo traces of the 32-layer graph, ~10 s each and calibrated by the warm-ups, dominate the fluxc phases:
3 prefill shape classes + 1 per decode shape, since each decode entry compiles its own step); second
repetitions and optional phases also keep the time the later required phases need; a required phase starts
with half its estimate left and keeps its headline shapes first. Each step runs under a watchdog (>= 120 s);
a step that overruns it makes the phase skip its remaining long steps. Every measurement is written to the
JSON as soon as it exists (atomic rename), with per-phase wall times printed; SIGINT (the runner's timeout)
keeps what was measured and prints the summary.

Targets (the ratios the issue asks for) are data: benchmarks/targets.toml, bench "e2e"; the run writes each
with its value and a pass flag. Modules: e2e_spec (shapes), models (the model, forced routers), e2e_run (the
run's state, budget and steps), e2e_floors (floors and targets), e2e_fluxc (fluxc phases), e2e_hf (baselines);
this file plans and drives the phases.

    python benchmarks/e2e.py [--out results.json] [--time-budget 500]     # GPU (scripts/gpu_e2e.sh)
    python benchmarks/e2e.py --smoke [--quick]                             # tiny model on CPU, all logic
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch

import harness
from e2e_floors import evaluate, floors_phase
from e2e_fluxc import fluxc_phase, router_phase, verify_phase
from e2e_hf import (
    b_cleanup,
    b_phase,
    hf_a_phase,
    hf_big_prefill_phase,
    hf_decode_phase,
    hf_fa2_phase,
    nonattn_phase,
)
from e2e_run import Phase, Run
from e2e_spec import GIB, LLAMA31_8B, SMOKE, SMOKE_QUICK, route_for
from models import build_model, param_bytes, register_noattn

ROOT = harness.ROOT
__all__ = ["main", "route_for"]


def setup(run: Run) -> None:
    """Build the model on the device, register the zero-cost attention, check one forward's logits."""
    start = time.perf_counter()
    run.model = build_model(run.spec, run.dtype, run.spec.device)
    harness.sync(run.cuda)
    run.weights_bytes, run.nonembed_bytes = param_bytes(run.model)
    register_noattn()
    with torch.no_grad():
        logits = run.model(input_ids=run.ids(1, 128), logits_to_keep=1).logits
    finite = bool(torch.isfinite(logits).all())
    build_s = time.perf_counter() - start
    run.rec.meta.update(weights_gib=run.weights_bytes / GIB, nonembed_weights_gib=run.nonembed_bytes / GIB,
                        model_build_s=build_s, sanity_logits_finite=finite,
                        params=sum(p.numel() for p in run.model.parameters()))
    print(f"model built in {build_s:.1f} s: {run.weights_bytes / GIB:.2f} GiB, logits finite: {finite}", flush=True)


def plan(run: Run) -> None:
    """The phases in priority order, each with its cost estimate (seconds on an H100) and whether it is required."""
    spec = run.spec
    short, mid, long = spec.lengths
    b = spec.big_batch

    def fluxc_est(r: float) -> float:
        def f(batch: int, length: int) -> float:
            return run.fwd_s(batch, length, run.sa_factor(r, length))
        return (5 * run.trace_s + 1 + spec.reps_short * f(1, short) + f(1, mid) + spec.reps_long * f(1, long)
                + f(b, short) + 6)
    rs = [float(x) for x in run.args.rs.split(",") if x]
    core = [r for r in (0.0, 0.75, 1.0) if r in rs]
    extra = [r for r in rs if r not in core]  # after (b), still required: "every r" has targets
    add = run.phases.append
    add(Phase("floors", lambda: floors_phase(run), lambda: run.est(14), True))
    for r in core:
        add(Phase(f"fluxc_r{r}", lambda r=r: fluxc_phase(run, r), lambda r=r: run.est(fluxc_est(r)), True))
    add(Phase("hf_a_prefill", lambda: hf_a_phase(run),
              lambda: run.est(1 + spec.reps_short * run.fwd_s(1, short) + run.fwd_s(1, mid)
                              + spec.reps_long * run.fwd_s(1, long)), True))
    add(Phase("nonattn", lambda: nonattn_phase(run),
              lambda: run.est(3 * run.fwd_s(1, short, 0) + run.fwd_s(1, long, 0) + 6), True))
    add(Phase("hf_b_decode", lambda: run.step("hf_static_compiled decode", 70, lambda: b_phase(run)),
              lambda: run.est(70), True))
    add(Phase("hf_b_cleanup", lambda: b_cleanup(run), lambda: 0.0, True))
    for r in extra:
        add(Phase(f"fluxc_r{r}", lambda r=r: fluxc_phase(run, r), lambda r=r: run.est(fluxc_est(r)), True))
    add(Phase("router", lambda: router_phase(run),
              lambda: run.est(3 * run.trace_s + 4 * run.fwd_s(1, short, run.sa_factor(0.75, short))
                              + run.fwd_s(1, long, run.sa_factor(0.75, long)) + 4), False))
    add(Phase("maxbatch_verify", lambda: verify_phase(run), lambda: run.est(2 * run.trace_s + 16), False))
    add(Phase("hf_a2_prefill", lambda: hf_fa2_phase(run),
              lambda: run.est(1 + sum(run.fwd_s(1, x, 1.8) for x in spec.lengths)), False))
    add(Phase("hf_a_decode", lambda: hf_decode_phase(run), lambda: run.est(10), False))
    add(Phase("hf_a_prefill_big", lambda: hf_big_prefill_phase(run), lambda: run.est(run.fwd_s(b, short) + 2),
              False))


def drive(run: Run) -> None:
    """Set up, plan, then run each phase that is selected and fits the time left; evaluate after each."""
    only = set(run.args.phases.split(",")) if run.args.phases else None
    print(f"== setup (budget {run.budget:.0f} s)", flush=True)
    setup(run)
    run.rec.data["phases"].append(dict(name="setup", status="ok", wall_s=round(run.elapsed(), 1)))
    plan(run)
    run.rec.meta["plan"] = [dict(name=p.name, est_s=round(p.est(), 1), required=p.required) for p in run.phases]
    print("plan: " + ", ".join(f"{p.name} ~{p.est():.0f}s" for p in run.phases), flush=True)
    for i, ph in enumerate(run.phases):
        run.current = i
        start = run.elapsed()
        entry: dict[str, Any] = dict(name=ph.name, est_s=round(ph.est(), 1), start_s=round(start, 1))
        base = ph.name.split("_r")[0] if ph.name.startswith("fluxc_r") else ph.name
        if only is not None and ph.name not in only and base not in only:
            entry.update(status="not selected")
        elif run.broken:
            entry.update(status="skipped", reason=f"CUDA context unusable since {run.broken}")
        elif (ph.required and 0.5 * ph.est() > run.left()) or (
                not ph.required and ph.est() + run.reserve() > run.left()):
            entry.update(status="skipped", reason=f"time budget: {run.left():.0f} s left, phase ~{ph.est():.0f} s, "
                                                  f"{run.reserve():.0f} s kept for later required phases")
        else:
            print(f"== phase {ph.name} (est {ph.est():.0f} s, {run.left():.0f} s left)", flush=True)
            run.phase_timeout = None
            try:
                ph.fn()
                entry.update(status="ok")
            except Exception as exc:  # noqa: BLE001
                run.error(f"phase {ph.name}", exc)
                entry.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            run.free()
        entry.update(wall_s=round(run.elapsed() - start, 1), end_s=round(run.elapsed(), 1),
                     mem_after_gib=run.mem.now())
        run.rec.data["phases"].append(entry)
        if entry["status"] != "not selected":
            print(f"== phase {ph.name}: {entry['status']} in {entry['wall_s']:.1f} s "
                  f"(elapsed {run.elapsed():.0f} / {run.budget:.0f} s){' ' + entry.get('reason', '')}", flush=True)
        evaluate(run)


def summary(run: Run) -> None:
    print("\n== summary (ms; decode ms/token)")
    for r in run.rec.rows:
        if r.get("ms") is None or r.get("kind") not in ("prefill", "decode", "nonattn_prefill", "nonattn_decode",
                                                         "attn_floor", "router_op", "copy"):
            continue
        tag = f"r={r['r']}" if r.get("r") is not None else ""
        print(f"{r['kind']:16s} {r.get('impl', ''):20s} {tag:7s} B={r.get('B', '')!s:>2s} L={r.get('L', '')!s:>6s} "
              f"{r['ms']:11.3f}" + (f"  peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") else ""))
    for name, mb in run.rec.data["maxbatch"].items():
        print(f"maxbatch r={name}: " + json.dumps(harness.rounded(mb)))
    harness.print_targets(run.rec.data["targets"])
    for e in run.rec.data["errors"]:
        print(f"ERROR {e['label']}: {e['error'][:160]}")
    for msg, n in run.tally.counts.most_common(8):
        print(f"FLUXC LOG x{n}: {msg[:200]}")
    print(f"elapsed {run.elapsed():.0f} s; results: {run.args.out}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/e2e_h100.json; smoke: a temp "
                                                "file)")
    ap.add_argument("--smoke", action="store_true", help="tiny Llama on CPU: every phase's logic, no real numbers")
    ap.add_argument("--quick", action="store_true", help="with --smoke: a 2-layer model, one rep (the test)")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for the whole process (default 500; "
                                                                   "smoke 3600)")
    ap.add_argument("--rs", default="0,0.75,1,0.5", help="SA fractions (0, .75, 1 required; others optional)")
    ap.add_argument("--phases", default="", help="comma list of phase names to run (default all); fluxc = all r")
    ap.add_argument("--compiler", default="inductor", choices=("eager", "inductor"),
                    help="FluxConfig.compiler (default: fluxc's default, Inductor)")
    ap.add_argument("--impl", default="auto", choices=("auto", "triton", "fa4"),
                    help="FluxConfig.impl (default: fluxc's default, auto: flash-attn-4 where it is installed, else "
                         "cuDNN SDPA for all-full prefills, logged; triton: fluxc's Triton kernels alone)")
    ap.add_argument("--b-backend", default=None, help="backend of (b): inductor (mode reduce-overhead; default on "
                                                      "GPU) or eager (smoke default)")
    args = ap.parse_args(argv)
    spec = (SMOKE_QUICK if args.quick else SMOKE) if args.smoke else LLAMA31_8B
    if args.time_budget is None:
        args.time_budget = 3600.0 if args.smoke else 500.0
    if args.out is None:
        args.out = (os.path.join(tempfile.gettempdir(), "fluxc-e2e-smoke.json") if args.smoke
                    else str(ROOT / "benchmarks" / "results" / "e2e_h100.json"))
    if args.b_backend is None:
        args.b_backend = "eager" if args.smoke else "inductor"
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on CPU", file=sys.stderr)
        return 2
    run = Run(args, spec, None if argv is None else ["benchmarks/e2e.py", *argv])
    rc = 0
    try:
        with torch.no_grad():
            drive(run)
    except KeyboardInterrupt:  # the outer timeout: keep what was measured
        during = run.phases[run.current].name if run.phases else "setup"
        run.rec.data["phases"].append(dict(name=during, status="interrupted", end_s=round(run.elapsed(), 1)))
        rc = 130
    except Exception as exc:  # noqa: BLE001
        run.error("run", exc)
        rc = 1
    finally:
        try:
            evaluate(run)
        except Exception as exc:  # noqa: BLE001
            print(f"evaluate failed: {exc}", flush=True)
        run.rec.meta["elapsed_s"] = round(run.elapsed(), 1)
        run.rec.flush()
        summary(run)
        run.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
