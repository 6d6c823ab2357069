"""fluxc phases of the end-to-end benchmark: forced routes at SA fraction r (prefill, decode, the max-batch
model), its verification, and the router engine against the forced routes it reproduces."""

from __future__ import annotations

import math
import pathlib
import tempfile
from typing import Any

import torch

import fluxc

import harness
from e2e_run import Run
from e2e_spec import GIB, route_for
from models import forced_routers

PAGE_SIZE = 16  # keys per KV page (DecodeEngine's default)


def new_engine(run: Run, fm: Any, sized_to_workload: bool = True) -> Any:
    """The decode engine of a phase. `sized_to_workload`: its KV pool holds this run's largest prefill (B=big x
    the short length, every layer full) and no more, so the rest of the device stays free for that prefill's
    activations (the default pool would keep room for a prefill of max_len tokens only); else the default pool."""
    spec = run.spec
    max_len = max(spec.lengths) + spec.new_tokens
    short = spec.lengths[0] + spec.new_tokens
    pages = None
    if sized_to_workload:  # + 1: the pool's scratch page
        pages = spec.layers * max(spec.big_batch * math.ceil(short / PAGE_SIZE), math.ceil(max_len / PAGE_SIZE)) + 1
    return fluxc.DecodeEngine(fm, cuda_graphs=run.cuda, max_batch=spec.big_batch, max_len=max_len,
                              page_size=PAGE_SIZE, num_pages=pages, max_prefill_tokens=max(spec.big_batch * short, 2))


def graphs(fm: Any) -> int | None:
    """Dynamo graphs compiled so far (a new one during a timed call is a recompile)."""
    return getattr(getattr(fm, "_backend", None), "graphs", None)


def timed_prefill(run: Run, engine: Any, fm: Any, ids: torch.Tensor) -> dict[str, Any]:
    """One timed engine.prefill of ids (B, T); memory and recompiles around it. The engine's KV pool exists
    before (a server allocates it at start-up), so `peak - before` is the prefill's transient memory."""
    engine.allocate()
    run.free(collect=False)
    before = run.mem.reset()
    g0 = graphs(fm)
    ms, state = run.wall(lambda: engine.prefill(ids, max_new_tokens=run.spec.new_tokens))
    return dict(ms=ms, state=state, peak=run.mem.peak(), before=before, recompiled=(graphs(fm) or 0) - (g0 or 0))


def route_ok(state: Any, route: list[str]) -> bool | None:
    """Whether the prefill's (B, layers) routes are the forced ones (None: the state has none)."""
    got = getattr(state, "route", None)
    if got is None:
        return None
    want = torch.tensor([[x == "full" for x in route]] * int(got.shape[0]), dtype=torch.bool)
    return bool(torch.equal(got.to("cpu", torch.bool), want))


def prefill_series(run: Run, impl: str, r: float | None, fm: Any, engine: Any, route: list[str], batch: int,
                   length: int, reps: int, keep: bool) -> Any:
    """`reps` timed prefills of one shape -> one row (median); returns the last state when `keep`."""
    runs: list[dict[str, Any]] = []
    state = None
    attn = run.sa_factor(r or 0.0, length)
    for i in range(reps):
        state = None
        run.free(collect=False)

        def go() -> dict[str, Any]:
            return timed_prefill(run, engine, fm, run.ids(batch, length))
        res = run.step(f"{impl} r={r} prefill {batch}x{length} rep {i}", run.fwd_s(batch, length, attn) + 3, go,
                       optional=i >= 1)
        if res is None:
            break
        state = res.pop("state")
        res.update(cache_bytes=engine.state_kv_bytes(state), route_ok=route_ok(state, route))
        runs.append(res)
        if i < reps - 1 or not keep:
            engine.end(state)
            state = None
    if not runs:
        return None
    ms_all = [x["ms"] for x in runs]
    clean = [x["ms"] for x in runs if not x["recompiled"]] or ms_all
    last = runs[-1]
    run.rec.add(kind="prefill", impl=impl, r=r, B=batch, L=length, ms=harness.median(clean), ms_all=ms_all,
                min_ms=min(ms_all), recompiled=[x["recompiled"] for x in runs], peak_gib=last["peak"],
                before_gib=last["before"], cache_gib=last["cache_bytes"] / GIB,
                cache_per_seq_gib=last["cache_bytes"] / batch / GIB, sa_layers=route.count("sparse"),
                route_ok=all(x["route_ok"] is not False for x in runs))
    run.last_prefill = last
    return state


