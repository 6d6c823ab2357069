"""Router cost at prefill (issue 4): `fluxc::router_logits` alone on one layer's (1, T, 32, 128) bf16 pre-RoPE query,
Llama-3.1-8B shape, router MLP (1024, 256, 512, 128); CUDA-event medians over 50 calls. JSON to argv[1].

    python benchmarks/router_op.py out.json     # needs `import fluxc` (scripts/gpu.sh builds the package view)
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys

import torch

import fluxc
from fluxc.ops.router import LayerRouter


def main() -> None:
    router = LayerRouter(128, (1024, 256, 512, 128)).cuda()
    weights = [w.detach() for w in router.weights()]
    rows = []
    for seq in (32768, 131072):
        query = torch.randn(1, seq, 32, 128, device="cuda", dtype=torch.bfloat16)
        valid = torch.ones(1, seq, dtype=torch.bool, device="cuda")
        times = []
        for i in range(60):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.ops.fluxc.router_logits(query, valid, weights, 150)
            end.record()
            torch.cuda.synchronize()
            if i >= 10:
                times.append(start.elapsed_time(end))
        rows.append({"T": seq, "pool_size": 150, "ms": statistics.median(times), "goal_ms": 0.02})
        print(rows[-1], flush=True)
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "fluxc": fluxc.__version__,
            "date": datetime.date.today().isoformat()}
    with open(sys.argv[1], "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
