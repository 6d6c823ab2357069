"""benchmarks/request_stream.py in parts (`--append`): a part's rows replace only its own earlier rows, at the batch
sizes it ran, and a document of other prompts is refused."""

from __future__ import annotations

import argparse
import json

import pytest
from test_e2e_smoke import ROOT, _module

STREAM = dict(requests=200, new=32, min_len=1024, max_len=8000, seed=0, check=16, router="r.safetensors")
ROWS = [
    dict(kind="warmup", impl="fluxc", s=80.0),
    dict(kind="requests", impl="fluxc", B=1, p50_ms=1.0),
    dict(kind="requests", impl="fluxc", B=8, p50_ms=2.0),
    dict(kind="kv", impl="fluxc", fraction_of_dense=0.6),
    dict(kind="check", full_equals_untouched=16, router_equals_dynamic_loop=16, prompts=16),
    dict(kind="warmup", impl="hf_dynamic", s=5.0),
    dict(kind="requests", impl="hf_dynamic", B=1, p50_ms=3.0),
    dict(kind="requests", impl="hf_dynamic", B=8, p50_ms=4.0),
]


@pytest.fixture(scope="module")
def stream():
    return _module("request_stream", ROOT / "benchmarks" / "request_stream.py")


def _kept(stream, parts, batches):
    args = argparse.Namespace(parts=parts, batches=batches)
    return [(r["kind"], r.get("impl"), r.get("B")) for r in ROWS if not stream.replaced(r, args)]


def test_a_part_replaces_only_its_rows_at_its_batches(stream):
    assert _kept(stream, ["hf_dynamic"], [8]) == [
        ("warmup", "fluxc", None), ("requests", "fluxc", 1), ("requests", "fluxc", 8), ("kv", "fluxc", None),
        ("check", None, None), ("requests", "hf_dynamic", 1)]
    assert _kept(stream, ["fluxc", "checks"], [1, 8]) == [
        ("warmup", "hf_dynamic", None), ("requests", "hf_dynamic", 1), ("requests", "hf_dynamic", 8)]
    assert len(_kept(stream, ["hf_static"], [1, 8])) == len(ROWS)


def test_append_needs_the_same_prompts(stream, tmp_path):
    path = tmp_path / "r.json"
    with pytest.raises(SystemExit, match="does not exist"):
        stream.earlier_run(str(path), STREAM)
    path.write_text(json.dumps(dict(meta={}, rows=ROWS, stream=STREAM, parts={})))
    assert stream.earlier_run(str(path), dict(STREAM))["rows"] == ROWS
    with pytest.raises(SystemExit, match="another request stream"):
        stream.earlier_run(str(path), {**STREAM, "requests": 40})


def test_near_tie_tells_a_bf16_tie_from_a_real_difference(stream):
    """The checks' rule: where the answer under test first departs from the reference, its token is acceptable
    when the fp32 model prefers the reference's token by no more than twice the untouched bf16 model's own logit
    error there (at least 4 bf16 ulps), or prefers the tested token; a wider preference is a real difference."""
    import types

    import torch

    class Logits(torch.nn.Module):
        def __init__(self, row: list[float]) -> None:
            super().__init__()
            self.row = torch.tensor(row)

        def forward(self, input_ids):
            return types.SimpleNamespace(logits=self.row.expand(1, input_ids.shape[1], -1))

    def logits(row: list[float]):
        return stream.last_logits(Logits(row))

    reference, other = torch.tensor([3, 1, 2]), torch.tensor([3, 1, 0])  # first differ at 2: token 2 against 0
    truth = logits([19.0, 0.0, 20.0, 0.0, 0.0, 0.0])
    tied, gap, tolerance = stream.near_tie(logits([19.0, 0.0, 20.6, 0.0, 0.0, 0.0]), truth, reference, other)
    assert tied and gap == pytest.approx(1.0) and tolerance == pytest.approx(1.2, abs=1e-4)  # bf16 is 0.6 off
    tied, gap, tolerance = stream.near_tie(truth, truth, reference, other)  # an exact bf16: 4 ulps at 20
    assert not tied and gap == pytest.approx(1.0) and tolerance == pytest.approx(0.3125)
    close = logits([19.95, 0.0, 20.0, 0.0, 0.0, 0.0])
    tied, gap, _ = stream.near_tie(close, close, reference, other)
    assert tied and gap == pytest.approx(0.05, abs=1e-4)
    prefers_other = logits([23.0, 0.0, 20.0, 0.0, 0.0, 0.0])  # the reference's token was the bf16 error
    tied, gap, _ = stream.near_tie(truth, prefers_other, reference, other)
    assert tied and gap == pytest.approx(-3.0)
    assert stream.near_tie(truth, truth, reference, reference) is None


def test_a_route_flip_is_tied_only_within_the_runs_own_noise(stream):
    """Two runs of a prompt that routed a layer apart: a near-tie when the flipped layer's margins are within
    twice the margin differences the runs show on the layers they routed alike; NaN (forced) layers are skipped."""
    nan = float("nan")
    engine = ((True, False, True, True), (2.0, -1.0, 0.01, nan))
    assert stream.route_flip_tied(engine, engine) is None
    tied, flips = stream.route_flip_tied(engine, ((True, False, False, True), (2.1, -1.05, -0.02, nan)))
    assert tied and flips == [[2, 0.01, -0.02]]  # noise 0.1 (layer 0): |0.02| <= 0.2
    tied, _ = stream.route_flip_tied(engine, ((True, True, True, True), (2.1, 0.5, 0.01, nan)))
    assert not tied  # layer 1 moved from -1.0 to 0.5 while the others moved at most 0.1
