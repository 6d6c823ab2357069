"""Plot benchmarks/kernel_bench.py results: prefill time vs length, decode bandwidth, targets.

    python benchmarks/plot_kernels.py results.json results.png
"""

from __future__ import annotations

import json
import sys


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(src))
    rows = [r for r in data["rows"] if "ms" in r]
    meta = data["meta"]
    fig, axes = plt.subplots(1, 3, figsize=(20, 6.5), gridspec_kw=dict(width_ratios=[1.1, 1.1, 1.0]))

    ax = axes[0]
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 series, each its own colour
    series = {}
    for r in rows:
        if r["kind"] != "prefill":
            continue
        key = f"{r['impl']} {r['mask']}" + (" (route constexpr)" if r.get("route") == "constexpr" else "")
        series.setdefault(key, []).append((r["L"], r["ms"]))
    for key, pts in sorted(series.items()):
        pts.sort()
        style = "-" if key.startswith(("ours", "fluxc")) else "--"
        ax.plot([p[0] / 1024 for p in pts], [p[1] for p in pts], style, marker="o", label=key)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prefill length (K tokens), B=1")
    ax.set_ylabel("ms (median)")
    ax.set_title("Prefill attention, 32q/8kv heads, d128, bf16")
    if series:  # a decode-only run has no prefill rows
        ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[1]
    dec = [r for r in rows if r["kind"] == "decode"]
    shapes = sorted({(r["B"], r["L"]) for r in dec})
    impls = sorted({f"{r['impl']} {r['mask']}" + (" const" if r.get("route") == "constexpr" else "") for r in dec})
    width = 0.8 / max(1, len(impls))
    for i, name in enumerate(impls):
        ys = []
        for s in shapes:
            m = [r for r in dec if (r["B"], r["L"]) == s and f"{r['impl']} {r['mask']}" + (
                " const" if r.get("route") == "constexpr" else "") == name]
            ys.append(m[0].get("gbps_graph") or m[0]["gbps"] if m else 0)
        ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=name)
    if meta.get("copy_gbps"):
        ax.axhline(meta["copy_gbps"], color="k", ls=":", label=f"copy {meta['copy_gbps']:.0f} GB/s")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"B={b}\nL={L // 1024}K" for b, L in shapes])
    ax.set_ylabel("GB/s of K/V the branch must read (CUDA-graph median)")
    ax.set_title("Decode")
    ax.legend(fontsize=7)

    ax = axes[2]
    ax.axis("off")
    lines = [f"{meta.get('gpu')}  torch {meta.get('torch')}  triton {meta.get('triton')}",
             f"{meta.get('date', '')[:19]}", ""]
    for t in data.get("targets", []):
        mark = "MET " if t["met"] else "MISS"
        lines.append(f"[{mark}] {t['target']}: {t['value']} (goal {t['goal']})")
    ax.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=6.5)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print("wrote", dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
