"""transformers baselines of the end-to-end benchmark, same process and weights as fluxc: (a) SDPA prefill,
(a') SDPA forced to FlashAttention-2, (b) StaticCache + torch.compile decode, (a) DynamicCache decode, and
the non-attention floor (the model with a zero-cost attention)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

import harness
from e2e_run import CallTimeout, Run
from models import NOATTN, attention_impl


def hf_prefill(run: Run, impl: str, batch: int, length: int, reps: int, flash: bool = False) -> None:
    """`reps` timed prefills of the untouched model (a DynamicCache, logits of the last token only) -> one row."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    runs: list[tuple[float, float | None, float | None]] = []
    for i in range(reps):
        def go() -> tuple[float, float | None, float | None]:
            ids = run.ids(batch, length)
            run.free(collect=False)
            before = run.mem.reset()
            ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash else contextlib.nullcontext()

            def call() -> torch.Tensor:
                with ctx, torch.no_grad():
                    out = run.model(input_ids=ids, logits_to_keep=1)
                    return out.logits[:, -1].argmax(-1)
            ms, _ = run.wall(call)
            return ms, run.mem.peak(), before
        res = run.step(f"{impl} prefill {batch}x{length} rep {i}", run.fwd_s(batch, length, 1.8 if flash else 1.0) + 2,
                       go, optional=i >= 1)
        if res is None:
            break
        runs.append(res)
    run.free()
    if runs:
        ms_all = [x[0] for x in runs]
        run.rec.add(kind="prefill", impl=impl, r=None, B=batch, L=length, ms=harness.median(ms_all), ms_all=ms_all,
                    min_ms=min(ms_all), peak_gib=runs[-1][1], before_gib=runs[-1][2])


def hf_a_phase(run: Run) -> None:
    short, mid, long = run.spec.lengths
    hf_prefill(run, "hf_sdpa_warm", 1, run.spec.warm[0][1], 1)
    hf_prefill(run, "hf_sdpa", 1, short, run.spec.reps_short)
    hf_prefill(run, "hf_sdpa", 1, mid, 1)
    hf_prefill(run, "hf_sdpa", 1, long, run.spec.reps_long)


def hf_fa2_phase(run: Run) -> None:
    hf_prefill(run, "hf_sdpa_fa2_warm", 1, run.spec.warm[0][1], 1, flash=True)
    for length in run.spec.lengths:
        hf_prefill(run, "hf_sdpa_fa2", 1, length, 1, flash=True)


def hf_big_prefill_phase(run: Run) -> None:
    hf_prefill(run, "hf_sdpa", run.spec.big_batch, run.spec.lengths[0], 1)


def nonattn_phase(run: Run) -> None:
    """The model with attention replaced by a zero-cost op: prefill per token, decode as a CUDA graph."""
    spec = run.spec
    short, _, long = spec.lengths
    with attention_impl(run.model, NOATTN):
        for length, reps in ((spec.warm[0][1], 1), (short, 2), (long, 1)):
            def go(length: int = length, reps: int = reps) -> None:
                ms_all = []
                for _ in range(reps):
                    ids = run.ids(1, length)
                    run.free(collect=False)
                    run.mem.reset()
                    ms, _ = run.wall(lambda ids=ids: run.model(input_ids=ids, use_cache=False, logits_to_keep=1))
                    ms_all.append(ms)
                run.rec.add(kind="nonattn_prefill", impl="hf_noattn", B=1, L=length, ms=harness.median(ms_all),
                            ms_all=ms_all, peak_gib=run.mem.peak())
            run.step(f"nonattn prefill 1x{length}", reps * run.fwd_s(1, length, 0.0) + 1, go)
        for batch in (1, spec.big_batch):
            run.step(f"nonattn decode B={batch}", 5, lambda b=batch: nonattn_decode(run, b, short))
            run.free(collect=False)
    run.free()


def nonattn_decode(run: Run, batch: int, length: int) -> None:
    """One decode step without attention (weights read, nothing else), replayed as a CUDA graph on the GPU."""
    ids = run.ids(batch, 1)  # (B, 1)
    pos = torch.full((batch, 1), length, dtype=torch.long, device=run.spec.device)

    def fwd() -> torch.Tensor:
        return run.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1).logits
    with torch.no_grad():
        how = "eager"
        fn: Callable[[], Any] = fwd
        if run.cuda:
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
        ms_all = run.bench(fn, iters=30 if run.cuda else 5, warm=2)
    run.rec.add(kind="nonattn_decode", impl="hf_noattn", B=batch, L=length, ms=harness.median(ms_all),
                ms_all=ms_all, how=how)


