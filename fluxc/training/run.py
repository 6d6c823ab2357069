"""`train`: a whole router-training run from a `RunConfig` (what `fluxc train` calls).

Loads the model, streams generated batches (a background thread; batch i depends only on i, so a resumed
run sees the batches it would have seen), runs `RouterTrainer` with a progress line, a JSONL log, periodic
held-out evaluation and atomic checkpoints with provenance, under ``torchrun`` (one process per GPU, or
gloo on CPU) or in one process. A time budget can stop training early (saved, and said so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fluxc.checkpoint import read_checkpoint
from fluxc.errors import ConfigError

from . import data as data_module
from .batches import BatchStream, family_batches, heldout_examples, pad_id, to_device, training_batch
from .config import RunConfig
from .data import collate
from .evaluation import evaluate
from .models import DTYPES, GGUF_SOURCES, gguf_path, load_model, resolve_device
from .runs import git_state, host_provenance, record_run, sha256_file
from .state_io import SUFFIX as STATE_SUFFIX
from .state_io import load_state, refuse_pickled, save_state
from .text_sources import text_corpus
from .trainer import RouterTrainer, lm_loss, mark_dynamic

log = logging.getLogger("fluxc")

ROUTERS = "routers.safetensors"
TRAIN_LOG = "train_log.jsonl"


# ------------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Processes:
    """Where this process sits in a (possibly one-process) data-parallel run."""

    rank: int
    world: int
    device: torch.device
    initialised_here: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_processes(device_spec: str, timeout_s: float = 600.0) -> Processes:
    """Join the process group that ``torchrun`` describes (RANK / WORLD_SIZE / LOCAL_RANK), if any. A collective
    that waits more than `timeout_s` (a process that died or hangs) raises instead of hanging the others."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local)
    if world <= 1:
        return Processes(0, 1, device, False)
    initialised = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
        initialised = True
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Processes(dist.get_rank(), dist.get_world_size(), device, initialised)


# ----------------------------------------------------------------------------------------- provenance


def model_provenance(cfg: RunConfig, model: torch.nn.Module) -> dict[str, Any]:
    info: dict[str, Any] = {"source": cfg.model.source, "class": type(model).__name__, "dtype": cfg.model.dtype,
                            "parameters": sum(p.numel() for p in model.parameters())}
    if cfg.model.source in GGUF_SOURCES:
        path = gguf_path(cfg.model.source, cfg.model.gguf or None)
        info.update(gguf=path.name, gguf_sha256=sha256_file(path), gguf_bytes=path.stat().st_size)
    return info


