"""The production path on CPU: a traced HF model through the pass, `fluxc::routed_attention` and
`fluxc::cache_attention`, the dispatch and the Triton kernels (run by the Triton interpreter in one subprocess
started with TRITON_INTERPRET=1), against the same model on the plain-PyTorch reference.

Error rule (FlashAttention's): the Triton path's logits may differ from the float64 reference by at most twice
the float32 reference's own difference, plus 1e-5. Greedy tokens of a few decode steps (prefill on the
kernels, then decode over the engine's paged cache: a ring for the sparse layer, growing pages for the full
one) must equal the reference engine's. A Gemma 3-style model adds a local layer: its own sliding window read as
structure (positions + the window) on the prefill kernel, and a ring of that window on the paged decode kernel.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import fluxc

HERE = os.path.dirname(os.path.abspath(__file__))
# each pattern and each rule once (the interpreter is slow), and a model with a local layer
VARIANTS = [("streaming", True, "llama"), ("triangle", False, "llama"), ("streaming", False, "gemma3")]
ROUTE = ["sparse", "full"]  # llama: layer 0 sparse (a ring of pages at decode), layer 1 full (growing pages)
# gemma3: layer 0 local (its 6-key window: full branch at prefill, a ring of 6 at decode), layer 1 global, sparse
LOCAL_ROUTE = ["full", "sparse"]
NEW_TOKENS = 3


def _name(pattern: str, block_exact: bool, arch: str) -> str:
    return f"{arch}-{pattern}-{'block' if block_exact else 'token'}"


def _run_variant(pattern: str, block_exact: bool, arch: str) -> dict:
    """In the TRITON_INTERPRET=1 worker: one model, three implementations (fp64 and fp32 reference, Triton)."""
    from fluxc.kernels import attention as kernels

    calls = {"routed_prefill": 0, "routed_decode_paged": 0, "paged_write_prompt": 0}
    originals = {name: getattr(kernels, name) for name in calls}
    for name, original in originals.items():  # count the launches: an explicit impl would raise, not fall back

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(kernels, name, counted)
    try:
        return _compare(pattern, block_exact, arch, calls)
    finally:
        for name, original in originals.items():
            setattr(kernels, name, original)


def _compare(pattern: str, block_exact: bool, arch: str, calls: dict[str, int]) -> dict:
    from hf_models import batch, tiny_model

    local = {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]} if arch == "gemma3" else {}
    model = tiny_model(arch, "sdpa", layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64, **local)
    route = LOCAL_ROUTE if local else ROUTE
    ids, mask = batch(seq=20, left_pad=3)
    config = fluxc.FluxConfig(pattern=pattern, sink=4, window=8, block=4, block_exact=block_exact, n_last=5,
                              compiler="eager")
    modules = {
        "ref64": fluxc.compile(copy.deepcopy(model).double(), config=config.replace(impl="reference"), route=route),
        "ref32": fluxc.compile(model, config=config.replace(impl="reference"), route=route),
        "triton": fluxc.compile(model, config=config.replace(impl="triton"), route=route),
    }
    with torch.no_grad():
        logits = {name: fm(input_ids=ids, attention_mask=mask).logits.double() for name, fm in modules.items()}
    real = mask.bool()
    err = {name: float((logits[name] - logits["ref64"])[real].abs().max()) for name in ("ref32", "triton")}
    prefill_calls = calls["routed_prefill"]
    tokens = {name: fluxc.generate(modules[name], ids, NEW_TOKENS, attention_mask=mask).tolist()
              for name in ("ref32", "triton")}
    local_sites = [s.layer for s in fluxc.sites(modules["triton"]) if s.local_window]
    return dict(err=err["triton"], ref_err=err["ref32"], calls=dict(calls), prefill_calls=prefill_calls,
                tokens_equal=tokens["ref32"] == tokens["triton"], local_sites=local_sites)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("production") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(path)], env=env, cwd=HERE,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and path.exists(), proc.stderr[-3000:]
    return json.loads(path.read_text())


@pytest.mark.parametrize("pattern, block_exact, arch", VARIANTS, ids=[_name(*v) for v in VARIANTS])
def test_triton_path_matches_the_reference(results, pattern, block_exact, arch):
    got = results[_name(pattern, block_exact, arch)]
    assert "error" not in got, got.get("error")
    assert got["local_sites"] == ([0] if arch == "gemma3" else [])
    assert got["prefill_calls"] == 2  # both layers' prefill ran the Triton kernel (layer 1 with its full route)
    # decode: both layers (the sparse one's ring, the full one's growing pages) on the paged kernel, every step
    assert got["calls"]["routed_decode_paged"] == 2 * (NEW_TOKENS - 1)
    assert got["calls"]["paged_write_prompt"] == 2  # the prompt's keys went into the pages in one launch a layer
    assert got["err"] <= 2 * got["ref_err"] + 1e-5, got
    assert got["tokens_equal"]


if __name__ == "__main__":  # the worker: python tests/test_production_path.py OUT.json, with TRITON_INTERPRET=1
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    sys.path.insert(0, HERE)
    torch.manual_seed(0)
    out = {}
    for variant in VARIANTS:
        try:
            out[_name(*variant)] = _run_variant(*variant)
        except Exception as exc:  # noqa: BLE001  (reported per variant, asserted by the test)
            import traceback

            out[_name(*variant)] = dict(error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}")
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