def decode_series(run: Run, impl: str, r: float | None, engine: Any, state: Any, batch: int, length: int) -> None:
    """A warm-up call (traces and captures), then `decode_reps` timed calls of `decode_steps` steps."""
    spec = run.spec
    run.mem.reset()
    first_ms, _ = run.wall(lambda: engine.decode(state, spec.decode_warm))
    ms_all: list[float] = []
    tokens = None
    for _ in range(spec.decode_reps):
        ms, tokens = run.wall(lambda: engine.decode(state, spec.decode_steps))
        ms_all.append(ms / spec.decode_steps)
    ok = tokens is not None and bool(((tokens >= 0) & (tokens < spec.vocab)).all())
    run.rec.add(kind="decode", impl=impl, r=r, B=batch, L=length, ms=harness.median(ms_all), ms_all=ms_all,
                first_call_s=first_ms / 1e3, steps=spec.decode_steps, peak_gib=run.mem.peak(),
                cache_gib=engine.state_kv_bytes(state) / GIB, tokens_in_vocab=ok,
                engine_stats={k: int(v) for k, v in dict(getattr(engine, "stats", {})).items()})


def warmups(run: Run, label: str, fm: Any, engine: Any) -> None:
    """One prefill per shape class (static, dynamic length, dynamic batch): the Dynamo traces, timed apart."""
    for batch, length in run.spec.warm:
        res = run.step(f"{label} warm {batch}x{length}", run.trace_s + 2,
                       lambda b=batch, t=length: timed_prefill(run, engine, fm, run.ids(b, t)))
        if res is None:
            continue
        engine.end(res.pop("state"))
        run.rec.add(kind="warm", impl=label, B=batch, L=length, s=res["ms"] / 1e3, recompiled=res["recompiled"])
        if res["recompiled"] and run.spec.est_scale:
            run.trace_s = max(run.trace_s * 0.5, res["ms"] / 1e3)  # calibrate the trace estimate
    run.free()


def fluxc_phase(run: Run, r: float) -> None:
    """Forced routes with SA fraction r: warm-ups (one trace per shape class), then the headline shapes
    first (a phase cut short by the budget keeps them): B=big at the short length with decode, B=1 at the
    long length with decode and the max-batch model, then B=1 at the short and mid lengths. Each shape
    gets a fresh engine: an engine's decode entries own their KV buffers."""
    spec = run.spec
    route = route_for(r, spec.layers)
    fm = fluxc.compile(run.model, config=run.cfg, route=route)
    impl = "fluxc"
    short, mid, long = spec.lengths
    engine = new_engine(run, fm)
    warmups(run, f"fluxc r={r}", fm, engine)
    for batch, length, reps in ((spec.big_batch, short, 1), (1, long, spec.reps_long)):
        engine = state = None
        run.free()
        engine = new_engine(run, fm)
        state = prefill_series(run, impl, r, fm, engine, route, batch, length, reps, keep=True)
        if state is None:
            continue
        if batch == 1:
            maxbatch_model(run, r, run.last_prefill)
        run.step(f"fluxc r={r} decode {batch}x{length}", run.trace_s + 4,
                 lambda b=batch, t=length, e=engine, s=state: decode_series(run, impl, r, e, s, b, t))
    for length, reps in ((short, spec.reps_short), (mid, 1)):
        engine = state = None
        run.free()
        engine = new_engine(run, fm)
        prefill_series(run, impl, r, fm, engine, route, 1, length, reps, keep=False)
    engine = state = None
    if r in (0.0, 0.75):
        run.fms[r] = fm
    run.free()


