"""fluxc.export on CPU: torch.export prefill and decode programs, reload in a fresh process, AOTInductor, ONNX in
onnxruntime, the `fluxc export` command and its errors.

References: the fluxc module's own outputs (fluxc.compile with the same routers or route, HF DynamicCache for
decode steps), and the untouched model for route="full". Routers are set so that, on the first prompt, layer 0
routes the two sequences differently and layer 1 routes both to full attention: both branches of each layer's
`torch.cond` (ONNX `If`) run.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_hf_models import _routers_with_mixed_decisions
from transformers import AutoModelForCausalLM, DynamicCache

import fluxc
from fluxc.cli import main as cli_main
from fluxc.exporter.program import export_with_signature
from fluxc.ops.cache import ring_capacity

from hf_models import ARCHS, COMMON, batch, tiny_model

CFG = fluxc.FluxConfig(sink=2, window=4, block=2, compiler="eager", router_hidden=(32, 16, 16, 8), pool_size=4)
EXPORT_ARCHS = ("llama", "qwen3", "mistral", "gemma3")
OPSET = {"llama": 18, "qwen3": 21, "mistral": 23, "gemma3": 25}  # the supported range, one opset per model


def _prompts(shapes=((12, 3, 1), (7, 2, 5))) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Left-padded batches (default: two of different lengths), (seq, pad, seed) each:
    (input_ids, attention_mask, position_ids)."""
    out = []
    for seq, pad, seed in shapes:
        ids, mask = batch(seq=seq, left_pad=pad, seed=seed)
        out.append((ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)))
    return out


def _routed_module(arch: str, tmp_path, device: str = "cpu", head_dim: int = 16,
                   dtype: torch.dtype = torch.float32, sparse_layer0: bool = False) -> fluxc.FluxModule:
    model = tiny_model(arch, "sdpa", layers=2, head_dim=head_dim)
    ids, mask, _ = _prompts()[0]
    routers = _routers_with_mixed_decisions(model, ids, mask, CFG, head_dim)
    with torch.no_grad():
        routers[1].head[4].bias[1] += 100.0  # layer 1: full attention for every sequence
        if sparse_layer0:
            routers[0].head[4].bias[1] -= 100.0  # layer 0: sparse for every sequence (no decision near the edge)
    path = tmp_path / f"{arch}.safetensors"
    fluxc.save_routers(path, routers, CFG, fluxc.Fingerprint(type(model).__name__, 2, 4, 2, head_dim))
    return fluxc.compile(model.to(device, dtype), str(path), config=CFG)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (routed module, dynamic prefill program, signature), exported once per module."""
    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            fm = _routed_module(arch, tmp_path_factory.mktemp(arch))
            ids, mask, pos = _prompts()[0]
            program, sig = export_with_signature(fm, dict(input_ids=ids, attention_mask=mask, position_ids=pos))
            cache[arch] = (fm, program, sig)
        return cache[arch]

    return get


def _module_prefill(fm, ids, mask, pos):
    with torch.no_grad():
        out = fm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=DynamicCache(), use_cache=True)
    cache = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
    return out.logits, fluxc.last_route(fm).clone(), cache


def _targets(program, name: str) -> int:
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and name in str(n.target))


def _check_prefill(fm, program, session, ids, mask, pos) -> tuple[torch.Tensor, torch.Tensor]:
    """`program` against the module within 1e-5 (logits, routes, cache) and onnxruntime's `session` within 1e-4
    (logits of real tokens, routes); returns the module's logits and routes."""
    logits, routes, cache = _module_prefill(fm, ids, mask, pos)
    with torch.no_grad():
        out = program.module()(ids, mask, pos)
    torch.testing.assert_close(out[0], logits, atol=1e-5, rtol=0)
    assert torch.equal(out[-1], routes)
    for got, want in zip(out[1:-1], cache):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()})
    real = mask.bool()  # padding rows: torch's SDPA gives 0 where ONNX's full branch averages; never read
    torch.testing.assert_close(torch.from_numpy(got[0])[real], logits[real], atol=1e-4, rtol=0)
    assert np.array_equal(got[-1], routes.numpy())
    return logits, routes


