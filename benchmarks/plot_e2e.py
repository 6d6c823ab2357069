"""Plot benchmarks/e2e.py results: prefill time, decode ms/token (floors marked), KV memory, targets.

    python benchmarks/plot_e2e.py e2e_h100.json e2e_h100.png
"""

from __future__ import annotations

import json
import sys
from typing import Any

BASELINES = {"hf_sdpa": "(a) HF SDPA", "hf_sdpa_fa2": "(a') HF SDPA FA2", "hf_static_compiled": "(b) HF static+compiled",
             "hf_dynamic": "(a) HF DynamicCache"}
RS = (0.0, 0.5, 0.75, 1.0)


def _label(row: dict[str, Any]) -> str:
    if row["impl"] in BASELINES:
        return BASELINES[row["impl"]]
    return f"{'fluxc' if row['impl'] == 'fluxc' else 'fluxc+routers'} r={row['r']:g}"


def _group_key(group: str) -> tuple[int, float]:
    """'32K B=8' -> (8, 32): batch first, then length."""
    length, batch = group.split(" B=")
    return int(batch), float(length.rstrip("K")) * (1024 if length.endswith("K") else 1)


def _ordered(series: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Baselines first, then fluxc by r, then fluxc with routers."""
    def key(name: str) -> tuple[int, str]:
        return (0 if name.startswith("(") else 2 if "routers" in name else 1, name)
    return {n: series[n] for n in sorted(series, key=key)}


def _bars(ax: Any, groups: list[str], series: dict[str, dict[str, float]], floors: dict[str, float],
          ylabel: str, title: str) -> None:
    names = list(series)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        ys = [series[name].get(grp) for grp in groups]
        bars = ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width,
                      label=name)
        for bar, y in zip(bars, [y for y in ys if y is not None]):
            ax.annotate(f"{y:.3g}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=6,
                        rotation=90)
        for x, grp in zip(xs, groups):
            fl = floors.get(f"{name}|{grp}")
            if fl:
                ax.plot([x - width / 2, x + width / 2], [fl, fl], color="black", lw=1.5)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title + " (black: analytical floor)", fontsize=10)
    if names:
        ax.legend(fontsize=7)
    ax.grid(True, axis="y", which="both", alpha=0.3)


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(src))
    meta, rows = data["meta"], [r for r in data["rows"] if r.get("ms") is not None]
    floors = data.get("floors", {})
    fig, axes = plt.subplots(2, 2, figsize=(20, 12))

    def k(length: int) -> str:
        return f"{length // 1024}K" if length >= 1024 else str(length)

    # prefill
    series: dict[str, dict[str, float]] = {}
    fl: dict[str, float] = {}
    groups: list[str] = []
    for r in rows:
        if r["kind"] != "prefill" or r["impl"].endswith("_warm"):
            continue
        grp = f"{k(r['L'])} B={r['B']}"
        if grp not in groups:
            groups.append(grp)
        name = _label(r)
        series.setdefault(name, {})[grp] = r["ms"] / 1e3
        f = floors.get("prefill", {}).get(f"r={r['r']} B={r['B']} L={r['L']}") if r["impl"] == "fluxc" else None
        if f and f.get("ms"):
            fl[f"{name}|{grp}"] = f["ms"] / 1e3
    _bars(axes[0, 0], sorted(groups, key=_group_key), _ordered(series), fl, "seconds (median)", "Prefill")

    # decode
    series, fl, groups = {}, {}, []
    for r in rows:
        if r["kind"] != "decode":
            continue
        grp = f"{k(r['L'])} B={r['B']}"
        if grp not in groups:
            groups.append(grp)
        name = _label(r)
        series.setdefault(name, {})[grp] = r["ms"]
        f = floors.get("decode", {}).get(f"r={r['r']} B={r['B']} L={r['L']}") if r["impl"] == "fluxc" else None
        if f and f.get("ms"):
            fl[f"{name}|{grp}"] = f["ms"]
    _bars(axes[0, 1], sorted(groups, key=_group_key), _ordered(series), fl, "ms / token (median)", "Decode")

    # memory: KV per sequence at the long length, largest batch, prefill peaks
    ax = axes[1, 0]
    long = max((r["L"] for r in rows if r["kind"] == "prefill"), default=0)
    per_seq = {f"r={r['r']:g}": r["cache_per_seq_gib"] for r in rows
               if r["kind"] == "prefill" and r["impl"] == "fluxc" and r["L"] == long and r["B"] == 1
               and r.get("cache_per_seq_gib") is not None}
    peaks = {_label(r): r["peak_gib"] for r in rows
             if r["kind"] == "prefill" and r["L"] == long and r["B"] == 1 and r.get("peak_gib")}
    xs = sorted(per_seq, key=lambda x: float(x[2:]))
    ax.bar(xs, [per_seq[x] for x in xs], color="tab:blue", label=f"KV cache per sequence at {k(long)} (GiB)")
    for x in xs:
        ax.annotate(f"{per_seq[x]:.2f}", (x, per_seq[x]), ha="center", va="bottom", fontsize=8)
    names = list(peaks)
    ax.bar(names, [peaks[n] for n in names], color="tab:gray", alpha=0.6, label=f"peak memory of a {k(long)} prefill (GiB)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    mb = data.get("maxbatch", {})
    text = [f"r={r}: B_max {v.get('b_max')} (cache only {v.get('b_max_cache_only')}), verified {v.get('verified')}"
            for r, v in mb.items() if "b_max" in v]
    ax.set_title(f"Memory at {k(long)}" + ("\n" + "; ".join(text) if text else ""), fontsize=9)
    ax.set_ylabel("GiB")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)

    # targets
    ax = axes[1, 1]
    ax.axis("off")
    lines = [f"{'MET   ' if t['met'] else 'n/a   ' if t['met'] is None else 'MISSED'} {t['value']!s:>8s} "
             f"(goal {t['goal']}) {t['target']}" for t in data.get("targets", [])]
    ax.text(0, 1, "\n".join(lines[:48]) or "no targets evaluated", va="top", family="monospace", fontsize=6.5)
    ax.set_title("End-to-end targets", fontsize=10)

    fig.suptitle(f"fluxc end to end, {meta.get('spec', {}).get('name')}: {meta.get('gpu')}, torch {meta.get('torch')}, "
                 f"triton {meta.get('triton')}, transformers {meta.get('transformers')}, {str(meta.get('date'))[:10]}, "
                 f"commit {str(meta.get('commit'))[:12]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
