"""Markdown tables and the targets met / missed, from the benchmarks' result JSONs, for README-style files.

A file names the regions it wants between markers; --write rewrites what lies between them (nothing else),
--check exits 1 when a region differs from what the JSONs give (CI: tables never drift from the results).

    <!-- fluxc-report:e2e -->
    ...generated...
    <!-- /fluxc-report:e2e -->

    python benchmarks/report.py                                      # every region, to stdout
    python benchmarks/report.py --write benchmarks/results/REPORT.md # a new file gets every region
    python benchmarks/report.py --check README.md                    # exit 1 when a region is stale
    python benchmarks/report.py --source e2e=/tmp/out/e2e_h100.json --write REPORT.md   # another run's file

Regions: e2e, export, training, kernels-prefill, kernels-decode, reliability, serving, targets. Result files from before the
shared harness lack some provenance (commit, command): they read "not recorded".
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import harness
import measures

HERE = pathlib.Path(__file__).resolve().parent

RESULTS = HERE / "results"
# name -> (benchmark, file under benchmarks/results/): the runs the tables show
SOURCES: dict[str, tuple[str, str]] = {
    "e2e": ("e2e", "e2e/e2e_h100.json"),
    "router_op": ("router_op", "e2e/router_op_h100.json"),
    "export": ("export", "gpu/export_gpu_h100_2026-11-24.json"),
    "training": ("training", "training/smollm2_eval_h100_200.json"),
    "kernels": ("kernels", "kernels_h100.json"),
    "kernels_decode": ("kernels", "kernels_h100_decode.json"),
    "kernels_ring": ("kernels", "kernels_h100_ring_decode.json"),
    "requests": ("requests", "requests/requests_h100.json"),
    "soak_gpu": ("soak", "soak/soak_h100.json"),
    "soak_gpu_faults": ("soak", "soak/soak_h200_faults.json"),
    "soak_cpu": ("soak", "soak/soak_cpu_smoke.json"),
}
NOT_RECORDED = "not recorded"
MARKER = re.compile(r"<!-- fluxc-report:([\w.-]+) -->\n(.*?)<!-- /fluxc-report:\1 -->", re.DOTALL)


@dataclass(frozen=True)
class Source:
    name: str
    bench: str
    path: pathlib.Path
    doc: Mapping[str, Any] | None  # None: the file is missing

    @property
    def shown(self) -> str:
        """The path as the report prints it: relative to the repository when inside it (stable output)."""
        try:
            return str(self.path.resolve().relative_to(harness.ROOT))
        except ValueError:
            return str(self.path)


def load_sources(results: pathlib.Path = RESULTS, overrides: Mapping[str, str] | None = None) -> dict[str, Source]:
    out = {}
    for name, (bench, rel) in SOURCES.items():
        path = pathlib.Path(overrides[name]) if overrides and name in overrides else results / rel
        doc = json.loads(path.read_text()) if path.is_file() else None
        out[name] = Source(name, bench, path, doc)
    return out


# ------------------------------------------------------------------------------------ formatting


def provenance_of(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The harness's provenance fields, read from any layout the benchmarks have written (None: absent)."""
    meta = dict(doc.get("meta") or {})
    own = doc.get("provenance") or {}  # fluxc eval's record of its own run
    own_host = own.get("host") or {}
    train = doc.get("router_provenance") or {}  # fluxc eval's record of the router's training
    host = train.get("host") or {}
    command = meta.get("command") or own.get("command") or train.get("command")
    if isinstance(command, list):
        command = shlex.join(command)
    cpu = f"CPU ({own_host['platform']})" if str(own_host.get("device", "")).startswith("cpu") else None
    return dict(gpu=meta.get("gpu") or doc.get("gpu") or own_host.get("gpu") or cpu or host.get("gpu"),
                torch=meta.get("torch") or doc.get("torch") or own_host.get("torch") or host.get("torch"),
                triton=meta.get("triton") or doc.get("triton"),
                transformers=(meta.get("transformers") or doc.get("transformers") or own_host.get("transformers")
                              or host.get("transformers")),
                fluxc=meta.get("fluxc") or train.get("fluxc_version"),
                commit=meta.get("commit") or (own.get("git") or {}).get("commit") or (train.get("git") or {}).get("commit"),
                command=command, date=str(meta.get("date") or doc.get("date") or own.get("date") or "")[:10] or None)


