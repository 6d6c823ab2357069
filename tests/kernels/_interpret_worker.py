"""Runs every interpreter case and writes one JSON object {case: report}.  Started by
test_kernels_interpret.py in a subprocess with TRITON_INTERPRET=1, so the interpreter setting never
reaches the pytest process itself (Triton reads it when kernels are defined)."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _interpret_cases import cases  # noqa: E402
from _kernel_harness import (  # noqa: E402
    load_kernels,
    run_decode_case,
    run_paged_case,
    run_paged_write_case,
    run_prefill_case,
    run_ring_case,
    run_skip_case,
    run_varlen_case,
)

RUN = {"prefill": run_prefill_case, "decode": run_decode_case, "varlen": run_varlen_case, "ring": run_ring_case,
       "paged": run_paged_case, "paged_write": run_paged_write_case}


def main(path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    K = load_kernels()
    results = {}
    only = sys.argv[2:]
    for name, case in cases().items():
        if only and name not in only:
            continue
        t0 = time.time()
        try:
            fn = run_skip_case if name.startswith("skip-") else RUN[case["kind"]]
            rep = fn(K, case, "cpu")
        except Exception as e:  # noqa: BLE001  (reported per case)
            rep = dict(ok=False, error=f"{type(e).__name__}: {e}", tb=traceback.format_exc())
        rep["seconds"] = round(time.time() - t0, 2)
        results[name] = rep
        print(name, rep.get("ok"), rep.get("err"), rep.get("tol"), rep["seconds"], flush=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
