"""Exported programs on the GPU: torch.export programs of a Flux model, prefill latency side by side.

Model: a Llama-shaped `LlamaForCausalLM` from a config (hidden 2048, 16 query / 8 KV heads, head dim 128, MLP
5632, vocabulary 32000, 4 layers), bf16, random N(0, 0.02) weights, built on the GPU. One dynamic program per
variant (exported at 256 tokens, routers in the program), run at each length (B=1) as `program.module()` (the
program's ATen graph, op by op) and, with `--aoti`, as AOTInductor packages of the full and sparse programs.
Routers come from a checkpoint whose last layer is zero with a bias that picks every layer's route, so the
router MLP runs in full and the decisions are known (checked on the programs' routes output):
  program-full           routers choosing full,   structural masks (the Triton kernels, every sequence full)
  program-sparse         routers choosing sparse, structural masks (the Triton kernels, sink + window)
  program-sparse-masked  routers choosing sparse, structural_masks=False: the model's (T, T) mask kept and a
                         per-layer torch.cond whose routed branch runs the reference (masked SDPA): what every
                         exported program did before
  fluxc-eager-sparse     the sparse-routed `fluxc.compile(..., compiler="eager")` module: the same graph in Python
  aoti-full / aoti-sparse  program-full / program-sparse compiled by `fluxc.export_aoti` and loaded with
                         `torch._inductor.aoti_load_package` (Inductor's kernels around fluxc's ops)
  hf-sdpa                the untouched model, transformers' SDPA (FlashAttention, is_causal), eager
Median of `--reps` timed calls after two warm-ups (synchronised wall time, benchmarks/harness.py; provenance in
"meta"). Each variant's last-token logits
are compared with program-full's, the two sparse programs with each other, and each package with its program.

    python benchmarks/export_gpu.py --out results.json          # GPU
    python benchmarks/export_gpu.py --smoke                     # tiny fp32 model on CPU: the logic only
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import tempfile
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import fluxc

import harness
from models import forced_routers

log = logging.getLogger("export_gpu")


def build_model(smoke: bool, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, vocab_size=256) if smoke else dict(
        hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=8,
        num_hidden_layers=4, vocab_size=32000)
    config = LlamaConfig(**shape, max_position_embeddings=65536, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--lengths", default=None, help="comma-separated prompt lengths (default 8192,32768)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--aoti", action="store_true", help="also time AOTInductor packages of the full and "
                        "sparse programs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    lengths = [int(x) for x in (args.lengths or ("64,96" if args.smoke else "8192,32768")).split(",")]
    config = fluxc.FluxConfig(sink=4, window=16, block=4, compiler="eager") if args.smoke else fluxc.FluxConfig(
        compiler="eager")
    model = build_model(args.smoke, device, dtype)
    vocab = model.config.vocab_size
    example = torch.randint(0, vocab, (1, 32 if args.smoke else 256), device=device)
    tmp = tempfile.mkdtemp(prefix="fluxc-export-bench-")
    results: dict = {
        "meta": harness.provenance(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        "model": {k: getattr(model.config, k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                        "num_hidden_layers", "vocab_size")},
        "dtype": str(dtype), "batch": 1, "reps": args.reps,
        "flux": {"sink": config.sink, "window": config.window, "block": config.block},
        "export_s": {}, "prefill_ms": {}, "max_abs_logit_diff_vs_program_full": {},
        "transformers": transformers.__version__,
    }
    if args.aoti:
        results["aoti_preload"] = os.environ.get("FLUXC_PRELOADED")  # scripts/run_with_preload.py (README, Export)
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:  # a CPU smoke run
        pass

    layers = model.config.num_hidden_layers
    modules = {want: fluxc.compile(model, forced_routers(model, config, [want] * layers,
                                                         os.path.join(tmp, f"{want}.safetensors"),
                                                         made_by="benchmarks/export_gpu.py"), config=config)
               for want in ("full", "sparse")}
    runners = {}
    # an attention_mask input: HF builds its causal + padding mask (read as structure), as a deployment feeds it
    example_inputs = dict(input_ids=example, attention_mask=torch.ones_like(example))
    programs = {}
    for name, want, structural in (("program-full", "full", True), ("program-sparse", "sparse", True),
                                   ("program-sparse-masked", "sparse", False)):
        start = time.perf_counter()
        programs[name] = fluxc.export(modules[want], example_inputs, structural_masks=structural)
        runners[name] = programs[name].module()
        results["export_s"][name] = round(time.perf_counter() - start, 1)
        log.info("%s: exported in %.0f s", name, results["export_s"][name])
    for want in ("full", "sparse") if args.aoti else ():
        start = time.perf_counter()
        path = fluxc.export_aoti(programs[f"program-{want}"], os.path.join(tmp, f"{want}.pt2"))
        runners[f"aoti-{want}"] = torch._inductor.aoti_load_package(path)
        results["export_s"][f"aoti-{want}"] = round(time.perf_counter() - start, 1)  # AOTInductor compile + load
        log.info("aoti-%s: compiled and loaded in %.0f s", want, results["export_s"][f"aoti-{want}"])

    def run_of(name: str, ids: torch.Tensor):
        """A call of variant `name` on `ids` returning (logits, routes; None for the modules)."""
        mask = torch.ones_like(ids)
        if name in runners:
            def run():
                out = runners[name](ids, mask)
                return out[0], out[-1]
            return run
        if name == "fluxc-eager-sparse":
            return lambda: (modules["sparse"](input_ids=ids, attention_mask=mask).logits, None)
        return lambda: (model(input_ids=ids).logits, None)

    names = [*runners, "fluxc-eager-sparse", "hf-sdpa"]
    for length in lengths:
        ids = torch.randint(0, vocab, (1, length), device=device)
        row, last = {}, {}
        with torch.no_grad():
            for name in names:
                row[name], (logits, routes) = harness.median_wall_ms(run_of(name, ids), reps=args.reps, warm=2,
                                                                     cuda=device == "cuda")
                last[name] = logits[:, -1].float()
                del logits
                if routes is not None and not bool((routes == name.endswith("-full")).all()):
                    raise RuntimeError(f"{name}: routes {routes.tolist()} are not the forced ones")  # as built
                if device == "cuda":
                    torch.cuda.empty_cache()
        results["prefill_ms"][str(length)] = {k: round(v, 3) for k, v in row.items()}
        results["max_abs_logit_diff_vs_program_full"][str(length)] = {
            k: round((v - last["program-full"]).abs().max().item(), 4) for k, v in last.items()}
        for want in ("full", "sparse") if args.aoti else ():  # each package against the program it was compiled from
            gap = (last[f"aoti-{want}"] - last[f"program-{want}"]).abs().max().item()
            results.setdefault("aoti_vs_program_max_abs", {}).setdefault(str(length), {})[want] = round(gap, 4)
        sparse_gap = (last["program-sparse"] - last["program-sparse-masked"]).abs().max().item()
        results.setdefault("sparse_kernels_vs_masked_reference_max_abs", {})[str(length)] = round(sparse_gap, 4)
        log.info("T=%d: %s | sparse/full %.2f, masked/sparse %.2f, sparse kernels vs masked reference %.3g",
                 length, ", ".join(f"{k} {v:.2f} ms" for k, v in row.items()),
                 row["program-sparse"] / row["program-full"], row["program-sparse-masked"] / row["program-sparse"],
                 sparse_gap)
        if args.out:  # after every length: a run cut short keeps what it measured
            harness.write_json(args.out, results)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