def data_provenance() -> dict[str, Any]:
    corpus = text_corpus()

    return {"generator": "fluxc.training.data", "corpus_paragraphs": len(corpus),
            "corpus_sha256": hashlib.sha256("\n".join(corpus).encode()).hexdigest(),
            "eval_fraction": data_module.EVAL_FRACTION, "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------- train


def _atomic_save(trainer: RouterTrainer, out: Path, provenance: dict[str, Any]) -> Path:
    """Write routers + optimiser state next to their final names, then move them in place."""
    final = out / ROUTERS
    tmp = out / f".{ROUTERS}.tmp"
    trainer.save(str(tmp), provenance)
    os.replace(f"{tmp}{STATE_SUFFIX}", f"{final}{STATE_SUFFIX}")
    os.replace(tmp, final)
    return final


def _resume(path: Path, model: torch.nn.Module, cfg: RunConfig, trainable: Callable[[str], bool] | None) -> RouterTrainer:
    ckpt = read_checkpoint(path)
    if ckpt.config.method_dict() != cfg.flux.method_dict():
        raise ConfigError(f"--resume: {path} was trained with flux {ckpt.config.method_dict()}, but the config asks "
                          f"for {cfg.flux.method_dict()}; use the same [flux] section or start a new run.out")
    refuse_pickled(path)
    state_step = load_state(f"{path}{STATE_SUFFIX}")["step"] if os.path.isfile(f"{path}{STATE_SUFFIX}") else None
    if state_step is not None and ckpt.provenance.get("step") != state_step:
        raise ConfigError(f"--resume: {path} is at step {ckpt.provenance.get('step')} but its state file at step "
                          f"{state_step} (an interrupted save); delete both to start over")
    return RouterTrainer.resume(str(path), model, cfg.train, trainable=trainable)


def _trainable(names: tuple[str, ...]) -> Callable[[str], bool] | None:
    if not names:
        return None
    wanted = set(names)
    return lambda name: bool(wanted.intersection(name.split(".")[:-1]))


class Progress:
    """A progress bar on a terminal (one line, redrawn), plain lines otherwise."""

    def __init__(self, total: int, echo: Callable[[str], None], every: int) -> None:
        self.total, self.echo, self.every = total, echo, every
        self.tty = echo is print and sys.stdout.isatty()

    def update(self, done: int, text: str) -> None:
        width = 20
        filled = round(width * done / max(1, self.total))
        line = f"[{'#' * filled}{'.' * (width - filled)}] {text}"
        if self.tty:
            sys.stdout.write("\r" + line[:250].ljust(120))
            sys.stdout.flush()
        elif done % self.every == 0 or done == self.total:
            self.echo(line)

    def close(self) -> None:
        if self.tty:
            sys.stdout.write("\n")


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def step_summary(stats: dict[str, Any], families: dict[str, float], total: int, s_per_step: float) -> str:
    """One progress line: loss, per-family sparsity of the batch, multipliers, speed."""
    fam = " ".join(f"{t}={v:.2f}" for t, v in sorted(families.items()))
    lam = " ".join(f"{t}={stats['lambda1'][t]:.3f}/{stats['lambda2'][t]:.3f}" for t in sorted(stats["lambda1"]))
    eta = (total - stats["step"]) * s_per_step
    distill = f" kl {stats['distill']:.4f}" if "distill" in stats else ""
    return (f"step {stats['step']}/{total} loss {stats['loss']:.4f} (lm {stats['lm']:.4f}{distill} "
            f"pen {stats['penalty']:+.4f}) "
            f"tau {stats['tau']:.3f} | SA {fam} | lambda1/2 {lam} | {s_per_step:.2f} s/step eta {_fmt_duration(eta)}")


def family_sparsity(trainer: RouterTrainer, families: list[str]) -> dict[str, float]:
    """Per family of the last batch: the fraction of layers its samples routed to SA."""
    sparse = 1.0 - trainer.recorder.samples().detach().float().mean(dim=1).cpu()  # (B,)
    return {f: float(sparse[[i for i, x in enumerate(families) if x == f]].mean()) for f in sorted(set(families))}


def quick_eval(trainer: RouterTrainer, batches: list[dict[str, Any]], device: torch.device) -> dict[str, dict[str, float]]:
    """Held-out loss on the answer tokens and the router's argmax SA fraction, per family, on the training graph.

    Runs with grad mode on (the graph traced for training serves; no backward is run) and leaves the RNG
    state as it found it, so evaluating does not change the training run."""

    out: dict[str, dict[str, float]] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for batch in batches:
            batch = to_device(batch, device)
            trainer.recorder.clear()
            trainer.set_router_tokens(batch)
            mark_dynamic(batch["input_ids"], batch["attention_mask"])
            result = trainer.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = (result.logits if hasattr(result, "logits") else result).detach()
            sparse = (trainer.recorder.logits().detach().argmax(dim=-1) == 0).float().mean(dim=1)  # (B,) argmax
            family = batch["family"][0]
            out[family] = {"loss": float(lm_loss(logits, batch["labels"], trainer.cfg.loss_average)),
                           "sa_fraction": float(sparse.mean())}
            del result, logits
    trainer.recorder.clear()
    return out


def preflight(trainer: RouterTrainer, batch: dict[str, Any], device: torch.device,
              echo: Callable[[str], None]) -> Callable[[], contextlib.AbstractContextManager]:
    """One forward + backward on a short batch, without an update. On CUDA, a failure inside the attention
    backward is retried with SDPA's math backend; if that works, the run uses it (said so)."""

    def attempt() -> None:

        trainer.recorder.clear()
        mark_dynamic(batch["input_ids"], batch["attention_mask"])
        out = trainer.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits if hasattr(out, "logits") else out
        loss = lm_loss(logits, batch["labels"]) + trainer.recorder.samples().sum() * 0.0
        loss.backward()
        for p in trainer.module.routers.parameters():
            p.grad = None
        for p in trainer.extra:
            p.grad = None
        trainer.recorder.clear()

    batch = to_device(batch, device)
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    try:
        with rng:  # the check draws Gumbel noise; the run (and a resumed run) must not see it
            attempt()
        return contextlib.nullcontext
    except (RuntimeError, NotImplementedError) as exc:
        if device.type != "cuda":
            raise
        from torch.nn.attention import SDPBackend, sdpa_kernel

        echo(f"preflight: forward+backward failed ({type(exc).__name__}: {str(exc)[:300]}); retrying with SDPA's "
             f"math backend")
        with sdpa_kernel([SDPBackend.MATH]), torch.random.fork_rng(devices=[device]):
            attempt()
        echo("preflight: the math backend works; the whole run uses it (slower attention)")
        return lambda: sdpa_kernel([SDPBackend.MATH])


class _Loop:
    """The training loop of `train`: steps, logging, the time budget, checkpoints and periodic evaluation."""

    def __init__(self, cfg: RunConfig, trainer: RouterTrainer, procs: Processes, out: Path, provenance: dict[str, Any],
                 probes: list[dict[str, Any]], echo: Callable[[str], None]) -> None:
        self.cfg, self.trainer, self.procs, self.out = cfg, trainer, procs, out
        self.provenance, self.probes, self.echo = provenance, probes, echo
        self.say = echo if procs.main else (lambda _text: None)
        self.step_times: list[float] = []
        self.stats: dict[str, Any] = {}
        self.saved_at = trainer.step_index
        self.start_step = trainer.step_index
        self.sdpa_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def run(self, stream: BatchStream) -> str | None:
        """Train until train.steps (or the budget, or an interrupt); returns why it stopped early, if it did."""
        mode = "a" if self.cfg.run.resume else "w"  # a new run starts a new log
        log_file = open(self.out / TRAIN_LOG, mode) if self.procs.main else None  # noqa: SIM115
        progress = Progress(self.trainer.cfg.steps, self.echo, self.cfg.run.log_every) if self.procs.main else None
        self.loop_start = time.perf_counter()
        try:
            while self.trainer.step_index < self.trainer.cfg.steps:
                stopped = self._step(stream, log_file, progress)
                if stopped:
                    return stopped
            return None
        except KeyboardInterrupt:  # e.g. `timeout --signal=INT`: keep what was trained
            return f"interrupted at step {self.trainer.step_index}"
        finally:
            stream.close()
            if progress is not None:
                progress.close()
            if log_file is not None:
                log_file.close()

    def _step(self, stream: BatchStream, log_file: Any, progress: Progress | None) -> str | None:
        trainer, procs, run = self.trainer, self.procs, self.cfg.run
        t = time.perf_counter()
        batch = next(stream)
        families = batch.pop("family")
        with self.sdpa_ctx():
            self.stats = trainer.step(to_device(batch, procs.device))
        if procs.device.type == "cuda":
            torch.cuda.synchronize(procs.device)
        self.step_times.append(time.perf_counter() - t)
        done = trainer.step_index
        fam = family_sparsity(trainer, families)
        recent = self.step_times[-10:]
        if log_file is not None and progress is not None:
            record = {**self.stats, "family_sparsity": fam, "seconds": self.step_times[-1],
                      "length": int(batch["input_ids"].shape[1])}
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            progress.update(done, step_summary(self.stats, fam, trainer.cfg.steps, sum(recent) / len(recent)))
        elapsed = time.perf_counter() - self.loop_start
        if run.time_budget_s and run.fit_steps_to_budget and done == self.start_step + run.warmup_steps:
            self._fit_budget(elapsed, progress)
        if run.time_budget_s and done < trainer.cfg.steps and _agree(int(elapsed > run.time_budget_s), procs):
            return f"time budget of {run.time_budget_s:.0f} s reached at step {done} of {trainer.cfg.steps}"
        if run.save_every and done % run.save_every == 0 and procs.main:
            _atomic_save(trainer, self.out, {**self.provenance, "train_seconds": elapsed})
            self.saved_at = done
        if run.eval_every and done % run.eval_every == 0:
            if procs.main and log_file is not None:
                result = quick_eval(trainer, self.probes, procs.device)
                line = " ".join(f"{f}: loss {r['loss']:.3f} SA {r['sa_fraction']:.2f}" for f, r in result.items())
                self.say(f"eval @ step {done} (held-out, argmax routes): {line}")
                log_file.write(json.dumps({"eval_step": done, **result}) + "\n")
                log_file.flush()
            if procs.world > 1:
                dist.barrier()
        return None

    def _fit_budget(self, elapsed: float, progress: Progress | None) -> None:
        """Lower train.steps to what the time budget holds at the speed of the steps after the first two (which
        trace the graph)."""
        timed = self.step_times[2:] or self.step_times
        per = sum(timed) / len(timed)
        steps = self.trainer.cfg.steps
        fits = _agree(max(self.trainer.step_index,
                          min(steps, self.trainer.step_index + int((self.cfg.run.time_budget_s - elapsed) / per))),
                      self.procs)
        if fits < steps:
            self.say(f"time budget {self.cfg.run.time_budget_s:.0f} s at {per:.2f} s/step: train.steps {steps} -> {fits}")
            self.trainer.cfg = dataclasses.replace(self.trainer.cfg, steps=fits)
            if progress is not None:
                progress.total = fits

    @property
    def seconds_per_step(self) -> float | None:
        timed = self.step_times[2:]
        return sum(timed) / len(timed) if timed else None


def train(cfg: RunConfig, *, model: torch.nn.Module | None = None, tokenizer: Any = None,
          echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train routers as `cfg` says; returns a summary (steps, checkpoint path, timings, last stats).

    Checkpoints (`<run.out>/routers.safetensors` and its ``.state.safetensors``) are written every `run.save_every`
    steps and at the end, so an interrupted run keeps its progress; `run.resume` continues from them."""
    t0 = time.perf_counter()
    out = Path(cfg.run.out)
    ckpt_path = out / ROUTERS
    if cfg.run.resume and not ckpt_path.is_file():
        raise ConfigError(f"run.resume=true but {ckpt_path} does not exist; drop --resume or fix run.out")
    if not cfg.run.resume and ckpt_path.exists():
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out "
                          f"(or delete it) to start a new one")
    procs = setup_processes(cfg.model.device, cfg.run.collective_timeout_s)
    timings: dict[str, float] = {}
    say = echo if procs.main else (lambda _text: None)
    try:
        if procs.main:
            out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.run.seed + procs.rank)  # per-rank Gumbel noise; routers come from rank 0
        if model is None or tokenizer is None:
            t = time.perf_counter()
            model, tokenizer = load_model(cfg.model.source, gguf=cfg.model.gguf, tokenizer=cfg.model.tokenizer,
                                          dtype=cfg.model.dtype, tiny_layers=cfg.model.tiny_layers, seed=cfg.model.seed)
            timings["load_model_s"] = time.perf_counter() - t
            say(f"model: {type(model).__name__} from {cfg.model.source!r} ({cfg.model.dtype}) in "
                f"{timings['load_model_s']:.1f} s")
        model = model.to(procs.device, DTYPES[cfg.model.dtype])
        t = time.perf_counter()
        provenance = {"run_config": cfg.to_dict(), "model": model_provenance(cfg, model), "data": data_provenance(),
                      "host": host_provenance(procs.device), "git": git_state(), "command": sys.argv,
                      "world_size": procs.world}
        timings["provenance_s"] = time.perf_counter() - t
        trainable = _trainable(cfg.trainable)
        if cfg.run.resume:
            trainer = _resume(ckpt_path, model, cfg, trainable)
            say(f"resumed from {ckpt_path} at step {trainer.step_index}")
        else:
            trainer = RouterTrainer(model, cfg.flux, cfg.train, trainable=trainable)
        if trainable is not None:
            if not trainer.extra:
                raise ConfigError(f"train.trainable={list(cfg.trainable)} matches no parameter of the model")
            say(f"trainable backbone tensors: {sum(p.numel() for p in trainer.extra)} values in {len(trainer.extra)} "
                f"tensors ({', '.join(cfg.trainable)})")
        steps = cfg.train.steps
        start = trainer.step_index
        if start >= steps and cfg.run.resume:
            say(f"nothing to do: the checkpoint is at step {start} of train.steps={steps}")
        probes: list[dict[str, Any]] = []
        if cfg.run.eval_every and procs.main:
            pid = pad_id(tokenizer)
            held = heldout_examples(cfg, tokenizer, cfg.run.eval_examples, cfg.data.lengths, cfg.data.tasks)
            for task in cfg.data.tasks:
                probe = collate([e for e in held if e.task == task], pid)
                probe["family"] = probe["task"]
                probes.append(probe)
        loop = _Loop(cfg, trainer, procs, out, provenance, probes, echo)
        if cfg.run.preflight and start < steps:
            t = time.perf_counter()
            short = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, lengths=(min(cfg.data.lengths[0], 512),), batch_size=min(2, cfg.data.batch_size)))
            loop.sdpa_ctx = preflight(trainer, training_batch(short, tokenizer, 0), procs.device, say)
            timings["preflight_s"] = time.perf_counter() - t
            say(f"preflight: forward+backward on a short batch passed in {timings['preflight_s']:.1f} s "
                f"(includes tracing the graph)")
        if cfg.train.supervise_batches and not cfg.run.resume:
            t = time.perf_counter()
            with loop.sdpa_ctx():
                data, source = supervision_data(cfg, trainer, tokenizer, procs, provenance)
            timings["supervise_inputs_s"] = time.perf_counter() - t
            say(f"route supervision inputs: {source} in {timings['supervise_inputs_s']:.1f} s")
            layer_choice = data.get("layer_choice") or {}
            trainer.full_layers = {k: list(c["layers"]) for k, c in layer_choice.items()}
            if layer_choice:
                provenance["layer_choice"] = layer_choice  # in the router file's header: which layers and why
            for key, c in layer_choice.items():
                gap = c["loss_sparse"] - c["loss_full"]
                closed = (f"{(c['loss_sparse'] - c['loss_chosen']) / gap:.0%} of the gap closed" if gap > 0
                          else "all-sparse is no worse than all-full here")
                say(f"layer choice for {key!r}: full attention in layers {c['layers']}, its loss all-sparse "
                    f"{c['loss_sparse']:.4f}, with them {c['loss_chosen']:.4f}, all-full {c['loss_full']:.4f} "
                    f"({closed})")
            t = time.perf_counter()
            fit = trainer.fit_routes(data["inputs"], data["want"], cfg.train.supervise_steps,
                                     calibrate=cfg.train.calibrate_batches > 0)
            timings["supervise_s"] = time.perf_counter() - t
            accuracy = fit["accuracy"]
            say(f"route supervision on {fit['examples']} examples in {timings['supervise_s']:.1f} s "
                f"({'with' if fit['calibration'] else 'without'} calibration on them): kept step {fit['step']}, on the "
                f"{fit['checked']} checked examples loss {fit['loss']:.3f}, accuracy per router min {min(accuracy):.2f} "
                f"median {sorted(accuracy)[len(accuracy) // 2]:.2f}")
        elif cfg.train.calibrate_batches and not cfg.run.resume and start < steps:
            t = time.perf_counter()
            calibration = [to_device(training_batch(cfg, tokenizer, i, procs.rank, procs.world), procs.device)
                           for i in range(cfg.train.calibrate_batches)]
            with torch.random.fork_rng(devices=[procs.device] if procs.device.type == "cuda" else []), loop.sdpa_ctx():
                summary = trainer.calibrate(calibration)  # Gumbel draws of this pass must not shift the run's RNG
            timings["calibrate_s"] = time.perf_counter() - t
            offsets = ", ".join(f"{m:.2f}/{s:.2f}" for m, s in summary[:4])
            say(f"calibrated the router inputs on {len(calibration)} batches in {timings['calibrate_s']:.1f} s "
                f"(routers {len(summary)}, the first {min(4, len(summary))}: mean |offset| / mean std {offsets})")
        stream = BatchStream(lambda s: training_batch(cfg, tokenizer, s, procs.rank, procs.world), start, steps)
        t = time.perf_counter()
        stopped = loop.run(stream)
        timings["train_loop_s"] = time.perf_counter() - t
        if stopped:
            say(f"stopped early: {stopped}")
        if procs.main and (trainer.step_index != loop.saved_at or not ckpt_path.exists()):
            _atomic_save(trainer, out, {**provenance, "train_seconds": timings["train_loop_s"],
                                        **({"stopped": stopped} if stopped else {})})
        if procs.world > 1:
            dist.barrier()
        summary = {"steps": trainer.step_index, "planned_steps": cfg.train.steps, "checkpoint": str(ckpt_path),
                   **({"full_layers": trainer.full_layers} if trainer.full_layers else {}),
                   "stopped": stopped, "last": loop.stats, "timings": timings, "s_per_step": loop.seconds_per_step}
        say(f"trained {trainer.step_index} steps in {_fmt_duration(timings['train_loop_s'])}; routers: {ckpt_path}")
        if cfg.run.final_eval and procs.main and not (stopped or "").startswith("interrupted"):
            del trainer, loop
            if procs.device.type == "cuda":
                torch.cuda.empty_cache()
            t = time.perf_counter()
            summary["eval"] = evaluate(cfg, str(ckpt_path), model=model, tokenizer=tokenizer, echo=echo,
                                       device=procs.device)["summary"]
            timings["eval_s"] = time.perf_counter() - t
        if procs.world > 1:
            dist.barrier()
        timings["total_s"] = time.perf_counter() - t0
        say("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    finally:
        if procs.initialised_here and dist.is_initialized():
            dist.destroy_process_group()
    if procs.main:  # after the process group is gone: no file or subprocess work between the last collectives
        record_run(cfg, "train", checkpoint=str(ckpt_path), checkpoint_sha256=sha256_file(ckpt_path),
                   curves=str(out / TRAIN_LOG), from_step=start, git=provenance["git"],
                   **{k: v for k, v in summary.items() if k not in ("checkpoint", "timings")}, timings=timings)
    return summary


def supervision_key(cfg: RunConfig, model_info: dict[str, Any]) -> dict[str, Any]:
    """What route supervision's inputs depend on: the data, the families' target routes, the SA method and the
    model's weights (not the dtype or device they were computed in)."""
    weights = {k: model_info.get(k) for k in ("source", "class", "parameters", "gguf_sha256")}
    return {"data": cfg.to_dict()["data"], "supervise_batches": cfg.train.supervise_batches,
            "layer_choice": [list(cfg.train.layer_choice), cfg.train.layer_choice_batches, cfg.train.layer_choice_rounds],
            "targets": dict(sorted(cfg.train.targets.items())), "train_seed": cfg.train.seed,
            "router_on_prompt": cfg.train.router_on_prompt, "flux": cfg.flux.method_dict(), "model": weights}


def _as_json(value: Any) -> str:
    """Canonical JSON: a stored key and a fresh one compare equal whatever tuple/list types each came back with."""
    return json.dumps(value, sort_keys=True, default=str)


def supervision_data(cfg: RunConfig, trainer: RouterTrainer, tokenizer: Any, procs: Processes,
                     provenance: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Route supervision's inputs (`RouterTrainer.supervision_inputs`) and where they came from: computed from
    `train.supervise_batches` batches, or read from `run.supervise_inputs` when that file exists and was recorded
    for the same data, targets, method and model (written there after computing them otherwise)."""
    path = Path(cfg.run.supervise_inputs) if cfg.run.supervise_inputs else None
    if path is not None and procs.world > 1:
        raise ConfigError(f"run.supervise_inputs={str(path)!r} works with one process (this run has {procs.world}); "
                          f"record the inputs with one process or leave run.supervise_inputs empty")
    key = supervision_key(cfg, provenance["model"])
    if path is not None and path.is_file():
        stored = load_state(path)
        if _as_json(stored.get("key")) != _as_json(key):
            differ = sorted(k for k in key if _as_json(key[k]) != _as_json((stored.get("key") or {}).get(k)))
            raise ConfigError(f"run.supervise_inputs={str(path)!r} was recorded for other {differ} than this run's; "
                              f"use the config it was recorded with ({stored.get('recorded', {})}) or another path")
        if trainer.module.routers is None:  # the routers exist once the graph has been traced: one short forward
            short = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, lengths=(min(cfg.data.lengths[0], 512),), batch_size=1))
            trainer.router_inputs([to_device(training_batch(short, tokenizer, 0), procs.device)])
        return stored, f"read {len(stored['want'])} examples from {path}"
    choice: dict[str, Any] = {}
    if cfg.train.layer_choice:
        choice = trainer.choose_full_layers([to_device(b, procs.device) for b in family_batches(
            cfg, tokenizer, list(cfg.train.layer_choice), cfg.train.layer_choice_batches, procs.rank, procs.world)])
    batches = [to_device(training_batch(cfg, tokenizer, i, procs.rank, procs.world), procs.device)
               for i in range(cfg.train.supervise_batches)]
    data = {**trainer.supervision_inputs(batches), "layer_choice": choice}
    if path is None:
        return data, f"{len(data['want'])} examples run with their target routes"
    path.parent.mkdir(parents=True, exist_ok=True)
    recorded = {"dtype": cfg.model.dtype, "device": str(procs.device), "git": provenance["git"].get("commit"),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    save_state(path, {**data, "key": key, "recorded": recorded})
    return data, f"{len(data['want'])} examples run with their target routes, written to {path}"


def _agree(value: int, procs: Processes) -> int:
    """Rank 0's `value` on every process (decisions that must not differ between ranks)."""
    if procs.world <= 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=procs.device if procs.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return int(t.item())


__all__ = ["Processes", "setup_processes", "train"]
