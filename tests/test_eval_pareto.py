"""`fluxc eval` statistics and the Pareto sweep: Wilson and delta-method intervals against independent
derivations, paired comparisons with full attention, and `--thresholds` writing pareto.json / pareto.png from
one compiled router model."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch

import fluxc
from fluxc.training.data import EVAL_ONLY_TEMPLATES, TEMPLATES
from fluxc.training.evaluation import Z95, mean_ci, ratio_ci, versus_full, wilson
from fluxc.training.models import load_model


@pytest.mark.parametrize("correct,n", [(0, 10), (3, 10), (10, 10), (143, 200), (1, 400)])
def test_wilson_bounds_are_the_roots_of_the_score_equation(correct, n):
    # the Wilson interval is {p : (p_hat - p)^2 <= z^2 p (1 - p) / n}: roots of a quadratic in p
    p_hat, z2 = correct / n, Z95**2
    roots = sorted(np.roots([1 + z2 / n, -(2 * p_hat + z2 / n), p_hat**2]).real)
    low, high = wilson(correct, n)
    assert low == pytest.approx(max(0.0, roots[0]), abs=1e-12) and high == pytest.approx(min(1.0, roots[1]), abs=1e-12)
    assert low <= p_hat <= high


def test_mean_and_ratio_intervals():
    rng = np.random.default_rng(0)
    values = rng.normal(0.3, 2.0, 50).tolist()
    mean, low, high = mean_ci(values)
    half = Z95 * statistics.stdev(values) / math.sqrt(len(values))
    assert (mean, low, high) == pytest.approx((statistics.fmean(values), mean - half, mean + half))
    # equal counts: the pooled ratio's interval is the mean interval of the per-example ratios
    sums = rng.gamma(2.0, 3.0, 40).tolist()
    assert ratio_ci(sums, [16] * 40) == pytest.approx(mean_ci([s / 16 for s in sums]))
    assert mean_ci([1.0])[1] == -math.inf and math.isnan(ratio_ci([], [])[0])


def test_paired_comparison_with_full_attention():
    full = {"outcomes": [1, 1, 0, 1, 0, 1, 1, 1]}
    routed = {"outcomes": [1, 0, 0, 1, 0, 1, 1, 1]}
    got = versus_full(full, routed)
    assert got["accuracy_diff"] == pytest.approx(-1 / 8)
    assert got["ci95"] == pytest.approx(list(mean_ci([0, -1, 0, 0, 0, 0, 0, 0])[1:]))
    same_targets = {"nll": [4.0, 6.0], "target_tokens": [2, 3]}
    worse = {"nll": [5.0, 6.6], "target_tokens": [2, 3]}
    assert versus_full(same_targets, worse)["perplexity_ratio"] == pytest.approx(math.exp(1.6 / 5))
    assert versus_full(full, {"outcomes": [1]}) is None  # not the same examples: no paired comparison


def _tiny_router(path):
    model, _ = load_model("tiny", tokenizer="bytes")
    text = model.config
    config = fluxc.FluxConfig(sink=16, window=32, block=16, router_hidden=(16, 8, 8, 8), pool_size=8,
                              compiler="eager")
    head_dim = text.hidden_size // text.num_attention_heads
    torch.manual_seed(3)
    routers = torch.nn.ModuleList(fluxc.ops.LayerRouter(head_dim, config.router_hidden)
                                  for _ in range(text.num_hidden_layers))
    with torch.no_grad():
        for p in routers.parameters():
            p.normal_(0, 0.5)
    fluxc.save_routers(path, routers, config, fluxc.Fingerprint(type(model).__name__, text.num_hidden_layers,
                                                                text.num_attention_heads, text.num_key_value_heads,
                                                                head_dim))


def test_eval_sweep_writes_the_pareto_view(tmp_path):
    import fluxc.cli

    router = tmp_path / "routers.safetensors"
    _tiny_router(router)
    out = tmp_path / "eval"
    argv = ["eval", "--config", "tiny", "--out", str(out), "--router", str(router), "--examples", "4",
            "--lengths", "448", "--thresholds", "0.05,0.5,0.95", "--set", 'eval.tasks=["passkey","lm"]',
            "--set", "eval.max_new_tokens=2", "--set", "eval.batch_size=4",
            "--set", "flux.sink=16", "--set", "flux.window=32", "--set", "flux.block=16", "--set", "flux.pool_size=8",
            "--set", "flux.router_hidden=[16,8,8,8]"]
    assert fluxc.cli.main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    front = json.loads((out / "pareto.json").read_text())["families"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for task, family in result["families"].items():
        modes = family["modes"]
        assert set(modes) == {"full", "sparse", "router", "router@0.05", "router@0.95"}  # 0.5 is "router" itself
        assert modes["router"]["threshold"] == 0.5 and modes["full"]["threshold"] is None
        for row in modes.values():
            metric = row["perplexity"] if task == "lm" else row["accuracy"]
            assert row["ci95"][0] <= metric <= row["ci95"][1]
        assert modes["full"].get("vs_full") is None and modes["sparse"]["vs_full"] is not None
        points = front[task]["points"]
        assert [p["threshold"] for p in points] == [None, None, 0.05, 0.5, 0.95]
        assert {p["mode"] for p in points[:2]} == {"full", "sparse"}
        # far operating points: near-all full at 0.05, near-all sparse at 0.95 (random routers are not that sure)
        assert modes["router@0.05"]["sa_fraction"] <= modes["router@0.95"]["sa_fraction"]
    passkey = result["families"]["passkey"]["modes"]["full"]["breakdown"]
    assert sum(d["examples"] for d in passkey["domain"].values()) == 4
    count = len(TEMPLATES["passkey"])
    own = {f"passkey/{i}" for i in range(count - EVAL_ONLY_TEMPLATES, count)}  # evaluation's own phrasings
    assert set(passkey["template"]) <= own
    lm = result["families"]["lm"]["modes"]
    assert lm["sparse"]["vs_full"]["perplexity_ratio"] == pytest.approx(lm["sparse"]["perplexity"]
                                                                        / lm["full"]["perplexity"])
    assert "sa_gap_at_least_0.4" in result["criteria"] or "sa_fraction_gap" not in result["summary"]
