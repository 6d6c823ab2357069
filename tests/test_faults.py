"""Faults in serving: a request that fails (its pages cannot be allocated, its logits turn NaN, its prompt holds
an out-of-range token) ends with a RequestError while the others give exactly the tokens of a clean run; a
cancelled request frees its pages; a router whose logits are not finite routes full, logged and counted; two
threads on one compiled model both get their answers."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from test_hf_models import _routers_with_mixed_decisions

import fluxc
from fluxc.serve.engine import DecodeEngine
from fluxc.serve.faults import failing_allocations, poison_token

from hf_models import batch, tiny_model

SMALL = fluxc.FluxConfig(sink=2, window=4, block=2, compiler="eager")
ROUTED = SMALL.replace(router_hidden=(32, 16, 16, 8), pool_size=4)
PAGE = 4
POISON = 127  # the poisoned prompts hold it, the clean ones never do (ids drawn from [1, 100))


def _prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 100, (n,), generator=g) for n in lengths]


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """A model with routers that take mixed decisions, its NaN token hooked in before compiling."""
    model = tiny_model("llama", "sdpa")
    ids, mask = batch(left_pad=3)
    routers = _routers_with_mixed_decisions(model, ids, mask, ROUTED, 16)
    path = tmp_path_factory.mktemp("faults") / "routers.safetensors"
    fluxc.save_routers(path, routers, ROUTED, fluxc.Fingerprint(type(model).__name__, 3, 4, 2, 16), {"test": "faults"})
    poison_token(model, POISON)
    return fluxc.compile(model, str(path), config=ROUTED)


def _engine(fm, **kw) -> DecodeEngine:
    return DecodeEngine(fm, max_batch=kw.pop("max_batch", 2), max_len=96, page_size=PAGE, **kw)


def _clean(fm, prompts, new):
    return _engine(fm, max_batch=4).generate(prompts, new)


def test_a_nan_request_fails_alone_and_routes_full(routed, caplog):
    prompts = _prompts((9, 21, 14, 30, 6))
    bad = torch.cat([prompts[2][:5], torch.tensor([POISON]), prompts[2][5:]])
    served = [*prompts[:2], bad, *prompts[2:]]  # 6 requests through 2 slots: the NaN pages get reused
    engine = _engine(routed)
    with caplog.at_level(logging.WARNING, logger="fluxc"):
        outs = engine.generate(served, 9, errors="return", check_every=2)
    assert isinstance(outs[2], fluxc.RequestError) and "NaN" in str(outs[2])
    clean = _clean(routed, prompts, 9)
    for got, want in zip(outs[:2] + outs[3:], clean):
        assert torch.equal(got, want)
    assert engine.stats["failed"] == 1 and engine.pages_in_use() == 0
    undecided = engine.stats["nonfinite_routes"]  # layers past the first see NaN from the poisoned position on
    assert undecided >= 2, "the NaN prompt's routers should be undecided in layers 1 and 2"
    assert f"non-finite logits in {undecided} layer(s); they run full attention" in caplog.text
    with pytest.raises(fluxc.RequestError, match="1 of 2 requests failed.*NaN"):
        engine.generate([prompts[0], bad], 4)
    assert engine.pages_in_use() == 0


def test_router_nan_routes_full_in_the_compiled_forward(routed):
    """The prefill forward itself: the poisoned row's decision is full attention in every layer, the clean
    row's is its router's own."""
    ids, mask = batch(left_pad=0)
    clean = routed(input_ids=ids, attention_mask=mask)
    clean_route = fluxc.last_route(routed)
    counted = int(routed.route_state.nonfinite)
    poisoned = ids.clone()
    poisoned[1, 4] = POISON
    out = routed(input_ids=poisoned, attention_mask=mask)
    route = fluxc.last_route(routed)
    assert route[1, 1:].all() and torch.equal(route[0], clean_route[0])
    assert int(routed.route_state.nonfinite) - counted >= 2
    assert torch.equal(out.logits[0], clean.logits[0]) and out.logits[1].isnan().any()


def test_an_allocation_failure_fails_one_request(routed):
    prompts = _prompts((11, 7, 18))
    engine = _engine(fluxc.compile(routed.model, config=SMALL, route="full"), max_batch=4)
    engine.generate(prompts[:1], 2)  # allocates the pool
    first = engine.next_request_id
    with failing_allocations(engine.pool, {first + 1}):  # the second prompt's pages: at prefill
        outs = engine.generate(prompts, 8, errors="return")
    assert isinstance(outs[1], fluxc.RequestError) and "injected" in str(outs[1])
    takes: list[int] = []
    third = engine.next_request_id + 2  # the three prompts of the next call are admitted together

    def after_prefill(owner: int | None) -> bool:  # the third prompt of this call: its prefill takes pages,
        if owner != third:  # a full layer's next page (key 20) fails
            return False
        takes.append(owner)
        return len(takes) > 1

    with failing_allocations(engine.pool, after_prefill):
        late = engine.generate(prompts, 8, errors="return")
    assert isinstance(late[2], fluxc.RequestError) and "no page for its key" in str(late[2])
    clean = _clean(engine.model, prompts, 8)
    for got, want in ((outs[0], clean[0]), (outs[2], clean[2]), (late[0], clean[0]), (late[1], clean[1])):
        assert torch.equal(got, want)
    assert engine.pages_in_use() == 0 and engine.stats["failed"] == 1


def test_cancel_frees_pages_and_the_others_run_on(routed):
    fm = fluxc.compile(routed.model, config=SMALL, route=("full", "sparse", "full"))
    prompts = _prompts((13, 22))
    engine = _engine(fm)
    a = engine.add_request(prompts[0], 8)
    b = engine.add_request(prompts[1], 8)
    engine.step()
    held = engine.pages_in_use()
    b_pages = sum(len(p) for p in engine._requests[b].pages)
    engine.cancel(b)
    assert engine.pages_in_use() == held - b_pages
    while not engine._requests[a].done:
        engine.step()
    assert engine.error_of(a) is None and "cancelled after 2 tokens" in str(engine.error_of(b))
    assert torch.equal(engine.tokens_of(a), _clean(fm, prompts[:1], 8)[0][13:])
    engine.release()
    assert engine.pages_in_use() == 0 and engine.stats["cancelled"] == 1


def test_an_out_of_range_token_is_rejected_alone(routed):
    prompts = _prompts((8, 12, 10))
    served = [prompts[0], torch.tensor([5, 200, 7]), prompts[1], prompts[2]]
    engine = _engine(routed)
    outs = engine.generate(served, 5, errors="return")
    assert isinstance(outs[1], fluxc.RequestError) and "vocab" in str(outs[1])
    for got, want in zip([outs[0], *outs[2:]], _clean(routed, prompts, 5)):
        assert torch.equal(got, want)
    prefills = engine.stats["prefills"]
    with pytest.raises(fluxc.ConfigError, match=r"prompt.*200.*vocab"):
        fluxc.generate(routed, served, 5)
    with pytest.raises(fluxc.ConfigError, match="errors='return' needs a list"):
        engine.generate(torch.ones(2, 4, dtype=torch.long), 5, errors="return")
    assert engine.stats["prefills"] == prefills and engine.pages_in_use() == 0


def test_two_threads_on_one_compiled_model(routed):
    """`fluxc.generate` serialises on the model's lock: both threads get exactly their sequential answers."""
    prompts = _prompts((9, 17, 12, 25))
    expected = [fluxc.generate(routed, prompts[:2], 6), fluxc.generate(routed, prompts[2:], 6)]
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def worker(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                results[i] = fluxc.generate(routed, prompts[2 * i: 2 * i + 2], 6)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    start.wait()
    ids, mask = batch(left_pad=3)
    forward = routed(input_ids=ids, attention_mask=mask).logits  # a plain forward from a third thread
    for t in threads:
        t.join(timeout=600)
    assert not errors and not any(t.is_alive() for t in threads)
    for i in range(2):
        assert all(torch.equal(a, b) for a, b in zip(results[i], expected[i]))
    assert torch.isfinite(forward).all()
