"""Plot benchmarks/export_gpu.py results: prefill time per variant, one group of bars per prompt length.

    python benchmarks/plot_export.py export_gpu.json export_gpu.png
"""

from __future__ import annotations

import json
import sys


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(src))
    lengths = sorted(data["prefill_ms"], key=int)
    variants = list(data["prefill_ms"][lengths[0]])
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, name in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(lengths))]
        ys = [data["prefill_ms"][length][name] for length in lengths]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(lengths)), [f"{int(length) // 1024}K tokens" for length in lengths])
    ax.set_ylabel("prefill, ms (median)")
    model = data["model"]
    ax.set_title(f"Exported programs, {data['gpu']}, torch {data['torch']}: {model['num_hidden_layers']}-layer "
                 f"Llama-shaped bf16, B=1", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
