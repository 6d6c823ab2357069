"""The configuration of a `fluxc train` / `fluxc eval` run: sections of a TOML or JSON file, overridable by flags.

Sections: ``model`` (`ModelSpec`), ``flux`` (`fluxc.FluxConfig` fields), ``train`` (`TrainConfig` fields plus
``trainable``), ``data`` (`DataSpec`), ``run`` (`RunSpec`), ``eval`` (`EvalSpec`). Unknown sections and keys are
errors. A named config (``--config smollm2``) is read from the configs shipped in ``fluxc.training/configs``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxc.config import FluxConfig
from fluxc.errors import ConfigError

from .data import TASKS
from .trainer import TrainConfig

log = logging.getLogger("fluxc")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from (see `fluxc.training.models.load_model`)."""

    source: str = "smollm2"  # "smollm2" | "gemma3" | "tiny" | a Hugging Face config folder or config.json
    gguf: str = ""  # the GGUF file of a GGUF source; empty: $FLUXC_SMOLLM2_GGUF / $FLUXC_GEMMA3_GGUF, then its packages
    tokenizer: str = "auto"  # "auto" (the model's own; bytes for random models) | "bytes" | a tokenizer folder
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # "auto" (cuda when available, per local rank under torchrun) | "cpu" | "cuda" | "cuda:N"
    tiny_layers: int = 2
    seed: int = 0


@dataclass(frozen=True)
class DataSpec:
    """Generated training data (`fluxc.training.data`, split "train")."""

    tasks: tuple[str, ...] = tuple(TASKS)
    lengths: tuple[int, ...] = (1024, 2048)  # one per step in turn; every example of a batch has that length
    batch_size: int = 8  # the global batch: every process holds batch_size / world of its rows
    seed: int = 0
    chat: bool = True  # use the tokenizer's chat template when it has one
    # a curriculum over lengths: over the first curriculum_steps steps the lengths come in from the shortest (step s
    # draws from the shortest 1 + s * len(lengths) // curriculum_steps); 0: every length from the start
    curriculum_steps: int = 0


@dataclass(frozen=True)
class RunSpec:
    """Output, logging, checkpoints, periodic evaluation and the time budget of a training run."""

    out: str = "runs/fluxc-train"
    resume: bool = False  # continue from <out>/routers.safetensors (+ .state.safetensors)
    log_every: int = 1
    save_every: int = 50  # 0: only at the end
    eval_every: int = 0  # 0: no periodic evaluation
    eval_examples: int = 4  # held-out examples per family in a periodic evaluation
    time_budget_s: float = 0.0  # stop training (and save) once this much training time has passed; 0: none
    fit_steps_to_budget: bool = False  # after `warmup_steps`, lower train.steps to what fits the budget
    warmup_steps: int = 5
    preflight: bool = True  # one forward+backward on a short batch before training (checks the set-up)
    final_eval: bool = False  # run the `eval` section on the trained routers at the end (same process)
    seed: int = 0  # torch seed: router initialisation (the Gumbel noise follows train.seed)
    collective_timeout_s: float = 600.0  # several processes: a collective waiting longer fails the run, no hang
    index: str = "auto"  # every train / eval appends config, commit, results: "auto" = index.jsonl beside run.out; "": off
    # route supervision's pooled router inputs (a few KB per example): read from this file when it exists, so routers
    # are refitted without forward passes (on a CPU, from inputs a GPU recorded); written there when it does not
    supervise_inputs: str = ""


@dataclass(frozen=True)
class EvalSpec:
    """Held-out evaluation (`fluxc eval`): data from the "eval" split with its own seed."""

    tasks: tuple[str, ...] = tuple(TASKS)
    examples: int = 30  # per family
    lengths: tuple[int, ...] = (2048,)
    seed: int = 1
    batch_size: int = 16
    max_new_tokens: int = 12
    modes: tuple[str, ...] = ("full", "sparse", "router")
    threshold: float = 0.5  # the router's operating point in mode "router" (fluxc.compile's threshold)
    thresholds: tuple[float, ...] = ()  # a sweep of operating points: the Pareto view (pareto.json / .png)
    # (i, n): evaluate only examples i, i + n, i + 2n, ... of the held-out set, so n runs (e.g. n device calls) share
    # one evaluation; `fluxc eval --merge` joins their eval.json files into the one the whole set gives
    shard: tuple[int, int] = (0, 1)
    capable_threshold: float = 0.5  # a family counts as one the model can do when full attention scores this
    out: str = ""  # folder of eval.json and the heatmap; empty: run.out


