"""What a benchmark's result JSON measured, as rows and named scalars: the terms targets.toml is written in.

One function per benchmark, reading the document the benchmark writes (and the older layouts committed under
benchmarks/results/). The benchmarks call `targets_for` while they run; report.py calls it on files.

    rows, names = MEASURES["e2e"](json.load(open("benchmarks/results/e2e/e2e_h100.json")))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import harness

Doc = Mapping[str, Any]
View = tuple[list[dict[str, Any]], dict[str, Any]]


def e2e(doc: Doc) -> View:
    """Rows as measured, plus one `prefill_floor` / `decode_floor` row per floor the run derived (fields: r, B,
    L, the floor's parts and `ratio` = measured / floor). Names: the spec's lengths (short, mid, long), big
    (batch), layers, copy_gbps, and the max-batch model's dense_b_max / sparse_b_max (r = 0.75)."""
    meta = doc.get("meta", {})
    spec = meta.get("spec", {})
    rows = [dict(r) for r in doc.get("rows", [])]
    for phase in ("prefill", "decode"):
        for key, floor in doc.get("floors", {}).get(phase, {}).items():
            shape = dict(part.split("=", 1) for part in key.split())  # "r=0.75 B=1 L=131072"
            rows.append(dict(floor, kind=f"{phase}_floor", r=float(shape["r"]), B=int(shape["B"]),
                             L=int(shape["L"])))
    short, mid, long = spec.get("lengths", (None, None, None))
    names: dict[str, Any] = dict(short=short, mid=mid, long=long, big=spec.get("big_batch"),
                                 layers=spec.get("layers"), copy_gbps=meta.get("copy_gbps"))
    for label, r in (("dense", "0.0"), ("sparse", "0.75")):
        model = doc.get("maxbatch", {}).get(r, {})
        names[f"{label}_b_max"] = model.get("b_max")
        names[f"{label}_verified"] = model.get("verified")
    return rows, names


def kernels(doc: Doc) -> View:
    """Rows as measured; names: copy_gbps (the run's device copy bandwidth, GB/s)."""
    copy = next((r.get("gbps") for r in doc.get("rows", []) if r.get("kind") == "copy"), None)
    return [dict(r) for r in doc.get("rows", [])], dict(copy_gbps=doc.get("meta", {}).get("copy_gbps", copy))


def router_op(doc: Doc) -> View:
    """`router_op` rows with the prompt length as L (the file writes it as T)."""
    return [dict(r, kind="router_op", L=r.get("L", r.get("T")), impl=r.get("impl", "op")) for r in doc.get("rows", [])], {}


def export(doc: Doc) -> View:
    """One `prefill` row per (variant, length) of `prefill_ms`."""
    rows = [dict(kind="prefill", variant=name, L=int(length), B=doc.get("batch", 1), ms=ms)
            for length, variants in doc.get("prefill_ms", {}).items() for name, ms in variants.items()]
    return rows, {}


def training(doc: Doc) -> View:
    """One `family` row per task family: group (retrieval / holistic), metric, capable (full attention scores
    the eval's threshold), its score per mode (full, sparse, router: accuracy or perplexity), the router's SA
    fraction and work saved. Names: the eval summary's numbers (sa_fraction_gap, retrieval_full_accuracy, ...)."""
    summary = doc.get("summary", {})
    capable = set(summary.get("capable_families", doc.get("families", {})))
    rows = []
    for family, info in doc.get("families", {}).items():
        metric = info.get("metric")
        modes = info.get("modes", {})
        router = modes.get("router", {})
        rows.append(dict(kind="family", family=family, group=info.get("kind"), metric=metric,
                         capable=family in capable, examples=info.get("examples"),
                         router_sa_fraction=router.get("sa_fraction"), router_work_saved=router.get("work_saved"),
                         **{mode: (modes.get(mode) or {}).get(metric) for mode in ("full", "sparse", "router")}))
    names = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return rows, names


def requests(doc: Doc) -> View:
    """Rows as measured (warmup, requests per impl and batch, kv, check); each fluxc `requests` row also gets
    hf_best_p50_ms / hf_best_p95_ms, the best transformers baseline (dynamic or static cache) at its batch."""
    rows = [dict(r) for r in doc.get("rows", [])]
    for row in rows:
        if row.get("kind") != "requests" or row.get("impl") != "fluxc":
            continue
        hf = [r for r in rows if r.get("kind") == "requests" and str(r.get("impl", "")).startswith("hf_")
              and r.get("B") == row.get("B")]
        for q in ("p50", "p95"):
            values = [r[f"{q}_ms"] for r in hf if r.get(f"{q}_ms") is not None]
            if values:
                row[f"hf_best_{q}_ms"] = min(values)
    return rows, {}


def soak(doc: Doc) -> View:
    """Rows as measured (warmup, soak); the soak row also gets memory_delta_mib."""
    rows = [dict(r) for r in doc.get("rows", [])]
    for row in rows:
        if row.get("memory_delta_bytes") is not None:
            row["memory_delta_mib"] = row["memory_delta_bytes"] / 2**20
    return rows, {}


MEASURES: dict[str, Callable[[Doc], View]] = dict(e2e=e2e, kernels=kernels, router_op=router_op, export=export,
                                                   training=training, requests=requests, soak=soak)


def targets_for(bench: str, doc: Doc) -> list[dict[str, Any]]:
    """Every target of `bench` in targets.toml, evaluated on `doc`."""
    rows, names = MEASURES[bench](doc)
    return harness.evaluate_targets(harness.load_targets(bench), rows, names)
