"""Causal + padding masks read as structure (`fluxc.passes.masks`, `fluxc::causal_positions`): HF's traced
(B, 1, Tq, Tk) mask is never built, results equal the materialised path and the independent reference, and
the kernels get `is_causal` + per-sequence key ranges."""

from __future__ import annotations

import pytest
import torch
import transformers

import fluxc
from fluxc.ops.dispatch import is_key_mask, run_kernel, unsupported_reason
from fluxc.ops.masks import allowed_mask, mask_positions
from fluxc.passes import counters
from fluxc.spec import SiteSpec

from hf_models import Reference, batch, run_reference, tiny_model

CFG = fluxc.FluxConfig(sink=2, window=4, block=2, block_exact=True, compiler="eager")
ARCHS = ["llama", "qwen3", "phi3"]  # full-attention SDPA decoders (sliding windows: test_local_layers.py)


def _compile(model, route, structural: bool, cfg=CFG):
    fm = fluxc.compile(model, route=route, config=cfg)
    fm._backend.structural_masks = structural
    return fm


def _square_masks(gm: torch.fx.GraphModule, t: int) -> list[str]:
    """Nodes holding a bool (..., t, t) tensor: a materialised attention mask."""
    found = []
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.dim() >= 2 \
                and tuple(value.shape[-2:]) == (t, t):
            found.append(node.name)
    return found