def maxbatch_model(run: Run, r: float, prefill: dict[str, Any]) -> None:
    """Largest batch at the long length from this prefill's measured bytes (see e2e.py's docstring).

    On CPU (smoke) the device memory is synthetic: weights + 4.5 dense sequences, no transient."""
    if r not in (0.0, 0.75):
        return
    per_seq = prefill["cache_bytes"]
    if run.cuda:
        free_b, total_b = torch.cuda.mem_get_info()
        outside = total_b - free_b - torch.cuda.memory_reserved()  # CUDA context, libraries' workspaces
        usable = total_b - outside
        transient = prefill["peak"] * GIB - prefill["before"] * GIB  # the cache lives in the pool, allocated before
        how = "measured"
    else:
        dense = run.rec.data["maxbatch"].get("0.0", {}).get("per_seq_gib", per_seq / GIB) * GIB
        outside, usable, transient, how = 0.0, run.weights_bytes + 4.5 * dense, 0.0, "synthetic (CPU smoke)"
    b_max = int((usable - run.weights_bytes - transient) // per_seq)
    run.rec.data["maxbatch"][str(r)] = dict(
        L=run.spec.lengths[2], usable_gib=usable / GIB, outside_torch_gib=outside / GIB,
        weights_gib=run.weights_bytes / GIB, per_seq_gib=per_seq / GIB, transient_gib=transient / GIB,
        before_prefill_gib=prefill["before"], peak_prefill_gib=prefill["peak"], b_max=b_max,
        b_max_cache_only=int((usable - run.weights_bytes) // per_seq), memory=how,
        formula="floor((usable - weights - transient) / per_seq)", verified=None)
    run.rec.flush()


def verify_phase(run: Run) -> None:
    """Prefill B_max short prompts sized to the long length's capacity on an engine with the default pool (which
    keeps room for a max_len prefill's activations), decode; B_max + 1 must not fit."""
    spec = run.spec
    long = spec.lengths[2]
    for r in (0.0, 0.75):
        mb = run.rec.data["maxbatch"].get(str(r))
        fm = run.fms.get(r)
        if not mb or fm is None or "b_max" not in mb:
            run.skip(f"verify r={r}", "no max-batch model or fluxc module for this r")
            continue
        route = route_for(r, spec.layers)
        for batch, expect in ((mb["b_max"], "fits"), (mb["b_max"] + 1, "oom")):
            if batch < 1:
                continue

            def go(batch: int = batch, expect: str = expect, mb: dict = mb, fm: Any = fm,
                   route: list[str] = route, r: float = r) -> None:
                # the default pool keeps room for a max_len prefill's activations: the measured transient's role
                engine = new_engine(run, fm, sized_to_workload=False)
                run.mem.reset()
                outcome, nbytes, detail = "fits", None, ""
                try:
                    state = engine.prefill(run.ids(batch, spec.verify_prompt),
                                           max_new_tokens=long + spec.new_tokens - spec.verify_prompt)
                    nbytes = engine.state_kv_bytes(state)
                    if expect == "fits":
                        engine.decode(state, 2)
                    harness.sync(run.cuda)
                    detail = f"route_ok={route_ok(state, route)}"
                    state = None
                except (torch.cuda.OutOfMemoryError, fluxc.CapacityError) as exc:
                    outcome, detail = "oom", str(exc)[:200]
                run.rec.add(kind="maxbatch_verify", impl="fluxc", r=r, B=batch, L=long, expected=expect,
                            outcome=outcome, cache_gib=None if nbytes is None else nbytes / GIB,
                            cache_per_seq_gib=None if nbytes is None else nbytes / batch / GIB,
                            peak_gib=run.mem.peak(),
                            pool_gib=None if engine.pool is None else engine.pool.num_pages * engine.pool.page_bytes / GIB,
                            detail=detail)
                if expect == "fits":
                    mb["verified"] = outcome == "fits"
                else:
                    mb["b_max_plus_1"] = outcome
                engine = None
            run.step(f"verify r={r} B={batch}", run.trace_s + 6 if expect == "fits" else 4, go)
            run.free()
        run.rec.flush()


def router_phase(run: Run) -> None:
    """Routers whose decisions equal the r = 0.75 forced routes, against the forced module."""
    spec = run.spec
    r = 0.75
    route = route_for(r, spec.layers)
    ckpt = pathlib.Path(tempfile.mkdtemp(prefix="fluxc-e2e-")) / "routers.safetensors"
    forced_routers(run.model, run.cfg, route, ckpt, made_by="benchmarks/e2e.py")
    fm = fluxc.compile(run.model, str(ckpt), config=run.cfg)
    impl = "fluxc_router"
    short, _, long = spec.lengths
    engine = new_engine(run, fm)
    warmups(run, "fluxc router", fm, engine)
    engine = new_engine(run, fm)
    prefill_series(run, impl, r, fm, engine, route, 1, short, 3, keep=False)
    engine = None
    run.free()
    engine = new_engine(run, fm)
    state = prefill_series(run, impl, r, fm, engine, route, 1, long, 1, keep=True)
    if state is not None:
        run.step(f"router decode 1x{long}", run.trace_s + 3,
                 lambda: decode_series(run, impl, r, engine, state, 1, long))
    state = engine = None
    run.free()
