"""`fluxc` command line: `fluxc train`, `fluxc eval`, `fluxc export`, `fluxc fold`.

Each subcommand lives in its own module (`fluxc.cli.<name>`) with `add_arguments(parser)` and
`run(args) -> int`; a subcommand imports what it needs (torch, training, export) when it runs, so that
`fluxc --help` stays quick. `python -m fluxc.cli <subcommand> ...` runs the same (torchrun -m fluxc.cli).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fluxc.errors import FluxError

COMMANDS = {
    "train": "train a router on the rewritten graph (fluxc.training)",
    "eval": "evaluate full / all-sparse / routed attention per task family",
    "export": "export the rewritten graph (torch.export, AOTInductor, ONNX)",
    "fold": "fold an operating point (threshold) into a router file's last bias",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxc", description="Flux Attention as a torch.compile pass")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"fluxc.cli.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"fluxc.cli.{args.command}")
    try:
        return int(module.run(args) or 0)
    except FluxError as exc:  # a clear one-line message, not a traceback
        print(f"fluxc {args.command}: error: {exc}", file=sys.stderr)
        return 2

