"""CPU smoke run of the end-to-end benchmark (benchmarks/e2e.py): every measured path on a 2-layer Llama,
the JSON it writes, the floors and targets it derives, the budget gate, and the plot."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PHASES = "floors,fluxc,hf_a_prefill,nonattn,hf_b_decode,hf_b_cleanup"


def _module(name: str, path: pathlib.Path):
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # the benchmark scripts import their sibling modules by name
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def e2e():
    import fluxc

    try:
        fluxc.DecodeEngine  # noqa: B018  (lazy attribute: importing it is the check)
    except (AttributeError, ImportError) as exc:
        pytest.skip(f"fluxc.DecodeEngine is not available ({exc}); the benchmark drives the decode engine")
    return _module("fluxc_bench_e2e", ROOT / "benchmarks" / "e2e.py")


@pytest.fixture(scope="module")
def smoke_json(e2e, tmp_path_factory):
    """One quick smoke run (r = 0.75 and every baseline phase that has a CPU path), shared by the tests."""
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    assert e2e.main(["--smoke", "--quick", "--rs", "0.75", "--phases", PHASES, "--out", str(out)]) == 0
    return out


def _find(rows, **sel):
    hits = [r for r in rows if all(r.get(k) == v for k, v in sel.items())]
    assert hits, f"no row with {sel}"
    return hits[0]


def test_route_fractions(e2e):
    for r, sparse in ((0.0, 0), (0.5, 16), (0.75, 24), (1.0, 32)):
        route = e2e.route_for(r, 32)
        assert route.count("sparse") == sparse and len(route) == 32
    assert e2e.route_for(0.75, 32)[:4] == ["full", "sparse", "sparse", "sparse"]


def test_smoke_run_writes_every_measurement(smoke_json):
    data = json.loads(smoke_json.read_text())
    assert data["errors"] == [] and data["skipped"] == []
    status = {p["name"]: p["status"] for p in data["phases"]}
    for name in ("setup", "floors", "fluxc_r0.75", "hf_a_prefill", "nonattn", "hf_b_decode"):
        assert status[name] == "ok", (name, status)
    assert status["router"] == "not selected"
    meta = data["meta"]
    assert meta["torch"] and meta["transformers"] and meta["date"] and meta["tree_digest"]
    short, mid, long = meta["spec"]["lengths"]
    big = meta["spec"]["big_batch"]
    rows = data["rows"]
    assert [(r["B"], r["L"]) for r in rows if r["kind"] == "prefill" and r["impl"] == "fluxc"] == [
        (big, short), (1, long), (1, short), (1, mid)]  # headline shapes first
    for batch, length in ((1, short), (1, mid), (1, long), (big, short)):
        row = _find(rows, kind="prefill", impl="fluxc", r=0.75, B=batch, L=length)
        assert row["ms"] > 0 and row["route_ok"] is True and set(row["recompiled"]) == {0}
        assert row["cache_per_seq_gib"] > 0
    for batch, length in ((1, long), (big, short)):
        row = _find(rows, kind="decode", impl="fluxc", r=0.75, B=batch, L=length)
        assert row["ms"] > 0 and row["tokens_in_vocab"] is True
    assert _find(rows, kind="decode", impl="hf_static_compiled", B=big, L=short)["cache_tensors_filled"] > 0
    _find(rows, kind="prefill", impl="hf_sdpa", B=1, L=long)
    _find(rows, kind="nonattn_prefill", B=1, L=long)
    _find(rows, kind="nonattn_decode", B=big)
    _find(rows, kind="attn_floor", B=big, L=short)
    _find(rows, kind="router_op", L=long)
    # floors: every fluxc measurement has one, with its parts
    assert f"r=0.75 B={big} L={short}" in data["floors"]["decode"]
    prefill_floor = data["floors"]["prefill"][f"r=0.75 B=1 L={long}"]
    assert prefill_floor["ms"] > prefill_floor["nonattn_ms"] > 0 and 0 < prefill_floor["sa_exec_frac"] < 1
    targets = {t["target"]: t for t in data["targets"]}
    assert any(t.startswith("prefill / floor (r=0.75") and v["met"] is not None for t, v in targets.items())
    key = f"decode {short} B={big}: (b) static+compiled / fluxc r=0.75"
    assert targets[key]["value"] > 0
    assert targets[f"decode {short} B={big}: fluxc r=0 / r=0.75"]["met"] is None  # r=0 not run
    assert data["maxbatch"]["0.75"]["b_max"] >= 1


def test_budget_gate_skips_with_reasons(e2e, tmp_path):
    out = tmp_path / "e2e.json"
    assert e2e.main(["--smoke", "--quick", "--time-budget", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    phases = [p for p in data["phases"] if p["name"] != "setup"]
    assert phases and all(p["status"] == "skipped" and "time budget" in p["reason"] for p in phases)
    assert not [r for r in data["rows"] if r.get("kind") in ("prefill", "decode")]


def test_plot(smoke_json, tmp_path):
    pytest.importorskip("matplotlib")
    plot = _module("fluxc_bench_plot_e2e", ROOT / "benchmarks" / "plot_e2e.py")
    plot.main(str(smoke_json), str(tmp_path / "e2e.png"))
    assert (tmp_path / "e2e.png").stat().st_size > 10_000