@pytest.mark.parametrize("arch", EXPORT_ARCHS)
def test_prefill_program_and_onnx_match_module(arch, exported, tmp_path):
    """One dynamic program, two lengths: torch.export within 1e-5 of the module (logits, routes, caches), then
    the same program in onnxruntime within 1e-4, at one opset per model over the supported range."""
    fm, program, sig = exported(arch)
    assert sig.inputs == ("input_ids", "attention_mask", "position_ids")
    assert sig.outputs[0] == "logits" and sig.outputs[-1] == "routes" and sig.route is None
    assert _targets(program, "cond") == 2 and _targets(program, "fluxc.router_logits") == 2
    assert _targets(program, "record_routes") == 0  # no route state is mutated: routes are an output
    path = tmp_path / f"{arch}.onnx"
    fluxc.export_onnx(program, None, path, opset=OPSET[arch], optimize=False)  # the optimizer runs in the CLI test
    proto = onnx.load(path)
    assert proto.opset_import[0].version == OPSET[arch]
    assert [i.name for i in proto.graph.input] == list(sig.inputs)
    assert [o.name for o in proto.graph.output] == list(sig.outputs)
    assert sum(n.op_type == "If" for n in proto.graph.node) == 2  # the per-layer choice
    session = ort.InferenceSession(str(path))
    seen = [_check_prefill(fm, program, session, *prompt)[1] for prompt in _prompts()]
    first = seen[0]
    assert (first[0] != first[1]).any() and first[:, 1].all()  # layer 0 differs per sequence, layer 1 is full


RELOAD = r"""
import sys, torch
import fluxc  # registers fluxc's ops: the program calls them
assert not {"onnx", "onnxscript", "onnxruntime", "torch._inductor"} & set(sys.modules), "import fluxc loaded onnx"
program = torch.export.load(sys.argv[1])
inputs, expected = torch.load(sys.argv[2])
with torch.no_grad():
    out = program.module()(*inputs)
torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=0)
assert torch.equal(out[-1], expected[1])
print("ok")
"""


def test_program_reloads_in_a_fresh_process(exported, tmp_path):
    """torch.export.save, then torch.export.load after `import fluxc` in a new interpreter (which imports no
    ONNX package)."""
    fm, program, _ = exported("llama")
    torch.export.save(program, tmp_path / "prefill.pt2")
    ids, mask, pos = _prompts()[1]
    logits, routes, _ = _module_prefill(fm, ids, mask, pos)
    torch.save(((ids, mask, pos), (logits, routes)), tmp_path / "io.pt")
    result = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "prefill.pt2"), str(tmp_path / "io.pt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("arch", EXPORT_ARCHS)
def test_aoti_package_runs_and_matches(arch, exported, tmp_path):
    """The router program (per-layer torch.cond, fluxc's ops) through AOTInductor, at both lengths."""
    fm, program, _ = exported(arch)
    path = fluxc.export_aoti(program, tmp_path / "prefill.pt2")
    runner = torch._inductor.aoti_load_package(path)
    for ids, mask, pos in _prompts():
        logits, routes, _ = _module_prefill(fm, ids, mask, pos)
        out = runner(ids, mask, pos)
        torch.testing.assert_close(out[0], logits, atol=1e-5, rtol=0)
        assert torch.equal(out[-1], routes)


def _check_chained_decode(fm, prefill, decode, sig, tmp_path) -> None:
    """The second prompt through the exported `prefill`, then three chained exported dense decode steps (routes
    from that prefill) against the module's own steps within 1e-5; the last step in onnxruntime within 1e-4."""
    ids, mask, pos = _prompts()[1]
    with torch.no_grad():
        out = prefill.module()(ids, mask, pos)
        ref = fm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=DynamicCache(), use_cache=True)
    routes, cache, module_cache = out[-1], list(out[1:-1]), ref.past_key_values
    token, step_pos = ref.logits[:, -1:].argmax(-1), pos[:, -1:] + 1
    for _ in range(3):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        feed = [token, step_pos, mask, routes, *cache]
        with torch.no_grad():
            want = fm(input_ids=token, attention_mask=mask, position_ids=step_pos, past_key_values=module_cache,
                      use_cache=True)
            got = decode.module()(*feed)
        torch.testing.assert_close(got[0], want.logits, atol=1e-5, rtol=0)
        cache, module_cache = list(got[1:]), want.past_key_values
        token, step_pos = want.logits[:, -1:].argmax(-1), step_pos + 1
    path = tmp_path / "decode.onnx"
    fluxc.export_onnx(decode, None, path, optimize=False)
    onnx_out = ort.InferenceSession(str(path)).run(None, {k: v.numpy() for k, v in zip(sig.inputs, feed)})
    with torch.no_grad():
        want = decode.module()(*feed)
    for a, b in zip(onnx_out, want):
        torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-4, rtol=0)


