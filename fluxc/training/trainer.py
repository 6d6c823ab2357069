"""Router training on the rewritten graph, as Flux Attention trains its routers: every layer runs both branches mixed by a hard
straight-through Gumbel sample of its router; loss = LM cross-entropy + per-task Lagrangian sparsity
penalty, whose multipliers are trained by gradient ascent. The backbone stays frozen."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fluxc.api import FluxModule, compile_for_training, model_fingerprint
from fluxc.checkpoint import Fingerprint, read_checkpoint, save_routers
from fluxc.config import FluxConfig
from fluxc.errors import ConfigError, CorruptCheckpointError
from fluxc.ops.router import RouteRecorder, capture_router_inputs, router_mlp
from fluxc.training.checkpointing import compile_for_training_checkpointed
from fluxc.training.data import IGNORE
from fluxc.training.state_io import SUFFIX as STATE_SUFFIX
from fluxc.training.state_io import load_state, refuse_pickled, save_state
from fluxc.version import __version__


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of router training (defaults: the released recipe)."""

    steps: int = 300
    router_lr: float = 5e-4
    lambda_lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    tau_start: float = 1.5
    tau_end: float = 1.0
    tau_anneal_frac: float = 0.6
    targets: dict[str, float] = field(default_factory=lambda: {"retrieval": 0.45, "holistic": 1.0})
    extra_lr: float = 1e-5  # learning rate of backbone parameters made trainable (e.g. q/k/v)
    grad_checkpointing: bool = False  # recompute each layer's activations in backward (long sequences)
    loss_average: str = "token"  # "token": mean over all label tokens; "example": per example, then over the batch
    router_on_prompt: bool = True  # routers pool the prompt only (labels == -100), as at inference
    # batches of a calibration pass that standardises each router's input (mean/std folded into its first layer)
    calibrate_batches: int = 0
    # route supervision before the Lagrangian phase: batches run with their families' target routes, and
    # supervise_steps fitting steps of every router to its target on the pooled inputs those routes produce; 0: off
    supervise_batches: int = 0
    supervise_steps: int = 300
    # target keys (families) with a middle target whose full layers are measured rather than drawn: each runs
    # full attention in the (1 - target) x layers whose full attention alone (every other layer sparse) lowers its
    # loss most on `layer_choice_batches` batches of its examples (`choose_full_layers`); a middle target not
    # listed draws its full layers at random per example, and its routers learn a probability, not a decision
    layer_choice: tuple[str, ...] = ()
    layer_choice_batches: int = 4
    # greedy rounds of the choice: each adds its share of the layers that lower the loss most given the layers
    # already chosen (layers interact: alone, most barely matter), at one forward per remaining layer and round
    layer_choice_rounds: int = 1
    seed: int = 0  # the Gumbel noise: a function of (seed, step, example in the global batch)
    # weight of a distillation term: KL(untouched model || routed model) of the next-token distributions at the
    # label tokens, so routes keep what full attention would say and not only the labels' tokens; 0: off
    distill: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 0 or (self.steps == 0 and not self.supervise_batches):
            raise ConfigError(f"TrainConfig.steps={self.steps} must be >= 1 (0 only with supervise_batches: route "
                              f"supervision alone)")
        if self.supervise_batches < 0 or self.supervise_steps < 1:
            raise ConfigError(f"TrainConfig.supervise_batches={self.supervise_batches} must be >= 0 (0: off) and "
                              f"supervise_steps={self.supervise_steps} >= 1")
        if self.layer_choice_rounds < 1:
            raise ConfigError(f"TrainConfig.layer_choice_rounds={self.layer_choice_rounds} must be >= 1 (1: rank the "
                              f"layers once)")
        if self.layer_choice_batches < 1:
            raise ConfigError(f"TrainConfig.layer_choice_batches={self.layer_choice_batches} must be >= 1 (batches "
                              f"per family of train.layer_choice)")
        for key in self.layer_choice:
            if not 0.0 < self.targets.get(key, -1.0) < 1.0:
                raise ConfigError(f"TrainConfig.layer_choice names {key!r}, whose target is "
                                  f"{self.targets.get(key, 'missing')}; list only train.targets keys with a target "
                                  f"strictly between 0 and 1 (a share of layers to choose)")
        if self.calibrate_batches < 0:
            raise ConfigError(f"TrainConfig.calibrate_batches={self.calibrate_batches} must be >= 0 (0: no calibration)")
        if not (isinstance(self.distill, (int, float)) and self.distill >= 0.0):
            raise ConfigError(f"TrainConfig.distill={self.distill!r} must be a weight >= 0 (0: no distillation)")
        if self.loss_average not in ("token", "example"):
            raise ConfigError(f"TrainConfig.loss_average={self.loss_average!r}: use 'token' or 'example'")
        for task, target in self.targets.items():
            if not 0.0 <= target <= 1.0:
                raise ConfigError(f"TrainConfig.targets[{task!r}]={target} must be a sparsity in [0, 1]")


