"""The state one end-to-end run shares between its phases, and how a step runs: under the time budget, a
watchdog, and a record of every skip and error (one failing step never sinks the run)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

import fluxc

import harness
from e2e_spec import GIB, Spec, route_for


@dataclass
class Phase:
    name: str
    fn: Callable[[], None]
    est: Callable[[], float]
    required: bool


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


class LogTally(logging.Handler):
    """Counts fluxc's log messages (e.g. which sites fall back to the reference implementation, and why)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.levelname}: {record.getMessage()[:300]}"] += 1


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


class Run:
    """One run: its spec, model, results and clock; phases (e2e_floors, e2e_fluxc, e2e_hf) read and extend it."""

    def __init__(self, args: argparse.Namespace, spec: Spec, argv: list[str] | None = None) -> None:
        self.args = args
        self.spec = spec
        self.cuda = spec.device == "cuda"
        self.dtype: torch.dtype = getattr(torch, spec.dtype)
        self.mem = Mem(self.cuda)
        self.t0 = time.perf_counter()
        self.budget = float(args.time_budget)
        self.broken: str | None = None  # why the CUDA context is unusable, once it is
        self.phase_timeout: str | None = None  # a step of the current phase ran past its watchdog
        self.trace_s = 10.0  # one Dynamo trace of the 32-layer graph (calibrated by the warm-ups)
        self.model: Any = None
        self.weights_bytes = self.nonembed_bytes = 0
        self.copy_gbps = 3000.0 if self.cuda else 10.0  # replaced by the measured bandwidth
        self.fms: dict[float, Any] = {}  # kept fluxc modules (max-batch verification)
        self.last_prefill: dict[str, Any] = {}
        self.phases: list[Phase] = []
        self.current = 0
        self.gen = torch.Generator(device="cpu").manual_seed(1234)
        self.cfg = fluxc.FluxConfig(sink=spec.sink, window=spec.window, block=spec.block,
                                    router_hidden=spec.router_hidden, compiler=args.compiler, impl=args.impl)
        self.rec = harness.Results(args.out, self.meta(argv), phases=[], targets=[], floors={}, maxbatch={},
                                   errors=[], skipped=[])
        self.tally = LogTally()  # fluxc logs at INFO why a site runs the reference instead of the kernels
        self.logger = logging.getLogger("fluxc")
        self.saved_level = self.logger.level
        self.logger.addHandler(self.tally)
        self.logger.setLevel(logging.INFO)

    def close(self) -> None:
        self.logger.removeHandler(self.tally)
        self.logger.setLevel(self.saved_level)

    def meta(self, argv: list[str] | None) -> dict[str, Any]:
        meta = harness.provenance(
            argv, benchmark="e2e", spec=asdict(self.spec), time_budget_s=self.budget,
            flux_config=self.cfg.to_dict(), fluxc_path=fluxc.__file__,
            timing=("prefill: wall time of one call, synchronised before and after; "
                    "decode: wall time of decode(state, steps) / steps; medians"))
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            meta.update(gpu_mem_gib=props.total_memory / GIB, sms=props.multi_processor_count,
                        cudnn=torch.backends.cudnn.version())
        else:
            meta.update(note="CPU smoke run: numbers exercise the logic only")
        return meta

    # --- time
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def est(self, seconds: float) -> float:
        return seconds * self.spec.est_scale

    def reserve(self) -> float:
        """Estimated seconds of the required phases after the current one."""
        return sum(p.est() for p in self.phases[self.current + 1:] if p.required)

    def wall(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(ms, result) of one synchronised call."""
        return harness.wall_ms(fn, cuda=self.cuda)

    def bench(self, fn: Callable[[], Any], iters: int, warm: int = 2) -> list[float]:
        """Per-call ms (CUDA events on the GPU)."""
        return harness.iter_ms(fn, iters=iters, warm=warm, cuda=self.cuda)

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
        """Fraction of the causal pairs of a `length`-token prompt the SA pattern executes."""
        from fluxc.stats import sparse_pairs

        return sparse_pairs(length, self.cfg) / (length * (length + 1) / 2)

    def sa_keys(self, length: int) -> int:
        """Keys the SA pattern lets the query at position `length` read (the first decode step)."""
        from fluxc.stats import sparse_pairs

        return sparse_pairs(length + 1, self.cfg) - sparse_pairs(length, self.cfg)

    def n_sparse(self, r: float) -> int:
        return route_for(r, self.spec.layers).count("sparse")

    # --- steps
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
        """Random prompt token ids (B, T) on the run's device."""
        return torch.randint(3, self.spec.vocab, (batch, length), generator=self.gen).to(self.spec.device)
