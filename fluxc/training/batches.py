"""The data a run feeds: training batches (a pure function of step and rank), held-out examples, and the
thread that builds batches ahead of the step that needs them."""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fluxc.errors import ConfigError

from .config import RunConfig
from .data import Example, collate, end_of_turn_id, make_dataset, make_example


def per_process_batch(cfg: RunConfig, world: int) -> int:
    """Rows of the global batch (`data.batch_size`) each of `world` processes holds."""
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is the global batch and must split evenly over "
                          f"{world} processes; use a multiple of {world} (the same global batch on any number of "
                          f"processes trains the same routers)")
    return cfg.data.batch_size // world


def step_length(cfg: RunConfig, step: int) -> int:
    """The prompt length of every example of `step`: `data.lengths` in turn, or with `data.curriculum_steps` the
    shortest ones first, the longer ones joining as the curriculum advances."""
    lengths, ramp = cfg.data.lengths, cfg.data.curriculum_steps
    if not ramp or step >= ramp:
        return lengths[step % len(lengths)]
    allowed = sorted(lengths)[:1 + step * len(lengths) // ramp]
    return allowed[step % len(allowed)]


def training_example(cfg: RunConfig, tokenizer: Any, step: int, slot: int, rank: int = 0, world: int = 1) -> Example:
    """Example `slot` of process `rank`'s rows of the global batch at `step`: a pure function of its index in
    the global batch, so any number of processes sees the same examples; drawn from the "train" split (the eval
    split's text and numbers never occur)."""
    data = cfg.data
    index = step * data.batch_size + rank * per_process_batch(cfg, world) + slot
    task = data.tasks[index % len(data.tasks)]
    length = step_length(cfg, step)
    rng = random.Random(f"fluxc-train/{data.seed}/{index}")
    return make_example(task, tokenizer, length, rng, chat=data.chat, split="train")


def family_batches(cfg: RunConfig, tokenizer: Any, keys: list[str], per_key: int, rank: int = 0,
                   world: int = 1) -> list[dict[str, Any]]:
    """`per_key` batches of each target key in `keys` (its families of `data.tasks` in turn, `data.lengths` in
    turn), process `rank`'s rows, collated like `training_batch`: train-split examples drawn from a stream of
    their own, apart from the training batches."""
    rows = per_process_batch(cfg, world)
    out = []
    for key in keys:
        families = [t for t in cfg.data.tasks if cfg.target_key(t) == key]
        if not families:
            raise ConfigError(f"train.targets key {key!r} has no family in data.tasks={list(cfg.data.tasks)}")
        for i in range(per_key):
            length = cfg.data.lengths[i % len(cfg.data.lengths)]
            index = [i * cfg.data.batch_size + rank * rows + slot for slot in range(rows)]
            examples = [make_example(families[j % len(families)], tokenizer, length,
                                     random.Random(f"fluxc-layers/{cfg.data.seed}/{key}/{j}"), chat=cfg.data.chat,
                                     split="train") for j in index]
            batch = collate(examples, pad_id(tokenizer))
            batch["family"] = batch["task"]
            batch["task"] = [cfg.target_key(t) for t in batch["family"]]
            out.append(batch)
    return out


def pad_id(tokenizer: Any) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = end_of_turn_id(tokenizer)
    if pid is None:
        raise ConfigError("the tokenizer has neither a pad nor an end-of-turn token; give it a pad_token_id")
    return int(pid)


def training_batch(cfg: RunConfig, tokenizer: Any, step: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Process `rank`'s rows of the global batch of `step`, collated; ``task`` holds each example's target key,
    ``family`` its family."""
    examples = [training_example(cfg, tokenizer, step, i, rank, world) for i in range(per_process_batch(cfg, world))]
    batch = collate(examples, pad_id(tokenizer))
    batch["family"] = batch["task"]
    batch["task"] = [cfg.target_key(t) for t in batch["family"]]
    return batch


def heldout_examples(cfg: RunConfig, tokenizer: Any, n_per_task: int, lengths: tuple[int, ...] | None = None,
                     tasks: tuple[str, ...] | None = None) -> list[Example]:
    """Held-out examples: the "eval" split of the data generator (text from the corpus region training never
    reads, numbers from the set training never draws) with the eval seed."""
    return make_dataset(tokenizer, list(tasks or cfg.eval.tasks), n_per_task, list(lengths or cfg.eval.lengths),
                        seed=cfg.eval.seed, split="eval", chat=cfg.data.chat)


class BatchStream:
    """Batches `start`, `start + 1`, ... built by a background thread (at most `depth` ahead)."""

    def __init__(self, make: Callable[[int], dict[str, Any]], start: int, stop: int, depth: int = 3) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(make, start, stop), daemon=True,
                                        name="fluxc-batches")
        self._thread.start()

    def _work(self, make: Callable[[int], dict[str, Any]], start: int, stop: int) -> None:
        for step in range(start, stop):
            try:
                item: Any = make(step)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or isinstance(item, BaseException):
                return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
