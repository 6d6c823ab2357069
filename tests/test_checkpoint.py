"""Router checkpoints: fluxc format round trip and the released Flux Attention layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import fluxc

from hf_models import batch, tiny_model


def _released_folder(tmp_path, routers, model):
    """A released-style checkpoint: full-model tensors plus router tensors under mask_allocator, and the
    config keys of the released layout, split over two shards."""
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.model.named_parameters()}
    parts = {"feature": "cls_feat_extractor", "head": "cls_router_head_agnostic"}
    for i, r in enumerate(routers):
        for name, p in r.named_parameters():
            part, idx, kind = name.split(".")
            tensors[f"model.layers.{i}.self_attn.mask_allocator.{parts[part]}.{idx}.{kind}"] = p.detach().clone()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[::2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in names[1::2]}, tmp_path / "model-00002-of-00002.safetensors")
    cfg = model.config.to_dict()
    cfg.update(toggle_type="streaming", retrieval_mode="full", sink_size=2, local_window_size=4, triangle_n_last=2,
               pooling_mode="ctx_q", pool_size=4, use_softmax=False, architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_released_layout_loads_and_matches_fluxc_format(tmp_path):
    model = tiny_model("llama", "sdpa")
    torch.manual_seed(0)
    hidden = (32, 16, 24, 8)
    routers = torch.nn.ModuleList(fluxc.ops.LayerRouter(16, hidden) for _ in range(3))
    with torch.no_grad():
        for p in routers.parameters():
            p.normal_(0, 1.0)
    (tmp_path / "released").mkdir()
    folder = _released_folder(tmp_path / "released", routers, model)
    ckpt = fluxc.read_checkpoint(folder)
    assert ckpt.layout == "released" and ckpt.num_layers == 3
    assert ckpt.config.router_hidden == hidden and ckpt.config.sink == 2 and ckpt.config.window == 4
    assert ckpt.fingerprint == fluxc.Fingerprint("LlamaForCausalLM", 3, 4, 2, 16)
    ours = tmp_path / "ours.safetensors"
    fluxc.save_routers(ours, routers, ckpt.config, ckpt.fingerprint, {"from": "test"})
    assert fluxc.read_checkpoint(ours).provenance == {"from": "test"}
    ids, mask = batch(left_pad=3)
    eager = {"compiler": "eager"}
    with torch.no_grad():
        a = fluxc.compile(model, str(folder), config=ckpt.config.replace(**eager))
        b = fluxc.compile(model, str(ours), config=ckpt.config.replace(**eager))
        out_a = a(input_ids=ids, attention_mask=mask).logits
        out_b = b(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out_a, out_b)
    assert torch.equal(fluxc.last_route(a), fluxc.last_route(b))
    for got, want in zip(a.routers, routers):
        for (n1, p1), (n2, p2) in zip(got.named_parameters(), want.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)


def test_folded_operating_point_routes_as_the_original_at_its_threshold(tmp_path):
    from fluxc.checkpoint import fold_operating_point, save_routers
    from fluxc.ops.router import LayerRouter

    torch.manual_seed(0)
    routers = torch.nn.ModuleList(LayerRouter(16, (8, 8, 8, 4)) for _ in range(3))
    with torch.no_grad():  # spread the probabilities so that the thresholds part the prompts differently
        for r in routers:
            r.head[4].weight.mul_(40.0)
    config = fluxc.FluxConfig(sink=2, window=4, block=2, router_hidden=(8, 8, 8, 4), pool_size=4)
    src, dst = tmp_path / "r.safetensors", tmp_path / "folded.safetensors"
    save_routers(src, routers, config, fluxc.Fingerprint("Toy", 3, 2, 2, 16), {"step": 7})
    fold_operating_point(src, dst, 0.3, "unit test")
    folded = fluxc.read_checkpoint(dst)
    assert folded.provenance["step"] == 7 and folded.provenance["operating_point"]["threshold"] == 0.3
    q, valid = torch.randn(64, 5, 2, 16), torch.ones(64, 5, dtype=torch.bool)
    moved = 0
    for old, new in zip(routers, folded.load_routers()):
        p_old = torch.softmax(old(q, valid, 4), -1)[:, 1]
        p_new = torch.softmax(new(q, valid, 4), -1)[:, 1]
        assert torch.equal(p_old > 0.3, p_new > 0.5)
        moved += int(((p_old > 0.3) != (p_old > 0.5)).sum())
    assert moved > 0  # the operating point changes decisions here
    with pytest.raises(fluxc.ConfigError, match="threshold=1.5"):
        fold_operating_point(src, dst, 1.5, "")


def test_fold_command(tmp_path, capsys):
    import fluxc.cli
    from fluxc.checkpoint import save_routers
    from fluxc.ops.router import LayerRouter

    src, dst = tmp_path / "r.safetensors", tmp_path / "f.safetensors"
    routers = torch.nn.ModuleList([LayerRouter(16, (8, 8, 8, 4))])
    save_routers(src, routers, fluxc.FluxConfig(router_hidden=(8, 8, 8, 4)), fluxc.Fingerprint("Toy", 1, 2, 2, 16))
    assert fluxc.cli.main(["fold", str(src), "--threshold", "0.2", "--out", str(dst), "--chosen-on", "a sweep"]) == 0
    point = fluxc.read_checkpoint(dst).provenance["operating_point"]
    assert point["threshold"] == 0.2 and point["chosen_on"] == "a sweep"
    assert fluxc.cli.main(["fold", str(src), "--threshold", "2", "--out", str(dst)]) == 2
    assert "threshold=2.0 must be a float in (0, 1)" in capsys.readouterr().err
