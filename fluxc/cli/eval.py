"""`fluxc eval`: per task family, full attention vs all-sparse vs the router on held-out examples
(see `fluxc.training.evaluate`); writes eval.json and eval_heatmap.png, and with --thresholds the Pareto view
(pareto.json, pareto.png)."""

from __future__ import annotations

import argparse

from fluxc.cli._common import add_config_arguments, overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--router", help="router checkpoint to evaluate (default: <run.out>/routers.safetensors)")
    parser.add_argument("--examples", type=int, help="eval.examples per family")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], help="eval.lengths, e.g. 2048,4096")
    parser.add_argument("--modes", type=lambda s: s.split(","), help="eval.modes, e.g. full,sparse,router")
    parser.add_argument("--threshold", type=float, help="eval.threshold: the router's operating point (0.5)")
    parser.add_argument("--thresholds", type=lambda s: [float(x) for x in s.split(",")],
                        help="eval.thresholds: sweep the operating point, e.g. 0.1,0.3,0.5,0.7,0.9 (pareto.json/.png)")
    parser.add_argument("--merge", nargs="+", metavar="EVAL_JSON",
                        help="join the eval.json files of one evaluation's shards (eval.shard=[i,n]) into <--out>/eval.json "
                             "instead of evaluating")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fluxc.training import evaluate, load_run_config

    if args.merge:
        return _merge(args.merge, args.out)
    extra = {"eval.examples": args.examples, "eval.lengths": args.lengths, "eval.modes": args.modes,
             "eval.threshold": args.threshold, "eval.thresholds": args.thresholds}
    cfg = load_run_config(args.config, overrides(args, extra))
    router = args.router
    if router is None and "router" in cfg.eval.modes:
        router = str(Path(cfg.run.out) / "routers.safetensors")
    evaluate(cfg, router)
    return 0


def _merge(paths: list[str], out: str | None) -> int:
    import json
    from pathlib import Path

    from fluxc.errors import ConfigError
    from fluxc.training.evaluation import merge_evaluations, write_evaluation

    if not out:
        raise ConfigError("fluxc eval --merge needs --out DIR: the folder of the merged eval.json")
    docs = []
    for path in paths:
        try:
            docs.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--merge {path}: not a readable eval.json ({exc})") from None
    result = merge_evaluations(docs)
    wrote = write_evaluation(result, Path(out))
    print(result["table"])
    print("criteria: " + json.dumps(result["criteria"]))
    print(f"merged {len(docs)} shard(s) ({'complete' if result['complete'] else 'INCOMPLETE'}); wrote "
          + ", ".join(str(w) for w in wrote))
    return 0

