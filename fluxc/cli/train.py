"""`fluxc train`: train per-layer routers on the rewritten graph (see `fluxc.training.train`).

Runs in one process (GPU or CPU) or under ``torchrun`` (one process per GPU, or gloo on CPU)."""

from __future__ import annotations

import argparse

from fluxc.cli._common import add_config_arguments, overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, help="train.steps")
    parser.add_argument("--batch-size", type=int, help="data.batch_size (per process)")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], help="data.lengths, e.g. 1024,2048")
    parser.add_argument("--resume", action="store_true", default=None, help="continue from <out>/routers.safetensors")
    parser.add_argument("--grad-checkpointing", action="store_true", default=None, help="train.grad_checkpointing")
    parser.add_argument("--eval-every", type=int, help="run.eval_every (0: off)")
    parser.add_argument("--save-every", type=int, help="run.save_every")
    parser.add_argument("--time-budget", type=float, help="run.time_budget_s: stop (and save) after this many seconds")
    parser.add_argument("--final-eval", action="store_true", default=None,
                        help="run.final_eval: evaluate the trained routers ([eval] section) at the end")


def run(args: argparse.Namespace) -> int:
    from fluxc.training import load_run_config, train

    extra = {"train.steps": args.steps, "data.batch_size": args.batch_size, "data.lengths": args.lengths,
             "run.resume": args.resume, "train.grad_checkpointing": args.grad_checkpointing,
             "run.eval_every": args.eval_every, "run.save_every": args.save_every,
             "run.time_budget_s": args.time_budget, "run.final_eval": args.final_eval}
    cfg = load_run_config(args.config, overrides(args, extra))
    train(cfg)
    return 0

