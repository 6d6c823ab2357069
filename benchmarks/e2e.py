"""End-to-end benchmark (issue 4): a Llama-3.1-8B-shaped model, fluxc against transformers, one run.

Model: `LlamaForCausalLM` built from a Llama-3.1-8B config (32 layers, 32 query / 8 KV heads, head dim 128,
hidden 4096, MLP 14336, vocabulary 128256, untied head, llama3 RoPE) directly on the GPU in bf16, HF weight
init skipped, then N(0, 0.02) matrices and unit norms (a few hundred fused fills, no CPU copy). Speed does
not depend on the weights; zeros are avoided on purpose (they can run faster than real data).

fluxc runs with *forced* routes (a fraction r of the layers sparse, spread evenly: r in 0, .5, .75, 1), so
speed does not depend on an untrained router; `compiler="eager"` (an Inductor compile of an 8B graph does
not fit the budget); `DecodeEngine(cuda_graphs=True)`. Baselines, same process, same weights:
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
per-sequence KV bytes (`state.cache.nbytes() / B`), the largest batch that fits at 128K, routing costs.

Analytical floor (written into the JSON with its parts):
  prefill(r, B, L) = non-attention time measured on the same model with attention replaced by a
      zero-cost op (per token, B=1; other shapes scaled by tokens)
      + per layer: FA = SDPA cuDNN time measured here at (B, L) (BRIEF §2: the fastest dense kernel on
      H100), SA = (executed-pair fraction of the SA pattern at L) x that FA time.
  decode(r, B, L) = non-attention decode step measured as a CUDA graph (weights read, no attention)
      + KV bytes the step must read (FA: all L keys, SA: the sink + window keys the pattern allows) /
      measured device copy bandwidth (bytes read + written per second).
  Also `bytes_floor_ms` = (non-embedding weights + KV bytes) / copy bandwidth (the issue's ~17 ms).
Largest batch at 128K: B_max = floor((usable - weights - transient) / per_seq), usable = device memory
minus what lies outside PyTorch's allocator, per_seq = the engine's cache bytes per sequence after a 128K
prefill, transient = that prefill's peak minus memory before it minus its cache (sequences are prefilled one
at a time, then decoded together). Verified (optional phase) by holding a `transient`-sized buffer,
prefilling B_max short prompts whose max_new_tokens make the cache capacity that of 128K + new tokens
(the engine sizes its cache by capacity), decoding 2 steps, then trying B_max + 1.

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

    python benchmarks/e2e.py [--out results.json] [--time-budget 500]     # GPU (scripts/gpu_e2e.sh)
    python benchmarks/e2e.py --smoke [--quick]                             # tiny model on CPU, all logic
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import json
import logging
import math
import os
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = float(1 << 30)
NOATTN = "fluxc_e2e_noattn"
# BRIEF §2, SDPA cuDNN prefill at B=1 (ms): used only when the in-run measurement fails.
BRIEF_CUDNN_MS = {32768: 15.0, 65536: 57.1, 131072: 249.0}


@dataclass(frozen=True)
class Spec:
    """Model shape and run sizes (the GPU run, or the CPU smoke run)."""

    name: str
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    lengths: tuple[int, int, int]  # prompt lengths: short (decode at big batch), mid, long
    big_batch: int
    warm: tuple[tuple[int, int], ...]  # (B, T) prefill warm-ups: static, dynamic length, dynamic batch
    verify_prompt: int
    sink: int
    window: int
    block: int
    router_hidden: tuple[int, int, int, int]
    decode_warm: int
    decode_reps: int
    decode_steps: int
    reps_short: int
    reps_long: int
    copy_bytes: int
    dtype: str
    device: str
    est_scale: float  # 1: H100 cost model gates the steps; 0: only the elapsed time does

    @property
    def new_tokens(self) -> int:
        """max_new_tokens of every prefill: room for the warm-up and timed decode steps."""
        return self.decode_warm + self.decode_reps * self.decode_steps + 8


LLAMA31_8B = Spec("llama-3.1-8b", 128256, 4096, 14336, 32, 32, 8, 128, (32768, 65536, 131072), 8,
                  ((1, 4096), (1, 8192), (2, 4096)), 4096, 128, 2048, 128, (1024, 256, 512, 128),
                  4, 3, 16, 3, 2, 1 << 30, "bfloat16", "cuda", 1.0)
SMOKE = Spec("smoke-tiny-llama", 256, 64, 128, 4, 4, 2, 16, (64, 128, 256), 2,
             ((1, 32), (1, 48), (2, 32)), 48, 8, 16, 8, (32, 16, 24, 8),
             2, 2, 3, 2, 2, 1 << 20, "float32", "cpu", 0.0)
# the test's run: two layers, one prompt length (no dynamic-length trace), one rep each: every code path with
# the fewest Dynamo traces (the full --smoke covers the three lengths and the dynamic shapes)
SMOKE_QUICK = replace(SMOKE, name="smoke-quick", layers=2, lengths=(40, 40, 40), warm=((1, 40), (2, 40)),
                      verify_prompt=16, decode_reps=1, decode_steps=2, reps_short=1, reps_long=1)


def route_for(r: float, layers: int) -> list[str]:
    """`layers` routes with a fraction r sparse, spread evenly (layer 0 full unless r = 1)."""
    return ["sparse" if math.floor((i + 1) * r + 1e-9) - math.floor(i * r + 1e-9) == 1 else "full"
            for i in range(layers)]


# ------------------------------------------------------------------------------------ recording


class Recorder:
    """Results as one JSON document, rewritten (atomically) after every change."""

    def __init__(self, path: str | None, meta: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = dict(meta=meta, phases=[], rows=[], targets=[], floors={}, maxbatch={},
                                         errors=[], skipped=[])

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.data["rows"]

    def add(self, **row: Any) -> dict[str, Any]:
        row = {k: _round(v) for k, v in row.items()}
        self.rows.append(row)
        print("ROW " + json.dumps(row), flush=True)
        self.flush()
        return row

    def find(self, **sel: Any) -> dict[str, Any] | None:
        for row in self.rows:
            if all(row.get(k) == v for k, v in sel.items()) and row.get("ms") is not None:
                return row
        return None

    def flush(self) -> None:
        if not self.path:
            return
        path = pathlib.Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, path)


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, list):
        return [_round(x) for x in v]
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


class LogTally(logging.Handler):
    """Counts fluxc's log messages (e.g. which sites fall back to the reference implementation, and why)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.levelname}: {record.getMessage()[:300]}"] += 1


class CallTimeout(Exception):
    """A step ran past its watchdog."""


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise CallTimeout in the main thread after `seconds` (no-op elsewhere)."""
    if seconds is None or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise CallTimeout(f"step ran past its {seconds:.0f} s watchdog")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.5))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------ timing


class Clock:
    """Wall time with device synchronisation, and per-iteration event timing for short ops."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(ms, result) of one call, synchronised before and after."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3, out

    def bench(self, fn: Callable[[], Any], iters: int, warm: int = 2) -> list[float]:
        """Per-iteration ms of `iters` calls after `warm` calls (CUDA events on the GPU)."""
        for _ in range(warm):
            fn()
        self.sync()
        if not self.cuda:
            out = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]


