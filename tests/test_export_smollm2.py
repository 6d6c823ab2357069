"""fluxc.export on the real SmolLM2-135M-Instruct: one dynamic prefill program with a per-layer route baked in,
checked at two prompt lengths against the fluxc module (torch.export), in onnxruntime and as an AOTInductor package.

Marked slow as documentation only: `make test` runs it. One export serves the three checks.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

import fluxc
from fluxc.exporter.program import export_with_signature

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROMPTS = [["Attention lets every token of a sequence look at the tokens before it.",
            "Sparse attention keeps a few links: the first tokens and a local window."],
           ["Routers pick a branch per layer.", "Full or sparse?"]]
ROUTE = ["full" if layer % 3 == 0 else "sparse" for layer in range(30)]  # differs per layer
CONFIG = fluxc.FluxConfig(sink=4, window=8, block_exact=False, compiler="eager")


def _load():
    spec = importlib.util.spec_from_file_location("fluxc_examples_smollm2", EXAMPLES / "smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_smollm2(torch.float32)


def _encode(tokenizer, texts):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask, (enc.attention_mask.cumsum(-1) - 1).clamp_min(0)


def test_smollm2_prefill_exports_to_torch_export_onnx_and_aoti(tmp_path):
    model, tokenizer = _load()
    fm = fluxc.compile(model, config=CONFIG, route=ROUTE)
    batches = [_encode(tokenizer, texts) for texts in PROMPTS]
    assert batches[0][0].shape[1] != batches[1][0].shape[1] and (batches[0][1] == 0).any()  # lengths, padding
    ids, mask, pos = batches[0]
    program, sig = export_with_signature(fm, dict(input_ids=ids, attention_mask=mask, position_ids=pos))
    assert sig.num_layers == 30 and sig.route == tuple(r == "full" for r in ROUTE)
    path = tmp_path / "smollm2.onnx"
    fluxc.export_onnx(program, None, path, optimize=False)  # the ONNX optimizer takes about a minute here
    as_written = ort.SessionOptions()
    as_written.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the exported graph as is
    sessions = {"as-written": ort.InferenceSession(str(path), as_written), "optimized": ort.InferenceSession(str(path))}
    runner = torch._inductor.aoti_load_package(fluxc.export_aoti(program, tmp_path / "smollm2.pt2"))
    exact = fluxc.compile(copy.deepcopy(model).double(), config=CONFIG, route=ROUTE)  # fp64: the truth both approximate
    for ids, mask, pos in batches:
        reference = fluxc.compile(model, config=CONFIG, route=ROUTE)  # one static trace per length is quicker
        with torch.no_grad():
            want = reference(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            truth = exact(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            got = program.module()(ids, mask, pos)
        torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)
        assert got[-1].tolist() == [[r == "full" for r in ROUTE]] * ids.shape[0]
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
        onnx_logits = {name: torch.from_numpy(session.run(None, feed)[0]) for name, session in sessions.items()}
        real = mask.bool()  # padding rows: torch's SDPA gives 0 where ONNX's full branch averages; never read
        # the graph as exported, run op by op by onnxruntime: within 1e-4 of the fp32 module (measured 6.8e-5, 7.0e-5)
        torch.testing.assert_close(onnx_logits["as-written"][real], want[real], atol=1e-4, rtol=0)
        # with onnxruntime's default session (graph optimizations on; no single optimizer we disabled explains it) the
        # logits are 1.2e-4 from the fp32 module but 6.0e-5 and 5.0e-5 from the fp64 ones, closer than torch fp32
        # itself (7.0e-5, 8.9e-5; torch 2.13, onnxruntime 1.32, CPU): held to the fp64 truth, within 1e-4 and 2x torch's
        torch_error = (want[real].double() - truth[real]).abs().max().item()
        onnx_error = (onnx_logits["optimized"][real].double() - truth[real]).abs().max().item()
        assert onnx_error <= min(1e-4, 2 * torch_error), (onnx_error, torch_error)
        compiled = runner(ids, mask, pos)
        aoti_error = (compiled[0][real].double() - truth[real]).abs().max().item()  # measured 1.1e-4 and 8.3e-5
        assert aoti_error <= 2 * torch_error, (aoti_error, torch_error)
        torch.testing.assert_close(compiled[0][real], want[real], atol=2e-4, rtol=0)  # padding rows: never read
        assert compiled[-1].tolist() == got[-1].tolist()