def test_structural_mask_programs_match_module(exported, tmp_path):
    """structural_masks=True (a CUDA export's default): HF's causal + padding mask is read as index vectors and a
    key mask, so each routed site stays one op that chooses per sequence (no torch.cond, no (Tq, Tk) mask; the
    Triton kernels' input on a GPU). Prefill at both lengths: the program within 1e-5 of the module, onnxruntime
    within 1e-4, the AOTInductor package within 1e-5; three chained decode steps within 1e-5, one in onnxruntime.
    A sliding-window model's masks are read the same way (causal + per-key + its window) and match too."""
    fm, _, _ = exported("llama")
    ids, mask, pos = _prompts()[0]
    example = dict(input_ids=ids, attention_mask=mask, position_ids=pos)
    program, sig = export_with_signature(fm, example, structural_masks=True)
    assert sig.structural_masks and _targets(program, "cond") == 0 and _targets(program, "fluxc.positions") == 0
    assert _targets(program, "causal_positions") == 1 and _targets(program, "routed_attention") == 2
    fluxc.export_onnx(program, None, tmp_path / "prefill.onnx", optimize=False)
    session = ort.InferenceSession(str(tmp_path / "prefill.onnx"))
    runner = torch._inductor.aoti_load_package(fluxc.export_aoti(program, tmp_path / "prefill.pt2"))
    for ids, mask, pos in _prompts():
        logits, routes = _check_prefill(fm, program, session, ids, mask, pos)
        aoti = runner(ids, mask, pos)
        torch.testing.assert_close(aoti[0], logits, atol=1e-5, rtol=0)
        assert torch.equal(aoti[-1], routes)
    assert (_module_prefill(fm, *_prompts()[0])[1][:, 0]).unique().numel() == 2  # layer 0 mixes both routes

    decode, dsig = export_with_signature(fm, example, step="decode", structural_masks=True)
    assert dsig.structural_masks and _targets(decode, "cond") == 0 and _targets(decode, "causal_positions") == 1
    _check_chained_decode(fm, program, decode, dsig, tmp_path)

    sliding, _, _ = exported("mistral")  # a sliding window is structure too: positions + the window, in ONNX as well
    program, sig = export_with_signature(sliding, example, structural_masks=True)
    assert sig.structural_masks and _targets(program, "cond") == 0 and _targets(program, "causal_positions") == 1
    fluxc.export_onnx(program, None, tmp_path / "sliding.onnx", optimize=False)
    session = ort.InferenceSession(str(tmp_path / "sliding.onnx"))
    for ids, mask, pos in _prompts():
        _check_prefill(sliding, program, session, ids, mask, pos)