MODES = ("full", "sparse", "router")
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class RunConfig:
    """Everything a training or evaluation run needs, validated."""

    model: ModelSpec = field(default_factory=ModelSpec)
    flux: FluxConfig = field(default_factory=lambda: FluxConfig(compiler="eager"))
    train: TrainConfig = field(default_factory=TrainConfig)
    trainable: tuple[str, ...] = ()  # backbone parameter names whose module is one of these (e.g. q_proj)
    data: DataSpec = field(default_factory=DataSpec)
    run: RunSpec = field(default_factory=RunSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able sections (the inverse of `from_dict`)."""
        train = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v)
                 for k, v in dataclasses.asdict(self.train).items()}
        return {"model": dataclasses.asdict(self.model), "flux": self.flux.to_dict(),
                "train": {**train, "trainable": list(self.trainable)},
                "data": _plain(dataclasses.asdict(self.data)), "run": dataclasses.asdict(self.run),
                "eval": _plain(dataclasses.asdict(self.eval))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        unknown = set(data) - {"model", "flux", "train", "data", "run", "eval"}
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; known: model, flux, train, data, run, eval")
        flux = dict(data.get("flux", {}))
        flux.setdefault("compiler", "eager")  # training runs eagerly; eval on CPU/GPU too unless asked
        train = dict(data.get("train", {}))
        trainable = tuple(train.pop("trainable", ()))
        unknown = set(train) - _TRAIN_FIELDS
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)} in [train]; known: {sorted(_TRAIN_FIELDS | {'trainable'})}")
        if "betas" in train:
            train["betas"] = tuple(train["betas"])
        if "layer_choice" in train:
            train["layer_choice"] = tuple(train["layer_choice"])
        cfg = cls(model=_build(ModelSpec, data.get("model", {}), "model"), flux=FluxConfig.from_dict(flux),
                  train=TrainConfig(**train), trainable=trainable,
                  data=_build(DataSpec, data.get("data", {}), "data"), run=_build(RunSpec, data.get("run", {}), "run"),
                  eval=_build(EvalSpec, data.get("eval", {}), "eval"))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise `ConfigError` for values that cannot work together."""
        for section, tasks in (("data", self.data.tasks), ("eval", self.eval.tasks)):
            bad = [t for t in tasks if t not in TASKS]
            if bad or not tasks:
                raise ConfigError(f"{section}.tasks={list(tasks)} has unknown or no families; choose from {list(TASKS)}")
        for task in self.data.tasks:
            if task not in self.train.targets and TASKS[task] not in self.train.targets:
                raise ConfigError(f"data.tasks includes {task!r} but train.targets has no target for it (or for its "
                                  f"kind {TASKS[task]!r}); targets: {sorted(self.train.targets)}")
        unused = set(self.train.targets) - set(self.data.tasks) - {TASKS[t] for t in self.data.tasks}
        if unused:
            raise ConfigError(f"train.targets has {sorted(unused)}, which no family of data.tasks uses; remove them")
        if isinstance(self.data.curriculum_steps, bool) or not isinstance(self.data.curriculum_steps, int) \
                or self.data.curriculum_steps < 0:
            raise ConfigError(f"data.curriculum_steps={self.data.curriculum_steps!r} must be an int >= 0 (0: no "
                              f"curriculum)")
        for section, lengths in (("data", self.data.lengths), ("eval", self.eval.lengths)):
            if not lengths or any(not isinstance(n, int) or n < 64 for n in lengths):
                raise ConfigError(f"{section}.lengths={list(lengths)} must be token counts >= 64")
        positive = {"data.batch_size": self.data.batch_size, "eval.batch_size": self.eval.batch_size,
                    "eval.examples": self.eval.examples, "eval.max_new_tokens": self.eval.max_new_tokens,
                    "run.log_every": self.run.log_every, "run.eval_examples": self.run.eval_examples}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an int >= 1")
        for name in ("save_every", "eval_every", "warmup_steps"):
            value = getattr(self.run, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"run.{name}={value!r} must be an int >= 0")
        if self.run.time_budget_s < 0:
            raise ConfigError(f"run.time_budget_s={self.run.time_budget_s} must be >= 0 (0: no budget)")
        if self.run.fit_steps_to_budget and not self.run.time_budget_s:
            raise ConfigError("run.fit_steps_to_budget=true needs run.time_budget_s > 0")
        shard = self.eval.shard
        if len(shard) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard) \
                or not 0 <= shard[0] < shard[1]:
            raise ConfigError(f"eval.shard={list(shard)} must be [i, n] with 0 <= i < n (e.g. [0, 3] for the first of "
                              f"three runs)")
        bad_modes = [m for m in self.eval.modes if m not in MODES]
        if bad_modes or not self.eval.modes:
            raise ConfigError(f"eval.modes={list(self.eval.modes)} must be a non-empty subset of {list(MODES)}")
        for name, points in (("eval.threshold", (self.eval.threshold,)), ("eval.thresholds", self.eval.thresholds)):
            if any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0 for t in points):
                shown = self.eval.threshold if name == "eval.threshold" else list(points)
                raise ConfigError(f"{name}={shown!r}: operating points are probabilities strictly between 0 and 1 "
                                  f"(e.g. eval.thresholds=[0.1, 0.3, 0.5, 0.7, 0.9])")
        if self.eval.thresholds and "router" not in self.eval.modes:
            raise ConfigError(f"eval.thresholds={list(self.eval.thresholds)} sweeps the router, but eval.modes="
                              f"{list(self.eval.modes)} has no 'router'; add it or drop the sweep")
        if self.flux.compiler != "eager":
            log.info("fluxc: flux.compiler=%r is used for evaluation; training always runs the graph eagerly",
                     self.flux.compiler)

    def target_key(self, task: str) -> str:
        """The key of train.targets that a family's examples count under (the family, else its kind)."""
        return task if task in self.train.targets else TASKS[task]


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table of keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in [{section}]; known: {sorted(fields)}")
    out = {}
    for key, value in values.items():
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{section}.{key}={value!r} must be a list")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{section}.{key}={value!r} must be true or false")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{section}.{key}={value!r} must be a number")
            value = float(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{section}.{key}={value!r} must be an integer")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{section}.{key}={value!r} must be a string")
        out[key] = value
    return cls(**out)