def temperature(step: int, cfg: TrainConfig) -> float:
    """Cosine from tau_start to tau_end over the first tau_anneal_frac of the steps, then tau_end."""
    span = max(1, round(cfg.steps * cfg.tau_anneal_frac))
    if step >= span:
        return cfg.tau_end
    return cfg.tau_end + 0.5 * (cfg.tau_start - cfg.tau_end) * (1 + math.cos(math.pi * step / span))


class SparsityLagrangian(nn.Module):
    """mean over the task classes in a batch of lambda1_t * |s_t - t| + lambda2_t * (s_t - t)^2, with s_t the
    mean sparsity of that class's samples. The multipliers are maximised (gradient ascent)."""

    def __init__(self, targets: dict[str, float]) -> None:
        super().__init__()
        self.tasks = sorted(targets)
        self.register_buffer("targets", torch.tensor([targets[t] for t in self.tasks]), persistent=False)
        self.lambda1 = nn.Parameter(torch.zeros(len(self.tasks)))
        self.lambda2 = nn.Parameter(torch.zeros(len(self.tasks)))

    def forward(self, sparsity: torch.Tensor, task_of_sample: Sequence[str]) -> torch.Tensor:
        """The penalty of the global batch: with several processes the per-class means are over every process's
        samples (its value is the same on all of them; each one's gradient reaches its own samples)."""
        unknown = set(task_of_sample) - set(self.tasks)
        if unknown:
            raise ConfigError(f"task class(es) {sorted(unknown)} have no sparsity target; targets: {self.tasks}")
        rows = torch.zeros(len(self.tasks), len(task_of_sample), dtype=sparsity.dtype, device=sparsity.device)
        for j, t in enumerate(task_of_sample):
            rows[self.tasks.index(t), j] = 1.0
        sums, counts = rows @ sparsity, rows.sum(dim=1)  # (C,) per class: local sum of sparsity, local count
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            totals = torch.stack([sums.detach(), counts])
            dist.all_reduce(totals)
            sums = sums + (totals[0] - sums.detach())  # the global sum's value, the local samples' gradient
            counts = totals[1]
        present = counts > 0
        gap = sums[present] / counts[present] - self.targets.to(sums.device)[present]
        terms = self.lambda1[present] * gap.abs() + self.lambda2[present] * gap.square()
        return terms.mean()