def _gpu_prompts() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The two CPU prompts and two more at 16 and 32 tokens, on the GPU."""
    shapes = ((12, 3, 1), (7, 2, 5), (16, 3, 1), (32, 2, 5))
    return [tuple(t.cuda() for t in p) for p in _prompts(shapes)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_aoti_package_on_gpu(tmp_path):
    """The same router program exported from a CUDA model with the model's mask kept (per-layer torch.cond) and
    compiled by AOTInductor for the GPU (fp32, head_dim 16: the routed branch runs the reference on the GPU)."""
    fm = _routed_module("llama", tmp_path, "cuda")
    prompts = _gpu_prompts()
    ids, mask, pos = prompts[0]
    program = fluxc.export(fm, dict(input_ids=ids, attention_mask=mask, position_ids=pos), structural_masks=False)
    assert _targets(program, "cond") == 2
    runner = torch._inductor.aoti_load_package(fluxc.export_aoti(program, tmp_path / "gpu.pt2"))
    for ids, mask, pos in prompts:
        logits, routes, _ = _module_prefill(fm, ids, mask, pos)
        out = runner(ids, mask, pos)
        torch.testing.assert_close(out[0], logits, atol=1e-4, rtol=1e-4)  # GPU kernels: another summation order
        assert torch.equal(out[-1], routes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_aoti_package_bf16_on_gpu(tmp_path, caplog):
    """bf16, head_dim 64, a CUDA export's default: the causal + padding mask is read as structure, so both layers'
    routed ops run the Triton kernels (no reference fallback is logged). Layer 0 routes every sequence sparse
    (clear of the decision edge so that bf16 and fp32 agree), layer 1 full. Logits of real tokens against the
    fp32 module within 2x the bf16 module's own error, at three lengths, left padding included."""
    for sub in ("bf16", "fp32"):
        (tmp_path / sub).mkdir()
    fm = _routed_module("llama", tmp_path / "bf16", "cuda", head_dim=64, dtype=torch.bfloat16, sparse_layer0=True)
    exact = _routed_module("llama", tmp_path / "fp32", "cuda", head_dim=64, sparse_layer0=True)  # same seeds, fp32
    prompts = [tuple(t.cuda() for t in batch(seq=seq, left_pad=pad, seed=seq)) for seq, pad in ((12, 0), (16, 3), (33, 5))]
    program, sig = export_with_signature(fm, dict(input_ids=prompts[0][0], attention_mask=prompts[0][1]))
    assert sig.structural_masks and _targets(program, "cond") == 0 and _targets(program, "routed_attention") == 2
    runner = torch._inductor.aoti_load_package(fluxc.export_aoti(program, tmp_path / "gpu_bf16.pt2"))
    for ids, mask in prompts:
        with torch.no_grad():
            logits = fm(input_ids=ids, attention_mask=mask).logits
            truth = exact(input_ids=ids, attention_mask=mask).logits
        routes = fluxc.last_route(exact).clone()
        with caplog.at_level(logging.INFO, logger="fluxc"):
            caplog.clear()
            out = runner(ids, mask)
        assert "runs the reference" not in caplog.text, caplog.text  # the Triton kernels ran
        assert torch.equal(out[-1], routes) and routes[:, 0].logical_not().all() and routes[:, 1].all()
        real = mask.bool()
        own_error = (logits.float() - truth)[real].abs().max().item()
        aoti_error = (out[0].float() - truth)[real].abs().max().item()
        assert aoti_error <= 2 * own_error, (aoti_error, own_error)


def test_router_decode_step_matches_module(exported, tmp_path):
    """Dense KV layout on a sliding-window model, routes from the exported prefill: next-token logits of three
    chained exported steps against the module's own decode steps, then one step in onnxruntime."""
    fm, prefill, _ = exported("mistral")
    ids, mask, pos = _prompts()[0]
    decode, sig = export_with_signature(fm, dict(input_ids=ids, attention_mask=mask, position_ids=pos), step="decode")
    assert sig.inputs[:4] == ("input_ids", "position_ids", "attention_mask", "routes") and sig.kv_layout == "dense"
    assert _targets(decode, "router_logits") == 0  # a decode step reuses the prefill's routes
    _check_chained_decode(fm, prefill, decode, sig, tmp_path)  # 7 tokens, pad 2: past the sliding window (5)


