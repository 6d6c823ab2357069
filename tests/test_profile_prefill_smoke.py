"""CPU smoke run of the prefill profile (benchmarks/profile_prefill.py): admissions at two lengths compile nothing
after warm-up, every timing is recorded, and the profile names the attention it ran."""

from __future__ import annotations

import json

from test_e2e_smoke import ROOT, _module


def test_profile_prefill_smoke(tmp_path):
    profile = _module("profile_prefill", ROOT / "benchmarks" / "profile_prefill.py")
    out = tmp_path / "prefill.json"
    assert profile.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    warm = next(r for r in rows if r["kind"] == "warmup")
    prefills = [r for r in rows if r["kind"] == "prefill"]
    assert [r["tokens"] for r in prefills] == sorted(r["tokens"] for r in prefills) and len(prefills) == 2
    for r in prefills:
        assert r["engine_admission_ms"] > 0 and r["fluxc_forward_ms"] > 0 and r["transformers_forward_ms"] > 0
    # the plain forward (no paged cache) is one more input layout; admissions of new lengths compile nothing
    assert prefills[0]["compiles"] == prefills[1]["compiles"] == warm["compiles"] + 1
    assert any("attention" in r["name"] or "fluxc" in r["name"] for r in rows if r["kind"] == "op")
