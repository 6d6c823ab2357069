"""Arguments and config handling shared by `fluxc train` and `fluxc eval`."""

from __future__ import annotations

import argparse
from typing import Any

from fluxc.errors import ConfigError

MODEL_FLAGS = ("smollm2", "model", "gguf", "device", "dtype")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML or JSON run config, or the name of a shipped one (e.g. smollm2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (JSON-parsed), e.g. --set train.steps=100; repeatable")
    model = parser.add_argument_group("model")
    model.add_argument("--smollm2", action="store_true", help="model.source=smollm2 (SmolLM2-135M-Instruct GGUF)")
    model.add_argument("--model", help="model.source: 'smollm2', 'gemma3', 'tiny', or a Hugging Face config folder/config.json")
    model.add_argument("--gguf", help="model.gguf: the GGUF file of a GGUF model (default: $FLUXC_SMOLLM2_GGUF or "
                       "$FLUXC_GEMMA3_GGUF, then the model's packages)")
    model.add_argument("--device", help="model.device: auto, cpu, cuda, cuda:N")
    model.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="model.dtype")
    parser.add_argument("--out", help="run.out: folder of checkpoints, logs and eval results")


def overrides(args: argparse.Namespace, extra: dict[str, Any]) -> list[tuple[list[str], Any]]:
    """--set values, then the dedicated flags (which win), as (path, value) pairs."""
    from fluxc.training.config import parse_override

    pairs = [parse_override(text) for text in args.overrides]
    flags: dict[str, Any] = {"model.source": "smollm2" if args.smollm2 else args.model, "model.gguf": args.gguf,
                             "model.device": args.device, "model.dtype": args.dtype, "run.out": args.out, **extra}
    if args.smollm2 and args.model and args.model != "smollm2":
        raise ConfigError(f"--smollm2 and --model {args.model!r} disagree; pass one of them")
    pairs += [(key.split("."), value) for key, value in flags.items() if value is not None]
    return pairs