def _all_nodes(proto) -> list:
    nodes = []

    def walk(graph):
        for node in graph.node:
            nodes.append(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(proto.graph)
    for fn in proto.functions:
        nodes.extend(fn.node)
    return nodes


def test_engine_layout_decode_matches_module(tmp_path):
    """A fixed route baked in, with the decode engine's KV layout (padding dropped, the sparse layer in a sink +
    window ring). Eight chained exported steps (the ring wraps) against the module keeping every key; the
    same steps in onnxruntime; the fused ONNX form of the prefill."""
    model = tiny_model("llama", "sdpa", layers=2)
    fm = fluxc.compile(model, config=CFG, route=("sparse", "full"))
    ids, mask, pos = _prompts()[0]
    example = dict(input_ids=ids, attention_mask=mask, position_ids=pos)
    prefill, psig = export_with_signature(fm, example)
    decode, dsig = export_with_signature(fm, example, step="decode")
    assert psig.kv_layout == dsig.kv_layout == "engine" and psig.route == (False, True)
    assert _targets(prefill, "cond") == 0 and _targets(prefill, "router_logits") == 0  # nothing left to choose
    assert dsig.layouts == ("sparse-ring", "full") and dsig.inputs[:2] == ("input_ids", "position_ids")
    ids, mask, pos = _prompts()[1]
    with torch.no_grad():
        out = prefill.module()(ids, mask, pos)
        ref = fm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=DynamicCache(), use_cache=True)
    torch.testing.assert_close(out[0], ref.logits, atol=1e-5, rtol=0)
    assert out[-1].tolist() == [[False, True]] * 2
    ring = ring_capacity(CFG.sink, CFG.window, CFG.block, CFG.block_exact)
    assert [t.shape[2] for t in out[1:-1]] == [ring, ring, ids.shape[1], ids.shape[1]]
    capacity = ids.shape[1] + 8
    buffers = [t if t.shape[2] == ring else torch.nn.functional.pad(t, (0, 0, 0, capacity - t.shape[2]))
               for t in out[1:-1]]  # the full layer gets room to decode; the ring is fixed
    feeds, module_cache = [], ref.past_key_values
    token, step_pos = ref.logits[:, -1:].argmax(-1), mask.sum(dim=1, keepdim=True)  # real index of the token
    for _ in range(8):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        feeds.append([token, step_pos, *buffers])
        with torch.no_grad():
            want = fm(input_ids=token, attention_mask=mask, position_ids=step_pos, past_key_values=module_cache,
                      use_cache=True)
            got = decode.module()(*feeds[-1])
        torch.testing.assert_close(got[0], want.logits, atol=1e-5, rtol=0)
        assert [t.shape for t in got[1:]] == [t.shape for t in buffers]  # fixed-size buffers, token written
        buffers, module_cache = list(got[1:]), want.past_key_values
        token, step_pos = want.logits[:, -1:].argmax(-1), step_pos + 1
    path = tmp_path / "decode.onnx"
    fluxc.export_onnx(decode, None, path, optimize=False)
    session = ort.InferenceSession(str(path))
    for feed in feeds[1::3]:
        with torch.no_grad():
            want = decode.module()(*feed)
        got = session.run(None, {k: v.numpy() for k, v in zip(dsig.inputs, feed)})
        for a, b in zip(got, want):
            torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-4, rtol=0)
    fluxc.export_onnx(prefill, None, tmp_path / "fused.onnx", fused=True, optimize=False)
    fused = [n for n in _all_nodes(onnx.load(tmp_path / "fused.onnx")) if n.domain == "fluxc"]
    assert [n.op_type for n in fused] == ["RoutedAttention"]  # the sparse layer; the full one is plain attention
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in fused[0].attribute}
    assert (attrs["sink"], attrs["window"], attrs["block"], attrs["block_exact"]) == (2, 4, 2, 1)