class Mem:
    """Allocator figures in GiB (None on CPU)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def reset(self) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / GIB

    def peak(self) -> float | None:
        return torch.cuda.max_memory_allocated() / GIB if self.cuda else None

    def now(self) -> float | None:
        return torch.cuda.memory_allocated() / GIB if self.cuda else None


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ------------------------------------------------------------------------------------ model


def build_model(spec: Spec, dtype: torch.dtype, device: str) -> Any:
    """Llama of `spec`'s shape on `device`: HF init skipped, weights filled on the device (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": min(8192, max(spec.lengths))}
    common = dict(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.inter,
                  num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                  head_dim=spec.head_dim, max_position_embeddings=max(131072, 2 * max(spec.lengths)),
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    try:
        cfg = LlamaConfig(**common, rope_parameters=rope)
    except (TypeError, ValueError):  # an older config API: plain RoPE costs the same
        cfg = LlamaConfig(**common)
    cfg._attn_implementation = "sdpa"
    try:
        from transformers.initialization import no_init_weights
        skip_init: Any = no_init_weights()
    except ImportError:
        skip_init = contextlib.nullcontext()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), skip_init:
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
    return model


def _noattn(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Zero-cost attention for the non-attention floor: (B, H, T, D) -> (B, T, H, D) view of the query."""
    return query.transpose(1, 2), None


@contextlib.contextmanager
def attention_impl(model: Any, name: str) -> Iterator[None]:
    """Switch the HF attention implementation of `model` (restored after)."""
    saved = model.config._attn_implementation

    def switch(to: str) -> None:
        try:
            model.set_attn_implementation(to)
        except (ValueError, KeyError, TypeError):  # an older API: the config is shared by every layer
            model.config._attn_implementation = to
    switch(name)
    try:
        yield
    finally:
        switch(saved)


def param_bytes(model: Any) -> tuple[int, int]:
    """(all parameter bytes, bytes without the input embedding: what one decode step reads)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    return total, total - emb.numel() * emb.element_size()


def tree_digest() -> str:
    """sha256 over the sources that decide the numbers (works without .git on the GPU machine)."""
    h = hashlib.sha256()
    for folder in ("fluxc", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def git_commit() -> str:
    if os.environ.get("FLUXC_COMMIT"):
        return os.environ["FLUXC_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------ the run


@dataclass
class Phase:
    name: str
    fn: Callable[[], None]
    est: Callable[[], float]
    required: bool


class Bench:
    """All phases of one run; state shared between them (model, floors, fluxc modules)."""

    def __init__(self, args: argparse.Namespace, spec: Spec) -> None:
        self.args = args
        self.spec = spec
        self.cuda = spec.device == "cuda"
        self.dtype = getattr(torch, spec.dtype)
        self.clock = Clock(self.cuda)
        self.mem = Mem(self.cuda)
        self.t0 = time.perf_counter()
        self.budget = float(args.time_budget)
        self.broken: str | None = None
        self.phase_timeout: str | None = None  # a step of the current phase ran past its watchdog
        self.trace_s = 10.0  # one Dynamo trace of the 32-layer graph (calibrated by the warm-ups)
        self.model: Any = None
        self.fms: dict[float, Any] = {}  # kept fluxc modules (max-batch verification)
        self.phases: list[Phase] = []
        self.current = 0
        self.gen = torch.Generator(device="cpu").manual_seed(1234)
        self.rec = Recorder(args.out, self.meta())
        import fluxc

        self.fluxc = fluxc
        self.cfg = fluxc.FluxConfig(sink=spec.sink, window=spec.window, block=spec.block,
                                    router_hidden=spec.router_hidden, compiler=args.compiler)
        self.rec.data["meta"].update(flux_config=self.cfg.to_dict(), fluxc_path=fluxc.__file__,
                                     fluxc_passes_path=fluxc.passes.__file__)
        self.tally = LogTally()  # fluxc logs at INFO why a site runs the reference instead of the kernels
        self.logger = logging.getLogger("fluxc")
        self.saved_level = self.logger.level
        self.logger.addHandler(self.tally)
        self.logger.setLevel(logging.INFO)

    def close(self) -> None:
        self.logger.removeHandler(self.tally)
        self.logger.setLevel(self.saved_level)

    # --- bookkeeping
    def meta(self) -> dict[str, Any]:
        import transformers

        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        meta: dict[str, Any] = dict(
            benchmark="e2e (issue 4)", spec=asdict(self.spec), torch=torch.__version__, triton=triton_version,
            transformers=transformers.__version__, python=platform.python_version(), cuda=torch.version.cuda,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(), unix_time=time.time(),
            host=platform.node(), commit=git_commit(), tree_digest=tree_digest(), argv=sys.argv[1:],
            time_budget_s=self.budget, timing=("prefill: wall time of one call, synchronised before and after; "
                                               "decode: wall time of decode(state, steps) / steps; medians"))
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            meta.update(gpu=torch.cuda.get_device_name(0), gpu_mem_gib=props.total_memory / GIB,
                        sms=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
        else:
            meta.update(gpu=None, note="CPU smoke run: numbers exercise the logic only")
        return meta

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def est(self, seconds: float) -> float:
        return seconds * self.spec.est_scale

    def reserve(self) -> float:
        """Estimated seconds of the required phases after the current one."""
        return sum(p.est() for p in self.phases[self.current + 1:] if p.required)

    def skip(self, label: str, why: str) -> None:
        print(f"SKIP {label}: {why}", flush=True)
        self.rec.data["skipped"].append(dict(label=label, reason=why, at_s=round(self.elapsed(), 1)))
        self.rec.flush()

    def error(self, label: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {str(exc)[:600]}"
        print(f"ERROR {label}: {msg}", flush=True)
        traceback.print_exception(type(exc), exc, exc.__traceback__, limit=8)
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
        self.rec.data["errors"].append(dict(label=label, error=msg, oom=oom, at_s=round(self.elapsed(), 1)))
        self.rec.flush()
        if self.cuda and not oom and not isinstance(exc, CallTimeout):
            try:  # is the context still usable? (an illegal address poisons it for every later phase)
                torch.ones(1, device="cuda").add_(1)
                torch.cuda.synchronize()
            except Exception as probe:  # noqa: BLE001
                self.broken = f"{label}: {type(probe).__name__}: {str(probe)[:200]}"

    def step(self, label: str, est: float, fn: Callable[[], Any], *, optional: bool = False) -> Any:
        """Run one measured step, or record why not; exceptions are recorded, never raised."""
        if self.broken:
            self.skip(label, f"CUDA context unusable since {self.broken}")
            return None
        est = self.est(est)
        left = self.left()
        if est > left:
            self.skip(label, f"time budget: {left:.0f} s left, step needs ~{est:.0f} s")
            return None
        if self.phase_timeout and est > 10:
            self.skip(label, f"an earlier step of this phase ran past its watchdog ({self.phase_timeout})")
            return None
        if optional and est + self.reserve() > left:
            self.skip(label, f"optional; {left:.0f} s left, step ~{est:.0f} s + {self.reserve():.0f} s kept for "
                             f"later required phases")
            return None
        # generous: a slow Dynamo trace must finish; only a hung or pathological step is cut
        limit = min(max(120.0, 3.0 * est + 30.0), left + 20.0) if self.spec.est_scale else None
        try:
            with deadline(limit):
                return fn()
        except Exception as exc:  # noqa: BLE001  (one failing step must not sink the run)
            self.error(label, exc)
            if isinstance(exc, CallTimeout):
                self.phase_timeout = label
        self.free()  # the exception's frames may hold device memory in reference cycles
        return None

    def free(self, collect: bool = True) -> None:
        """Release cached device memory; `collect` also runs the cycle collector first (0.2-0.3 s each, so only
        where an engine and its KV buffers are dropped; CPU runs hold no device memory and skip it)."""
        if collect and self.cuda:
            gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def ids(self, batch: int, length: int) -> torch.Tensor:
        return torch.randint(3, self.spec.vocab, (batch, length), generator=self.gen).to(self.spec.device)

    # --- cost model (H100, seconds): gates the steps; smoke runs scale it to 0
    def fwd_s(self, batch: int, length: int, attn: float = 1.0) -> float:
        """One prefill: non-attention ~3.9 s per 128K tokens, dense attention 0.249 s per layer at 128K."""
        tokens = batch * length
        dense = batch * self.spec.layers * 0.249 * (length / 131072) ** 2
        return 0.3 + tokens * 3.9 / 131072 + attn * dense

    def sa_factor(self, r: float, length: int) -> float:
        return (1 - r) + r * 1.5 * self.sa_frac(length)

    # --- attention arithmetic
    def sa_frac(self, length: int) -> float:
        from fluxc.stats import sparse_pairs

        return sparse_pairs(length, self.cfg) / (length * (length + 1) / 2)

    def sa_keys(self, length: int) -> int:
        """Keys the SA pattern lets the query at position `length` read (the first decode step)."""
        from fluxc.stats import sparse_pairs

        return sparse_pairs(length + 1, self.cfg) - sparse_pairs(length, self.cfg)

    def n_sparse(self, r: float) -> int:
        return route_for(r, self.spec.layers).count("sparse")

    # ------------------------------------------------------------------------------------ phases
    def setup(self) -> None:
        t = time.perf_counter()
        self.model = build_model(self.spec, self.dtype, self.spec.device)
        self.clock.sync()
        total, nonembed = param_bytes(self.model)
        self.weights_bytes, self.nonembed_bytes = total, nonembed
        from transformers import AttentionInterface

        AttentionInterface.register(NOATTN, _noattn)
        ids = self.ids(1, 128)
        with torch.no_grad():
            logits = self.model(input_ids=ids, logits_to_keep=1).logits
        finite = bool(torch.isfinite(logits).all())
        self.rec.data["meta"].update(weights_gib=total / GIB, nonembed_weights_gib=nonembed / GIB,
                                     model_build_s=time.perf_counter() - t, sanity_logits_finite=finite,
                                     params=sum(p.numel() for p in self.model.parameters()))
        print(f"model built in {time.perf_counter() - t:.1f} s: {total / GIB:.2f} GiB, logits finite: {finite}",
              flush=True)

    def floors(self) -> None:
        """Device copy bandwidth, SDPA cuDNN prefill per layer at every prefill shape, router op alone."""
        spec = self.spec
        n = spec.copy_bytes

        def copy() -> None:
            x = torch.empty(n // 2, dtype=torch.bfloat16, device=spec.device).normal_()
            y = torch.empty_like(x)
            ms = median(self.clock.bench(lambda: y.copy_(x), iters=20))
            self.copy_gbps = 2 * n / (ms * 1e-3) / 1e9
            self.rec.add(kind="copy", impl="torch copy_", bytes=2 * n, ms=ms, gbps=self.copy_gbps)
        self.copy_gbps = 3000.0 if self.cuda else 10.0
        self.step("copy bandwidth", 2, copy)
        self.rec.data["meta"]["copy_gbps"] = self.copy_gbps
        short, mid, long = spec.lengths
        for batch, length in ((1, short), (1, mid), (1, long), (spec.big_batch, short)):
            est = 2 + 6 * batch * 0.249 * (length / 131072) ** 2 * 32 / 32
            self.step(f"sdpa cudnn {batch}x{length}", est, lambda b=batch, t=length: self.sdpa_floor(b, t))
            self.free(collect=False)
        for length in (short, long):
            self.step(f"router op {length}", 3, lambda t=length: self.router_op(t))
            self.free(collect=False)

    def sdpa_floor(self, batch: int, length: int) -> None:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        spec = self.spec
        q = torch.randn(batch, spec.heads, length, spec.head_dim, dtype=self.dtype, device=spec.device)
        k = torch.randn(batch, spec.kv_heads, length, spec.head_dim, dtype=self.dtype, device=spec.device)
        v = torch.randn_like(k)
        backend = SDPBackend.CUDNN_ATTENTION if self.cuda else SDPBackend.MATH
        gqa = "native"

        def native() -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        fn: Callable[[], torch.Tensor] = native
        try:
            native()
            self.clock.sync()
        except RuntimeError:  # the backend refuses native GQA: expand K/V outside the timed region
            grp = spec.heads // spec.kv_heads
            ke, ve = k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1)
            gqa = "expanded"

            def expanded() -> torch.Tensor:
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
            fn = expanded
        guess = max(1.0, batch * 249.0 * (length / 131072) ** 2)
        iters = max(3, min(20, int(1500 / guess))) if self.cuda else 3
        ms_all = self.clock.bench(fn, iters=iters, warm=1)
        self.rec.add(kind="attn_floor", impl="sdpa_cudnn" if self.cuda else "sdpa_math_cpu", B=batch, L=length,
                     ms=median(ms_all), ms_all=ms_all, gqa=gqa)

    def router_op(self, length: int) -> None:
        from fluxc.ops.router import LayerRouter

        spec = self.spec
        router = LayerRouter(spec.head_dim, spec.router_hidden).to(spec.device)
        q = torch.randn(1, length, spec.heads, spec.head_dim, dtype=self.dtype, device=spec.device)
        valid = torch.ones(1, length, dtype=torch.bool, device=spec.device)
        weights = router.weights()
        ms_all = self.clock.bench(lambda: torch.ops.fluxc.router_logits(q, valid, weights, self.cfg.pool_size),
                                  iters=20 if self.cuda else 3, warm=3 if self.cuda else 1)
        self.rec.add(kind="router_op", impl="fluxc::router_logits", B=1, L=length, ms=median(ms_all), ms_all=ms_all,
                     note="one layer's router on a (1, T, 32, 128) pre-RoPE query, valid mask all true")

    # --- fluxc
    def new_engine(self, fm: Any) -> Any:
        return self.fluxc.DecodeEngine(fm, cuda_graphs=self.cuda, max_graphs=self.args.max_graphs)

    def graphs(self, fm: Any) -> int | None:
        return getattr(getattr(fm, "_backend", None), "graphs", None)

    def fluxc_prefill(self, engine: Any, fm: Any, ids: torch.Tensor) -> dict[str, Any]:
        """One timed engine.prefill; memory and recompiles around it."""
        self.free(collect=False)
        before = self.mem.reset()
        g0 = self.graphs(fm)
        ms, state = self.clock.run(lambda: engine.prefill(ids, max_new_tokens=self.spec.new_tokens))
        return dict(ms=ms, state=state, peak=self.mem.peak(), before=before,
                    recompiled=(self.graphs(fm) or 0) - (g0 or 0))

    def route_ok(self, state: Any, route: list[str]) -> bool | None:
        got = getattr(state, "route", None)
        if got is None:
            return None
        want = torch.tensor([[x == "full" for x in route]] * int(got.shape[0]), dtype=torch.bool)
        return bool(torch.equal(got.to("cpu", torch.bool), want))

    def prefill_series(self, impl: str, r: float | None, fm: Any, engine: Any, route: list[str], batch: int,
                       length: int, reps: int, keep: bool) -> Any:
        """`reps` timed prefills of one shape -> one row (median); returns the last state when `keep`."""
        runs: list[dict[str, Any]] = []
        state = None
        attn = self.sa_factor(r or 0.0, length)
        for i in range(reps):
            state = None
            self.free(collect=False)

            def go() -> dict[str, Any]:
                return self.fluxc_prefill(engine, fm, self.ids(batch, length))
            res = self.step(f"{impl} r={r} prefill {batch}x{length} rep {i}", self.fwd_s(batch, length, attn) + 3, go,
                            optional=i >= 1)
            if res is None:
                break
            state = res.pop("state")
            res.update(cache_bytes=state.cache.nbytes(), route_ok=self.route_ok(state, route))
            runs.append(res)
            if i < reps - 1 or not keep:
                state = None
        if not runs:
            return None
        ms_all = [x["ms"] for x in runs]
        clean = [x["ms"] for x in runs if not x["recompiled"]] or ms_all
        last = runs[-1]
        self.rec.add(kind="prefill", impl=impl, r=r, B=batch, L=length, ms=median(clean), ms_all=ms_all,
                     min_ms=min(ms_all), recompiled=[x["recompiled"] for x in runs], peak_gib=last["peak"],
                     before_gib=last["before"], cache_gib=last["cache_bytes"] / GIB,
                     cache_per_seq_gib=last["cache_bytes"] / batch / GIB, sa_layers=route.count("sparse"),
                     route_ok=all(x["route_ok"] is not False for x in runs))
        self.last_prefill = last
        return state

    def decode_series(self, impl: str, r: float | None, engine: Any, state: Any, batch: int, length: int) -> None:
        spec = self.spec
        self.mem.reset()
        first_ms, _ = self.clock.run(lambda: engine.decode(state, spec.decode_warm))
        ms_all: list[float] = []
        tokens = None
        for _ in range(spec.decode_reps):
            ms, tokens = self.clock.run(lambda: engine.decode(state, spec.decode_steps))
            ms_all.append(ms / spec.decode_steps)
        ok = tokens is not None and bool(((tokens >= 0) & (tokens < spec.vocab)).all())
        self.rec.add(kind="decode", impl=impl, r=r, B=batch, L=length, ms=median(ms_all), ms_all=ms_all,
                     first_call_s=first_ms / 1e3, steps=spec.decode_steps, peak_gib=self.mem.peak(),
                     cache_gib=state.cache.nbytes() / GIB, tokens_in_vocab=ok,
                     engine_stats={k: int(v) for k, v in dict(getattr(engine, "stats", {})).items()})

    def warmups(self, label: str, fm: Any, engine: Any) -> None:
        for batch, length in self.spec.warm:
            res = self.step(f"{label} warm {batch}x{length}", self.trace_s + 2,
                            lambda b=batch, t=length: self.fluxc_prefill(engine, fm, self.ids(b, t)))
            if res is None:
                continue
            res.pop("state")
            self.rec.add(kind="warm", impl=label, B=batch, L=length, s=res["ms"] / 1e3, recompiled=res["recompiled"])
            if res["recompiled"] and self.spec.est_scale:
                self.trace_s = max(self.trace_s * 0.5, res["ms"] / 1e3)  # calibrate the trace estimate
        self.free()

    def fluxc_phase(self, r: float) -> None:
        """Forced routes with SA fraction r: warm-ups (one trace per shape class), then the headline shapes
        first (a phase cut short by the budget keeps them): B=big at the short length with decode, B=1 at the
        long length with decode and the max-batch model, then B=1 at the short and mid lengths. Each shape
        gets a fresh engine: an engine's decode entries own their KV buffers."""
        spec = self.spec
        route = route_for(r, spec.layers)
        fm = self.fluxc.compile(self.model, config=self.cfg, route=route)
        impl = "fluxc"
        short, mid, long = spec.lengths
        engine = self.new_engine(fm)
        self.warmups(f"fluxc r={r}", fm, engine)
        for batch, length, reps in ((spec.big_batch, short, 1), (1, long, spec.reps_long)):
            engine = state = None
            self.free()
            engine = self.new_engine(fm)
            state = self.prefill_series(impl, r, fm, engine, route, batch, length, reps, keep=True)
            if state is None:
                continue
            if batch == 1:
                self.maxbatch_model(r, self.last_prefill)
            self.step(f"fluxc r={r} decode {batch}x{length}", self.trace_s + 4,
                      lambda b=batch, t=length, e=engine, s=state: self.decode_series(impl, r, e, s, b, t))
        for length, reps in ((short, spec.reps_short), (mid, 1)):
            engine = state = None
            self.free()
            engine = self.new_engine(fm)
            self.prefill_series(impl, r, fm, engine, route, 1, length, reps, keep=False)
        engine = state = None
        if r in (0.0, 0.75):
            self.fms[r] = fm
        self.free()

    def maxbatch_model(self, r: float, run: dict[str, Any]) -> None:
        """Largest batch at the long length from this prefill's measured bytes (see the module docstring).

        On CPU (smoke) the device memory is synthetic: weights + 4.5 dense sequences, no transient."""
        if r not in (0.0, 0.75):
            return
        per_seq = run["cache_bytes"]
        if self.cuda:
            free_b, total_b = torch.cuda.mem_get_info()
            outside = total_b - free_b - torch.cuda.memory_reserved()  # CUDA context, libraries' workspaces
            usable = total_b - outside
            transient = run["peak"] * GIB - run["before"] * GIB - per_seq
            how = "measured"
        else:
            dense = self.rec.data["maxbatch"].get("0.0", {}).get("per_seq_gib", per_seq / GIB) * GIB
            outside, usable, transient, how = 0.0, self.weights_bytes + 4.5 * dense, 0.0, "synthetic (CPU smoke)"
        b_max = int((usable - self.weights_bytes - transient) // per_seq)
        self.rec.data["maxbatch"][str(r)] = dict(
            L=self.spec.lengths[2], usable_gib=usable / GIB, outside_torch_gib=outside / GIB,
            weights_gib=self.weights_bytes / GIB, per_seq_gib=per_seq / GIB, transient_gib=transient / GIB,
            before_prefill_gib=run["before"], peak_prefill_gib=run["peak"], b_max=b_max,
            b_max_cache_only=int((usable - self.weights_bytes) // per_seq), memory=how,
            formula="floor((usable - weights - transient) / per_seq)", verified=None)
        self.rec.flush()

    def verify_phase(self) -> None:
        """Hold the measured transient, prefill B_max short prompts sized to the long length's capacity, decode."""
        spec = self.spec
        long = spec.lengths[2]
        for r in (0.0, 0.75):
            mb = self.rec.data["maxbatch"].get(str(r))
            fm = self.fms.get(r)
            if not mb or fm is None or "b_max" not in mb:
                self.skip(f"verify r={r}", "no max-batch model or fluxc module for this r")
                continue
            route = route_for(r, spec.layers)
            for batch, expect in ((mb["b_max"], "fits"), (mb["b_max"] + 1, "oom")):
                if batch < 1:
                    continue

                def go(batch: int = batch, expect: str = expect, mb: dict = mb, fm: Any = fm,
                       route: list[str] = route, r: float = r) -> None:
                    blob = torch.empty(max(0, int(mb["transient_gib"] * GIB)), dtype=torch.uint8, device=spec.device)
                    engine = self.new_engine(fm)
                    self.mem.reset()
                    outcome, nbytes, detail = "fits", None, ""
                    try:
                        state = engine.prefill(self.ids(batch, spec.verify_prompt),
                                               max_new_tokens=long + spec.new_tokens - spec.verify_prompt)
                        nbytes = state.cache.nbytes()
                        if expect == "fits":
                            engine.decode(state, 2)
                        self.clock.sync()
                        ok_route = self.route_ok(state, route)
                        detail = f"route_ok={ok_route}"
                        state = None
                    except torch.cuda.OutOfMemoryError as exc:
                        outcome, detail = "oom", str(exc)[:200]
                    self.rec.add(kind="maxbatch_verify", impl="fluxc", r=r, B=batch, L=long, expected=expect,
                                 outcome=outcome, cache_gib=None if nbytes is None else nbytes / GIB,
                                 cache_per_seq_gib=None if nbytes is None else nbytes / batch / GIB,
                                 peak_gib=self.mem.peak(), transient_held_gib=blob.numel() / GIB, detail=detail)
                    if expect == "fits":
                        mb["verified"] = outcome == "fits"
                    else:
                        mb["b_max_plus_1"] = outcome
                    engine = blob = None
                self.step(f"verify r={r} B={batch}", self.trace_s + 6 if expect == "fits" else 4, go)
                self.free()
            self.rec.flush()

    def router_phase(self) -> None:
        """Routers whose decisions equal the r = 0.75 forced routes, against the forced module."""
        from fluxc.api import model_fingerprint
        from fluxc.ops.router import LayerRouter

        spec = self.spec
        r = 0.75
        route = route_for(r, spec.layers)
        routers = torch.nn.ModuleList(LayerRouter(spec.head_dim, spec.router_hidden) for _ in range(spec.layers))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for router, want in zip(routers, route):
                for p in router.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                last = router.head[4]
                last.weight.zero_()
                last.bias.copy_(torch.tensor([1.0, -1.0] if want == "sparse" else [-1.0, 1.0]))  # index 1 = FA
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="fluxc-e2e-"))
        ckpt = tmp / "routers.safetensors"
        self.fluxc.save_routers(ckpt, routers, self.cfg, model_fingerprint(self.model),
                                {"made_by": "benchmarks/e2e.py", "decisions": "forced by a zero last layer + bias"})
        fm = self.fluxc.compile(self.model, str(ckpt), config=self.cfg)
        impl = "fluxc_router"
        short, _, long = spec.lengths
        engine = self.new_engine(fm)
        self.warmups("fluxc router", fm, engine)
        engine = self.new_engine(fm)
        self.prefill_series(impl, r, fm, engine, route, 1, short, 3, keep=False)
        engine = None
        self.free()
        engine = self.new_engine(fm)
        state = self.prefill_series(impl, r, fm, engine, route, 1, long, 1, keep=True)
        if state is not None:
            self.step(f"router decode 1x{long}", self.trace_s + 3,
                      lambda: self.decode_series(impl, r, engine, state, 1, long))
        state = engine = None
        self.free()

    # --- transformers baselines
    def hf_prefill(self, impl: str, batch: int, length: int, reps: int, flash: bool = False) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        runs: list[tuple[float, float | None, float | None]] = []
        for i in range(reps):
            def go() -> tuple[float, float | None, float | None]:
                ids = self.ids(batch, length)
                self.free(collect=False)
                before = self.mem.reset()
                ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash else contextlib.nullcontext()

                def call() -> torch.Tensor:
                    with ctx, torch.no_grad():
                        out = self.model(input_ids=ids, logits_to_keep=1)
                        return out.logits[:, -1].argmax(-1)
                ms, _ = self.clock.run(call)
                return ms, self.mem.peak(), before
            res = self.step(f"{impl} prefill {batch}x{length} rep {i}",
                            self.fwd_s(batch, length, 1.8 if flash else 1.0) + 2, go, optional=i >= 1)
            if res is None:
                break
            runs.append(res)
        self.free()
        if runs:
            ms_all = [x[0] for x in runs]
            self.rec.add(kind="prefill", impl=impl, r=None, B=batch, L=length, ms=median(ms_all), ms_all=ms_all,
                         min_ms=min(ms_all), peak_gib=runs[-1][1], before_gib=runs[-1][2])

    def hf_a_phase(self) -> None:
        short, mid, long = self.spec.lengths
        self.hf_prefill("hf_sdpa_warm", 1, self.spec.warm[0][1], 1)
        self.hf_prefill("hf_sdpa", 1, short, self.spec.reps_short)
        self.hf_prefill("hf_sdpa", 1, mid, 1)
        self.hf_prefill("hf_sdpa", 1, long, self.spec.reps_long)

    def hf_fa2_phase(self) -> None:
        short, mid, long = self.spec.lengths
        self.hf_prefill("hf_sdpa_fa2_warm", 1, self.spec.warm[0][1], 1, flash=True)
        for length in (short, mid, long):
            self.hf_prefill("hf_sdpa_fa2", 1, length, 1, flash=True)

    def nonattn_phase(self) -> None:
        """The model with attention replaced by a zero-cost op: prefill per token, decode as a CUDA graph."""
        spec = self.spec
        short, _, long = spec.lengths
        with attention_impl(self.model, NOATTN):
            for length, reps in ((spec.warm[0][1], 1), (short, 2), (long, 1)):
                def go(length: int = length, reps: int = reps) -> None:
                    ms_all = []
                    for _ in range(reps):
                        ids = self.ids(1, length)
                        self.free(collect=False)
                        self.mem.reset()
                        ms, _ = self.clock.run(lambda ids=ids: self.model(input_ids=ids, use_cache=False, logits_to_keep=1))
                        ms_all.append(ms)
                    self.rec.add(kind="nonattn_prefill", impl="hf_noattn", B=1, L=length, ms=median(ms_all),
                                 ms_all=ms_all, peak_gib=self.mem.peak())
                self.step(f"nonattn prefill 1x{length}", reps * self.fwd_s(1, length, 0.0) + 1, go)
            for batch in (1, spec.big_batch):
                self.step(f"nonattn decode B={batch}", 5, lambda b=batch: self.nonattn_decode(b, short))
                self.free(collect=False)
        self.free()

    def nonattn_decode(self, batch: int, length: int) -> None:
        ids = self.ids(batch, 1)
        pos = torch.full((batch, 1), length, dtype=torch.long, device=self.spec.device)

        def fwd() -> torch.Tensor:
            return self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1).logits
        with torch.no_grad():
            how = "eager"
            fn: Callable[[], Any] = fwd
            if self.cuda:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        fwd()
                torch.cuda.current_stream().wait_stream(side)
                try:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        fwd()
                    fn, how = graph.replay, "cuda graph"
                except Exception as exc:  # noqa: BLE001  (eager steps are launch-bound: flagged in the row)
                    how = f"eager (capture failed: {type(exc).__name__}: {str(exc)[:160]})"
                    torch.cuda.synchronize()
            ms_all = self.clock.bench(fn, iters=30 if self.cuda else 5, warm=2)
        self.rec.add(kind="nonattn_decode", impl="hf_noattn", B=batch, L=length, ms=median(ms_all), ms_all=ms_all,
                     how=how)

    def b_phase(self) -> None:
        """(b): StaticCache + torch.compile(model.forward, mode='reduce-overhead') decode at the short length."""
        from transformers import StaticCache

        spec = self.spec
        batch, length = spec.big_batch, spec.lengths[0]
        total = 4 + spec.decode_reps * spec.decode_steps
        cache = StaticCache(config=self.model.config, max_cache_len=length + total + 8)
        try:
            cache.early_initialization(batch, spec.kv_heads, spec.head_dim, self.dtype, torch.device(spec.device))
        except (AttributeError, TypeError):  # lazily initialised by one short forward instead
            with torch.no_grad():
                self.model(input_ids=self.ids(batch, 1), past_key_values=cache, use_cache=True, logits_to_keep=1)
        filled = 0
        for layer in getattr(cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    t.normal_()
                    filled += 1
            pos = getattr(layer, "cumulative_length", None)
            if isinstance(pos, torch.Tensor):
                pos.fill_(length)
        def compiled(fullgraph: bool) -> Callable[..., Any]:
            if self.args.b_backend == "inductor":
                return torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=fullgraph)
            return torch.compile(self.model.forward, backend=self.args.b_backend, fullgraph=fullgraph)
        fullgraph = True
        fwd = compiled(fullgraph)
        tok = self.ids(batch, 1)
        step_no = [0]

        def one() -> torch.Tensor:
            nonlocal tok
            pos = torch.full((batch, 1), length + step_no[0], dtype=torch.long, device=spec.device)
            step_no[0] += 1
            if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                out = fwd(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            return tok

        def steps(n: int) -> torch.Tensor:
            for _ in range(n):
                one()
            return tok
        self.mem.reset()
        try:
            compile_ms, _ = self.clock.run(lambda: steps(4))  # compile, warm-up run, record, first replay
        except (CallTimeout, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:  # noqa: BLE001  (a graph break: HF's documented set-up, without fullgraph)
            if self.left() < self.est(80):
                raise
            self.error("hf_static_compiled fullgraph=True", exc)
            fullgraph = False
            fwd = compiled(fullgraph)
            for layer in getattr(cache, "layers", []):
                pos = getattr(layer, "cumulative_length", None)
                if isinstance(pos, torch.Tensor):
                    pos.fill_(length)
            step_no[0] = 0
            compile_ms, _ = self.clock.run(lambda: steps(4))
        ms_all = []
        for _ in range(spec.decode_reps):
            ms, _ = self.clock.run(lambda: steps(spec.decode_steps))
            ms_all.append(ms / spec.decode_steps)
        self.rec.add(kind="decode", impl="hf_static_compiled", r=None, B=batch, L=length, ms=median(ms_all),
                     ms_all=ms_all, compile_and_warm_s=compile_ms / 1e3, peak_gib=self.mem.peak(),
                     cache_tensors_filled=filled, backend=self.args.b_backend, fullgraph=fullgraph,
                     note="StaticCache filled with random K/V at position L (no prefill)")
        fwd = cache = None  # noqa: F841  (free before the cleanup phase)
        self.free()

    def b_cleanup(self) -> None:
        try:  # the compiled decode's CUDA-graph pool would otherwise stay reserved
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()
        except Exception as exc:  # noqa: BLE001
            print(f"reset_cudagraph_trees: {exc}", flush=True)
        self.free()

    def hf_decode_phase(self) -> None:
        """(a) decode: DynamicCache filled with random K/V, eager steps (as users run generate)."""
        from transformers import DynamicCache

        spec = self.spec
        batch, length = spec.big_batch, spec.lengths[0]

        def go() -> None:
            cache = DynamicCache(config=self.model.config)
            for layer in range(spec.layers):
                k = torch.randn(batch, spec.kv_heads, length, spec.head_dim, dtype=self.dtype, device=spec.device)
                cache.update(k, torch.randn_like(k), layer)
            tok = self.ids(batch, 1)
            done = [0]

            def steps(n: int) -> torch.Tensor:
                nonlocal tok
                with torch.no_grad():
                    for _ in range(n):
                        pos = torch.full((batch, 1), length + done[0], dtype=torch.long, device=spec.device)
                        done[0] += 1
                        out = self.model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True,
                                         logits_to_keep=1)
                        tok = out.logits[:, -1].argmax(-1, keepdim=True)
                return tok
            self.mem.reset()
            steps(2)
            n = max(2, spec.decode_steps // 2)
            ms_all = []
            for _ in range(2):
                ms, _ = self.clock.run(lambda: steps(n))
                ms_all.append(ms / n)
            self.rec.add(kind="decode", impl="hf_dynamic", r=None, B=batch, L=length, ms=median(ms_all), ms_all=ms_all,
                         peak_gib=self.mem.peak(), note="DynamicCache filled with random K/V (no prefill)")
        self.step(f"hf_dynamic decode {batch}x{length}", 8, go)
        self.free()

    def hf_big_prefill_phase(self) -> None:
        self.hf_prefill("hf_sdpa", self.spec.big_batch, self.spec.lengths[0], 1)

    # ------------------------------------------------------------------------------------ evaluation
    def cudnn_ms(self, batch: int, length: int) -> tuple[float | None, str]:
        row = self.rec.find(kind="attn_floor", B=batch, L=length)
        if row:
            return row["ms"], "measured"
        row = self.rec.find(kind="attn_floor", B=1, L=length)
        if row:
            return row["ms"] * batch, "measured at B=1, x B"
        if length in BRIEF_CUDNN_MS and self.cuda:
            return BRIEF_CUDNN_MS[length] * batch, "BRIEF §2 table"
        return None, "missing"

    def nonattn_prefill_ms(self, batch: int, length: int) -> tuple[float | None, str]:
        row = self.rec.find(kind="nonattn_prefill", B=batch, L=length)
        if row:
            return row["ms"], "measured"
        rows = [r for r in self.rows_of("nonattn_prefill") if r["L"] >= self.spec.lengths[0]]
        if not rows:
            return None, "missing"
        ref = max(rows, key=lambda r: r["B"] * r["L"])
        return ref["ms"] * batch * length / (ref["B"] * ref["L"]), f"scaled by tokens from {ref['B']}x{ref['L']}"

    def rows_of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.rec.rows if r.get("kind") == kind and r.get("ms") is not None]

    def prefill_floor(self, r: float, batch: int, length: int) -> dict[str, Any] | None:
        non, non_src = self.nonattn_prefill_ms(batch, length)
        fa, fa_src = self.cudnn_ms(batch, length)
        if non is None or fa is None:
            return None
        ns = self.n_sparse(r)
        frac = self.sa_frac(length)
        attn = (self.spec.layers - ns) * fa + ns * frac * fa
        return dict(ms=non + attn, nonattn_ms=non, nonattn_source=non_src, attn_ms=attn, fa_layer_ms=fa,
                    fa_source=fa_src, sa_exec_frac=frac, full_layers=self.spec.layers - ns, sparse_layers=ns)

    def decode_floor(self, r: float, batch: int, length: int) -> dict[str, Any] | None:
        row = self.rec.find(kind="nonattn_decode", B=batch)
        spec = self.spec
        per_key = spec.kv_heads * spec.head_dim * 2 * torch.finfo(self.dtype).bits // 8  # K and V
        ns = self.n_sparse(r)
        kv = batch * per_key * ((spec.layers - ns) * length + ns * self.sa_keys(length))
        bw = self.copy_gbps * 1e9
        kv_ms = kv / bw * 1e3
        out = dict(kv_bytes=kv, kv_ms=kv_ms, copy_gbps=self.copy_gbps,
                   bytes_floor_ms=(self.nonembed_bytes + kv) / bw * 1e3, sa_keys=self.sa_keys(length))
        if row is None:
            return out | dict(ms=None)
        return out | dict(ms=row["ms"] + kv_ms, nonattn_ms=row["ms"], nonattn_how=row.get("how"))

    def evaluate(self) -> None:
        """Floors for every measured fluxc shape, then every target of the issue with a pass flag."""
        spec = self.spec
        short, _, long = spec.lengths
        floors: dict[str, Any] = dict(
            prefill_formula="nonattn(B,L) + sum over layers [FA: cuDNN(B,L); SA: exec_frac(L) x cuDNN(B,L)]",
            decode_formula="nonattn_decode(B) [CUDA graph] + KV bytes read (FA: L keys, SA: sink+window keys) / "
                           "copy bandwidth; bytes_floor_ms = (non-embedding weights + KV bytes) / copy bandwidth",
            prefill={}, decode={})
        for row in self.rec.rows:
            if row.get("impl") != "fluxc" or row.get("ms") is None:
                continue
            key = f"r={row['r']} B={row['B']} L={row['L']}"
            fn = self.prefill_floor if row["kind"] == "prefill" else self.decode_floor if row["kind"] == "decode" else None
            if fn is None:
                continue
            fl = fn(row["r"], row["B"], row["L"])
            if fl is not None:
                floors[row["kind"]][key] = fl | dict(measured_ms=row["ms"],
                                                      ratio=row["ms"] / fl["ms"] if fl.get("ms") else None)
        self.rec.data["floors"] = floors
        targets: list[dict[str, Any]] = []

        def add(name: str, value: float | None, goal: str, ok: Callable[[float], bool], note: str = "") -> None:
            targets.append(dict(target=name, value=None if value is None else round(value, 4), goal=goal,
                                met=None if value is None else bool(ok(value)), note=note))

        def ms(kind: str, impl: str, r: float | None, batch: int, length: int) -> float | None:
            row = self.rec.find(kind=kind, impl=impl, r=r, B=batch, L=length)
            return row["ms"] if row else None

        def ratio(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        for kind, limit0, limit in (("prefill", 1.15, 1.10), ("decode", 1.15, 1.15)):
            for key, fl in floors[kind].items():
                if fl.get("ratio") is None:
                    continue
                if key.startswith("r=0.0 "):
                    add(f"r=0 {kind} / dense floor ({key})", fl["ratio"], f"<= {limit0}", lambda v, x=limit0: v <= x)
                add(f"{kind} / floor ({key})", fl["ratio"], f"<= {limit}", lambda v, x=limit: v <= x)
        a128 = ms("prefill", "hf_sdpa", None, 1, long)
        for r, goal in ((0.75, 1.9), (1.0, 2.8)):
            add(f"prefill {long} B=1: (a) SDPA / fluxc r={r}", ratio(a128, ms("prefill", "fluxc", r, 1, long)),
                f">= {goal}", lambda v, g=goal: v >= g)
        b = spec.big_batch
        d0 = ms("decode", "fluxc", 0.0, b, short)
        d75 = ms("decode", "fluxc", 0.75, b, short)
        d1 = ms("decode", "fluxc", 1.0, b, short)
        add(f"decode {short} B={b}: fluxc r=0 / r=0.75", ratio(d0, d75), ">= 1.8", lambda v: v >= 1.8)
        add(f"decode {short} B={b}: (b) static+compiled / fluxc r=0.75",
            ratio(ms("decode", "hf_static_compiled", None, b, short), d75), ">= 8", lambda v: v >= 8)
        add(f"decode {short} B={b}: fluxc r=0 / r=1.0", ratio(d0, d1), ">= 2.5", lambda v: v >= 2.5)
        dr = ms("decode", "fluxc_router", 0.75, 1, long)
        df = ms("decode", "fluxc", 0.75, 1, long)
        add(f"routing cost at decode (1x{long}, router engine / forced r=0.75 - 1)",
            None if ratio(dr, df) is None else ratio(dr, df) - 1, "<= 0.01", lambda v: v <= 0.01,
            "the decode graph is specialised on the mask in both; routers run only at prefill")
        for length in (short, long):
            op = self.rec.find(kind="router_op", L=length)
            add(f"router op alone per layer, T={length} (ms)", op["ms"] if op else None, "<= 0.02",
                lambda v: v <= 0.02)
        pr = ms("prefill", "fluxc_router", 0.75, 1, short)
        pf = ms("prefill", "fluxc", 0.75, 1, short)
        add(f"router cost at prefill per layer, 1x{short}, (router - forced) / layers (ms)",
            None if pr is None or pf is None else (pr - pf) / spec.layers, "<= 0.02", lambda v: v <= 0.02,
            "difference of two whole prefills: noisy at this resolution; see the op-alone rows")
        mb = self.rec.data["maxbatch"]
        if "b_max" in mb.get("0.0", {}) and "b_max" in mb.get("0.75", {}):
            dense, sparse = mb["0.0"]["b_max"], mb["0.75"]["b_max"]
            add(f"largest batch at {long}: r=0.75 / dense (r=0)", sparse / dense if dense > 0 else float("inf"),
                ">= 3.5", lambda v: v >= 3.5, f"B_max dense {dense}, r=0.75 {sparse}; verified: "
                f"{mb['0.0'].get('verified')} / {mb['0.75'].get('verified')}")
        self.rec.data["targets"] = targets
        self.rec.data["fluxc_log"] = dict(self.tally.counts.most_common(40))
        self.rec.flush()

    # ------------------------------------------------------------------------------------ driver
    def plan(self) -> None:
        spec = self.spec
        short, mid, long = spec.lengths
        b = spec.big_batch

        def fluxc_est(r: float) -> float:
            def f(batch: int, length: int) -> float:
                return self.fwd_s(batch, length, self.sa_factor(r, length))
            return (5 * self.trace_s + 1 + spec.reps_short * f(1, short) + f(1, mid) + spec.reps_long * f(1, long)
                    + f(b, short) + 6)
        rs = [float(x) for x in self.args.rs.split(",") if x]
        core = [r for r in (0.0, 0.75, 1.0) if r in rs]
        extra = [r for r in rs if r not in core]  # after (b), still required: "every r" has targets
        add = self.phases.append
        add(Phase("floors", self.floors, lambda: self.est(14), True))
        for r in core:
            add(Phase(f"fluxc_r{r}", lambda r=r: self.fluxc_phase(r), lambda r=r: self.est(fluxc_est(r)), True))
        add(Phase("hf_a_prefill", self.hf_a_phase,
                  lambda: self.est(1 + spec.reps_short * self.fwd_s(1, short) + self.fwd_s(1, mid)
                                   + spec.reps_long * self.fwd_s(1, long)), True))
        add(Phase("nonattn", self.nonattn_phase,
                  lambda: self.est(3 * self.fwd_s(1, short, 0) + self.fwd_s(1, long, 0) + 6), True))
        add(Phase("hf_b_decode", lambda: self.step("hf_static_compiled decode", 70, self.b_phase),
                  lambda: self.est(70), True))
        add(Phase("hf_b_cleanup", self.b_cleanup, lambda: 0.0, True))
        for r in extra:
            add(Phase(f"fluxc_r{r}", lambda r=r: self.fluxc_phase(r), lambda r=r: self.est(fluxc_est(r)), True))
        add(Phase("router", self.router_phase,
                  lambda: self.est(3 * self.trace_s + 4 * self.fwd_s(1, short, self.sa_factor(0.75, short))
                                   + self.fwd_s(1, long, self.sa_factor(0.75, long)) + 4), False))
        add(Phase("maxbatch_verify", self.verify_phase, lambda: self.est(2 * self.trace_s + 16), False))
        add(Phase("hf_a2_prefill", self.hf_fa2_phase,
                  lambda: self.est(1 + sum(self.fwd_s(1, x, 1.8) for x in spec.lengths)), False))
        add(Phase("hf_a_decode", self.hf_decode_phase, lambda: self.est(10), False))
        add(Phase("hf_a_prefill_big", self.hf_big_prefill_phase, lambda: self.est(self.fwd_s(b, short) + 2), False))

    def run(self) -> None:
        only = set(self.args.phases.split(",")) if self.args.phases else None
        print(f"== setup (budget {self.budget:.0f} s)", flush=True)
        self.setup()
        self.rec.data["phases"].append(dict(name="setup", status="ok", wall_s=round(self.elapsed(), 1)))
        self.plan()
        self.rec.data["meta"]["plan"] = [dict(name=p.name, est_s=round(p.est(), 1), required=p.required)
                                         for p in self.phases]
        print("plan: " + ", ".join(f"{p.name} ~{p.est():.0f}s" for p in self.phases), flush=True)
        for i, ph in enumerate(self.phases):
            self.current = i
            start = self.elapsed()
            entry: dict[str, Any] = dict(name=ph.name, est_s=round(ph.est(), 1), start_s=round(start, 1))
            base = ph.name.split("_r")[0] if ph.name.startswith("fluxc_r") else ph.name
            if only is not None and ph.name not in only and base not in only:
                entry.update(status="not selected")
            elif self.broken:
                entry.update(status="skipped", reason=f"CUDA context unusable since {self.broken}")
            elif (ph.required and 0.5 * ph.est() > self.left()) or (
                    not ph.required and ph.est() + self.reserve() > self.left()):
                entry.update(status="skipped", reason=f"time budget: {self.left():.0f} s left, phase ~{ph.est():.0f} s, "
                                                      f"{self.reserve():.0f} s kept for later required phases")
            else:
                print(f"== phase {ph.name} (est {ph.est():.0f} s, {self.left():.0f} s left)", flush=True)
                self.phase_timeout = None
                try:
                    ph.fn()
                    entry.update(status="ok")
                except Exception as exc:  # noqa: BLE001
                    self.error(f"phase {ph.name}", exc)
                    entry.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
                self.free()
            entry.update(wall_s=round(self.elapsed() - start, 1), end_s=round(self.elapsed(), 1),
                         mem_after_gib=self.mem.now())
            self.rec.data["phases"].append(entry)
            if entry["status"] not in ("not selected",):
                print(f"== phase {ph.name}: {entry['status']} in {entry['wall_s']:.1f} s "
                      f"(elapsed {self.elapsed():.0f} / {self.budget:.0f} s){' ' + entry.get('reason', '')}",
                      flush=True)
            self.evaluate()

    def summary(self) -> None:
        print("\n== summary (ms; decode ms/token)")
        for r in self.rec.rows:
            if r.get("ms") is None or r.get("kind") not in ("prefill", "decode", "nonattn_prefill", "nonattn_decode",
                                                             "attn_floor", "router_op", "copy"):
                continue
            tag = f"r={r['r']}" if r.get("r") is not None else ""
            print(f"{r['kind']:16s} {r.get('impl', ''):20s} {tag:7s} B={r.get('B', '')!s:>2s} L={r.get('L', '')!s:>6s} "
                  f"{r['ms']:11.3f}" + (f"  peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") else ""))
        for name, mb in self.rec.data["maxbatch"].items():
            print(f"maxbatch r={name}: " + json.dumps(_round(mb)))
        for t in self.rec.data["targets"]:
            flag = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
            print(f"TARGET {t['target']}: {t['value']} (goal {t['goal']}) -> {flag}")
        for e in self.rec.data["errors"]:
            print(f"ERROR {e['label']}: {e['error'][:160]}")
        for msg, n in self.tally.counts.most_common(8):
            print(f"FLUXC LOG x{n}: {msg[:200]}")
        print(f"elapsed {self.elapsed():.0f} s; results: {self.args.out}", flush=True)


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
    ap.add_argument("--compiler", default="eager", choices=("eager", "inductor"), help="FluxConfig.compiler")
    ap.add_argument("--max-graphs", type=int, default=2, help="DecodeEngine max_graphs (each engine is short-lived)")
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
    bench = Bench(args, spec)
    rc = 0
    try:
        with torch.no_grad():
            bench.run()
    except KeyboardInterrupt:  # the outer timeout: keep what was measured
        during = bench.phases[bench.current].name if bench.phases else "setup"
        bench.rec.data["phases"].append(dict(name=during, status="interrupted", end_s=round(bench.elapsed(), 1)))
        rc = 130
    except Exception as exc:  # noqa: BLE001
        bench.error("run", exc)
        rc = 1
    finally:
        try:
            bench.evaluate()
        except Exception as exc:  # noqa: BLE001
            print(f"evaluate failed: {exc}", flush=True)
        bench.rec.data["meta"]["elapsed_s"] = round(bench.elapsed(), 1)
        bench.rec.flush()
        bench.summary()
        bench.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