def mark_dynamic(*tensors: torch.Tensor, dims: tuple[int, ...] = (0, 1)) -> None:
    """Let Dynamo trace these dims (batch, length) as symbols from the first call: one graph serves every shape
    (otherwise the first shape is traced static and the second traced again as dynamic). Calls that pass a
    KV cache mark the length only: a symbolic batch on the inputs next to the cache's static one would give
    the graph two batch sizes."""
    for t in tensors:
        for dim in dims:
            if dim < t.dim():
                torch._dynamo.maybe_mark_dynamic(t, dim)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T-1) next-token cross-entropy at the label tokens (0 elsewhere) and (B,) label tokens per example."""
    target = labels[:, 1:]  # (B, T-1)
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE,
                                reduction="none").view(target.shape)  # (B, T-1); one float copy of the logits
    return per_token, (target != IGNORE).sum(dim=1)


def lm_terms(logits: torch.Tensor, labels: torch.Tensor, average: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """(total, count) of the LM loss: summed token cross-entropy and label tokens ("token"), or summed per-example
    means and examples with labels ("example"); the loss is total / count, over one process or all of them."""
    per_token, counts = token_nll(logits, labels)  # (B, T-1), (B,)
    if average == "token":
        return per_token.sum(), counts.sum().to(per_token.dtype)
    per_example = per_token.sum(dim=1) / counts.clamp_min(1)  # (B,)
    return per_example[counts > 0].sum(), (counts > 0).sum().to(per_token.dtype)


def distill_terms(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, count) of KL(teacher || student) between next-token distributions at the label tokens: logits and
    teacher (B, T, V), labels (B, T) with -100 where nothing is predicted; the term is total / count."""
    at = labels[:, 1:] != IGNORE  # (B, T-1) positions whose next token is a label
    student = logits[:, :-1][at].float().log_softmax(dim=-1)  # (N, V)
    target = teacher[:, :-1][at].float().log_softmax(dim=-1)  # (N, V)
    per_token = (target.exp() * (target - student)).sum(dim=-1)  # (N,)
    return per_token.sum(), at.sum().to(per_token.dtype)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, average: str = "token") -> torch.Tensor:
    """Next-token cross-entropy; labels -100 are ignored. ``average="example"`` takes each example's mean over its
    label tokens, then the mean over examples (a 64-token target weighs as much as a 5-token answer)."""
    total, count = lm_terms(logits, labels, average)
    return total / count


