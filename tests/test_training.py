"""Router training on the rewritten graph (CPU, tiny random model): the sparsity gap to each task's
target shrinks, the multipliers rise by gradient ascent, and only the routers change."""

from __future__ import annotations

import pytest
import torch

import fluxc
from fluxc.training import RouterTrainer, SparsityLagrangian, TrainConfig, temperature

from hf_models import batch, tiny_model

CFG = fluxc.FluxConfig(sink=2, window=4, block=2, router_hidden=(16, 16, 16, 8), pool_size=4)


def _batch(g):
    # two task classes whose prompts differ (token ranges), so a router can tell them apart
    ids = torch.cat([torch.randint(1, 64, (4, 16), generator=g), torch.randint(64, 128, (4, 16), generator=g)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
            "task": ["holistic"] * 4 + ["retrieval"] * 4}


def test_router_training_moves_sparsity_toward_targets_and_touches_only_routers():
    torch.manual_seed(0)
    model = tiny_model("llama", "sdpa", layers=4)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    targets = {"holistic": 1.0, "retrieval": 0.0}
    trainer = RouterTrainer(model, CFG, TrainConfig(steps=60, router_lr=1e-2, lambda_lr=5e-2, targets=targets))
    g = torch.Generator().manual_seed(0)
    expected_sparsity, stats = [], []
    for _ in range(60):
        stats.append(trainer.step(_batch(g)))
        p_sparse = torch.softmax(trainer.recorder.logits().detach(), -1)[..., 0].mean(1)  # (B,) E[sparsity]
        expected_sparsity.append((float(p_sparse[:4].mean()), float(p_sparse[4:].mean())))
    first = torch.tensor(expected_sparsity[:10]).mean(0)
    last = torch.tensor(expected_sparsity[-10:]).mean(0)
    gap_first = (first - torch.tensor([1.0, 0.0])).abs()
    gap_last = (last - torch.tensor([1.0, 0.0])).abs()
    assert (gap_last < gap_first - 0.05).all(), (first, last)  # both classes move toward their targets
    assert last[0] - last[1] > 0.15  # context-aware: holistic prompts routed sparser than retrieval ones
    assert all(v > 0.5 for v in stats[-1]["lambda1"].values())  # multipliers rose by ascent from 0
    assert all(v > 0.5 for v in stats[-1]["lambda2"].values())
    assert stats[-1]["tau"] == pytest.approx(1.0) and stats[0]["tau"] == pytest.approx(1.5)
    for name, value in model.state_dict().items():  # backbone bit-identical
        assert torch.equal(value, frozen[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in trainer.module.routers.parameters())


def test_trainable_predicate_opens_chosen_backbone_weights():
    torch.manual_seed(0)
    model = tiny_model("llama", "sdpa", layers=2)
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    o_before = model.model.layers[0].self_attn.o_proj.weight.clone()
    trainer = RouterTrainer(model, CFG, TrainConfig(steps=3, extra_lr=1e-2),
                            trainable=lambda name: name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        trainer.step(_batch(g))
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_before)
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, o_before)


def test_schedule_and_penalty():
    cfg = TrainConfig(steps=100)
    assert temperature(0, cfg) == pytest.approx(1.5) and temperature(30, cfg) == pytest.approx(1.25)
    assert temperature(60, cfg) == temperature(99, cfg) == 1.0
    pen = SparsityLagrangian({"a": 0.5, "b": 1.0})
    with torch.no_grad():
        pen.lambda1.copy_(torch.tensor([1.0, 2.0]))
        pen.lambda2.copy_(torch.tensor([3.0, 0.0]))
    value = pen(torch.tensor([0.7, 0.9, 0.4]), ["a", "a", "b"])
    expected = ((1.0 * 0.3 + 3.0 * 0.09) + (2.0 * 0.6)) / 2  # class a: mean 0.8 vs 0.5; class b: 0.4 vs 1.0
    assert float(value) == pytest.approx(expected)
    with pytest.raises(fluxc.ConfigError, match="no sparsity target"):
        pen(torch.tensor([0.5]), ["c"])


def _train(model, steps, trainer=None, seed=0, skip=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(skip):
        _batch(g)
    trainer = trainer or RouterTrainer(model, CFG, TrainConfig(steps=8, router_lr=1e-2, lambda_lr=5e-2,
                                                               targets={"holistic": 1.0, "retrieval": 0.0}))
    for _ in range(steps):
        trainer.step(_batch(g))
    return trainer


def test_resume_continues_exactly(tmp_path):
    torch.manual_seed(0)
    straight = _train(tiny_model("llama", "sdpa", layers=2), 5)
    torch.manual_seed(0)
    model = tiny_model("llama", "sdpa", layers=2)
    first = _train(model, 3)
    path = str(tmp_path / "routers.safetensors")
    first.save(path, {"data": "synthetic test batches"})
    info = fluxc.read_checkpoint(path).provenance
    assert info["step"] == 3 and info["data"] == "synthetic test batches" and info["torch"] == torch.__version__
    resumed = RouterTrainer.resume(path, model, TrainConfig(steps=8, router_lr=1e-2, lambda_lr=5e-2,
                                                            targets={"holistic": 1.0, "retrieval": 0.0}))
    _train(model, 2, trainer=resumed, skip=3)
    for a, b in zip(straight.module.routers.parameters(), resumed.module.routers.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(straight.penalty.lambda1, resumed.penalty.lambda1)


def test_two_gloo_processes_train_the_same_routers(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free loopback port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(__file__)
    out = tmp_path / "result.txt"
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={port}", os.path.join(here, "_ddp_worker.py"),
                          str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert "same=True" in text, text
    assert "lambda=[0.0, 0.0]" not in text  # the multipliers moved



def _grads_and_saved(module, recorder, ids, mask, calls):
    """Router gradients of one forward/backward, bytes saved for backward during the forward, and the number of
    reference attention calls in forward and in backward."""
    from fluxc.training import lm_loss

    for p in module.routers.parameters() if module.routers is not None else ():
        p.grad = None
    saved = []
    torch.manual_seed(5)
    calls.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        out = module(input_ids=ids, attention_mask=mask)
    forward_calls = calls["n"]
    (lm_loss(out.logits, ids) + recorder.samples().sum()).backward()
    grads = [p.grad.clone() for p in module.routers.parameters()]
    return grads, sum(saved), forward_calls, calls["n"] - forward_calls


def test_gradient_checkpointing_same_gradients_fewer_saved_activations(monkeypatch):
    import collections
    import copy

    import fluxc.ops.attention as attention
    from fluxc.api import compile_for_training
    from fluxc.ops.router import LayerRouter, RouteRecorder
    from fluxc.training.checkpointing import compile_for_training_checkpointed

    calls = collections.Counter()
    reference = attention.routed_attention_reference

    def counted(*args, **kwargs):
        calls["n"] += 1
        return reference(*args, **kwargs)

    monkeypatch.setattr(attention, "routed_attention_reference", counted)
    torch.manual_seed(1)
    routers = torch.nn.ModuleList(LayerRouter(16, CFG.router_hidden) for _ in range(3))
    model = tiny_model("llama", "sdpa", layers=3)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    inputs = []
    for length in (24, 48):
        ids = torch.randint(1, 128, (2, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # a left-padded row
        inputs.append((ids, mask))
    results = {}
    for name, build in (("plain", compile_for_training), ("checkpointed", compile_for_training_checkpointed)):
        recorder = RouteRecorder(1.2)
        module = build(model, CFG, recorder, routers=copy.deepcopy(routers))
        for ids, mask in inputs:
            results[name, ids.shape[1]] = _grads_and_saved(module, recorder, ids, mask, calls)
    for length in (24, 48):
        plain, ckpt = results["plain", length], results["checkpointed", length]
        for a, b in zip(plain[0], ckpt[0]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert plain[2] == ckpt[2] == 6  # forward: both branches of 3 layers
        assert ckpt[3] == plain[3] + 6  # backward: each layer's forward is recomputed
    growth = {name: results[name, 48][1] - results[name, 24][1] for name in ("plain", "checkpointed")}
    assert growth["checkpointed"] * 4 < growth["plain"]  # activations kept per token: a fraction


def test_calibration_standardises_router_inputs_and_routers_pool_the_prompt():
    from fluxc.ops.router import capture_router_inputs

    torch.manual_seed(0)
    model = tiny_model("llama", "sdpa", layers=2)
    trainer = RouterTrainer(model, CFG, TrainConfig(steps=2, calibrate_batches=2))
    g = torch.Generator().manual_seed(0)
    batches = [_batch(g) for _ in range(2)]
    for b in batches:  # the first 10 tokens are the prompt, the rest the answer
        b["labels"] = b["labels"].clone()
        b["labels"][:, :10] = -100

    def pooled_inputs(runs):
        with torch.no_grad(), capture_router_inputs() as found:
            for b in runs:
                trainer.recorder.clear()
                trainer.set_router_tokens(b)
                trainer.module(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return found

    pooled_inputs(batches[:1])  # traces the graph: the routers exist
    before = [(r.feature[0].weight.detach().clone(), r.feature[0].bias.detach().clone()) for r in trainer.module.routers]
    trainer.calibrate(batches)
    pooled = pooled_inputs(batches)
    n = len(trainer.module.routers)
    # layer 0 only: later layers' inputs depend on the Gumbel routes sampled in the layers before them
    for layer, router in enumerate(trainer.module.routers[:1]):
        x = torch.cat(pooled[layer::n])  # (16, D) this layer's pooled inputs over both batches
        z = (x - x.mean(0)) / x.std(0)  # standardised
        w0, b0 = before[layer]
        with torch.no_grad():
            h = router.feature[0](x)  # the folded first layer sees x; it must act as the old one on z
        torch.testing.assert_close(h, z @ w0.T + b0, atol=1e-4, rtol=1e-4)
        assert x.std(0).max() / x.std(0).min() > 1.5  # the fold is not the identity here
    # with router_on_prompt the pooled input is the prompt's: changing the answer tokens does not move it
    changed = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batches[0].items()}
    changed["input_ids"][:, 10:] = 1
    again = pooled_inputs([batches[0], changed])
    torch.testing.assert_close(again[0], again[n])
    trainer.cfg = TrainConfig(steps=2, router_on_prompt=False)
    assert not torch.allclose(*[pooled_inputs([b])[0] for b in (batches[0], changed)])


def test_pool_queries_equals_dense_weighting_any_padding():
    from fluxc.ops.router import pool_queries

    def dense(query, valid, pool):  # every token weighted: 1 per slice (first / last `pool` real tokens) it is in
        rank = torch.cumsum(valid.long(), dim=1) - 1
        n_real = valid.sum(dim=1, keepdim=True)
        weight = ((rank < pool).double() + (rank >= n_real - pool).double()) * valid
        return torch.einsum("bt,btd->bd", weight, query.double().mean(dim=2)) / weight.sum(1, keepdim=True).clamp_min(1.0)

    g = torch.Generator().manual_seed(0)
    for seq in (1, 3, 7, 20, 64):
        for pool in (1, 4, 16):
            query = torch.randn(4, seq, 3, 8, dtype=torch.float64, generator=g)
            valid = torch.ones(4, seq, dtype=torch.bool)
            valid[1, : seq // 2] = False  # left padding
            valid[2, seq // 3:] = False  # right padding (all padding when seq < 3)
            valid[3] = torch.rand(seq, generator=g) > 0.4  # holes
            torch.testing.assert_close(pool_queries(query, valid, pool).double(), dense(query, valid, pool),
                                       atol=1e-6, rtol=0)


def test_distillation_term_is_the_kl_from_the_untouched_model():
    """distill_terms against torch's kl_div at the label positions; a distilling step reports it, and its teacher is
    the untouched model (every layer full attention)."""
    import torch.nn.functional as F

    from fluxc.training.trainer import RouterTrainer, TrainConfig, distill_terms

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    labels = torch.full((2, 6), -100)
    labels[0, 4:], labels[1, 2] = 3, 5  # the logits at positions 3, 4 (row 0) and 1 (row 1) predict labels
    total, count = distill_terms(student, teacher, labels)
    rows = torch.stack([student[0, 3], student[0, 4], student[1, 1]]), torch.stack([teacher[0, 3], teacher[0, 4],
                                                                                    teacher[1, 1]])
    want = F.kl_div(rows[0].log_softmax(-1), rows[1].log_softmax(-1), log_target=True, reduction="sum")
    assert int(count) == 3 and torch.allclose(total, want, atol=1e-6)
    assert float(distill_terms(teacher, teacher, labels)[0]) == pytest.approx(0.0, abs=1e-6)

    model = tiny_model("llama", "sdpa", layers=3)
    ids, mask = batch(seq=24, left_pad=0)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    trainer = RouterTrainer(model, CFG, TrainConfig(steps=2, distill=0.5, targets={"retrieval": 0.5}))
    stats = trainer.step({"input_ids": ids, "attention_mask": mask, "labels": labels, "task": ["retrieval"] * 2})
    with torch.no_grad():
        untouched = model(input_ids=ids, attention_mask=mask).logits
        full = fluxc.compile(model, route="full", config=CFG.replace(compiler="eager"))(
            input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(untouched, full, atol=1e-5, rtol=0)  # the teacher is full attention
    assert stats["distill"] > 0.0 and stats["loss"] == pytest.approx(stats["lm"] + stats["penalty"]
                                                                       + 0.5 * stats["distill"], rel=1e-5)
    with pytest.raises(fluxc.ConfigError, match="distill=-1"):
        TrainConfig(distill=-1)


def _narrow_batch(g):
    # each family draws from a few tokens of its own, so a random model's pooled inputs tell them apart
    ids = torch.cat([torch.randint(1, 4, (4, 16), generator=g), torch.randint(120, 124, (4, 16), generator=g)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
            "task": ["holistic"] * 4 + ["retrieval"] * 4}


def test_route_supervision_runs_target_routes_and_fits_routers_to_them():
    """Supervision runs each batch with its families' target routes (a mid target mixes layers), then fits the
    routers: afterwards the argmax routes of held-out prompts follow their family, with no Lagrangian step."""
    torch.manual_seed(0)
    model = tiny_model("llama", "sdpa", layers=4)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    targets = {"holistic": 1.0, "retrieval": 0.0, "lm": 0.5}
    trainer = RouterTrainer(model, CFG, TrainConfig(steps=0, supervise_batches=4, supervise_steps=150,
                                                    router_lr=1e-2, targets=targets))
    batches = [_narrow_batch(torch.Generator().manual_seed(i)) for i in range(4)]
    full, routes = trainer.target_routes({"task": ["holistic", "retrieval", "lm"] * 40}, index=0)
    assert full[:3, 0].tolist() == [0.0, 1.0, 0.5] and full.shape == routes.shape
    assert routes[0::3].eq(0).all() and routes[1::3].eq(1).all()  # one-sided targets: every layer alike
    assert 0.35 < float(routes[2::3].mean()) < 0.65  # the mid target: a mix of layers
    # a forced forward takes exactly the given routes
    trainer.recorder.clear()
    trainer.recorder.forced = routes[:8].clone()
    trainer.module(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
    torch.testing.assert_close(trainer.recorder.samples(), routes[:8, : len(trainer.module.routers)])
    trainer.recorder.clear()

    fit = trainer.supervise(batches, steps=150, calibrate=True)
    assert fit["examples"] == 32 and fit["checked"] == 6 and fit["calibration"] is not None
    assert fit["step"] > 0 and min(fit["accuracy"]) == 1.0, fit
    held_out = _narrow_batch(torch.Generator().manual_seed(9))
    trainer.recorder.clear()
    trainer.recorder.forced = torch.tensor([0.0] * 4 + [1.0] * 4)[:, None].expand(-1, 4)  # earlier layers on target
    with torch.no_grad():
        trainer.module(input_ids=held_out["input_ids"], attention_mask=held_out["attention_mask"])
    full_prob = torch.softmax(trainer.recorder.logits(), -1)[..., 1]  # (B, L)
    assert (full_prob[:4] < 0.2).all() and (full_prob[4:] > 0.8).all(), full_prob
    for name, value in model.state_dict().items():  # backbone bit-identical
        assert torch.equal(value, frozen[name]), name


def _per_example_loss(logits, labels):
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target, ignore_index=-100,
                                            reduction="none")  # (B, T-1)
    return nll.sum(1) / (target != -100).sum(1)


def test_layer_choice_takes_the_layers_whose_full_attention_lowers_the_loss_most():
    """A family with a middle target runs full attention in the layers that help it most: `layer_gains` equals
    the loss drop of forcing each layer alone full in the inference graph (`fluxc.compile` with a per-layer route),
    the choice is its top (1 - target) x layers, supervision's routes and per-layer targets follow it, and the
    fitted routers send held-out prompts of the family full in exactly those layers."""
    torch.manual_seed(0)
    model = tiny_model("llama", "sdpa", layers=4)
    targets = {"holistic": 0.5, "retrieval": 0.0}
    trainer = RouterTrainer(model, CFG, TrainConfig(steps=0, supervise_batches=4, layer_choice=("holistic",),
                                                    router_lr=1e-2, targets=targets))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 120, (3, 24), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -6:] = ids[:, -6:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "task": ["holistic"] * 3}
    eager = CFG.replace(compiler="eager")

    def loss_with(route):
        with torch.no_grad():
            return _per_example_loss(fluxc.compile(model, route=route, config=eager)(input_ids=ids).logits, labels)

    sparse = loss_with("sparse")
    reference = torch.stack([(sparse - loss_with(["full" if i == layer else "sparse" for i in range(4)])).mean()
                             for layer in range(4)])  # (R,)
    gains = trainer.layer_gains([batch])["holistic"]
    torch.testing.assert_close(gains, reference, atol=2e-5, rtol=1e-4)
    assert float(reference.abs().max()) > 1e-3  # the window (4) is shorter than the prompt: layers matter

    report = trainer.choose_full_layers([batch])["holistic"]
    best = sorted(reference.argsort(descending=True)[:2].tolist())
    assert report["layers"] == best == trainer.full_layers["holistic"]
    assert report["loss_full"] == pytest.approx(float(loss_with("full").mean()), abs=2e-5)
    assert report["loss_chosen"] == pytest.approx(
        float(loss_with(["full" if i in best else "sparse" for i in range(4)]).mean()), abs=2e-5)

    # two greedy rounds: the best layer alone, then the best one beside it
    greedy = RouterTrainer(model, CFG, TrainConfig(steps=0, supervise_batches=4, layer_choice=("holistic",),
                                                   layer_choice_rounds=2, targets=targets))
    first = int(reference.argmax())
    alone = loss_with(["full" if i == first else "sparse" for i in range(4)])
    beside = torch.tensor([float((alone - loss_with(["full" if i in (first, layer) else "sparse"
                                                        for i in range(4)])).mean()) if layer != first else -1e9
                           for layer in range(4)])
    two = greedy.choose_full_layers([batch])["holistic"]
    assert two["layers"] == sorted([first, int(beside.argmax())]) and len(two["gains"]) == 2
    torch.testing.assert_close(torch.tensor(two["gains"][1])[beside > -1], beside[beside > -1], atol=1e-4, rtol=1e-3)

    want, routes = trainer.target_routes({"task": ["holistic", "retrieval"]}, index=0)
    pattern = torch.zeros(4)
    pattern[best] = 1.0
    assert torch.equal(want[0], pattern) and torch.equal(routes[0], pattern) and routes[1].eq(1).all()
    fit = trainer.supervise([_narrow_batch(torch.Generator().manual_seed(i)) for i in range(4)], steps=150,
                            calibrate=True)
    assert min(fit["accuracy"]) == 1.0, fit
    held_out = _narrow_batch(torch.Generator().manual_seed(9))
    trainer.recorder.clear()
    trainer.recorder.forced = torch.stack([pattern] * 4 + [torch.ones(4)] * 4)  # earlier layers on target
    with torch.no_grad():
        trainer.module(input_ids=held_out["input_ids"], attention_mask=held_out["attention_mask"])
    decided = torch.softmax(trainer.recorder.logits(), -1)[..., 1] > 0.5  # (B, L) full attention
    assert torch.equal(decided[:4], pattern.bool().expand(4, -1)) and decided[4:].all(), decided


def test_supervision_config_is_checked():
    from fluxc.errors import ConfigError

    with pytest.raises(ConfigError, match="steps=0 must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="supervise_steps=0"):
        TrainConfig(supervise_batches=2, supervise_steps=0)
    with pytest.raises(ConfigError, match="layer_choice_rounds=0"):
        TrainConfig(supervise_batches=2, layer_choice_rounds=0)
    with pytest.raises(ConfigError, match="layer_choice_batches=0"):
        TrainConfig(supervise_batches=2, layer_choice_batches=0)
    with pytest.raises(ConfigError, match=r"layer_choice names 'retrieval', whose target is 1.0; list only"):
        TrainConfig(supervise_batches=2, targets={"retrieval": 1.0}, layer_choice=("retrieval",))
    trainer = RouterTrainer(tiny_model("llama", "sdpa", layers=2), CFG,
                            TrainConfig(steps=0, supervise_batches=1, targets={"holistic": 1.0}))
    with pytest.raises(ConfigError, match=r"no train.targets entry for \['retrieval'\]"):
        trainer.target_routes({"task": ["holistic", "retrieval"]}, index=0)
