"""CPU smoke run of the soak (benchmarks/soak.py): a tiny model with its routers serves a stream with every fault
kind (cancellations, allocation failures at admission and mid-decode, a NaN prompt, out-of-range tokens); no page
leaks, no unaffected request differs from the clean run, nothing compiles after warm-up."""

from __future__ import annotations

import json

from test_e2e_smoke import ROOT, _module


def test_soak_smoke(tmp_path):
    soak = _module("soak", ROOT / "benchmarks" / "soak.py")
    out = tmp_path / "soak.json"
    assert soak.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    row = next(r for r in data["rows"] if r["kind"] == "soak")
    assert row["planned"]["clean"] < row["requests"] and all(row["planned"][k] for k in soak.FAULTS)
    assert row["ended_with_error"]["cancel"] == row["planned"]["cancel"]
    assert row["ended_with_error"]["oov"] == row["planned"]["oov"] and row["ended_with_error"]["nan"] >= 1
    assert row["ended_with_error"]["fail-prefill"] == row["planned"]["fail-prefill"]
    assert row["unaffected"] + sum(row["ended_with_error"].values()) == row["requests"]
    assert row["leaked_pages"] == row["reserved_pages_left"] == row["pages_after_clean_run"] == 0
    assert row["lost_unaffected"] == 0 and row["compiles_after_warmup"] == 0 and row["nonfinite_routes"] >= 1
    targets = {t["id"]: t["met"] for t in data["targets"]}
    assert targets["soak.leaked-pages"] and targets["soak.lost-requests"] and targets["soak.compiles-after-warmup"]
    assert data["meta"]["command"]
