"""The router's operating point (`threshold`): a layer runs full attention when the router's probability of full
exceeds it. Checked against the routers' own logits on the pooled queries the graph fed them, at thresholds
between those logits, with no recompile when it moves; bad values are ConfigErrors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import fluxc
from fluxc.ops.router import capture_router_inputs
from fluxc.passes import counters

from hf_models import batch, random_router_file, tiny_model

CFG = fluxc.FluxConfig(sink=2, window=2, block=1, block_exact=False, router_hidden=(8, 8, 8, 8), compiler="eager")


def _routers(tmp_path):
    return random_router_file(tmp_path / "routers.safetensors", CFG, seed=11)


def _prefill(fm, ids, mask):
    with torch.no_grad():
        fm(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True)
    return fluxc.last_route(fm).clone()  # (B, L) True = full


def _margins(routers, pooled):
    """(B, L) log-odds of full attention the routers give the pooled queries (B, D) of each layer."""
    with torch.no_grad():
        logits = torch.stack([r.head(r.feature(x)) for r, x in zip(routers, pooled)], dim=1)  # (B, L, 2)
    return logits[..., 1] - logits[..., 0]


def test_routes_follow_the_threshold_without_recompiling(tmp_path):
    model = tiny_model("llama", "sdpa", layers=3)
    path, routers = _routers(tmp_path)
    ids, mask = batch(seq=12, left_pad=3, size=4, seed=5)
    fm = fluxc.compile(model, path, config=CFG)
    assert fm.threshold == 0.5
    with capture_router_inputs() as pooled:  # (B, D) float32 per layer, as the graph pooled them
        routes = _prefill(fm, ids, mask)
    margin = _margins(routers, pooled)
    assert torch.equal(routes, margin > 0)  # 0.5: the router's argmax
    torch.testing.assert_close(fluxc.last_route_margins(fm), margin, rtol=1e-5, atol=1e-5)  # as recorded
    graphs = fm._backend.graphs
    cuts = margin.flatten().sort().values
    points = [p for p in (float(torch.sigmoid((a + b) / 2)) for a, b in zip(cuts[:-1], cuts[1:])) if 1e-6 < p < 1 - 1e-6]
    seen = set()
    for t in points[:: max(1, len(points) // 5)]:
        fm.set_threshold(t)
        with capture_router_inputs() as pooled:  # a layer's query follows the routes of the layers before it
            got = _prefill(fm, ids, mask)
        want = _margins(routers, pooled) - math.log(t / (1 - t))  # over the operating point
        assert torch.equal(got, want > 0), t
        torch.testing.assert_close(fluxc.last_route_margins(fm), want, rtol=1e-5, atol=1e-5)
        seen.add(tuple(got.flatten().tolist()))
    assert len(seen) >= 4  # the thresholds really moved the routes
    assert fm._backend.graphs == graphs  # the operating point is data: nothing retraced


def test_threshold_given_at_compile_and_to_the_backend(tmp_path):
    model = tiny_model("llama", "sdpa", layers=3)
    path, _ = _routers(tmp_path)
    ids, mask = batch(seq=12, left_pad=3, size=4, seed=5)
    sparse_most = _prefill(fluxc.compile(model, path, config=CFG, threshold=0.999999), ids, mask)
    full_most = _prefill(fluxc.compile(model, path, config=CFG, threshold=1e-6), ids, mask)
    assert sparse_most.float().mean() < full_most.float().mean()
    state = fluxc.passes.RouteState()
    compiled = torch.compile(model, backend="flux", options={"router_ckpt": path, "config": CFG, "state": state,
                                                            "threshold": 0.999999})
    with torch.no_grad():
        compiled(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True)
    assert torch.equal(fluxc.last_route(state), sparse_most)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, float("nan"), True, "0.5", None])
def test_bad_thresholds_are_config_errors(tmp_path, bad):
    model = tiny_model("llama", "sdpa", layers=3)
    path, _ = _routers(tmp_path)
    with pytest.raises(fluxc.ConfigError, match="threshold=.*strictly between 0 and 1"):
        fluxc.compile(model, path, config=CFG, threshold=bad)
    fm = fluxc.compile(model, path, config=CFG)
    with pytest.raises(fluxc.ConfigError, match="threshold="):
        fm.set_threshold(bad)
    assert fm.threshold == 0.5


def test_inductor_reads_the_threshold_live(tmp_path):
    """The default compiler must not fold the operating point into the kernels: moving it after the compile
    changes Inductor's routes exactly as the eager graph's (whose router ops run as custom ops, Inductor's
    inlined)."""
    model = tiny_model("llama", "sdpa", layers=3)
    path, _ = _routers(tmp_path)
    ids, mask = batch(seq=12, left_pad=3, size=4, seed=5)
    eager = fluxc.compile(model, path, config=CFG)
    inductor = fluxc.compile(model, path, config=CFG.replace(compiler="inductor"))
    inlined, indices = counters["router_ops_inlined"], counters["router_pool_indices"]
    seen = set()
    for t in (0.5, 1e-4, 0.9999, 0.2, 0.8):
        eager.set_threshold(t)
        inductor.set_threshold(t)
        want = _prefill(eager, ids, mask)
        assert torch.equal(_prefill(inductor, ids, mask), want), t
        seen.add(tuple(want.flatten().tolist()))
    assert len(seen) >= 3 and inductor._backend.graphs == 1
    # Inductor got the routers as plain tensor ops (fused with the layer), not as three opaque custom-op calls
    assert counters["router_ops_inlined"] - inlined == 3
    assert counters["router_pool_indices"] - indices == 1  # the mask's scan, once for the three layers


def test_forced_routes_have_no_margins(tmp_path):
    """A forced route is no router's decision: its margins read NaN, never a made-up confidence."""
    model = tiny_model("llama", "sdpa", layers=3)
    ids, mask = batch(seq=12, left_pad=3, size=4, seed=5)
    fm = fluxc.compile(model, route=["full", "sparse", "full"], config=CFG)
    routes = _prefill(fm, ids, mask)
    assert routes.tolist() == [[True, False, True]] * 4
    assert fluxc.last_route_margins(fm).shape == (4, 3) and fluxc.last_route_margins(fm).isnan().all()