class RouterTrainer:
    """Trains the routers of `model` on its own rewritten graph.

    `trainable(name)` may make backbone parameters trainable too (the released recipe allows q/k/v);
    everything else is frozen and left bit-identical.
    """

    def __init__(self, model: nn.Module, flux_config: FluxConfig, train_config: TrainConfig | None = None, *,
                 routers: nn.ModuleList | None = None, trainable: Callable[[str], bool] | None = None) -> None:
        self.cfg = train_config or TrainConfig()
        self.flux_config = flux_config
        self.extra = [p for n, p in model.named_parameters() if trainable is not None and trainable(n)]
        for name, p in model.named_parameters():
            p.requires_grad_(trainable is not None and trainable(name))
        self.recorder = RouteRecorder(temperature(0, self.cfg))
        if self.cfg.grad_checkpointing:
            self.module: FluxModule = compile_for_training_checkpointed(model, flux_config, self.recorder,
                                                                        routers=routers)
        else:
            self.module = compile_for_training(model, flux_config, self.recorder, routers=routers)
        self.penalty = SparsityLagrangian(self.cfg.targets)
        self.lambda_opt = torch.optim.AdamW(self.penalty.parameters(), lr=self.cfg.lambda_lr, betas=self.cfg.betas,
                                            weight_decay=0.0, maximize=True)
        self.router_opt: torch.optim.Optimizer | None = None
        self.step_index = 0
        self.full_layers: dict[str, list[int]] = {}  # target key -> the layers route supervision runs full

    @staticmethod
    def _world() -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def _trained(self) -> list[nn.Parameter]:
        return [*self.module.routers.parameters(), *self.extra, *self.penalty.parameters()]

    def _optimizer(self) -> torch.optim.Optimizer:
        if self.router_opt is None:  # routers exist once the graph has been traced
            if self._world() > 1:  # every rank starts from rank 0's routers and multipliers
                for p in self._trained():
                    dist.broadcast(p.data, src=0)
            groups: list[dict[str, Any]] = [{"params": list(self.module.routers.parameters()), "lr": self.cfg.router_lr}]
            if self.extra:
                groups.append({"params": self.extra, "lr": self.cfg.extra_lr})
            self.router_opt = torch.optim.AdamW(groups, betas=self.cfg.betas, weight_decay=self.cfg.weight_decay)
        return self.router_opt

    def set_router_tokens(self, batch: dict[str, Any]) -> None:
        """Routers pool this batch's prompt tokens (labels == -100) with `router_on_prompt`; after `recorder.clear()`."""
        self.recorder.router_tokens = (batch["labels"] == IGNORE) if self.cfg.router_on_prompt else None

    @torch.no_grad()
    def router_inputs(self, batches: list[dict[str, Any]], forced: list[torch.Tensor] | None = None
                      ) -> list[torch.Tensor]:
        """Each router's pooled inputs over `batches`: one (N, D) float32 tensor per router. `forced[i]` (B, R)
        0/1: the routes batch i runs with (1 = full); None: Gumbel samples of the current routers."""
        found_per_batch: list[list[torch.Tensor]] = []
        for i, batch in enumerate(batches):
            self.recorder.clear()
            self.set_router_tokens(batch)
            self.recorder.forced = forced[i] if forced is not None else None
            with capture_router_inputs() as found:
                self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            found_per_batch.append(found)
        self.recorder.clear()
        return [torch.cat([found[r] for found in found_per_batch]) for r in range(len(self.module.routers))]

    @torch.no_grad()
    def calibrate(self, batches: list[dict[str, Any]], inputs: list[torch.Tensor] | None = None
                  ) -> list[tuple[float, float]]:
        """Standardise each router's input: run `batches` (or take their `inputs`, from `router_inputs`), then
        fold the per-dimension mean and std of every layer's pooled input into its first linear layer
        (W <- W / std, b <- b - W mean / std), so a fresh router sees unit-scale differences between prompts
        instead of one large shared offset. The checkpoint format and the inference op do not change. Returns
        (mean |offset|, mean std) per layer."""
        inputs = self.router_inputs(batches) if inputs is None else inputs
        summary = []
        for x, router in zip(inputs, self.module.routers):  # x (N, D) pooled inputs of this layer
            mean, std = x.mean(dim=0), x.std(dim=0)
            std = std.clamp_min(1e-3 * float(std.mean()) + 1e-12)
            first = router.feature[0]
            first.weight.div_(std.to(first.weight.dtype))
            first.bias.sub_(first.weight @ mean.to(first.weight.dtype))
            summary.append((float(mean.abs().mean()), float(std.mean())))
        return summary

    def target_routes(self, batch: dict[str, Any], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R) probability of full attention each example's target asks of each layer and (B, R) 0/1 routes
        drawn from it, a function of (train.seed, `index`, example): a family aimed at full attention runs full,
        one aimed at sparse runs sparse, one in between its `full_layers` full (when chosen) or a random mix."""
        unknown = sorted({t for t in batch["task"] if t not in self.cfg.targets})
        if unknown:
            raise ConfigError(f"route supervision: no train.targets entry for {unknown}; targets: "
                              f"{sorted(self.cfg.targets)}")
        columns = self._route_columns()
        full = torch.tensor([1.0 - self.cfg.targets[t] for t in batch["task"]])[:, None].repeat(1, columns)  # (B, R)
        for row, task in enumerate(batch["task"]):
            if task in self.full_layers:
                full[row] = 0.0
                full[row, self.full_layers[task]] = 1.0
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + 500_009 + index)
        draws = torch.rand(len(full), columns, generator=g)  # (B, R)
        return full, (draws < full).float()

    @torch.no_grad()
    def forced_losses(self, batch: dict[str, Any], routes: torch.Tensor) -> torch.Tensor:
        """(B,) each example's mean loss over its label tokens with the routes `routes` (B, R) 0/1 forced."""
        self.recorder.clear()
        self.set_router_tokens(batch)
        self.recorder.forced = routes.to(batch["input_ids"].device)
        try:
            out = self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            self.recorder.clear()
        per_token, counts = token_nll(out.logits if hasattr(out, "logits") else out, batch["labels"])
        return (per_token.sum(dim=1) / counts.clamp_min(1)).cpu()

    @torch.no_grad()
    def layer_gains(self, batches: list[dict[str, Any]], chosen: dict[str, list[int]] | None = None
                    ) -> dict[str, torch.Tensor]:
        """Per target key of `batches`: (R,) mean drop of its examples' loss when that layer runs full attention
        besides the key's `chosen` layers (none: every other layer sparse); 0 for the chosen layers themselves. One
        forward per layer not chosen by any key, and one without it; averaged over all processes' examples."""
        columns = self._route_columns()
        chosen = chosen or {}
        keys = sorted({t for b in batches for t in b["task"]})
        sums, counts = torch.zeros(len(keys), columns, dtype=torch.float64), torch.zeros(len(keys), dtype=torch.float64)
        for batch in batches:
            base = torch.zeros(len(batch["task"]), columns)  # (B, R) each example's chosen layers full
            for row, task in enumerate(batch["task"]):
                base[row, chosen.get(task, [])] = 1.0
            before = self.forced_losses(batch, base)  # (B,)
            gains = torch.zeros(len(batch["task"]), columns)  # (B, R)
            for layer in range(columns):
                if not bool(base[:, layer].all()):
                    with_layer = base.clone()
                    with_layer[:, layer] = 1.0
                    gains[:, layer] = (before - self.forced_losses(batch, with_layer)) * (1.0 - base[:, layer])
            for row, task in enumerate(batch["task"]):
                sums[keys.index(task)] += gains[row].double()
                counts[keys.index(task)] += 1
        if self._world() > 1:  # every rank holds the same keys (the same families in its rows)
            device = next(self.module.routers.parameters()).device
            both = torch.cat([sums, counts[:, None]], dim=1).to(device)
            dist.all_reduce(both)
            sums, counts = both[:, :-1].cpu(), both[:, -1].cpu()
        return {k: (sums[i] / counts[i].clamp_min(1)).float() for i, k in enumerate(keys)}

    @torch.no_grad()
    def choose_full_layers(self, batches: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Set `full_layers` of every target key of `batches` listed in train.layer_choice: its floor((1 - target)
        x R + 1/2) layers, taken in `layer_choice_rounds` greedy rounds of largest `layer_gains` given the layers
        taken before. Returns per such key the layers, every round's gains and the mean loss of its examples (this
        process's) all-sparse, with the chosen layers full, and all-full."""
        columns = self._route_columns()
        keys = sorted({t for b in batches for t in b["task"]} & set(self.cfg.layer_choice))
        wanted = {k: math.floor((1.0 - self.cfg.targets[k]) * columns + 0.5) for k in keys}
        chosen: dict[str, list[int]] = {k: [] for k in keys}
        rounds: dict[str, list[list[float]]] = {k: [] for k in keys}
        for done in range(self.cfg.layer_choice_rounds):
            gains = self.layer_gains(batches, chosen)
            for key in keys:
                take = math.ceil((wanted[key] - len(chosen[key])) / (self.cfg.layer_choice_rounds - done))
                order = [i for i in gains[key].argsort(descending=True).tolist() if i not in chosen[key]]
                chosen[key] += order[:take]
                rounds[key].append([round(g, 5) for g in gains[key].tolist()])
        report: dict[str, dict[str, Any]] = {}
        for key in keys:
            self.full_layers[key] = sorted(chosen[key])
            report[key] = {"layers": self.full_layers[key], "gains": rounds[key]}
        every = list(range(columns))
        for name, full_of in (("loss_sparse", lambda t: []), ("loss_chosen", lambda t: self.full_layers.get(t, [])),
                              ("loss_full", lambda t: every)):
            losses: dict[str, list[float]] = {}
            for batch in batches:
                routes = torch.zeros(len(batch["task"]), columns)  # (B, R)
                for row, task in enumerate(batch["task"]):
                    routes[row, full_of(task)] = 1.0
                for task, loss in zip(batch["task"], self.forced_losses(batch, routes).tolist()):
                    losses.setdefault(task, []).append(loss)
            for key in report:
                report[key][name] = sum(losses[key]) / len(losses[key])
        return report

    def supervision_inputs(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """Route supervision's data: run `batches` with their target routes (`target_routes`) and keep every
        router's pooled inputs. Returns {"inputs": R x (N, D) float32, "want": (N, R) target probability of full
        attention per layer, "tasks": N family names}; `fit_routes` fits the routers to it (a file can hold it
        between)."""
        device = batches[0]["input_ids"].device
        drawn = [self.target_routes(b, i) for i, b in enumerate(batches)]
        inputs = self.router_inputs(batches, [routes.to(device) for _, routes in drawn])  # R x (N, D)
        want = torch.cat([full for full, _ in drawn]).to(device)  # (N, R)
        return {"inputs": inputs, "want": want, "tasks": [t for b in batches for t in b["task"]]}

    def supervise(self, batches: list[dict[str, Any]], steps: int, calibrate: bool = False) -> dict[str, Any]:
        """Route supervision: `supervision_inputs(batches)`, then `fit_routes` on them."""
        data = self.supervision_inputs(batches)
        return self.fit_routes(data["inputs"], data["want"], steps, calibrate)

    def fit_routes(self, inputs: list[torch.Tensor], want: torch.Tensor, steps: int, calibrate: bool = False
                   ) -> dict[str, Any]:
        """Fit every router to its layer's target probability of full attention `want` (N, R), or (N,) for every
        layer alike, on its pooled inputs
        `inputs[r]` (N, D) (binary cross-entropy on logit_full - logit_sparse, up to `steps` full-batch AdamW steps
        at train.router_lr on four fifths of the examples; the step with the lowest loss on the other fifth is
        kept). A warm start for the Lagrangian phase: the routers begin context-aware instead of at the sparsity
        prior. `calibrate`: first standardise the routers' inputs (`calibrate`) on the same pooled inputs. Returns
        the kept step, its loss and accuracy per router on the checked fifth (examples with a one-sided target)."""
        self._optimizer()  # with several processes: every rank starts from rank 0's routers
        if len(inputs) != len(self.module.routers):
            raise ConfigError(f"route supervision has inputs for {len(inputs)} routers; the model has "
                              f"{len(self.module.routers)}")
        device = next(self.module.routers.parameters()).device
        inputs, want = [x.to(device, torch.float32) for x in inputs], want.to(device, torch.float32)
        want = want[:, None].expand(-1, len(inputs)) if want.dim() == 1 else want[:, :len(inputs)]  # (N, R)
        calibration = self.calibrate([], inputs) if calibrate else None
        # every fifth example checks the fit: the routers keep the step with the lowest loss on them
        check = torch.arange(want.shape[0], device=device) % 5 == 4
        params = list(self.module.routers.parameters())
        opt = torch.optim.AdamW(params, lr=self.cfg.router_lr, betas=self.cfg.betas,
                                weight_decay=self.cfg.weight_decay)

        def losses() -> tuple[torch.Tensor, torch.Tensor]:
            margins = torch.stack([self._margin(r, x) for r, x in zip(self.module.routers, inputs)])  # (R, N)
            each = F.binary_cross_entropy_with_logits(margins, want.T, reduction="none").mean(0)  # (N,)
            return each[~check].mean(), each[check].mean().detach()

        best = (float("inf"), -1, [p.detach().clone() for p in params])
        for step in range(steps + 1):
            opt.zero_grad(set_to_none=True)
            fit, held = losses()
            if self._world() > 1:
                dist.all_reduce(held)
                held /= self._world()
            if float(held) < best[0]:
                best = (float(held), step, [p.detach().clone() for p in params])
            if step == steps:
                break
            fit.backward()
            self._average_grads(params)  # every rank fits its rows; averaged gradients keep the routers identical
            opt.step()
        with torch.no_grad():
            for p, kept in zip(params, best[2]):
                p.copy_(kept)
            accuracy = []
            for r, x, aim in zip(self.module.routers, inputs, want.T):  # aim (N,): this layer's targets
                sided = (aim != 0.5) & check
                accuracy.append(float(((self._margin(r, x) > 0) == (aim > 0.5))[sided].float().mean())
                                if sided.any() else float("nan"))
        return {"examples": int(want.shape[0]), "checked": int(check.sum()), "loss": best[0], "step": best[1],
                "accuracy": accuracy, "calibration": calibration}

    def _model_layers(self) -> int | None:
        """The model's layer count from its (text) config, or None for a model without one."""
        text = getattr(getattr(self.module.model, "config", None), "get_text_config", lambda: None)()
        layers = getattr(text, "num_hidden_layers", None)
        return None if layers is None else int(layers)

    def _average_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Data parallel: average the gradients of `params` over the processes (nothing with one)."""
        world = self._world()
        if world > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world

    def _route_columns(self) -> int:
        """Routers, or before the first trace (routers not built yet) the model's layer count, which bounds them."""
        if self.module.routers is not None:
            return len(self.module.routers)
        layers = self._model_layers()
        if layers is None:
            raise ConfigError("route supervision needs the model's layer count (config.num_hidden_layers) or a traced "
                              "model; run one forward first")
        return layers

    @staticmethod
    def _margin(router: nn.Module, x: torch.Tensor) -> torch.Tensor:
        logits = router_mlp(x, router.weights())  # (N, 2)
        return logits[:, 1] - logits[:, 0]

    def _noise(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """(B, L, 2) uniform draws of this step's Gumbel samples: rows of the global batch's draws, which depend on
        (seed, step) alone, so a run on any number of processes samples each example alike. None for a model
        without a layer count (torch's generator then)."""
        layers = self._model_layers()
        if layers is None:
            return None
        world = self._world()
        rank = dist.get_rank() if world > 1 else 0
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step_index)
        draws = torch.rand(batch_size * world, layers, 2, generator=g)  # every process holds B rows
        return draws[rank * batch_size:(rank + 1) * batch_size].to(device)

    @staticmethod
    def _global_mean(total: torch.Tensor, count: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(term to differentiate, its value) of total / count over the global batch: with several processes the
        averaged gradients then equal the global batch's (world x this process's share)."""
        if world == 1:
            mean = total / count
            return mean, mean.detach()
        sums = torch.stack([total.detach(), count])
        dist.all_reduce(sums)
        return total * world / sums[1], sums[0] / sums[1]

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One update. `batch`: input_ids, attention_mask, labels (B, T) and task (list of task classes). With
        several processes, each holds B rows of the global batch and the loss is the global batch's."""
        self.recorder.tau.fill_(temperature(self.step_index, self.cfg))
        self.recorder.clear()
        self.set_router_tokens(batch)
        self.recorder.noise = self._noise(batch["input_ids"].shape[0], batch["input_ids"].device)
        mark_dynamic(batch["input_ids"], batch["attention_mask"])
        out = self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits if hasattr(out, "logits") else out
        world = self._world()
        lm, lm_value = self._global_mean(*lm_terms(logits, batch["labels"], self.cfg.loss_average), world)
        distill = distill_value = None
        if self.cfg.distill:
            with torch.no_grad():  # the teacher: the untouched model (every layer full attention), not traced
                teacher = self.module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            teacher_logits = teacher.logits if hasattr(teacher, "logits") else teacher
            distill, distill_value = self._global_mean(*distill_terms(logits, teacher_logits, batch["labels"]), world)
            lm = lm + self.cfg.distill * distill
        sparsity = 1.0 - self.recorder.samples().mean(dim=1)  # (B,) fraction of layers routed sparse
        if world > 1:  # the routers' share of the global penalty, scaled like the LM term; the multipliers' not
            sparsity = sparsity * world - (sparsity * (world - 1)).detach()
        penalty = self.penalty(sparsity, batch["task"])
        loss = lm + penalty
        opt = self._optimizer()
        opt.zero_grad(set_to_none=True)
        self.lambda_opt.zero_grad(set_to_none=True)
        loss.backward()
        self._average_grads(self._trained())
        opt.step()
        self.lambda_opt.step()
        self.step_index += 1
        per_task = {t: float(sparsity.detach()[[i for i, x in enumerate(batch["task"]) if x == t]].mean())
                    for t in sorted(set(batch["task"]))}
        distilled = self.cfg.distill * float(distill_value) if distill_value is not None else 0.0
        return {"step": self.step_index, "loss": float(lm_value.detach() + penalty.detach()) + distilled,
                "lm": float(lm_value.detach()), "penalty": float(penalty.detach()),
                **({"distill": float(distill_value)} if distill_value is not None else {}),
                "tau": float(self.recorder.tau), "sparsity": per_task,
                "lambda1": dict(zip(self.penalty.tasks, self.penalty.lambda1.detach().tolist())),
                "lambda2": dict(zip(self.penalty.tasks, self.penalty.lambda2.detach().tolist()))}

    # --- checkpoints -------------------------------------------------------------------------------
    def save(self, path: str, provenance: dict[str, Any] | None = None) -> None:
        """Routers in fluxc's format (with provenance) plus `<path>.state.safetensors` to resume training."""
        model = self.module.model
        first = self.module.routers[0]
        fp = model_fingerprint(model) or Fingerprint(type(model).__name__, len(self.module.routers), -1, -1,
                                                     first.head_dim)
        info = {"fluxc_version": __version__, "torch": torch.__version__, "python": platform.python_version(),
                "step": self.step_index, "train_config": {k: (dict(v) if isinstance(v, dict) else v)
                                                          for k, v in self.cfg.__dict__.items()},
                "world_size": self._world(), **(provenance or {})}
        save_routers(path, self.module.routers, self.flux_config, fp, info)
        save_state(path + STATE_SUFFIX, {
            "step": self.step_index, "router_opt": self._optimizer().state_dict(),
            "lambda_opt": self.lambda_opt.state_dict(), "penalty": self.penalty.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None})

    @classmethod
    def resume(cls, path: str, model: nn.Module, train_config: TrainConfig | None = None, *,
               trainable: Callable[[str], bool] | None = None) -> RouterTrainer:
        """A trainer continuing from `save(path)`: same routers, optimiser states, multipliers, step and RNG."""
        ckpt = read_checkpoint(path)
        routers = ckpt.load_routers(next(model.parameters()).device)
        trainer = cls(model, ckpt.config, train_config, routers=routers, trainable=trainable)
        refuse_pickled(path)
        if not os.path.isfile(path + STATE_SUFFIX):
            raise ConfigError(f"{path}{STATE_SUFFIX} is missing: the router file alone cannot resume training")
        state = load_state(path + STATE_SUFFIX)
        try:
            trainer.step_index = int(state["step"])
            trainer.penalty.load_state_dict(state["penalty"])
            trainer.lambda_opt.load_state_dict(state["lambda_opt"])
            trainer._optimizer().load_state_dict(state["router_opt"])
            torch.set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CorruptCheckpointError(f"{path}{STATE_SUFFIX} does not hold this run's training state "
                                         f"({type(exc).__name__}: {exc}); resume from the run that wrote it or start "
                                         f"over") from None
        cuda_rng = state.get("cuda_rng")
        if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)  # Gumbel noise on GPUs comes from their generators
        return trainer

