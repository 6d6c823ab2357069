"""Plot benchmarks/request_stream.py results: p50 and p95 request latency per implementation, batch 1 and batch 8.

    python benchmarks/plot_request_stream.py requests.json requests.png
"""

from __future__ import annotations

import json
import sys


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(src))
    rows = [r for r in data["rows"] if r.get("kind") == "requests"]
    batches = sorted({r["B"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            row = next((r for r in rows if r["impl"] == impl and r["B"] == batch), None)
            if row is None:
                continue
            bars = ax.bar([q + (i - (len(impls) - 1) / 2) * width for q in (0, 1)], [row["p50_ms"], row["p95_ms"]],
                          width, label=f"{impl} ({row['tokens_per_s']:.0f} tok/s)")
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks([0, 1], ["p50", "p95"])
        ax.set_ylabel("request latency, ms")
        ax.set_title(f"batch {batch}, {rows[0]['requests']} requests, {rows[0]['new']} new tokens", fontsize=9)
        ax.legend(fontsize=7)
    meta = data.get("meta", {})
    fig.suptitle(f"{meta.get('model', '')} on {meta.get('gpu', '')}, torch {meta.get('torch', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