def read_config_file(path: str) -> dict[str, Any]:
    """Sections of a TOML (``.toml``) or JSON (``.json``) file, or of a shipped config by name ("smollm2")."""
    file = Path(path)
    if not file.exists() and not file.suffix and (CONFIG_DIR / f"{path}.toml").is_file():
        file = CONFIG_DIR / f"{path}.toml"
    if not file.is_file():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        raise ConfigError(f"config={path!r} is not a file nor a shipped config ({shipped})")
    if file.suffix == ".json":
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config {str(file)!r} is not valid JSON: {exc}") from exc
    elif file.suffix == ".toml":
        data = _load_toml(file)
    else:
        raise ConfigError(f"config={str(file)!r}: use a .toml or .json file")
    if not isinstance(data, dict):
        raise ConfigError(f"config {str(file)!r} must hold sections (a table), got {type(data).__name__}")
    return data


def _load_toml(file: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(f"config {str(file)!r}: reading TOML needs Python >= 3.11 or the tomli package; "
                              f"or write the config as JSON") from None
    try:
        return tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {str(file)!r} is not valid TOML: {exc}") from exc


def parse_override(text: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], value); the value is read as JSON when it parses
    (numbers, true/false, lists, objects), else taken as a string."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: write section.key=value, e.g. --set train.steps=100")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """A copy of `data` with each (path, value) set."""
    out = json.loads(json.dumps(data))
    for parts, value in overrides:
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set {'.'.join(parts)}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_run_config(path: str | None, overrides: list[tuple[list[str], Any]] = ()) -> RunConfig:
    """The run configuration of a file (or the defaults), with overrides applied, validated."""
    data = read_config_file(path) if path else {}
    return RunConfig.from_dict(apply_overrides(data, list(overrides)))