def provenance_line(src: Source) -> str:
    p = provenance_of(src.doc or {})

    def v(key: str) -> str:
        return str(p[key]) if p.get(key) else NOT_RECORDED
    versions = ", ".join(f"{k} {v(k)}" for k in ("torch", "triton", "transformers", "fluxc"))
    command = f"`{p['command']}`" if p.get("command") else NOT_RECORDED
    return (f"Source: `{src.shown}`; {v('gpu')}; {versions}; commit {v('commit')}; date {v('date')}; "
            f"command: {command}.")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def kilo(length: int) -> str:
    """Prompt length as 32K, or as is when not a multiple of 1024."""
    return f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)


def num(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def first(rows: list[dict[str, Any]], field: str = "ms", **selector: Any) -> Any:
    """`field` of the first row matching `selector` that has it (None: not measured)."""
    return next((r[field] for r in rows if harness.matches(r, selector) and r.get(field) is not None), None)


def missing(src: Source) -> str:
    return f"Not measured: `{src.shown}` is missing."


# ------------------------------------------------------------------------------------ regions


def e2e_region(sources: Mapping[str, Source]) -> str:
    """The end-to-end table by SA fraction r, with the transformers baselines and the analytical floors."""
    src = sources["e2e"]
    if src.doc is None:
        return missing(src)
    rows, names = measures.e2e(src.doc)
    short, long, big = names["short"], names["long"], names["big"]
    rs = sorted({r["r"] for r in rows if r.get("impl") == "fluxc" and r.get("kind") in ("prefill", "decode")})

    def per_r(kind: str, batch: int, length: int, scale: float, spec: str, field: str = "ms") -> list[str]:
        return [num(None if (v := first(rows, field, kind=kind, impl="fluxc", r=r, B=batch, L=length)) is None
                    else v * scale, spec) for r in rs]

    def baselines(kind: str, batch: int, length: int, scale: float, spec: str, impls: dict[str, str]) -> str:
        found = [(label, first(rows, kind=kind, impl=impl, B=batch, L=length)) for impl, label in impls.items()]
        return "; ".join(f"{label} {format(ms * scale, spec)}" for label, ms in found if ms is not None)

    def floor_range(kind: str) -> list[str]:
        cells = []
        for r in rs:
            ratios = [x["ratio"] for x in rows if x.get("kind") == f"{kind}_floor" and x.get("r") == r
                      and x.get("ratio") is not None]
            lo, hi = (f"{min(ratios):.2f}", f"{max(ratios):.2f}") if ratios else ("", "")
            cells.append(lo if lo == hi else f"{lo}-{hi}")
        return cells
    prefill_hf = {"hf_sdpa": "(a) HF SDPA", "hf_sdpa_fa2": "(a') HF SDPA FA2"}
    decode_hf = {"hf_static_compiled": "(b) static + compile", "hf_dynamic": "(a)"}
    maxbatch = src.doc.get("maxbatch", {})
    body = [
        [f"prefill {kilo(long)}, B=1 (s)", *per_r("prefill", 1, long, 1e-3, ".2f"),
         baselines("prefill", 1, long, 1e-3, ".2f", prefill_hf)],
        [f"prefill {kilo(short)}, B={big} (s)", *per_r("prefill", big, short, 1e-3, ".2f"),
         baselines("prefill", big, short, 1e-3, ".2f", prefill_hf)],
        [f"decode {kilo(short)}, B={big} (ms/token)", *per_r("decode", big, short, 1, ".2f"),
         baselines("decode", big, short, 1, ".1f", decode_hf)],
        [f"decode {kilo(long)}, B=1 (ms/token)", *per_r("decode", 1, long, 1, ".2f"),
         baselines("decode", 1, long, 1, ".1f", decode_hf)],
        ["prefill / analytical floor", *floor_range("prefill"), ""],
        ["decode / analytical floor", *floor_range("decode"), ""],
        [f"KV cache per sequence at {kilo(long)} (GiB)", *per_r("prefill", 1, long, 1, ".2f", "cache_per_seq_gib"), ""],
        [f"largest batch at {kilo(long)} (model)",
         *[str(maxbatch.get(str(r), {}).get("b_max", "")) for r in rs], ""],
    ]
    spec = src.doc.get("meta", {}).get("spec", {})
    title = (f"{spec.get('name', 'model')}, random {spec.get('dtype', '')} weights, forced routes (r = fraction of "
             f"layers sparse), sink {spec.get('sink')} + window {spec.get('window')}.")
    return "\n".join([title, "", table(["measurement", *[f"r = {r:g}" for r in rs], "baselines"], body), "",
                      provenance_line(src)])


def export_region(sources: Mapping[str, Source]) -> str:
    """Prefill time of each exported-program variant per prompt length."""
    src = sources["export"]
    if src.doc is None:
        return missing(src)
    doc = src.doc
    lengths = sorted(doc.get("prefill_ms", {}), key=int)
    variants = list(dict.fromkeys(v for length in lengths for v in doc["prefill_ms"][length]))
    hf = {length: doc["prefill_ms"][length].get("hf-sdpa") for length in lengths}
    body = []
    for name in variants:
        cells = []
        for length in lengths:
            ms = doc["prefill_ms"][length].get(name)
            ratio = f" ({hf[length] / ms:.2f}x)" if ms and hf[length] and name != "hf-sdpa" else ""
            cells.append("" if ms is None else f"{ms:.1f}{ratio}")
        body.append([name, *cells])
    model, flux = doc.get("model", {}), doc.get("flux", {})
    title = (f"{model.get('num_hidden_layers')}-layer Llama-shaped model (hidden {model.get('hidden_size')}, "
             f"{model.get('num_attention_heads')} / {model.get('num_key_value_heads')} heads), "
             f"{str(doc.get('dtype', '')).replace('torch.', '')}, B={doc.get('batch')}, sink {flux.get('sink')} + "
             f"window {flux.get('window')}; median of {doc.get('reps')} calls; in parentheses: speed-up over "
             f"hf-sdpa.")
    header = ["variant", *[f"prefill {kilo(int(length))} (ms)" for length in lengths]]
    return "\n".join([title, "", table(header, body), "", provenance_line(src)])


def reliability_region(sources: Mapping[str, Source]) -> str:
    """The soak runs side by side: requests, faults injected, requests lost, pages leaked, compiles after warm-up."""
    runs = [(label, sources[name]) for label, name in (("GPU soak", "soak_gpu"), ("GPU, 20% failures", "soak_gpu_faults"),
                                                       ("CPU smoke", "soak_cpu"))]
    rows_of = {label: next((r for r in (src.doc or {}).get("rows", []) if r.get("kind") == "soak"), None)
               for label, src in runs}

    def cell(label: str, fmt: Callable[[dict[str, Any]], str]) -> str:
        row = rows_of[label]
        return "not measured" if row is None else fmt(row)

    def faults(row: dict[str, Any]) -> str:
        planned = {k: v for k, v in row["planned"].items() if k != "clean" and v}
        return ", ".join(f"{k} {row['ended_with_error'].get(k, 0)}/{v}" for k, v in planned.items())

    measures_ = [
        ("requests (prompt lengths)", lambda r: f"{r['requests']} ({kilo(r['min_len'])}-{kilo(r['max_len'])})"),
        ("faults that ended their request / injected", faults),
        ("unaffected requests lost (vs a clean run)", lambda r: f"{r['lost_unaffected']} of {r['unaffected']}"),
        ("pages leaked or still reserved", lambda r: str(r["leaked_pages"] + r["reserved_pages_left"])),
        ("compiles / CUDA-graph captures after warm-up",
         lambda r: f"{r['compiles_after_warmup']} / {r['captures_after_warmup']}"),
        ("device memory after - after warm-up", lambda r: "n/a (CPU)" if r.get("memory_delta_bytes") is None
         else f"{r['memory_delta_bytes'] / 2**20:.2f} MiB"),
    ]
    body = [[name, *(cell(label, fmt) for label, _ in runs)] for name, fmt in measures_]
    lines = [table(["", *(label for label, _ in runs)], body), ""]
    lines += [provenance_line(src) if src.doc is not None else missing(src) for _, src in runs]
    return "\n".join(lines)


def serving_region(sources: Mapping[str, Source]) -> str:
    """The request stream: fluxc's engine beside transformers' generate, latency, throughput, warm-up, compiles."""
    src = sources["requests"]
    if src.doc is None:
        return missing(src)
    rows = src.doc.get("rows", [])
    runs = [r for r in rows if r.get("kind") == "requests"]
    body = []
    for r in runs:
        impl = r["impl"].replace("hf_", "transformers generate, ").replace("fluxc", "fluxc engine")
        after = (f"{r['compiles_after_warmup']} / {r['captures_after_warmup']}"
                 if "compiles_after_warmup" in r else "")
        body.append([impl, str(r["B"]), num(r["p50_ms"], ".0f"), num(r["p95_ms"], ".0f"),
                     num(r["tokens_per_s"], ".0f"), after])
    warm = {r["impl"]: r["s"] for r in rows if r.get("kind") == "warmup"}
    kv = next((r for r in rows if r.get("kind") == "kv"), None)
    check = next((r for r in rows if r.get("kind") == "check"), None)
    first_run = runs[0] if runs else {}
    notes = [f"{first_run.get('requests')} prompts of {first_run.get('new')} greedy tokens each; warm-up (every "
             f"compile and capture): " + ", ".join(f"{k.replace('hf_', 'transformers ')} {v:.0f} s" for k, v in warm.items()) + "."]
    if kv is not None:
        notes.append(f"KV bytes a request holds: {kv['fraction_of_dense']:.2f} of its dense size (the router's "
                     f"sparse layers keep sink + window pages).")
    def tied(prefix: str) -> str:
        return f" (+{check[prefix + '_near_ties']} apart at a bf16 near-tie)" if f"{prefix}_near_ties" in check else ""

    if check:
        text = ""
        if "full_logit_error" in check:
            text = (f"Logit error against fp32 along the engine's answers, full routes: "
                    f"{check['full_logit_error']:.3f} (the untouched bf16 model: {check['untouched_logit_error']:.3f}). ")
        text += (f"Checks, equal greedy tokens: full routes against the untouched model "
                f"{check['full_equals_untouched']}/{check['prompts']}{tied('full')}; the engine against the plain "
                f"loop {check['router_equals_dynamic_loop']}/{check['prompts']}{tied('router')}")
        if "router_same_routes" in check:
            text += f", the same route for {check['router_same_routes']}/{check['prompts']}"
        if "hf_eager_equals_sdpa" in check:
            text += (f"; for scale, transformers' eager attention against its sdpa "
                     f"{check['hf_eager_equals_sdpa']}/{check['prompts']}{tied('hf_eager')}")
        notes.append(text + ".")
    else:
        notes.append("Checks (equal greedy tokens): not recorded.")
    batches = sorted({r["B"] for r in runs})
    for impl, name in (("hf_static", "static cache + compile"), ("hf_dynamic", "dynamic cache")):
        absent = [b for b in batches if not any(r["impl"] == impl and r["B"] == b for r in runs)]
        if absent:
            notes.append(f"transformers' {name}: not recorded at batch {', '.join(map(str, absent))}.")
    notes += [str(n) + ("" if str(n).endswith(".") else ".") for n in src.doc.get("notes", [])]
    parts = src.doc.get("parts", {})
    if len({(p.get("commit"), p.get("gpu")) for p in parts.values()}) > 1:  # parts of separate device calls
        notes.append("Parts run in separate calls (`--append`): " + "; ".join(
            f"{name} at {str(p.get('commit'))[:7]} on {p.get('gpu')}, {str(p.get('date'))[:16]}"
            for name, p in parts.items()) + ".")
    header = ["", "batch", "p50 (ms)", "p95 (ms)", "tokens/s", "compiles / captures after warm-up"]
    return "\n".join([table(header, body), "", " ".join(notes), "", provenance_line(src)])


def training_region(sources: Mapping[str, Source]) -> str:
    """Quality per task family with full attention, all-sparse and the router; the router's SA fraction."""
    src = sources["training"]
    if src.doc is None:
        return missing(src)
    doc = src.doc
    threshold = doc.get("summary", {}).get("capable_threshold")
    body = []
    for row in measures.training(doc)[0]:
        modes = doc["families"][row["family"]].get("modes", {})
        cells = []
        for mode in ("full", "sparse", "router"):
            m = modes.get(mode)
            if m is None:
                cells.append("-")
            elif row["metric"] == "perplexity":
                cells.append(f"{m['perplexity']:.2f}")
            else:
                cells.append(f"{100 * m['accuracy']:.1f}% ({m.get('correct')}/{row['examples']})")
        name = row["family"] if row["capable"] else (
            f"{row['family']} (model can't: < {threshold:.0%} with full)" if threshold is not None
            else f"{row['family']} (model can't)")
        body.append([name, str(row["group"]), str(row["metric"]), *cells, num(row["router_sa_fraction"], ".2f"),
                     "" if row["router_work_saved"] is None else f"{100 * row['router_work_saved']:.1f}%"])
    header = ["family", "kind", "metric", "full", "all-sparse", "router", "router SA fraction",
              "work saved (router)"]
    lengths = ", ".join(kilo(int(x)) for x in doc.get("lengths", []))
    first_family = next(iter(doc.get("families", {}).values()), {})
    title = f"Held-out examples at {lengths} tokens, {first_family.get('examples')} per family."
    return "\n".join([title, "", table(header, body), "", provenance_line(src)])


def kernels_prefill_region(sources: Mapping[str, Source]) -> str:
    """Prefill attention, B=1: ms per implementation and length; TFLOP/s on executed pairs in parentheses."""
    src = sources["kernels"]
    if src.doc is None:
        return missing(src)
    rows = [r for r in src.doc.get("rows", []) if r.get("kind") == "prefill"]
    columns: list[tuple[str, list[dict[str, Any]], bool]] = [  # (header, selectors joined by " / ", TFLOP/s)
        ("SDPA flash", [dict(impl="sdpa_flash")], False),
        ("SDPA cuDNN", [dict(impl="sdpa_cudnn")], True),
        ("flex causal", [dict(impl=["flex_triton", "flex"], mask="causal")], False),
        ("flex SA", [dict(impl=["flex_triton", "flex"], mask="sa_block")], False),
        ("ours Triton FA", [dict(impl="ours_triton", mask="causal", route="device")], True),
        ("ours Triton SA", [dict(impl="ours_triton", mask="sa_block", route="device")], True),
        ("ours SA token-exact", [dict(impl="ours_triton", mask="sa_token")], False),
        ("ours flex FA / SA", [dict(impl="ours_flex", mask="causal"), dict(impl="ours_flex", mask="sa_block")],
         False),
        ("ours dispatch FA", [dict(impl="ours_dispatch", mask="causal")], False),
    ]
    body = []
    for length in sorted({r["L"] for r in rows}):
        cells = []
        for _, selectors, with_tflops in columns:
            parts = []
            for sel in selectors:
                ms = first(rows, L=length, **sel)
                tf = first(rows, "tflops", L=length, **sel) if with_tflops else None
                parts.append("-" if ms is None else f"{ms:.4g}" + (f" ({tf:.0f})" if tf is not None else ""))
            cells.append(" / ".join(parts) if any(p != "-" for p in parts) else "-")
        body.append([kilo(length), *cells])
    return "\n".join(["Prefill, B=1 (ms; TFLOP/s on executed pairs).", "",
                      table(["L", *[c[0] for c in columns]], body), "", provenance_line(src)])


def kernels_decode_region(sources: Mapping[str, Source]) -> str:
    """Decode attention: ms per implementation and (B, L), do_bench / CUDA-graph replay."""
    src = sources["kernels_decode"]
    if src.doc is None:
        return missing(src)
    rows = [r for r in src.doc.get("rows", []) if r.get("kind") == "decode"]
    columns = [("SDPA flash", dict(impl="sdpa_flash")), ("SDPA cuDNN", dict(impl="sdpa_cudnn")),
               ("ours FA", dict(impl="ours_triton", mask="full", route="device")),
               ("ours SA", dict(impl="ours_triton", mask="sa_block", route="device")),
               ("ours SA ring", dict(impl="ours_triton", mask="sa_ring")),
               ("ours flex FA", dict(impl="ours_flex", mask="full")),
               ("ours flex SA", dict(impl="ours_flex", mask="sa_block"))]
    body = []
    for batch, length in sorted({(r["B"], r["L"]) for r in rows}, key=lambda s: (s[1], s[0])):
        cells = []
        for _, sel in columns:
            ms, graph = first(rows, B=batch, L=length, **sel), first(rows, "ms_graph", B=batch, L=length, **sel)
            cells.append("-" if ms is None else f"{ms:.3g} / {graph:.3g}" if graph is not None else f"{ms:.3g} / -")
        body.append([f"{batch}, {kilo(length)}", *cells])
    return "\n".join(["Decode (ms, do_bench / CUDA graph).", "", table(["B, L", *[c[0] for c in columns]], body),
                      "", provenance_line(src)])


def targets_region(sources: Mapping[str, Source]) -> str:
    """Every target of targets.toml evaluated on each result file: met, missed, not measured."""
    status = {True: "met", False: "**missed**", None: "not measured"}
    parts = []
    for src in sources.values():
        if not harness.load_targets(src.bench):
            continue
        if src.doc is None:
            parts.append(f"`{src.shown}`: missing.")
            continue
        entries = measures.targets_for(src.bench, src.doc)
        counts = {flag: sum(e["met"] is flag for e in entries) for flag in (True, False, None)}
        parts.append(f"`{src.shown}`: {counts[True]} met, {counts[False]} missed, {counts[None]} not measured.")
        for e in entries:
            value = "" if e["value"] is None else f" {e['value']:.4g}"
            note = f" ({e['note']})" if e["note"] else ""
            parts.append(f"- {status[e['met']]}: {e['target']}:{value} (goal {e['goal']}){note}")
        parts.append("")
    return "\n".join(parts).rstrip()


REGIONS: dict[str, tuple[str, Callable[[Mapping[str, Source]], str]]] = {  # name -> (title, renderer)
    "e2e": ("End to end", e2e_region),
    "export": ("Exported programs on the GPU", export_region),
    "training": ("SmolLM2-135M-Instruct router", training_region),
    "kernels-prefill": ("Kernels: prefill", kernels_prefill_region),
    "kernels-decode": ("Kernels: decode", kernels_decode_region),
    "reliability": ("Reliability: the soak", reliability_region),
    "serving": ("Serving: a request stream", serving_region),
    "targets": ("Targets met / missed (benchmarks/targets.toml)", targets_region),
}


# ------------------------------------------------------------------------------------ files


def render_regions(sources: Mapping[str, Source], names: list[str] | None = None) -> dict[str, str]:
    return {name: REGIONS[name][1](sources) for name in (names or list(REGIONS))}


def new_file(sources: Mapping[str, Source]) -> str:
    """A report with every region, for a file that does not exist yet."""
    lines = ["# Benchmark report", "",
             "Generated by `python benchmarks/report.py --write FILE` from the result JSONs under benchmarks/results/",
             "and the targets in benchmarks/targets.toml; `--check FILE` exits 1 when a region is stale. Only the",
             "text between `<!-- fluxc-report:NAME -->` markers is rewritten.", ""]
    for name, (title, _) in REGIONS.items():
        lines += [f"## {title}", "", f"<!-- fluxc-report:{name} -->", f"<!-- /fluxc-report:{name} -->", ""]
    return rewrite("\n".join(lines), sources)[0]


def rewrite(text: str, sources: Mapping[str, Source]) -> tuple[str, list[str]]:
    """`text` with each marked region regenerated, and the names of the regions that changed.
    Raises KeyError for a region name the report does not know."""
    unknown = sorted({m.group(1) for m in MARKER.finditer(text)} - set(REGIONS))
    if unknown:
        raise KeyError(f"unknown report region(s): {', '.join(unknown)} (known: {', '.join(REGIONS)})")
    rendered = render_regions(sources, list(dict.fromkeys(m.group(1) for m in MARKER.finditer(text))))
    changed = []

    def one(match: re.Match[str]) -> str:
        name, old = match.group(1), match.group(2)
        new = rendered[name] + "\n"
        if new != old:
            changed.append(name)
        return f"<!-- fluxc-report:{name} -->\n{new}<!-- /fluxc-report:{name} -->"
    return MARKER.sub(one, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", metavar="FILE", help="rewrite the marked regions of FILE (a new FILE gets all)")
    mode.add_argument("--check", metavar="FILE", help="exit 1 when a marked region of FILE is stale")
    parser.add_argument("--results", default=str(RESULTS), help="folder the default sources are read from")
    parser.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                        help=f"read source NAME from PATH instead ({', '.join(SOURCES)})")
    args = parser.parse_args(argv)
    overrides = dict(s.split("=", 1) for s in args.source)
    if set(overrides) - set(SOURCES):
        parser.error(f"unknown source(s) {sorted(set(overrides) - set(SOURCES))}; known: {', '.join(SOURCES)}")
    sources = load_sources(pathlib.Path(args.results), overrides)
    target = pathlib.Path(args.write or args.check or ".")
    if not (args.write or args.check):
        for name, text in render_regions(sources).items():
            print(f"<!-- fluxc-report:{name} -->\n{text}\n<!-- /fluxc-report:{name} -->\n")
        return 0
    if args.write and not target.exists():
        target.write_text(new_file(sources))
        print(f"wrote {target} (every region)")
        return 0
    try:
        text, changed = rewrite(target.read_text(), sources)
    except (KeyError, FileNotFoundError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if changed:
            print(f"{target}: stale region(s): {', '.join(changed)} (run: python benchmarks/report.py --write "
                  f"{target})", file=sys.stderr)
            return 1
        print(f"{target}: every region is current")
        return 0
    if changed:
        target.write_text(text)
    print(f"{target}: rewrote {', '.join(changed) or 'nothing (current)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
