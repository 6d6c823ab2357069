"""Regional compilation (`fluxc.passes.regions`): the graph is cut at fluxc's ops, work that depends only on the
inputs moves to the first region, in-place writes keep the graph whole, and a served model compiled region by
region (each distinct region once) gives the tokens and logits of the eager graph and of the whole-graph
compile."""

from __future__ import annotations

import torch
import torch.fx as fx
from test_engine import _engine, _mixed_router_setup

import fluxc
from fluxc.passes import counters
from fluxc.passes.regions import plan_regions

from hf_models import batch


def _levels(gm: fx.GraphModule) -> tuple[dict[str, int], set[str], str]:
    plan = plan_regions(gm)
    return {n.name: lvl for n, lvl in plan.level.items()}, {n.name for n in plan.outside}, plan.reason


def test_regions_are_cut_at_fluxc_ops_and_input_only_work_moves_first():
    def f(x, w):
        a = torch.ops.fluxc.materialize.default(x @ w)
        column = x[:, 0]  # a view of an input: outside the regions
        y = a * 2 + column[:, None]
        z = torch.ops.fluxc.materialize.default(y)
        total = x.sum()  # after the ops in the graph, but needs only the input: the first region
        return z + total

    level, outside, reason = _levels(fx.symbolic_trace(f))
    assert reason == ""
    assert level["matmul"] == 0 and level["sum_1"] == 0  # region 0
    assert level["materialize_default"] == 1 and "materialize_default" in outside
    assert level["mul"] == 1 and level["add"] == 1 and "add" not in outside  # region 1
    assert level["materialize_default_1"] == 2 and level["add_1"] == 2  # region 2
    assert {"getitem", "getitem_1"} <= outside and level["getitem"] == 0


def test_in_place_writes_keep_the_graph_whole():
    def f(x):
        y = torch.ops.fluxc.materialize.default(x * 2)
        y.add_(1)
        return y * 3

    _, _, reason = _levels(fx.symbolic_trace(f))
    assert "writes in place" in reason and "add_" in reason

    def no_site(x):
        return (x * 2).sum()

    _, _, reason = _levels(fx.symbolic_trace(no_site))
    assert reason == "the graph has a single region"


def _served(model, path, cfg, prompts, regional: bool | None):
    compiler = "eager" if regional is None else "inductor"
    fm = fluxc.compile(model, path, config=cfg.replace(compiler=compiler))
    if regional is not None:
        fm._backend.regional = regional
    engine = _engine(fm)
    return fm, engine.generate(prompts, 6)


def test_a_regionally_compiled_model_serves_what_the_eager_graph_and_the_whole_compile_serve(tmp_path):
    """A three-layer Llama with routers that route its sequences apart: prefill and decode compiled region by
    region (the identical layer regions once) give the eager graph's tokens and logits, and the whole compile's."""
    model, ids, mask, cfg, path = _mixed_router_setup(tmp_path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (n,), generator=g) for n in (9, 23, 14)]
    before = counters["regions"], counters["regions_compiled"]
    fm, regional = _served(model, path, cfg, prompts, regional=True)
    regions = counters["regions"] - before[0]
    compiled = counters["regions_compiled"] - before[1]
    assert regions >= 8 and compiled < regions  # two graphs; the middle layer's regions reuse the first's
    _, eager = _served(model, path, cfg, prompts, regional=None)
    _, whole = _served(model, path, cfg, prompts, regional=False)
    for a, b, c in zip(regional, eager, whole):
        assert torch.equal(a, b) and torch.equal(a, c)
    ids, mask = batch(left_pad=3)
    reference = fluxc.compile(model, path, config=cfg)  # eager
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).logits
        got = fm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