def b_phase(run: Run) -> None:
    """(b): StaticCache + torch.compile(model.forward, mode='reduce-overhead') decode at the short length.

    The cache is filled with random K/V and its position set to the prompt length instead of a prefill through
    the static-cache path (which materialises a (B, 1, T, T+new) mask): a decode step reads the same bytes."""
    from transformers import StaticCache

    spec = run.spec
    batch, length = spec.big_batch, spec.lengths[0]
    total = 4 + spec.decode_reps * spec.decode_steps
    cache = StaticCache(config=run.model.config, max_cache_len=length + total + 8)
    try:
        cache.early_initialization(batch, spec.kv_heads, spec.head_dim, run.dtype, torch.device(spec.device))
    except (AttributeError, TypeError):  # lazily initialised by one short forward instead
        with torch.no_grad():
            run.model(input_ids=run.ids(batch, 1), past_key_values=cache, use_cache=True, logits_to_keep=1)
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
        if run.args.b_backend == "inductor":
            return torch.compile(run.model.forward, mode="reduce-overhead", fullgraph=fullgraph)
        return torch.compile(run.model.forward, backend=run.args.b_backend, fullgraph=fullgraph)
    fullgraph = True
    fwd = compiled(fullgraph)
    tok = run.ids(batch, 1)
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
    run.mem.reset()
    try:
        compile_ms, _ = run.wall(lambda: steps(4))  # compile, warm-up run, record, first replay
    except (CallTimeout, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:  # noqa: BLE001  (a graph break: HF's documented set-up, without fullgraph)
        if run.left() < run.est(80):
            raise
        run.error("hf_static_compiled fullgraph=True", exc)
        fullgraph = False
        fwd = compiled(fullgraph)
        for layer in getattr(cache, "layers", []):
            pos = getattr(layer, "cumulative_length", None)
            if isinstance(pos, torch.Tensor):
                pos.fill_(length)
        step_no[0] = 0
        compile_ms, _ = run.wall(lambda: steps(4))
    ms_all = []
    for _ in range(spec.decode_reps):
        ms, _ = run.wall(lambda: steps(spec.decode_steps))
        ms_all.append(ms / spec.decode_steps)
    run.rec.add(kind="decode", impl="hf_static_compiled", r=None, B=batch, L=length, ms=harness.median(ms_all),
                ms_all=ms_all, compile_and_warm_s=compile_ms / 1e3, peak_gib=run.mem.peak(),
                cache_tensors_filled=filled, backend=run.args.b_backend, fullgraph=fullgraph,
                note="StaticCache filled with random K/V at position L (no prefill)")
    fwd = cache = None  # noqa: F841  (free before the cleanup phase)
    run.free()


def b_cleanup(run: Run) -> None:
    try:  # the compiled decode's CUDA-graph pool would otherwise stay reserved
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
    except Exception as exc:  # noqa: BLE001
        print(f"reset_cudagraph_trees: {exc}", flush=True)
    run.free()


def hf_decode_phase(run: Run) -> None:
    """(a) decode: DynamicCache filled with random K/V, eager steps (as users run generate)."""
    from transformers import DynamicCache

    spec = run.spec
    batch, length = spec.big_batch, spec.lengths[0]

    def go() -> None:
        cache = DynamicCache(config=run.model.config)
        for layer in range(spec.layers):
            k = torch.randn(batch, spec.kv_heads, length, spec.head_dim, dtype=run.dtype, device=spec.device)
            cache.update(k, torch.randn_like(k), layer)
        tok = run.ids(batch, 1)
        done = [0]

        def steps(n: int) -> torch.Tensor:
            nonlocal tok
            with torch.no_grad():
                for _ in range(n):
                    pos = torch.full((batch, 1), length + done[0], dtype=torch.long, device=spec.device)
                    done[0] += 1
                    out = run.model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True,
                                    logits_to_keep=1)
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
            return tok
        run.mem.reset()
        steps(2)
        n = max(2, spec.decode_steps // 2)
        ms_all = []
        for _ in range(2):
            ms, _ = run.wall(lambda: steps(n))
            ms_all.append(ms / n)
        run.rec.add(kind="decode", impl="hf_dynamic", r=None, B=batch, L=length, ms=harness.median(ms_all),
                    ms_all=ms_all, peak_gib=run.mem.peak(), note="DynamicCache filled with random K/V (no prefill)")
    run.step(f"hf_dynamic decode {batch}x{length}", 8, go)
    run.free()
