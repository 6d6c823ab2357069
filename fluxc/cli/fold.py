"""`fluxc fold`: a router file with an operating point folded into its last bias (`fold_operating_point`)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("router", help="router checkpoint (fluxc's format)")
    parser.add_argument("--threshold", type=float, required=True,
                        help="the probability of full attention above which a layer runs full, e.g. from the "
                             "Pareto sweep of `fluxc eval --thresholds`")
    parser.add_argument("--out", required=True, help="the router file to write")
    parser.add_argument("--chosen-on", default="", help="what picked the threshold (recorded in the provenance)")


def run(args: argparse.Namespace) -> int:
    from fluxc.checkpoint import fold_operating_point

    fold_operating_point(args.router, args.out, args.threshold, args.chosen_on)
    print(f"wrote {args.out}: {args.router} at threshold {args.threshold} (now the default operating point)")
    return 0