def _padded(padding: str, seq: int = 12):
    ids, mask = batch(seq=seq, left_pad=3 if padding == "left" else 0)
    if padding == "right":
        mask[-1, -4:] = 0
        ids[-1, -4:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding", ["left", "right", "none"])
def test_structural_mask_equals_materialised_mask_and_reference(arch, padding):
    model = tiny_model(arch, "sdpa")
    ids, mask = _padded(padding)
    real = mask.bool()
    n = model.config.num_hidden_layers
    for routes in (["sparse"] * n, ["full", "sparse", "full"][:n]):
        outs = {}
        for structural in (True, False):
            counters.clear()
            fm = _compile(model, routes, structural)
            with torch.no_grad():
                outs[structural] = fm(input_ids=ids, attention_mask=mask).logits
            graph = fm._backend.last_graph
            assert counters["structural_masks"] == int(structural)
            assert bool(_square_masks(graph, ids.shape[1])) != structural  # the (T, T) mask exists only without
        torch.testing.assert_close(outs[True][real], outs[False][real], atol=1e-6, rtol=0)
        if padding != "right":  # the loop reference counts positions from a left pad
            pads = [0, 3 if padding == "left" else 0]
            ref = run_reference(model, ids, mask, Reference(routes, pads, CFG.sink, CFG.window, CFG.block,
                                                            CFG.block_exact))
            torch.testing.assert_close(outs[True][real], ref[real], atol=1e-5, rtol=0)
    full = _compile(model, "full", True)
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(full(input_ids=ids, attention_mask=mask).logits[real], hf[real], atol=1e-5, rtol=0)


def test_structural_mask_with_dynamic_lengths_and_decode_steps():
    model = tiny_model("llama", "sdpa")
    fm_s, fm_m = _compile(model, ["sparse", "full", "sparse"], True), _compile(model, ["sparse", "full", "sparse"], False)
    counters.clear()
    for seq in (12, 17):  # the second length retraces with a dynamic length (SymInt sizes)
        ids, mask = _padded("left", seq)
        with torch.no_grad():
            a, b = fm_s(input_ids=ids, attention_mask=mask).logits, fm_m(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-6, rtol=0)
    assert counters["structural_masks"] == 2
    ids, mask = _padded("left", 10)
    tokens_s = fluxc.generate(fm_s, ids, 6, attention_mask=mask, engine=False)  # DynamicCache decode steps
    tokens_m = fluxc.generate(fm_m, ids, 6, attention_mask=mask, engine=False)
    assert torch.equal(tokens_s, tokens_m)
    assert counters["structural_masks"] >= 3  # the decode step's (B, 1, 1, Tk) mask was read too


def test_causal_positions_match_mask_positions_and_refuse_holes():
    batch_size, t = 3, 9
    q = torch.zeros(batch_size, 2, t, 16)
    keys = torch.ones(batch_size, t, dtype=torch.bool)
    keys[1, :4] = False  # left padding
    keys[2, -3:] = False  # right padding
    index = torch.arange(t)
    factor = keys[:, None, None, :]
    qpos, valid, key_start, key_mask = torch.ops.fluxc.causal_positions(q, q, index, index, factor, True)
    allowed = allowed_mask(None, True, batch_size, t, t, q.device) & factor
    ref_qpos, ref_valid, ref_start = mask_positions(allowed)
    assert torch.equal(valid, ref_valid) and torch.equal(key_start, ref_start)
    assert torch.equal(qpos[valid], ref_qpos[ref_valid])  # real rows: the query's own key
    assert torch.equal(key_mask[:, 0, 0], keys)
    _, valid_all, start_all, mask_all = torch.ops.fluxc.causal_positions(q, q, index, index, None, True)  # no factor
    assert valid_all.all() and not start_all.any() and mask_all.all() and mask_all.shape == (batch_size, 1, 1, t)
    # a decode step: one query at position t - 1 over t keys
    qpos1, valid1, start1, _ = torch.ops.fluxc.causal_positions(q[:, :, :1], q, index[-1:], index, factor, True)
    assert qpos1.flatten().tolist() == [t - 1] * batch_size and valid1.flatten().tolist() == [True, True, False]
    assert start1.tolist() == [0, 4, 0]
    holes = keys.clone()
    holes[0, 5] = False
    with pytest.raises(fluxc.MaskError, match=r"zeros between real tokens of sequence\(s\) \[0\].*impl='reference'"):
        torch.ops.fluxc.causal_positions(q, q, index, index, holes[:, None, None, :], True)
    torch.ops.fluxc.causal_positions(q, q, index, index, holes[:, None, None, :], False)  # reference: exact


def test_key_mask_dispatch():
    q = torch.randn(2, 4, 5, 64, dtype=torch.float16)
    key_mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    assert is_key_mask(key_mask, True) and not is_key_mask(key_mask, False)
    assert unsupported_reason(q, q, key_mask, True) is None
    assert "materialised mask" in unsupported_reason(q, q, torch.ones(2, 1, 5, 5, dtype=torch.bool), False)
    with pytest.raises(fluxc.ImplementationError, match="FlexAttention lowering takes no key ranges"):
        run_kernel("flex", q, q, q, key_mask, torch.ones(2, dtype=torch.bool), torch.arange(5).expand(2, 5),
                   torch.zeros(2, dtype=torch.long), SiteSpec(is_causal=True, scale=0.125, softcap=0.0,
                   pattern="streaming", sink=1, window=2, block=1, block_exact=False, n_last=0), explicit=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("route", ["full", "sparse"])
def test_kernels_take_structural_masks_on_gpu(route):
    """HF Llama (head dim 64, GQA 4:2), bf16, left and right padding: the Triton kernels (auto on CUDA reads the
    mask as structure) against the reference implementation on the materialised mask."""
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      max_position_embeddings=1024)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(1, 256, (3, 300), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    mask[2, -50:] = 0
    real = mask.bool()
    cfg = fluxc.FluxConfig(sink=16, window=64, block=16, compiler="eager")
    counters.clear()
    kernels = fluxc.compile(model, route=route, config=cfg.replace(impl="triton"))
    reference = fluxc.compile(model, route=route, config=cfg.replace(impl="reference"))
    with torch.no_grad():
        out = kernels(input_ids=ids, attention_mask=mask).logits.float()
        ref = reference(input_ids=ids, attention_mask=mask).logits.float()
        model32 = model.float()
        exact = fluxc.compile(model32, route=route, config=cfg.replace(impl="reference"))(
            input_ids=ids, attention_mask=mask).logits
        model.to(torch.bfloat16)
    assert counters["structural_masks"] == 1
    assert torch.isfinite(out[real]).all()
    # kernel error against the fp32 model within 2x the bf16 reference's own error
    err, ref_err = (out[real] - exact[real]).abs().max(), (ref[real] - exact[real]).abs().max()
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)


@pytest.mark.parametrize("is_causal,bottom_right", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("native_window", [0, 1, 3])
def test_maskless_positions_match_the_materialised_mask(is_causal, bottom_right, native_window):
    """A site with no mask tensor: positions in O(Tq), equal to reading the (Tq, Tk) mask it would build."""
    from fluxc.ops.masks import maskless_positions

    for q_len, kv_len in [(1, 1), (1, 7), (5, 5), (3, 8), (8, 3), (9, 4)]:
        expect = mask_positions(allowed_mask(None, is_causal, 2, q_len, kv_len, torch.device("cpu"),
                                             bottom_right=bottom_right, native_window=native_window))
        got = maskless_positions(is_causal, 2, q_len, kv_len, torch.device("cpu"), bottom_right=bottom_right,
                                 native_window=native_window)
        for name, want, have in zip(("qpos", "valid", "key_start"), expect, got):
            assert torch.equal(have, want), (name, q_len, kv_len, have, want)