def test_cli_exports_route_full_equal_to_the_untouched_model(tmp_path, capsys):
    """`fluxc export` on a config.json (random weights) with route 'full' baked in: the program and the ONNX
    file give the untouched model's logits; signature.json names every input and output."""
    cfg_cls, extra = ARCHS["qwen3"]
    config = cfg_cls(**{**COMMON, **extra, "num_hidden_layers": 2})
    (tmp_path / "config.json").write_text(config.to_json_string())
    code = cli_main(["export", "--model", str(tmp_path / "config.json"), "--attn", "eager", "--route", "full",
                     "--format", "pt2,onnx", "--step", "prefill", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    table = json.loads((tmp_path / "out" / "signature.json").read_text())["programs"]["prefill"]
    assert table["route"] == [True, True] and table["outputs"][0] == "logits" and table["outputs"][-1] == "routes"
    torch.manual_seed(0)  # the command's --seed default
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    program = torch.export.load(tmp_path / "out" / "prefill.pt2")
    session = ort.InferenceSession(str(tmp_path / "out" / "prefill.onnx"))
    for ids, mask, pos in _prompts():
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            got = program.module()(ids, mask, pos)
        torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)
        feed = dict(zip(table["inputs"], (ids.numpy(), mask.numpy(), pos.numpy())))
        real = mask.bool()
        torch.testing.assert_close(torch.from_numpy(session.run(None, feed)[0])[real], want[real], atol=1e-4, rtol=0)


def test_export_errors_are_clear(tmp_path, exported, capsys):
    model = tiny_model("llama", "sdpa", layers=2)
    ids, mask, _ = _prompts()[0]
    with pytest.raises(fluxc.ExportError, match="route=None asks for the router, but LlamaForCausalLM has none"):
        fluxc.export(model, (ids, mask))
    for opset in (17, 26, "18"):
        with pytest.raises(fluxc.ExportError, match=r"opset=.* is not supported; .* opsets 18 to 25"):
            fluxc.export_onnx(model, (ids, mask), tmp_path / "x.onnx", route="full", opset=opset)
    with pytest.raises(fluxc.ExportError, match="route: route\\[1\\]='dense' is not 'full' or 'sparse'"):
        fluxc.export(model, (ids, mask), route=["full", "dense"])
    with pytest.raises(fluxc.ExportError, match="step='generate' is not a step"):
        fluxc.export(model, (ids, mask), route="full", step="generate")
    with pytest.raises(fluxc.ExportError, match="kv_layout='paged' is not a layout"):
        fluxc.export(model, (ids, mask), route="full", kv_layout="paged")
    fm, program, _ = exported("llama")
    with pytest.raises(fluxc.ExportError, match="kv_layout='engine' cannot be used: the routes are decided by"):
        fluxc.export(fm, (ids, mask), step="decode", kv_layout="engine")
    with pytest.raises(fluxc.ExportError, match="export_onnx got a program and \\['example_inputs'\\]"):
        fluxc.export_onnx(program, (ids, mask), tmp_path / "x.onnx")
    with pytest.raises(fluxc.ExportError, match=r"inductor_configs must be a mapping .* got list \['max_autotune'\]"):
        fluxc.export_aoti(program, tmp_path / "x.pt2", inductor_configs=["max_autotune"])
    with pytest.raises(fluxc.ExportError, match="structural_masks='yes' must be True, False or None"):
        fluxc.export(model, (ids, mask), route="full", structural_masks="yes")
    with pytest.raises(fluxc.ExportError, match="example_inputs\\['use_cache'\\] is a bool; only tensors"):
        fluxc.export(model, dict(input_ids=ids, use_cache=True), route="full")
    assert cli_main(["export", "--model", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "o")]) == 2
    assert "fluxc export: error: no router: pass --router" in capsys.readouterr().err
    assert cli_main(["export", "--smollm2", "--route", "full", "--opset", "30", "--out", str(tmp_path / "o")]) == 2
    assert "opset=30 is not supported; fluxc's ONNX translations support opsets 18 to 25" in capsys.readouterr().err
    assert cli_main(["export", "--smollm2", "--route", "full,dense", "--out", str(tmp_path / "o")]) == 2
    assert "--route 'full,dense'" in capsys.readouterr().err
